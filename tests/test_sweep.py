"""The learning-rate sweep: its rates checked before any pass."""

import pytest

import fprobe
from fprobe.model import passes
from helpers import no_pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-4])
def test_sweep_refuses_a_non_finite_or_negative_rate_before_any_pass(fresh_gpt2, fresh_batches, monkeypatch, bad):
    E, U = fresh_batches
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    monkeypatch.setattr(passes, "forward", no_pass)
    with pytest.raises(ValueError, match="finite and >= 0"):  # was: nan/inf → an error about importance weights
        res.sweep([1e-4, bad])  # after a forward pass; −1e-4: evaluated as if a step at a negative rate existed


@pytest.mark.parametrize("lrs", [[], [0.0], [0.0, 0.0]])
def test_a_sweep_without_a_positive_rate_is_refused(fresh_gpt2, fresh_batches, lrs):
    E, U = fresh_batches
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=1e-5))
    with pytest.raises(ValueError, match="at least one learning rate > 0"):  # was: a sweep whose plot raised
        res.sweep(lrs)  # matplotlib's "cannot be log-scaled"
