"""ΔH_true, δH₁, δH₂ and the sweep on a tiny float64 GPT-2 after a real AdamW step."""

import dataclasses
import re
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fprobe
from fprobe.model import passes
from fprobe import tree
from helpers import make_batch, no_pass, plain_entropy, sequence_log_probs


@pytest.fixture(scope="module")
def setup(model_dir):
    policy = fprobe.Policy.from_pretrained(model_dir("gpt2"), dtype=torch.float64)
    E = make_batch(n=10, width=12, seed=11, with_advantages=False)
    U = make_batch(n=8, width=12, seed=12)
    return policy, E, U


def adamw_probe(setup, lr, **kw):
    policy, E, U = setup
    return fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=1e-3, weight_decay=0.01), lr=lr, **kw)


@pytest.mark.parametrize("normalize,entropy", [("token", "rb"), ("seq", "naive")])
def test_delta_h_true_matches_a_plain_loop(setup, normalize, entropy):
    policy, E, _ = setup
    res = adamw_probe(setup, 1e-3, normalize=normalize, entropy=entropy)
    params = policy.params
    h0 = float(plain_entropy(policy, params, E, normalize, entropy))
    h1 = float(plain_entropy(policy, tree.add(params, res.delta_named), E, normalize, entropy, params0=params))
    assert res.h_orig == pytest.approx(h0, rel=1e-13)
    assert res.delta_h_true == pytest.approx(h1 - h0, rel=1e-9, abs=1e-13 * abs(h0))


@pytest.mark.parametrize("estimator", ["snis", "togo"])
def test_jvp_and_gradient_dot_agree(setup, estimator):
    jvp = adamw_probe(setup, 1e-4, estimator=estimator)
    grad = adamw_probe(setup, 1e-4, estimator=estimator, method="grad")
    assert grad.delta_h1 == pytest.approx(jvp.delta_h1, rel=1e-9)


def test_delta_h1_matches_central_finite_difference(setup):
    policy, E, _ = setup
    res = adamw_probe(setup, 1e-3)
    params, delta = policy.params, res.delta_named
    eps = 1e-3
    plus = float(plain_entropy(policy, tree.axpy(eps, delta, params), E, params0=params))
    minus = float(plain_entropy(policy, tree.axpy(-eps, delta, params), E, params0=params))
    assert res.delta_h1 == pytest.approx((plus - minus) / (2 * eps), rel=1e-6)


def test_zero_learning_rate_changes_nothing(setup):
    res = adamw_probe(setup, 0.0)
    assert res.delta_h_true == 0.0
    assert res.delta_h1 == 0.0
    assert res.ess == len(setup[1])
    assert res.delta_l2 == 0.0


def test_delta_h1_is_linear_in_the_learning_rate(setup):
    base = adamw_probe(setup, 1e-4).delta_h1
    for scale in (0.5, 3.0, 10.0):
        assert adamw_probe(setup, scale * 1e-4).delta_h1 == pytest.approx(scale * base, rel=1e-9)


def test_ratio_tends_to_one_and_remainders_shrink_by_order(setup):
    results = {lr: adamw_probe(setup, lr, second_order=True) for lr in (1e-4, 1e-5, 1e-6, 1e-7)}
    assert abs(results[1e-7].ratio - 1) < 1e-3
    first = {lr: abs(r.delta_h_true - r.delta_h1) for lr, r in results.items()}
    second = {lr: abs(r.delta_h_true - r.delta_h1 - r.delta_h2) for lr, r in results.items()}
    for big, small in ((1e-4, 1e-5), (1e-5, 1e-6)):
        assert 60 < first[big] / first[small] < 160, first
    assert 500 < second[1e-4] / second[1e-5] < 2000, second


def test_micro_batch_size_does_not_change_results(setup):
    whole = adamw_probe(setup, 1e-3, second_order=True, micro_batch=None)
    for size in (1, 3):
        part = adamw_probe(setup, 1e-3, second_order=True, micro_batch=size)
        for field in ("delta_h_true", "delta_h1", "delta_h2", "ess"):
            assert getattr(part, field) == pytest.approx(getattr(whole, field), rel=1e-12), field


def test_sweep_equals_separate_probes_with_one_gradient(setup, monkeypatch):
    res = adamw_probe(setup, 1e-4, second_order=True)
    calls = []
    original = passes.gradient
    monkeypatch.setattr(passes, "gradient", lambda *a, **k: calls.append(1) or original(*a, **k))
    lrs = [1e-7, 1e-6, 1e-5]
    sweep = res.sweep(lrs)
    assert calls == []
    monkeypatch.undo()
    for lr, dh, d1, d12 in zip(lrs, sweep.delta_h_true, sweep.delta_h1, sweep.delta_h12):
        separate = adamw_probe(setup, lr, second_order=True)
        assert dh == pytest.approx(separate.delta_h_true, rel=1e-7)
        assert d1 == pytest.approx(separate.delta_h1, rel=1e-9)
        assert d12 == pytest.approx(separate.delta_h1 + separate.delta_h2, rel=1e-9)
    assert sweep.slope == pytest.approx(1.0, abs=0.02) and sweep.r2 > 0.999


def intercept_in_s_squared(steps: list[float], values: list[float]) -> float:
    """a of the least-squares line values ≈ a + b·s² over the steps s."""
    s2 = torch.tensor([s * s for s in steps], dtype=torch.float64)
    design = torch.stack([torch.ones_like(s2), s2], dim=1)
    return float(torch.linalg.lstsq(design, torch.tensor(values, dtype=torch.float64)[:, None]).solution[0, 0])


def test_eta_10_against_a_polynomial_fit_along_the_step(setup):
    """η₁₀ = 0.1·η₀·|c₁/c₂|, with c₁ and c₂ the first- and second-order coefficients of s ↦ Ĥ(θ₀ + sΔθ) fitted
    here from the plain Ĥ alone: (Ĥ(s) − Ĥ(−s))/2s = c₁ + c₃s² and (Ĥ(s) + Ĥ(−s) − 2Ĥ(0))/2s² = c₂ + c₄s²
    at s = 1/4, 1/2, 1, each extrapolated to s = 0 by a line in s²."""
    policy, E, _ = setup
    lr0, steps = 1e-4, [0.25, 0.5, 1.0]
    res = adamw_probe(setup, lr0, second_order=True)
    params, delta = policy.params, res.delta_named
    h = lambda s: float(plain_entropy(policy, tree.axpy(s, delta, params), E, params0=params))
    h0, plus, minus = h(0.0), [h(s) for s in steps], [h(-s) for s in steps]
    c1 = intercept_in_s_squared(steps, [(p - m) / (2 * s) for p, m, s in zip(plus, minus, steps)])
    c2 = intercept_in_s_squared(steps, [(p + m - 2 * h0) / (2 * s * s) for p, m, s in zip(plus, minus, steps)])
    assert res.sweep([lr0]).eta_10 == pytest.approx(0.1 * lr0 * abs(c1 / c2), rel=1e-5)


def test_sweep_loglog_fit_against_numpy_free_least_squares():
    xs = [1e-4, 1e-3, 1e-2]
    ys = [2e-6, 2e-4, 2e-2]
    slope, r2 = fprobe.entropy.sweep.loglog_fit(xs, ys)
    assert slope == pytest.approx(2.0, rel=1e-12)
    assert r2 == pytest.approx(1.0, rel=1e-12)


def test_exactly_one_update_and_nothing_mutated(setup):
    policy, E, U = setup
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    opt = fprobe.optim.adamw(lr=1e-3)
    calls = []
    counting = opt._replace(update=lambda *a, **k: calls.append(1) or opt.update(*a, **k))
    state = opt.init(policy.params)
    state_before = tree.tree_map(torch.clone, state.exp_avg), dict(state.step)
    ids = E.input_ids.clone()
    fprobe.probe(policy, E, U, counting, state, second_order=True).sweep([1e-4, 1e-3])
    assert len(calls) == 1
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
    assert torch.equal(E.input_ids, ids)
    assert all(torch.equal(state.exp_avg[k], v) for k, v in state_before[0].items())
    assert state.step == state_before[1]


def test_large_step_flags_low_ess(setup):
    with pytest.warns(fprobe.LowESSWarning, match="ESS fraction"):
        res = adamw_probe(setup, 3.0)
    assert res.ess_low and res.ess_fraction < 0.5
    assert "LOW ESS" in repr(res)


def test_small_step_does_not_warn(setup):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.LowESSWarning)
        assert not adamw_probe(setup, 1e-5).ess_low


def test_nonfinite_delta_is_rejected_naming_the_parameter(setup):
    policy, E, _ = setup
    delta = tree.zeros_like(policy.params)
    name = list(delta)[3]
    delta[name] = delta[name].clone().fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=name):
        fprobe.entropy_change(policy, E, delta)


def test_delta_with_wrong_names_is_rejected(setup):
    policy, E, _ = setup
    delta = tree.zeros_like(policy.params)
    delta["not.a.parameter"] = delta.pop(next(iter(delta)))
    with pytest.raises(ValueError, match="not.a.parameter"):
        fprobe.entropy_change(policy, E, delta)


def test_entropy_change_of_a_checkpoint_difference(setup):
    """Any Δθ works, e.g. the difference of two parameter sets; lr=None means scale 1."""
    policy, E, _ = setup
    g = torch.Generator().manual_seed(0)
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn(p.shape, generator=g, dtype=p.dtype), policy.params)
    chg = fprobe.entropy_change(policy, E, delta, second_order=True)
    h1 = float(plain_entropy(policy, tree.add(policy.params, delta), E, params0=policy.params))
    assert chg.delta_h_true == pytest.approx(h1 - chg.h_orig, rel=1e-8)
    assert chg.lr_used == 1.0
    assert chg.sweep([0.5, 1.0]).delta_h_true[1] == pytest.approx(chg.delta_h_true, rel=1e-12)


def test_result_converts_to_json_and_prints(setup):
    import json

    res = adamw_probe(setup, 1e-4)
    data = json.loads(res.to_json())
    assert data["delta_h1"] == res.delta_h1 and data["lr_used"] == 1e-4
    assert "delta_named" not in data and "context" not in data
    text = repr(res)
    for label in ("ΔH_true", "δH₁", "ESS fraction", "‖Δθ‖₂", "covariance baseline"):
        assert label in text


def test_covariance_baseline_uses_the_steps_log_probs(setup):
    policy, _, U = setup
    res = adamw_probe(setup, 1e-4)
    logp = fprobe.token_stats(policy, policy.params, U).logp
    want = fprobe.entropy.estimators.covariance_baseline(logp, U.response_mask, U.advantages, 1e-4)
    assert res.cov_baseline == pytest.approx(want, rel=1e-12)


def test_sweep_plot_writes_a_png(setup, tmp_path):
    res = adamw_probe(setup, 1e-4, second_order=True)
    fig = res.sweep([1e-5, 1e-4, 1e-3]).plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert len(fig.axes) == 2


@settings(max_examples=8, deadline=None)
@given(lr=st.floats(1e-6, 1e-3), micro=st.integers(1, 10), seed=st.integers(0, 100))
def test_property_jvp_equals_gradient_dot(model_dir, lr, micro, seed):
    policy = fprobe.Policy.from_pretrained(model_dir("gpt2"), dtype=torch.float64)
    E = make_batch(n=5, width=10, seed=seed, with_advantages=False)
    U = make_batch(n=4, width=10, seed=seed + 1)
    opt = fprobe.optim.sgd(lr=lr, momentum=0.9)
    a = fprobe.probe(policy, E, U, opt, micro_batch=micro)
    b = fprobe.probe(policy, E, U, opt, micro_batch=micro, method="grad")
    assert b.delta_h1 == pytest.approx(a.delta_h1, rel=1e-9, abs=1e-18)


def test_probe_is_lean_and_replays_its_step_bit_for_bit(setup):
    policy, E, U = setup
    opt = fprobe.optim.adamw(lr=1e-3, weight_decay=0.01)
    lean = fprobe.probe(policy, E, U, opt, max_grad_norm=0.1)
    kept = fprobe.probe(policy, E, U, opt, max_grad_norm=0.1, keep_step=True)
    assert lean.step is None and kept.step is not None
    replayed = lean.replay_step()
    for name, d in kept.step.delta.items():
        assert torch.equal(replayed.delta[name], d) and torch.equal(lean.delta_named[name], d)
        assert torch.equal(replayed.opt_state.exp_avg_sq[name], kept.step.opt_state.exp_avg_sq[name])
    assert replayed.clip_coef == kept.step.clip_coef < 1.0
    a, b = lean.contributions(), kept.contributions()
    assert torch.equal(a.per_sequence, b.per_sequence) and a.momentum == b.momentum and a.decay == b.decay


def test_replay_refuses_a_step_that_no_longer_matches(setup):
    policy, E, U = setup
    res = fprobe.probe(policy, E, U, fprobe.optim.sgd(lr=1e-3))
    moved_change = dataclasses.replace(res.change, context=dataclasses.replace(res.context, params=tree.scale(res.context.params, 1.01)))
    moved = dataclasses.replace(res, change=moved_change)
    with pytest.raises(RuntimeError, match="different Δθ"):
        moved.replay_step()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(method="vjp"), "method"),
        (dict(estimator="is"), "estimator"),
        (dict(normalize="tokens"), "normalize"),
        (dict(entropy="exact"), "entropy"),
        (dict(baseline="position"), "togo"),
        (dict(baseline="prompt", estimator="togo"), "snis"),
        (dict(baseline="prompt"), "group_ids"),
        (dict(micro_batch=0), "micro_batch"),
        (dict(ess_threshold=2.0), "ess_threshold"),
    ],
)
def test_bad_settings_fail_before_any_pass(setup, monkeypatch, bad, match):
    policy, E, U = setup
    calls = []
    for name in ("gradient", "jet", "forward"):
        original = getattr(passes, name)
        monkeypatch.setattr(passes, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    with pytest.raises(ValueError, match=match):
        fprobe.probe(policy, E, U, fprobe.optim.sgd(lr=1e-3), **bad)
    with pytest.raises(ValueError, match=match):
        fprobe.entropy_change(policy, E, tree.zeros_like(policy.params), **bad)
    assert calls == []


def test_mistyped_keyword_fails_at_the_call(setup):
    policy, E, U = setup
    with pytest.raises(TypeError, match="second_ordre"):
        fprobe.probe(policy, E, U, fprobe.optim.sgd(lr=1e-3), second_ordre=True)


def test_low_ess_warning_points_at_the_callers_line(setup):
    policy, E, U = setup
    with pytest.warns(fprobe.LowESSWarning) as caught:
        res = adamw_probe(setup, 3.0)
    assert {w.filename for w in caught} == {__file__}
    with pytest.warns(fprobe.LowESSWarning) as caught:
        res.sweep([3.0, 6.0])
    assert {w.filename for w in caught} == {__file__}


def shown_rows(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The title and the (label, value text) rows of a printed two-column table (title, a rule of dashes, rows)."""
    title, rule, *lines = text.splitlines()
    assert set(rule) == {"-"}, rule
    return title, [tuple(part.strip() for part in re.split(r"\s{2,}", line, maxsplit=1)) for line in lines]


def shows(text: str, value, se=None) -> bool:
    """Whether ``text`` shows ``value``: "—" for None, an int exactly, a float in at most 7 significant digits
    that read back to it within 5e-6 of its size (rounded to 6 digits at least); with a standard error,
    "value ± se" and the se in two significant digits."""
    if se is not None:
        shown, _, error = text.partition(" ± ")
        return shows(shown, value) and len(error.lstrip("0.").replace(".", "").partition("e")[0]) <= 2 and (
            float(error) == pytest.approx(se, rel=0.05))
    if value is None or isinstance(value, int):
        return text == ("—" if value is None else str(value))
    digits = text.lstrip("-").partition("e")[0].replace(".", "").lstrip("0")
    return len(digits) <= 7 and float(text) == pytest.approx(value, rel=5e-6, abs=0)


def test_printed_table_shows_the_results_numbers(setup):
    policy, E, _ = setup
    res = adamw_probe(setup, 1e-4)
    data = res.to_dict()
    title, rows = shown_rows(repr(res))
    assert title == "ProbeResult"
    expected = [
        ("H(θ₀)", "h_orig"), ("H(θ₀+Δθ)", "h_upd"), ("ΔH_true", "delta_h_true"), ("δH₁", "delta_h1"), ("δH₂", "delta_h2"),
        ("ΔH_true / δH₁", "ratio"), ("covariance baseline", "cov_baseline"), ("loss", "loss"), ("‖g‖₂", "grad_norm"),
        ("update lost to rounding", "update_lost"), ("ESS fraction", "ess_fraction"), ("max weight", "max_weight"),
        ("‖Δθ‖₂", "delta_l2"), ("lr", "lr_used"), ("E: sequences", "n_eval"), ("E: response tokens", "n_eval_tokens"),
    ]
    shown = [(label, data[key]) for label, key in expected]
    shown += [(f"time {phase} [s]", round(seconds, 3)) for phase, seconds in data["timings"].items()]
    assert [label for label, _ in rows] == [label for label, _ in shown]  # and no internal field among them
    errors = dict(zip([label for label, _ in expected], [data.get(f"{key}_se") for _, key in expected]))
    assert errors["ΔH_true"] > 0 and errors["δH₁"] > 0  # the estimates on E carry their standard errors
    for (label, text), (_, value) in zip(rows, shown):
        assert shows(text, value, errors.get(label)), (label, text, value)
    # the numbers themselves, against plain references
    params, new = policy.params, tree.add(policy.params, res.delta_named)
    h0, h1 = float(plain_entropy(policy, params, E)), float(plain_entropy(policy, new, E, params0=params))
    (ell0, _), (ell1, _) = sequence_log_probs(policy, params, E), sequence_log_probs(policy, new, E)
    w = torch.stack([(new_row.sum() - old_row.sum()).exp() for new_row, old_row in zip(ell1, ell0)])
    assert data["h_orig"] == pytest.approx(h0, rel=1e-12) and data["h_upd"] == pytest.approx(h1, rel=1e-12)
    assert data["ratio"] == pytest.approx(data["delta_h_true"] / data["delta_h1"], rel=1e-15)
    assert data["ess_fraction"] == pytest.approx(float(w.sum() ** 2 / (w**2).sum()) / len(E), rel=1e-9)
    assert data["max_weight"] == pytest.approx(float(w.max() / w.sum()), rel=1e-9)
    assert data["delta_l2"] == pytest.approx(sum(float((d**2).sum()) for d in res.delta_named.values()) ** 0.5, rel=1e-12)
    assert (data["lr_used"], data["n_eval"], data["n_eval_tokens"]) == (1e-4, len(E), int(E.response_mask.sum()))
    assert data["delta_h2"] is None and data["update_lost"] is None  # no second order asked; float64 loses nothing
    for hidden in ("step", "U", "optimizer", "opt_state", "lr_given", "micro_batch", "delta_named", "context"):
        assert hidden not in data
    assert data["max_grad_norm"] is None and data["loss_type"] == "dr_grpo"


# --- results refuse reuse once θ₀ or a batch changed in place; bad learning rates refused before any pass


@pytest.mark.parametrize("keep_step", [False, True])
def test_a_result_refuses_to_be_reused_after_the_model_was_changed_in_place(fresh_gpt2, fresh_batches, keep_step):
    E, U = fresh_batches
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=1e-4), keep_step=keep_step)
    lr = 1e-4 * (1 + 1e-7)
    before = res.sweep([lr]).delta_h_true[0]
    assert before == pytest.approx(res.delta_h_true, rel=1e-3)  # (η/η₀ − 1) = 1e-7: nearly the step itself
    with torch.no_grad():  # the user trains the model further, in place
        for p in fresh_gpt2.model.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    # Before the fix the sweep evaluated Ĥ at the *new* weights + Δθ against H(θ₀): ΔH_true off by 20×.
    for use in (lambda: res.sweep([lr]), res.predictors, res.contributions, res.replay_step):
        with pytest.raises(RuntimeError, match="changed in place"):
            use()


def test_a_result_on_params_the_model_does_not_share_survives_training(fresh_gpt2, fresh_batches):
    E, U = fresh_batches
    theta0 = tree.tree_map(torch.clone, fresh_gpt2.params)
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), theta0)
    change = fprobe.entropy_change(fresh_gpt2, E, delta, params=theta0, lr=1e-4)
    expected = change.sweep([2e-4]).delta_h_true[0]
    with torch.no_grad():
        for p in fresh_gpt2.model.parameters():
            p.add_(1e-3)
    assert change.sweep([2e-4]).delta_h_true[0] == expected  # θ₀ is the clone: nothing mixed, nothing refused


def test_a_result_refuses_to_be_reused_after_a_batch_was_changed_in_place(fresh_gpt2):
    E, U = make_batch(6, seed=1, with_advantages=False), make_batch(6, seed=2)
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    comparison = res.predictors()
    U.advantages.mul_(-1.0)  # a buffer reused for the next batch
    # was: every predictor's per-token values flipped sign against the same truth
    with pytest.raises(RuntimeError, match=r"changed in place .*U\['advantages'\]"):
        res.predictors()
    U.advantages.mul_(-1.0)  # the values are back, but the result cannot know: still refused
    with pytest.raises(RuntimeError, match="changed in place"):
        res.contributions()
    res2 = fprobe.probe(fresh_gpt2, E, make_batch(6, seed=2), fprobe.optim.adamw(lr=1e-4))
    assert res2.predictors().scores == comparison.scores  # an untouched batch: the same comparison as before
    E.input_ids[:, -1] = 5  # E's last column rewritten in place
    with pytest.raises(RuntimeError, match=r"changed in place .*E\['input_ids'\]"):
        res2.sweep([2e-4])  # was: Ĥ at θ₀+Δθ on the new tokens against H(θ₀) on the old ones


@pytest.mark.parametrize("bad", [float("nan"), -1e-4, float("inf")])
def test_entropy_change_refuses_a_bad_learning_rate_before_any_pass(fresh_gpt2, fresh_batches, monkeypatch, bad):
    E, _ = fresh_batches
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), fresh_gpt2.params)
    for name in ("forward", "jet"):
        monkeypatch.setattr(passes, name, no_pass)
    with pytest.raises(ValueError, match="lr"):  # was: accepted; its sweep then scaled Δθ by NaN or flipped it
        fprobe.entropy_change(fresh_gpt2, E, delta, lr=bad)
