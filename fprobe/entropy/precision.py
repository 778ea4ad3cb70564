"""The rounding floor of an entropy change: how large the rounding error of ΔH_true and δH₁ is at the dtype the passes
compute in (``Policy.dtype``), estimated by Monte Carlo arithmetic, and the warning when |ΔH_true| is not well above it.

One extra jvp of a few rows of E runs with every floating result of the model's operations perturbed by one random
rounding (×(1 + u·ξ), ξ ~ U[−1, 1], u the unit roundoff of the result's dtype: ``fprobe.model.numerics.perturbed_rounding``).
Its per-row differences from the plain pass, d_S,i, d_H,i (statistics) and d_i (row i's part of δH₁), are two rounding
realisations apart, so each has twice the variance of one pass's rounding error. Propagated to first order through
Ĥ = Σ w_i H_i / Σ w_i D_i (∂Ĥ/∂H_i = w_i/ΣwD, ∂Ĥ/∂S_i = w_i (H_i − Ĥ D_i)/ΣwD through the log-weights; w_i = 1 at θ₀
for a sample of π_θ₀) and summed over rows as independent errors, at θ₀ and at θ₀+Δθ (two evaluations: twice one's
variance):

    floor(ΔH_true)² = (n/m) Σ_{i ≤ m} w_i² [d_H,i² + (H_i − Ĥ D_i)² d_S,i²] / (Σ_i w_i D_i)²
    floor(δH₁)²     = (n/m) Σ_{i ≤ m} d_i² / 2

for the first m rows of E's n; each ``rounding_floor`` is ``_SIGMAS`` = 3 of these standard deviations. Against a
float64 evaluation of the same weights (float32 and bf16 weights computed in float32, SGD steps of 1e-7 to 1e-1), the
observed error stayed below 0.67 of the ΔH_true floor and 0.14 of the δH₁ floor on the built-in policy with sampled E
(experiments/rounding_floor.py), below 0.32 and 0.96 on it with random token batches, and below 0.24 and 0.58 on tiny
Qwen2 and GPT-2 models (tests/test_precision.py). A ΔH_true is taken as measured when it is ``_WELL_ABOVE`` = 10 floors
or more: its rounding error is then under ~7% of it, typically under 3%.
"""

from typing import NamedTuple

import torch

from fprobe import tree
from fprobe.entropy import estimators
from fprobe.model import passes
from fprobe.model.numerics import perturbed_rounding
from fprobe.model.tokens import TokenStats
from fprobe.rollouts import Rollouts
from fprobe.warnings import PrecisionWarning, warn

_SIGMAS = 3.0  # a floor is this many estimated standard deviations of the rounding error
_WELL_ABOVE = 10.0  # |ΔH_true| below this many floors: flagged, PrecisionWarning
_FLOOR_ROWS = 16  # rows of E in the perturbed pass (at most one micro-batch)
_SEED = 0


class _RoundingFloor(NamedTuple):
    """Estimated rounding errors (``_SIGMAS`` standard deviations) of ΔH_true and δH₁ at the computation's dtype
    (δH₁'s None where it is computed by ``method="grad"``)."""

    delta_h_true: float
    delta_h1: float | None
    dtype: str


def _statistic_differences(plain: TokenStats, perturbed: TokenStats, entropy: estimators.Entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (d_S, d_H), the perturbed minus the plain S_i and H_i."""
    a, b = estimators.rows(plain, entropy), estimators.rows(perturbed, entropy)
    return b.logp - a.logp, b.entropy - a.entropy


def _row_parts(alpha: torch.Tensor, beta: torch.Tensor, tangent: TokenStats) -> torch.Tensor:
    """Row i's part of δH₁ = Σ_ik α_ik ℓ̇_ik + β_ik ḣ_ik."""
    return (alpha * tangent.logp).sum(-1) + (beta * tangent.entropy).sum(-1)


def _floor_of_change(d_logp, d_entropy, rows0: estimators.Rows, denom, weights) -> float:
    """floor(ΔH_true), one standard deviation, from the first m rows' differences d_S, d_H (module docstring);
    ``rows0``, ``denom`` (D_i) and ``weights`` (w_i at θ₀: 1, or from E's sampler) over all n rows of E."""
    m = len(d_logp)
    total = (weights * denom).sum()
    h_hat = (weights * rows0.entropy).sum() / total
    w = weights[:m]
    terms = w**2 * (d_entropy**2 + (rows0.entropy[:m] - h_hat * denom[:m]) ** 2 * d_logp**2)
    return float(torch.sqrt(terms.sum() * len(weights) / m) / total)


def _floor_of_derivative(d_parts: torch.Tensor, n: int) -> float:
    """floor(δH₁) from the first m rows' differences of their parts of δH₁ (module docstring)."""
    return float(torch.sqrt((d_parts**2).sum() * n / len(d_parts) / 2))


def _with_rows_replaced(stats: TokenStats, head: TokenStats) -> TokenStats:
    """``stats`` with its first rows replaced by ``head``'s."""
    m = head.logp.shape[0]
    return TokenStats(*(torch.cat([h, x[m:]]) for x, h in zip(stats, head)))


def _head_of(jet: passes.StatsJet, m: int) -> passes.StatsJet:
    """The first m rows of a jet (value and tangent)."""
    return passes.StatsJet(*(TokenStats(*(x[:m] for x in stats)) for stats in (jet.value, jet.tangent)))


def _change_floor(d_logp, d_entropy, stats0: TokenStats, mask, settings, logp_ref) -> float:
    """``_SIGMAS`` × floor(ΔH_true) from the first rows' differences, with E's statistics at θ₀ (``stats0``) and the
    weights w_i = exp(S_i(θ₀) − S_i^q) from E's sampler (``logp_ref`` S^q; None: θ₀, every w_i = 1)."""
    rows0 = estimators.rows(stats0, settings.entropy)
    logw = torch.zeros_like(rows0.logp) if logp_ref is None else rows0.logp - logp_ref.to(rows0.logp.device)
    weights = torch.exp(logw - logw.max())
    denom = estimators.denominators(mask, settings.normalize)
    return _SIGMAS * _floor_of_change(d_logp, d_entropy, rows0, denom, weights)


def _forward_floor(policy, params, head: Rollouts, stats0: TokenStats, mask, settings, logp_ref) -> _RoundingFloor:
    """The ΔH_true floor from a plain and a perturbed forward pass over ``head`` (E's first rows), for models without
    forward-mode derivatives (``method="grad"``); δH₁'s floor is not estimated (None)."""
    plain = passes.forward(policy, params, head, len(head))
    with perturbed_rounding(_SEED):
        perturbed = passes.forward(policy, params, head, len(head))
    d_logp, d_entropy = _statistic_differences(plain, perturbed, settings.entropy)
    return _RoundingFloor(_change_floor(d_logp, d_entropy, stats0, mask.to(d_logp.device), settings, logp_ref), None,
                         str(policy.dtype).removeprefix("torch."))


def rounding_floor(policy, params, delta, E: Rollouts, stats0: TokenStats, settings, plain: passes.StatsJet | None = None,
                   logp_ref: torch.Tensor | None = None, rows: int = _FLOOR_ROWS) -> _RoundingFloor:
    """Estimated rounding errors of ΔH_true and δH₁ on E along Δθ at ``policy.dtype`` from a perturbed jvp of E's first
    m = ``rows`` rows (at most one micro-batch), against the plain one (``plain``: a jvp of E whose first m rows are
    used, else computed here); the module docstring. ``stats0`` are E's statistics at θ₀, ``settings`` the estimator's
    (``fprobe.entropy.settings.Settings``), ``logp_ref`` the sequence log-probs S^q of E's sampler (None: θ₀). Row i's part of δH₁ is taken with the coefficients (α, β) of the
    statistics it was computed with, so the rounding of H_i that enters δH₁ through (H_i − Ĥ D_i) Ṡ_i counts too.
    Δθ = 0 has floors 0 (ΔH_true compares one evaluation with itself). Cost: one jvp pass over m rows (two without
    ``plain``)."""
    dtype = str(policy.dtype).removeprefix("torch.")
    if float(tree.norm(delta)) == 0.0:
        return _RoundingFloor(0.0, 0.0, dtype)
    m = min(len(E), rows, settings.micro_batch or len(E))
    head = E.select(slice(0, m))
    if settings.method == "grad":
        return _forward_floor(policy, params, head, stats0, E.response_mask, settings, logp_ref)
    plain = passes.jet(policy, params, delta, head, 1, m) if plain is None else _head_of(plain, m)
    with perturbed_rounding(_SEED):
        perturbed = passes.jet(policy, params, delta, head, 1, m)
    d_logp, d_entropy = _statistic_differences(plain.value, perturbed.value, settings.entropy)
    mask = E.response_mask.to(d_logp.device)
    coefficients = lambda stats: [c[:m] for c in estimators.first_order_coefficients(
        stats, mask, settings.estimator, settings.normalize, settings.entropy, settings.baseline, logp_ref, E.group_ids)]
    d_parts = (_row_parts(*coefficients(_with_rows_replaced(stats0, perturbed.value)), perturbed.tangent)
               - _row_parts(*coefficients(_with_rows_replaced(stats0, plain.value)), plain.tangent))
    return _RoundingFloor(_change_floor(d_logp, d_entropy, stats0, mask, settings, logp_ref),
                         _SIGMAS * _floor_of_derivative(d_parts, len(E)), dtype)


def _below_floor(delta_h_true: float, floor: _RoundingFloor) -> bool:
    """Whether |ΔH_true| is not well above its rounding floor (within ``_WELL_ABOVE`` floors)."""
    return abs(delta_h_true) < _WELL_ABOVE * floor.delta_h_true


def warn_if_below_floor(delta_h_true: float, floor: _RoundingFloor, where: str = "") -> bool:
    """``_below_floor``; if so, a ``PrecisionWarning`` at the caller's line suggesting float64 passes."""
    low = _below_floor(delta_h_true, floor)
    if low:
        warn(
            f"|ΔH_true| = {abs(delta_h_true):.3g}{where} is within {_WELL_ABOVE:g}× its rounding floor "
            f"{floor.delta_h_true:.2g} in {floor.dtype}: the ratio to δH₁ is rounding noise; pass eval_dtype=torch.float64 "
            "(passes on a float64 copy of the weights)",
            PrecisionWarning,
        )
    return low
