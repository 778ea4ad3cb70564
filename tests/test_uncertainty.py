"""Standard errors by the delta method (fprobe.entropy.uncertainty) on hand-built token statistics: the estimates
they linearise are fprobe's own, a linear statistic gets the textbook std/√n, the errors agree with a delete-one
jackknife recomputed from the estimators, and they behave as a standard error must under duplication and
relabelling. The calibration against exact enumeration is tests/test_calibration.py."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fprobe.entropy import estimators, uncertainty
from fprobe.model.tokens import TokenStats


def hand_case(seed=0, n=8, width=6, group_size=2, reused=False):
    """Random statistics at θ₀ (ragged masks), tangents, second derivatives, rows at θ₀+Δθ, group ids
    (``group_size`` consecutive rows per prompt) and, when ``reused``, a sampling policy's S^q."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        length = int(torch.randint(1, width + 1, (1,), generator=g))
        mask[i, :length] = True
    rand = lambda scale=1.0: scale * torch.randn(n, width, generator=g, dtype=torch.float64) * mask
    value = TokenStats((-rand().abs() - 0.1) * mask, (rand().abs() + 0.5) * mask)
    tangent, second = TokenStats(rand(0.3), rand(0.3)), TokenStats(rand(0.3), rand(0.3))
    moved = TokenStats(value.logp + 0.1 * tangent.logp, value.entropy + 0.1 * tangent.entropy)
    groups = torch.arange(n) // group_size
    logp_ref = value.logp.sum(-1) + 0.2 * torch.randn(n, generator=g, dtype=torch.float64) if reused else None
    return value, tangent, second, moved, mask, groups, logp_ref


SETTINGS = [
    ("snis", "token", "rb", "none"), ("snis", "seq", "naive", "none"), ("snis", "token", "rb", "prompt"),
    ("snis", "seq", "rb", "prompt"), ("snis", "token", "naive", "prompt"), ("togo", "token", "rb", "none"),
    ("togo", "seq", "naive", "none"), ("togo", "token", "rb", "position"),
]


def errors_of(case, estimator, normalize, entropy, baseline, with_second=True):
    value, tangent, second, moved, mask, groups, logp_ref = case
    return uncertainty.of_statistics(
        value, mask, estimator=estimator, normalize=normalize, entropy=entropy, baseline=baseline, groups=groups,
        logp_ref=logp_ref, tangent=tangent, second=second if with_second and estimator == "snis" else None,
        moved=estimators.rows(moved, entropy),
    )


def reference_estimates(case, estimator, normalize, entropy, baseline):
    """h_orig, ΔH_true, δH₁ and (snis) δH₂ as the estimators compute them: snis_value, contract of the
    first-order coefficients, and forward-over-forward AD of snis_value along the Taylor path."""
    value, tangent, second, moved, mask, groups, logp_ref = case
    r0 = estimators.rows(value, entropy)
    denom = estimators.denominators(mask, normalize)
    reference = r0.logp if logp_ref is None else logp_ref
    b = estimators.baselines_for(r0, denom, baseline, groups)
    h0 = float(estimators.snis_value(r0.logp, r0.entropy, reference, denom, b))
    r1 = estimators.rows(moved, entropy)
    alpha, beta = estimators.first_order_coefficients(value, mask, estimator, normalize, entropy, baseline, logp_ref, groups)
    out = dict(h_orig=h0, delta_h_true=float(estimators.snis_value(r1.logp, r1.entropy, reference, denom, b)) - h0,
               delta_h1=float(estimators.contract(alpha, beta, tangent)))
    if estimator == "snis":
        out["delta_h2"] = float(estimators.second_order(value, tangent, second, mask, normalize, entropy, logp_ref, b))
    return out


@pytest.mark.parametrize("estimator,normalize,entropy,baseline", SETTINGS)
@pytest.mark.parametrize("reused", [False, True])
def test_linearised_estimates_are_the_estimators_own(estimator, normalize, entropy, baseline, reused):
    case = hand_case(1, reused=reused)
    errors = errors_of(case, estimator, normalize, entropy, baseline)
    for name, want in reference_estimates(case, estimator, normalize, entropy, baseline).items():
        assert errors.values[name] == pytest.approx(want, rel=1e-11, abs=1e-14), name
    assert errors.values["ratio"] == pytest.approx(errors.values["delta_h_true"] / errors.values["delta_h1"], rel=1e-12)
    assert all(errors.se[name] > 0 for name in errors.values)


def test_a_mean_gets_the_textbook_standard_error():
    """Per sequence with E sampled from π_θ₀, Ĥ(θ₀) is the plain mean of H_i: se = sample std / √n (rows), and
    with groups the std of the group sums scaled the same way (independent units: the groups)."""
    value, tangent, _, moved, mask, groups, _ = hand_case(2, n=12, group_size=3)
    H = value.entropy.sum(-1)
    errors = uncertainty.of_statistics(value, mask, normalize="seq", tangent=tangent)
    assert errors.se["h_orig"] == pytest.approx(float(H.std()) / math.sqrt(12), rel=1e-12)
    clustered = uncertainty.of_statistics(value, mask, normalize="seq", groups=groups)
    sums = (H - H.mean()).view(4, 3).sum(-1)
    assert clustered.se["h_orig"] == pytest.approx(math.sqrt(4 / 3 * float((sums**2).sum())) / 12, rel=1e-12)
    assert clustered.n_units == 4 and errors.n_units == 12


def jackknife(case, estimator, normalize, entropy, baseline):
    """Delete-one-unit jackknife standard errors, each estimate recomputed by the estimators on the remaining units."""
    value, tangent, second, moved, mask, groups, logp_ref = case
    units = groups.unique()
    leave_out = []
    for u in units:
        keep = groups != u
        sub = (TokenStats(value.logp[keep], value.entropy[keep]), TokenStats(tangent.logp[keep], tangent.entropy[keep]),
               TokenStats(second.logp[keep], second.entropy[keep]), TokenStats(moved.logp[keep], moved.entropy[keep]),
               mask[keep], groups[keep], None if logp_ref is None else logp_ref[keep])
        leave_out.append(reference_estimates(sub, estimator, normalize, entropy, baseline))
    G = len(units)
    se = {}
    for name in leave_out[0]:
        x = torch.tensor([v[name] for v in leave_out], dtype=torch.float64)
        se[name] = math.sqrt((G - 1) / G * float(((x - x.mean()) ** 2).sum()))
    return se


@pytest.mark.parametrize("estimator,normalize,entropy,baseline", [
    ("snis", "token", "rb", "none"), ("snis", "seq", "rb", "prompt"), ("togo", "token", "rb", "none"),
])
def test_delta_method_agrees_with_the_jackknife(estimator, normalize, entropy, baseline):
    """The two agree to O(1/n) for smooth estimators: within 8% at 80 units of 2 rows."""
    case = hand_case(3, n=160, group_size=2)
    delta = errors_of(case, estimator, normalize, entropy, baseline).se
    for name, want in jackknife(case, estimator, normalize, entropy, baseline).items():
        assert delta[name] == pytest.approx(want, rel=0.08), name


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 12))
def test_duplicated_permuted_and_reweighted_rows(seed, n):
    """Each row twice (as its own unit): x̄ and every influence unchanged, so se shrinks by exactly
    √((n−1)/(2n−1)); a permutation of the rows changes nothing; nor does a constant added to S^q."""
    value, tangent, second, moved, mask, _, logp_ref = hand_case(seed, n=n, reused=True)
    run = lambda v, t, s, m, k, ref: uncertainty.of_statistics(v, k, logp_ref=ref, tangent=t, second=s, moved=estimators.rows(m))
    base = run(value, tangent, second, moved, mask, logp_ref)
    twice = lambda x: torch.cat([x, x])
    double = lambda s: TokenStats(twice(s.logp), twice(s.entropy))
    doubled = run(double(value), double(tangent), double(second), double(moved), twice(mask), twice(logp_ref))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = lambda s: TokenStats(s.logp[order], s.entropy[order])
    permuted = run(perm(value), perm(tangent), perm(second), perm(moved), mask[order], logp_ref[order])
    shifted = run(value, tangent, second, moved, mask, logp_ref + 3.0)
    for name, se in base.se.items():
        assert doubled.se[name] == pytest.approx(se * math.sqrt((n - 1) / (2 * n - 1)), rel=1e-9), name
        assert permuted.se[name] == pytest.approx(se, rel=1e-9), name
        assert shifted.se[name] == pytest.approx(se, rel=1e-9), name


def test_one_row_has_no_standard_error_and_says_why():
    value, tangent, _, moved, mask, groups, _ = hand_case(4, n=1)
    errors = uncertainty.of_statistics(value, mask, tangent=tangent, moved=estimators.rows(moved))
    assert set(errors.values) == {"h_orig", "h_upd", "delta_h_true", "delta_h1", "ratio"}
    assert all(se is None for se in errors.se.values())
    assert all("one sequence" in errors.undefined[name] for name in errors.values)
    value, tangent, _, moved, mask, groups, _ = hand_case(4, n=3, group_size=3)
    grouped = uncertainty.of_statistics(value, mask, groups=groups, tangent=tangent)
    assert grouped.se["h_orig"] is None and "one prompt group" in grouped.undefined["h_orig"]


def test_missing_tangents_leave_delta_h1_undefined_with_the_reason():
    value, _, _, moved, mask, _, _ = hand_case(5)
    errors = uncertainty.of_statistics(value, mask, moved=estimators.rows(moved), missing=dict.fromkeys(("n1", "m1"), uncertainty.GRAD_METHOD))
    assert errors.se["delta_h_true"] > 0 and "delta_h1" not in errors.se
    assert errors.undefined == {"delta_h1": uncertainty.GRAD_METHOD, "ratio": uncertainty.GRAD_METHOD}


def test_prompt_baseline_keeps_delta_h_true_and_delta_h1_one_function():
    """With the per-prompt control variates, δH₁ is still the exact ε-derivative of the ΔH_true estimator on the
    same E: ΔH_true(ε)/(ε δH₁) − 1 = O(ε) along the statistics' path (and without groups it is plain snis)."""
    value, tangent, second, _, mask, groups, _ = hand_case(6, n=10, group_size=5)
    errors = lambda eps, g, baseline: uncertainty.of_statistics(
        value, mask, baseline=baseline, groups=g, tangent=tangent,
        moved=estimators.Rows(*(a + eps * b + 0.5 * eps**2 * c for a, b, c in zip(
            estimators.rows(value), estimators.rows(tangent), estimators.rows(second))))).values
    gaps = [abs(errors(eps, groups, "prompt")["ratio"] / eps - 1) for eps in (1e-3, 1e-4)]
    assert 0.05 < gaps[1] / gaps[0] < 0.2  # first order in ε: the gap shrinks tenfold with ε
    lone = torch.arange(10)  # every prompt answered once: no baseline at all
    assert errors(1e-3, lone, "prompt")["delta_h1"] == pytest.approx(errors(1e-3, None, "none")["delta_h1"], rel=1e-13)


def test_prompt_baseline_needs_group_ids():
    value, _, _, _, mask, _, _ = hand_case(7)
    with pytest.raises(ValueError, match="group_ids"):
        estimators.first_order_coefficients(value, mask, baseline="prompt")
    with pytest.raises(ValueError, match="estimator='snis' only"):
        estimators.first_order_coefficients(value, mask, "togo", baseline="prompt", groups=torch.zeros(8))


def test_rows_for_a_target_precision():
    assert uncertainty.rows_for(0.1, -0.5, 0.1, 64) == 256  # se 20% of |value|: 4× the rows halve it to 10%
    assert uncertainty.rows_for(0.1, 1.0, 0.05, 64) == 16
    assert uncertainty.rows_for(0.1, 1.0, None, 64) is None
    with pytest.raises(ValueError, match="rel_se"):
        uncertainty.rows_for(0.0, 1.0, 0.1, 64)


@pytest.fixture(scope="module")
def probed(model_dir):
    import dataclasses

    import fprobe
    from helpers import make_batch

    policy = fprobe.Policy.from_pretrained(model_dir("gpt2"), dtype=torch.float64)
    E = make_batch(n=12, width=10, seed=31, with_advantages=False)
    U = make_batch(n=6, width=10, seed=32)
    step = fprobe.rl_step(policy, policy.params, fprobe.optim.adamw(lr=1e-3), fprobe.optim.adamw(lr=1e-3).init(policy.params), U)
    grouped = dataclasses.replace(E, group_ids=torch.arange(12) // 3)
    return policy, E, grouped, step


def test_entropy_change_reports_the_standard_errors_of_its_own_estimates(probed):
    """Per sequence with the naive entropy, Ĥ(θ₀) is the mean of −S_i: its se is the sample std of −S_i (from a
    plain float64 log-softmax) over √n; every other se is the delta method's on the pass's own statistics, and
    the result's dict and JSON carry them."""
    import json

    import fprobe
    from helpers import sequence_log_probs

    policy, E, _, step = probed
    res = fprobe.entropy_change(policy, E, step.delta, new_params=step.params, normalize="seq", entropy="naive", second_order=True)
    ell, _ = sequence_log_probs(policy, policy.params, E)
    minus_s = torch.stack([-e.sum() for e in ell])
    assert res.h_orig_se == pytest.approx(float(minus_s.std()) / math.sqrt(len(E)), rel=1e-10)
    for name in ("h_upd", "delta_h_true", "delta_h1", "delta_h2", "ratio"):
        assert getattr(res, f"{name}_se") > 0, name
    assert res.se_units == 12 and res.se_undefined == {}
    data = json.loads(res.to_json())
    assert data["delta_h_true_se"] == pytest.approx(res.delta_h_true_se, rel=1e-15) and "se_terms" not in data
    assert res.n_eval_for(0.1) == uncertainty.rows_for(0.1, res.delta_h_true, res.delta_h_true_se, 12)
    assert res.n_eval_for(0.5, of="delta_h1") < res.n_eval_for(0.1, of="delta_h1")
    with pytest.raises(ValueError, match="of must name"):
        res.n_eval_for(0.1, of="ess")


def test_gradient_method_and_one_row_say_why_a_standard_error_is_missing(probed):
    import fprobe

    policy, E, _, step = probed
    jvp = fprobe.entropy_change(policy, E, step.delta, new_params=step.params)
    grad = fprobe.entropy_change(policy, E, step.delta, new_params=step.params, method="grad")
    assert grad.delta_h_true_se == pytest.approx(jvp.delta_h_true_se, rel=1e-12)
    assert grad.delta_h1_se is None and grad.ratio_se is None
    assert grad.se_undefined == {"delta_h1": uncertainty.GRAD_METHOD, "ratio": uncertainty.GRAD_METHOD}
    one = fprobe.entropy_change(policy, E.select([3]), step.delta, new_params=step.params)
    assert all(getattr(one, f"{name}_se") is None for name in ("h_orig", "delta_h_true", "delta_h1", "ratio"))
    assert "at least two" in one.se_undefined["delta_h_true"] and one.n_eval_for(0.1) is None
    assert "ΔH_true" in repr(one) and "±" not in repr(one)


def test_prompt_baseline_through_entropy_change(probed):
    """baseline='prompt' needs E's group ids (refused before any pass or step); with them the result clusters its
    se by prompt, and ΔH_true / δH₁ → 1 as the step shrinks, as for plain snis."""
    import fprobe
    from helpers import make_batch

    policy, E, grouped, step = probed
    with pytest.raises(ValueError, match="group_ids"):
        fprobe.entropy_change(policy, E, step.delta, baseline="prompt")
    calls = []
    counting = fprobe.optim.sgd(lr=1e-3)._replace(update=lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="group_ids"):
        fprobe.probe(policy, E, make_batch(n=6, width=10, seed=32), counting, baseline="prompt")
    assert calls == [], "refused before the step"
    small = {name: 1e-3 * d for name, d in step.delta.items()}
    res = fprobe.entropy_change(policy, grouped, small, baseline="prompt")
    plain = fprobe.entropy_change(policy, grouped, small)
    assert res.se_units == 4 and abs(res.ratio - 1) < 1e-3 and abs(plain.ratio - 1) < 1e-3
    assert res.delta_h1 != pytest.approx(plain.delta_h1, rel=1e-9)
    assert res.h_orig == pytest.approx(plain.h_orig, rel=1e-14)


def test_sweep_standard_errors_match_a_fresh_measurement_at_each_rate(probed, tmp_path):
    """At η = η₀ the sweep's se are the change's own; at 3η₀ its ΔH_true se is that of entropy_change along 3Δθ
    measured afresh, its δH₁ se three times η₀'s; the plot shades a band per estimate with an se."""
    import fprobe

    policy, E, _, step = probed
    res = fprobe.entropy_change(policy, E, step.delta, new_params=step.params, lr=1e-3, second_order=True)
    sweep = res.sweep([1e-3, 3e-3])
    again = fprobe.entropy_change(policy, E, {k: 3 * d for k, d in step.delta.items()}, lr=3e-3, second_order=True)
    assert sweep.delta_h_true_se[0] == pytest.approx(res.delta_h_true_se, rel=1e-12)
    assert sweep.ratio_se[0] == pytest.approx(res.ratio_se, rel=1e-12)
    assert sweep.delta_h_true_se[1] == pytest.approx(again.delta_h_true_se, rel=1e-9)
    assert sweep.ratio_se[1] == pytest.approx(again.ratio_se, rel=1e-9)
    assert sweep.delta_h1_se[1] == pytest.approx(3 * res.delta_h1_se, rel=1e-12)
    assert sweep.records()[1]["delta_h12_se"] > 0 and "±" in repr(sweep)
    fig = sweep.plot(tmp_path / "sweep.png")
    from matplotlib.collections import PolyCollection

    bands = [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1 + 3  # the ratio's, then |ΔH_true|, |δH₁|, |δH₁+δH₂|
