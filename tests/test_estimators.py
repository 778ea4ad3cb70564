"""The estimator algebra against plain float64 loops over sequences, on hand-built statistics."""

import math

import pytest
import torch

from fprobe.entropy import estimators
from fprobe.model.tokens import TokenStats


def hand_case(seed=0, n=5, width=7):
    """Random token statistics, tangents and second derivatives with ragged response masks."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        start = int(torch.randint(1, 3, (1,), generator=g))
        length = int(torch.randint(1, width - start + 1, (1,), generator=g))
        mask[i, start : start + length] = True
    rand = lambda: torch.randn(n, width, generator=g, dtype=torch.float64) * mask
    value = TokenStats((-rand().abs() - 0.1) * mask, (rand().abs() + 0.5) * mask)
    return mask, value, TokenStats(rand(), rand()), TokenStats(rand(), rand())


def responses(mask, x):
    """Row i's values at its response positions, as a list of Python floats."""
    return [[float(v) for v, m in zip(row, mrow) if m] for row, mrow in zip(x, mask)]


def ref_rows(mask, stats, entropy):
    ell = responses(mask, stats.logp)
    h = responses(mask, stats.entropy)
    S = [sum(r) for r in ell]
    H = [sum(r) for r in h] if entropy == "rb" else [-s for s in S]
    return S, H


def ref_denoms(mask, normalize):
    return [float(m.sum()) if normalize == "token" else 1.0 for m in mask]


def ref_delta_h1(mask, value, tangent, estimator, normalize, entropy, baseline="none"):
    """δH₁ = [Σ_i Ḣ_i + Σ_i (H_i − Ĥ D_i) Ṡ_i] / Σ_i D_i (snis), or with H_i Ṡ_i and D_i Ṡ_i replaced by their
    entropy-to-go sums over tokens (togo), one sequence and one token at a time in plain Python."""
    S, H = ref_rows(mask, value, entropy)
    dS, dH = ref_rows(mask, tangent, entropy)
    D = ref_denoms(mask, normalize)
    h_hat = sum(H) / sum(D)
    if estimator == "snis":
        score_terms = sum(H[i] * dS[i] - h_hat * D[i] * dS[i] for i in range(len(S)))
    else:
        ell_dot = responses(mask, tangent.logp)
        per_token = responses(mask, value.entropy) if entropy == "rb" else [[-v for v in r] for r in responses(mask, value.logp)]
        to_go = [
            [sum(row[k + 1 :]) if entropy == "rb" else sum(row[k:]) for k in range(len(row))] for row in per_token
        ]
        if baseline == "position":
            def b(i, k):
                others = [to_go[j][k] for j in range(len(to_go)) if j != i and len(to_go[j]) > k]
                return sum(others) / len(others) if others else 0.0
            to_go = [[to_go[i][k] - b(i, k) for k in range(len(to_go[i]))] for i in range(len(to_go))]
        score_terms = 0.0
        for i, row in enumerate(ell_dot):
            T = len(row)
            for k, d in enumerate(row, start=1):
                later = (T - k) if normalize == "token" else 0.0
                score_terms += (to_go[i][k - 1] - h_hat * later) * d
    return (sum(dH) + score_terms) / sum(D)


def ref_snis(S, H, S0, D):
    w = [math.exp(s - s0) for s, s0 in zip(S, S0)]
    return sum(wi * hi for wi, hi in zip(w, H)) / sum(wi * di for wi, di in zip(w, D))


SETTINGS = [(e, n, h) for e in ("snis", "togo") for n in ("token", "seq") for h in ("rb", "naive")]


@pytest.mark.parametrize("estimator,normalize,entropy", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_matches_plain_loop(estimator, normalize, entropy, seed):
    mask, value, tangent, _ = hand_case(seed)
    alpha, beta = estimators.first_order_coefficients(value, mask, estimator, normalize, entropy)
    got = float(estimators.contract(alpha, beta, tangent))
    assert got == pytest.approx(ref_delta_h1(mask, value, tangent, estimator, normalize, entropy), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("entropy", ["rb", "naive"])
def test_togo_position_baseline_matches_plain_loop(entropy):
    mask, value, tangent, _ = hand_case(3, n=6)
    alpha, beta = estimators.first_order_coefficients(value, mask, "togo", "token", entropy, "position")
    want = ref_delta_h1(mask, value, tangent, "togo", "token", entropy, "position")
    assert float(estimators.contract(alpha, beta, tangent)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("normalize,entropy", [(n, h) for n in ("token", "seq") for h in ("rb", "naive")])
def test_snis_value_and_diagnostics_match_plain_loop(normalize, entropy):
    mask, value, tangent, _ = hand_case(4)
    moved = TokenStats(value.logp + 0.3 * tangent.logp, value.entropy + 0.3 * tangent.entropy)
    S0, _ = ref_rows(mask, value, entropy)
    S, H = ref_rows(mask, moved, entropy)
    D = ref_denoms(mask, normalize)
    est = estimators.snis(estimators.rows(moved, entropy), estimators.rows(value, entropy).logp, estimators.denominators(mask, normalize))
    assert float(est.value) == pytest.approx(ref_snis(S, H, S0, D), rel=1e-13)
    w = [math.exp(s - s0) for s, s0 in zip(S, S0)]
    assert float(est.ess) == pytest.approx(sum(w) ** 2 / sum(x * x for x in w), rel=1e-13)
    assert float(est.ess_fraction) == pytest.approx(sum(w) ** 2 / sum(x * x for x in w) / len(w), rel=1e-13)
    assert float(est.max_weight) == pytest.approx(max(w) / sum(w), rel=1e-13)


def test_snis_derivative_is_the_first_order_snis_estimator():
    """The snis coefficients are the exact ε-derivative of Ĥ along the statistics' path (finite difference)."""
    mask, value, tangent, _ = hand_case(5)
    alpha, beta = estimators.first_order_coefficients(value, mask, "snis", "token", "rb")
    S0, _ = ref_rows(mask, value, "rb")
    D = ref_denoms(mask, "token")

    def h_at(eps):
        S, H = ref_rows(mask, TokenStats(value.logp + eps * tangent.logp, value.entropy + eps * tangent.entropy), "rb")
        return ref_snis(S, H, S0, D)

    eps = 1e-5
    fd = (h_at(eps) - h_at(-eps)) / (2 * eps)
    assert float(estimators.contract(alpha, beta, tangent)) == pytest.approx(fd, rel=1e-8)


@pytest.mark.parametrize("normalize,entropy", [("token", "rb"), ("seq", "naive")])
def test_second_order_is_half_the_second_derivative(normalize, entropy):
    mask, value, tangent, second = hand_case(6)
    S0, _ = ref_rows(mask, value, entropy)
    D = ref_denoms(mask, normalize)

    def h_at(eps):
        path = TokenStats(*(v + eps * t + 0.5 * eps * eps * s for v, t, s in zip(value, tangent, second)))
        S, H = ref_rows(mask, path, entropy)
        return ref_snis(S, H, S0, D)

    eps = 1e-4
    fd = (h_at(eps) - 2 * h_at(0.0) + h_at(-eps)) / (2 * eps * eps)
    got = float(estimators.second_order(value, tangent, second, mask, normalize, entropy))
    assert got == pytest.approx(fd, rel=1e-6)


def test_position_baseline_leaves_each_row_out():
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    values = torch.tensor([[0, 1.0, 2.0, 3.0], [0, 10.0, 20.0, 0], [100.0, 200.0, 0, 0]], dtype=torch.float64)
    want = torch.tensor([[0, 55.0, 110.0, 0.0], [0, 50.5, 101.0, 0], [5.5, 11.0, 0, 0]], dtype=torch.float64)
    assert torch.equal(estimators.position_baseline(values, mask), want)


def test_nonfinite_log_weights_name_the_rows():
    logp0 = torch.zeros(4, dtype=torch.float64)
    logp = torch.tensor([0.0, float("nan"), 0.0, float("-inf")], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"rows \[1, 3\]"):
        estimators.log_weights(logp, logp0)


def test_covariance_baseline_matches_plain_covariance():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logp = torch.tensor([[0, -1.0, -2.0], [-0.5, -0.25, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    pairs = [(-1.0, 1.0), (-2.0, 1.0), (-0.5, -1.0), (-0.25, -1.0)]
    ml = sum(p[0] for p in pairs) / 4
    ma = sum(p[1] for p in pairs) / 4
    cov = sum((a - ml) * (b - ma) for a, b in pairs) / 4
    assert estimators.covariance_baseline(logp, mask, adv, 0.1) == pytest.approx(-0.1 * cov, rel=1e-14)
