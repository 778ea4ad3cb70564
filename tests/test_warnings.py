"""fprobe's warnings point at the caller's own line, however deep inside fprobe they were raised."""

import pytest

import fprobe


def test_a_low_ess_warning_from_a_sweep_points_at_the_callers_line(fresh_gpt2, fresh_batches):
    E, U = fresh_batches
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    with pytest.warns(fprobe.LowESSWarning) as caught:
        res.sweep([10.0])  # 1e5 × the step: the weights degenerate
    assert [w.filename for w in caught] == [__file__]


def test_a_decomposition_warning_points_at_the_callers_line(fresh_gpt2, fresh_batches, monkeypatch):
    from fprobe.entropy import decompose

    E, U = fresh_batches
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    monkeypatch.setattr(decompose, "RESIDUAL_WARNING", -1.0)  # every residual warns
    with pytest.warns(fprobe.DecompositionWarning) as caught:
        res.contributions()
    assert [w.filename for w in caught] == [__file__]  # was fprobe/probe.py
