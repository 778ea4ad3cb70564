"""Standard errors of the estimates on E over E's sequences, by the delta method (influence functions).

Every estimate is a smooth function f of the means x̄ of per-row terms X_i that the estimators already
hold (``fprobe.entropy.estimators``): the terms n_i, m_i of Ĥ = Σ n / Σ m at θ₀ with their ε-derivatives
ṅ_i, ṁ_i (δH₁'s, for the chosen estimator and baseline) and n̈_i/2, m̈_i/2, and the terms a_i, b_i at θ₀+Δθ:

    Ĥ(θ₀) = n̄/m̄,  Ĥ(θ₀+Δθ) = ā/b̄,  ΔH_true = ā/b̄ − n̄/m̄,  δH₁ = (ṅ̄ − Ĥ ṁ̄)/m̄,
    δH₂ = (n̈̄/2 − δH₁ ṁ̄ − Ĥ m̈̄/2)/m̄,  ratio = ΔH_true/δH₁.

Linearised about x̄, f(x̄) − f(μ) ≈ (1/n) Σ_i φ_i with the influence of row i, φ_i = ∇f(x̄) · (X_i − x̄)
(∇f by reverse-mode autograd, in float64). E's independent units are its prompt groups (rows with one ``E.group_ids``
value: a shared prompt and, with ``baseline='prompt'``, each other's baselines tie them) or else its rows.
With G units g:  se² = G/(G−1) · Σ_g (Σ_{i∈g} φ_i)² / n².  The ratio's se is this formula for
f = ΔH_true/δH₁, so it carries the covariance of its two estimates on the same E (their shared noise
largely cancels). ``togo``'s position baseline b_ik is a leave-one-out mean over all rows; it is treated as
fixed (row i's effect on the other rows' baselines multiplies E[ℓ̇_jk | prefix] = 0: a smaller order).

Why the delta method rather than the jackknife: the two agree to O(1/n) for these smooth ratio estimators,
but the delta method is exact algebra on the per-row terms (O(n), no estimate re-evaluated n times), it is
cluster-robust as written, and it needs no re-derivation of the leave-one-out baselines that deleting a row
would change. The calibration test (``tests/test_calibration.py``) checks it against exact enumeration.
``method='grad'`` yields δH₁ as one ∇Ĥ · Δθ with no per-row tangents, so δH₁'s and the ratio's se are then
undefined (the reason says so); so is every se of an E with a single unit, never 0.
"""

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from fprobe.entropy import estimators
from fprobe.model.tokens import TokenStats

_Terms = dict[str, torch.Tensor]  # per-row terms by name: n0 m0 (θ₀), n1 m1 (first), n2 m2 (second), a b (θ₀+Δθ)


def h_orig(x):
    return x["n0"] / x["m0"]


def h_upd(x):
    return x["a"] / x["b"]


def delta_h_true(x):
    return h_upd(x) - h_orig(x)


def delta_h1(x):
    return (x["n1"] - h_orig(x) * x["m1"]) / x["m0"]


def delta_h2(x):
    return (x["n2"] - delta_h1(x) * x["m1"] - h_orig(x) * x["m2"]) / x["m0"]


def ratio(x):
    return delta_h_true(x) / delta_h1(x)


ESTIMATES: dict[str, Callable] = dict(
    h_orig=h_orig, h_upd=h_upd, delta_h_true=delta_h_true, delta_h1=delta_h1, delta_h2=delta_h2, ratio=ratio
)
_NEEDS = dict(
    h_orig=("n0", "m0"), h_upd=("a", "b"), delta_h_true=("n0", "m0", "a", "b"), delta_h1=("n0", "m0", "n1", "m1"),
    delta_h2=("n0", "m0", "n1", "m1", "n2", "m2"), ratio=("n0", "m0", "n1", "m1", "a", "b"),
)
def along_the_step(scale: float) -> tuple[dict, dict]:
    """(estimates, needs) at Δθ scaled by s = η/η₀ (a learning-rate sweep; a, b the terms at θ₀ + sΔθ):
    ΔH_true, s δH₁, s δH₁ + s² δH₂ and ΔH_true / (s δH₁)."""
    first = lambda x: scale * delta_h1(x)
    estimates = dict(
        delta_h_true=delta_h_true, delta_h1=first, delta_h12=lambda x: first(x) + scale**2 * delta_h2(x),
        ratio=lambda x: delta_h_true(x) / first(x),
    )
    return estimates, {**_NEEDS, "delta_h12": _NEEDS["delta_h2"]}


_ONE_UNIT = "E holds one independent unit ({}): a standard error needs at least two"
GRADIENT_PATH = "δH₁ is one ∇Ĥ·Δθ (the gradient path), without per-sequence tangents"
GRAD_METHOD = f"method='grad': {GRADIENT_PATH}; method='jvp' gives its standard error"


class _StandardErrors(NamedTuple):
    """``values``: each estimate f(x̄) (equal to the reported one); ``se``: its standard error, or None where
    ``undefined`` says why; ``n_units``: E's independent units (prompt groups, or rows); ``terms``: the per-row
    terms they were computed from (for other functions of them, such as a sweep's)."""

    values: dict
    se: dict
    undefined: dict
    n_units: int
    terms: dict


def _unit_index(groups: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """Row → index of its independent unit: its group in ``groups`` (E.group_ids), else the row itself."""
    if groups is None:
        return torch.arange(n, device=device)
    return torch.unique(groups.to(device), return_inverse=True)[1]


def influence(estimate: Callable, terms: _Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x̄), φ) with φ_i = ∇f(x̄) · (X_i − x̄), for f = ``estimate`` of the column means x̄ of ``terms``."""
    means = {k: v.mean().detach().requires_grad_() for k, v in terms.items()}
    with torch.enable_grad():
        value = estimate(means)
        gradient = torch.autograd.grad(value, list(means.values()), allow_unused=True)
    phi = sum(0.0 if g is None else g * (terms[k] - means[k].detach()) for k, g in zip(means, gradient))
    return value.detach(), phi


def _standard_error(phi: torch.Tensor, units: torch.Tensor) -> float | None:
    """√(G/(G−1) Σ_g (Σ_{i∈g} φ_i)²) / n over the G units; None for G < 2."""
    count = int(units.max()) + 1
    if count < 2:
        return None
    per_unit = torch.zeros(count, dtype=phi.dtype, device=phi.device).index_add_(0, units, phi)
    return math.sqrt(count / (count - 1) * float((per_unit**2).sum())) / len(phi)


def standard_errors(terms: _Terms, groups: torch.Tensor | None = None, missing: Mapping[str, str] | None = None,
                    estimates: Mapping[str, Callable] | None = None, needs: Mapping[str, tuple] | None = None) -> _StandardErrors:
    """Value and standard error of every estimate whose terms are all present. ``missing``: {term: why it is
    absent}; an estimate whose absent terms all have a reason gets it in ``undefined``; ``estimates``/``needs``: other functions of the terms' means (default: the
    six above) and the terms each reads."""
    estimates, needs, missing = estimates or ESTIMATES, needs or _NEEDS, dict(missing or {})
    terms = {k: v.double() for k, v in terms.items() if v is not None}
    n = len(next(iter(terms.values())))
    units = _unit_index(groups, n, next(iter(terms.values())).device)
    n_units = int(units.max()) + 1
    values, se, undefined = {}, {}, {}
    for name, f in estimates.items():
        absent = [k for k in needs[name] if k not in terms]
        if absent:  # an estimate not computed at all (no reason given) is left out silently
            if all(k in missing for k in absent):
                undefined[name] = missing[absent[0]]
            continue
        value, phi = influence(f, {k: terms[k] for k in needs[name]})
        values[name], se[name] = float(value), _standard_error(phi, units)
        if se[name] is None:
            undefined[name] = _ONE_UNIT.format("one prompt group" if groups is not None and n > 1 else "one sequence")
    return _StandardErrors(values, se, undefined, n_units, terms)


def _first_order_rows(t: estimators.FirstOrderTerms, tangent: TokenStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (ṅ_i, ṁ_i) = (Σ_k a_ik ℓ̇_ik + c_ik ḣ_ik, Σ_k d_ik ℓ̇_ik) from ``first_order_terms``' coefficients."""
    entropy_part = 0.0 if tangent.entropy is None else t.num_entropy * tangent.entropy
    return (t.num_logp * tangent.logp + entropy_part).sum(-1), (t.den_logp * tangent.logp).sum(-1)


def of_statistics(value: TokenStats, mask: torch.Tensor, *, estimator: estimators.Estimator = "snis",
                  normalize: estimators.Normalize = "token", entropy: estimators.Entropy = "rb",
                  baseline: estimators.Baseline = "none", groups: torch.Tensor | None = None,
                  logp_ref: torch.Tensor | None = None, tangent: TokenStats | None = None,
                  second: TokenStats | None = None, moved: estimators.Rows | None = None,
                  missing: Mapping[str, str] | None = None) -> _StandardErrors:
    """``standard_errors`` of the estimates on E from its token statistics at θ₀ (``value``), their first and
    second ε-derivatives along Δθ (``tangent``, ``second``; None where not computed) and its rows at θ₀+Δθ
    (``moved``), for the estimator settings given; E's ``groups`` (group ids) set the independent units."""
    t = estimators.first_order_terms(value, mask, estimator, normalize, entropy, baseline, logp_ref, groups)
    terms = {"n0": t.num, "m0": t.den}
    if tangent is not None:
        terms["n1"], terms["m1"] = _first_order_rows(t, tangent)
    r0 = estimators.rows(value, entropy)
    denom = estimators.denominators(mask.to(r0.logp.device), normalize)
    baselines = estimators.baselines_for(r0, denom, baseline, groups)
    reference = r0.logp if logp_ref is None else logp_ref.to(r0.logp.device)
    if second is not None:
        terms["n2"], terms["m2"] = estimators.second_order_terms(value, tangent, second, mask, normalize, entropy, reference, baselines)
    if moved is not None:
        terms["a"], terms["b"] = estimators.snis_terms(moved.logp, moved.entropy, reference, denom, baselines)
    return standard_errors(terms, groups, missing)


def rows_for(rel_se: float, value: float, se: float | None, n_rows: int) -> int | None:
    """The |E| (rows, in E's own design) at which se would be ``rel_se``·|value|: se ∝ 1/√|E|, so
    ⌈|E| (se / (rel_se |value|))²⌉; None when se is undefined or the value is 0."""
    if not (isinstance(rel_se, (int, float)) and not isinstance(rel_se, bool) and math.isfinite(rel_se) and rel_se > 0):
        raise ValueError(f"rel_se must be a positive fraction of the estimate, got {rel_se!r}")
    if se is None or value == 0 or not math.isfinite(value):
        return None
    return max(1, math.ceil(n_rows * (se / (rel_se * abs(value))) ** 2))
