"""Entropy estimators on token statistics: SNIS Ĥ, its first and second ε-derivatives, the
variance-reduced entropy-to-go form, and the covariance baseline. Pure float64 tensor algebra on
[n, L] token statistics (log-probs ℓ_ik, entropies h_ik and their derivatives along Δθ); no model passes here.

Ĥ(θ) = Σ_i w_i H_i / Σ_i w_i D_i,  log w_i = S_i(θ) − S_i(θ₀),  D_i = T_i (per token) or 1 (per sequence),
H_i = Σ_k h_ik (Rao–Blackwell) or −S_i (naive), S_i = Σ_k ℓ_ik. At θ₀ every w_i = 1 and ẇ_i = Ṡ_i, so
δH₁ = d/dε Ĥ(θ₀ + εΔθ)|₀ = [Σ_i Ḣ_i + Σ_i (H_i − Ĥ D_i) Ṡ_i] / Σ_i D_i (dots: derivatives along Δθ).
"""

from typing import Literal, NamedTuple

import torch

from fprobe.model.tokens import TokenStats

Normalize = Literal["token", "seq"]
Entropy = Literal["rb", "naive"]
Estimator = Literal["snis", "togo"]
Baseline = Literal["none", "position", "prompt"]


class Rows(NamedTuple):
    """Per-sequence S_i = Σ_k ℓ_ik and H_i."""

    logp: torch.Tensor
    entropy: torch.Tensor


class Snis(NamedTuple):
    """Ĥ and its importance-weight diagnostics: ESS = (Σw)²/Σw², its fraction of n, max w_i/Σw; and the
    per-row statistics it was computed from (for its standard error)."""

    value: torch.Tensor
    ess: torch.Tensor
    ess_fraction: torch.Tensor
    max_weight: torch.Tensor
    rows: Rows


def rows(stats: TokenStats, entropy: Entropy = "rb") -> Rows:
    if entropy not in ("rb", "naive"):
        raise ValueError(f"entropy must be 'rb' or 'naive', got {entropy!r}")
    s = stats.logp.sum(-1)
    return Rows(s, stats.entropy.sum(-1) if entropy == "rb" else -s)


def denominators(mask: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    """D_i: T_i per token, 1 per sequence."""
    if normalize not in ("token", "seq"):
        raise ValueError(f"normalize must be 'token' or 'seq', got {normalize!r}")
    return mask.sum(-1).double() if normalize == "token" else torch.ones(mask.shape[0], dtype=torch.float64, device=mask.device)


def log_weights(logp: torch.Tensor, logp0: torch.Tensor) -> torch.Tensor:
    """log w_i = S_i − S_i(θ₀); raises naming the rows where it is not finite."""
    logw = logp - logp0
    bad = torch.nonzero(~torch.isfinite(logw)).flatten().tolist()
    if bad:
        raise FloatingPointError(f"importance log-weights are not finite for evaluation rows {bad}")
    return logw


class Baselines(NamedTuple):
    """Control-variate coefficients b_i^H, b_i^D of a row, functions of the *other* rows only (see ``snis_terms``)."""

    entropy: torch.Tensor
    denom: torch.Tensor


def _group_leave_one_out_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the other rows of each row's group; 0 for a row alone in its group."""
    _, index = torch.unique(groups.to(values.device), return_inverse=True)
    sums = torch.zeros(int(index.max()) + 1, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    counts = torch.zeros_like(sums).index_add_(0, index, torch.ones_like(values))
    others = counts[index] - 1
    return torch.where(others > 0, (sums[index] - values) / others.clamp(min=1), 0.0)


def check_groups(groups: torch.Tensor | None, n: int) -> torch.Tensor:
    """E's group ids (one per row) for ``baseline='prompt'``; raises when E has none."""
    if groups is None:
        raise ValueError(
            "baseline='prompt' needs E.group_ids (the prompt of each row): sample E with "
            "fprobe.sample(..., eval_group_size=k), or set group_ids on E"
        )
    if groups.shape != (n,):
        raise ValueError(f"E.group_ids must hold one id per row ({n}), got shape {tuple(groups.shape)}")
    return groups


def _prompt_baselines(r: Rows, denom: torch.Tensor, groups: torch.Tensor) -> Baselines:
    """b_i^H, b_i^D = the means of H_j and D_j over the other responses j to row i's prompt (0 for a lone response)."""
    return Baselines(_group_leave_one_out_mean(r.entropy, groups), _group_leave_one_out_mean(denom, groups))


def snis_terms(logp, entropy, logp_ref, denom, baselines: Baselines | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row numerator and denominator terms (n_i, m_i) of Ĥ = Σ n_i / Σ m_i, both scaled by one constant
    e^{−max log w} (which Ĥ does not see): n_i = w_i H_i − b_i^H (w_i − 1), m_i = w_i D_i − b_i^D (w_i − 1).

    The control variates b_i (w_i − 1) have mean zero whenever b_i does not depend on row i's response,
    since E_q[w_i | prompt] = 1 under the sampling policy q; without ``baselines`` they are absent. At θ₀
    with E sampled from π_θ₀ every w_i = 1 and they vanish, so Ĥ(θ₀) is unchanged; their ε-derivative is
    −b_i Ṡ_i, the score-function baseline of δH₁ (see ``first_order_terms``).
    """
    logw = logp - logp_ref
    top = logw.detach().max()
    w = torch.exp(logw - top)
    if baselines is None:
        return w * entropy, w * denom
    excess = w - torch.exp(-top)
    return w * entropy - baselines.entropy * excess, w * denom - baselines.denom * excess


def snis_value(logp, entropy, logp_ref, denom, baselines: Baselines | None = None) -> torch.Tensor:
    """Ĥ = Σ n_i / Σ m_i (``snis_terms``; without baselines Σ w H / Σ w D)."""
    num, den = snis_terms(logp, entropy, logp_ref, denom, baselines)
    return num.sum() / den.sum()


def effective_sample_size(logw: torch.Tensor) -> torch.Tensor:
    """ESS = (Σw)² / Σw² of the weights w = exp(log w − max log w)."""
    w = torch.exp(logw - logw.max())
    return w.sum() ** 2 / (w**2).sum()


def snis(r: Rows, logp_ref: torch.Tensor, denom: torch.Tensor, baselines: Baselines | None = None) -> Snis:
    """Ĥ with its diagnostics: ESS, ESS / n and the largest normalised weight."""
    logw = log_weights(r.logp, logp_ref)
    ess = effective_sample_size(logw)
    value = snis_value(r.logp, r.entropy, logp_ref, denom, baselines)
    return Snis(value, ess, ess / len(logw), torch.softmax(logw, 0).max(), r)


def _entropy_to_go(stats: TokenStats, mask: torch.Tensor, entropy: Entropy) -> torch.Tensor:
    """G_ik = Σ_{k'>k} h_ik' (Rao–Blackwell) or Σ_{k'≥k} −ℓ_ik' (naive; −ℓ_ik' depends on y_k' itself)."""
    per_token = stats.entropy if entropy == "rb" else -stats.logp
    inclusive = per_token.flip(-1).cumsum(-1).flip(-1)
    return (inclusive - per_token if entropy == "rb" else inclusive) * mask


def position_baseline(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """b_ik = mean of ``values`` at the same response position k over the *other* rows (leave-one-out,
    so b_ik does not depend on row i's own sample); 0 where no other row reaches position k."""
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)
    width = int(mask.sum(-1).max())
    by_position = torch.zeros(mask.shape[0], width, dtype=torch.float64, device=mask.device)
    counts = torch.zeros_like(by_position)
    by_position.scatter_add_(1, position, values * mask)
    counts.scatter_add_(1, position, mask.double())
    others = (by_position.sum(0) - by_position, counts.sum(0) - counts)
    mean = torch.where(others[1] > 0, others[0] / others[1].clamp(min=1), 0.0)
    return mean.gather(1, position) * mask


class FirstOrderTerms(NamedTuple):
    """[n, L] coefficients of the per-row first ε-derivatives of Ĥ's terms (``snis_terms``) at θ₀:
    ṅ_i = Σ_k a_ik ℓ̇_ik + c_ik ḣ_ik and ṁ_i = Σ_k d_ik ℓ̇_ik; with the terms n_i, m_i themselves."""

    num_logp: torch.Tensor
    num_entropy: torch.Tensor
    den_logp: torch.Tensor
    num: torch.Tensor
    den: torch.Tensor


def check_baseline(estimator: Estimator, baseline: Baseline) -> None:
    """``position`` is a baseline of ``togo``'s per-token sums, ``prompt`` one of ``snis``'s per-row sums."""
    if baseline not in ("none", "position", "prompt"):
        raise ValueError(f"baseline must be 'none', 'position' or 'prompt', got {baseline!r}")
    wanted = {"position": "togo", "prompt": "snis"}.get(baseline, estimator)
    if estimator != wanted:
        raise ValueError(f"baseline={baseline!r} applies to estimator={wanted!r} only (got estimator={estimator!r})")


def baselines_for(r: Rows, denom: torch.Tensor, baseline: Baseline, groups: torch.Tensor | None) -> Baselines | None:
    """The control variates of Ĥ itself: the per-prompt ones for ``baseline='prompt'``, else None."""
    if baseline != "prompt":
        return None
    return _prompt_baselines(r, denom, check_groups(groups, len(denom)).to(denom.device))


def first_order_terms(
    stats: TokenStats,
    mask: torch.Tensor,
    estimator: Estimator = "snis",
    normalize: Normalize = "token",
    entropy: Entropy = "rb",
    baseline: Baseline = "none",
    logp_ref: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> FirstOrderTerms:
    """Per-row first-order terms of δH₁ = (Σ ṅ_i − Ĥ Σ ṁ_i) / Σ m_i, for statistics at θ₀ and E sampled
    from q (``logp_ref`` = S^q; None: q = π_θ₀), with v_i = w_i(θ₀) and the baselines b of ``snis_terms``.

    ``snis``: the exact derivative of ``snis_terms``, ṅ_i = v_i [Ḣ_i + (H_i − b_i^H) Ṡ_i], ṁ_i = v_i (D_i − b_i^D) Ṡ_i
    (``baseline='prompt'``: b the per-prompt leave-one-out means; otherwise 0).
    ``togo``: the same expectation with (H_i − b^H) ℓ̇_ik → (G_ik − b_ik) ℓ̇_ik and D_i ℓ̇_ik → (D_i − D_≤k) ℓ̇_ik,
    where D_≤k = k per token (0 per sequence, whose D_i ℓ̇_ik term vanishes in expectation); ``baseline='position'``:
    b_ik the leave-one-out mean of G at position k. Naive entropy: Ḣ_i = −Ṡ_i.
    """
    check_baseline(estimator, baseline)
    if estimator not in ("snis", "togo"):
        raise ValueError(f"estimator must be 'snis' or 'togo', got {estimator!r}")
    mask = mask.to(stats.logp.device).double()  # E's masks may live on the CPU, the statistics on the policy's device
    r = rows(stats, entropy)
    denom = denominators(mask, normalize)
    reference = r.logp if logp_ref is None else logp_ref.to(r.logp.device)
    logw = log_weights(r.logp, reference)
    v = torch.exp(logw - logw.max())[:, None] * mask
    baselines = baselines_for(r, denom, baseline, groups)
    num, den = snis_terms(r.logp, r.entropy, reference, denom, baselines)
    if estimator == "snis":
        b = Baselines(torch.zeros_like(denom), torch.zeros_like(denom)) if baselines is None else baselines
        num_score, den_score = (r.entropy - b.entropy)[:, None], (denom - b.denom)[:, None]
    else:
        num_score = _entropy_to_go(stats, mask, entropy)
        if baseline == "position":
            num_score = num_score - position_baseline(num_score, mask)
        den_score = denom[:, None] - mask.cumsum(-1) if normalize == "token" else torch.zeros_like(mask)
    if entropy == "rb":
        return FirstOrderTerms(v * num_score, v, v * den_score, num, den)
    return FirstOrderTerms(v * (num_score - 1), torch.zeros_like(mask), v * den_score, num, den)


def first_order_coefficients(
    stats: TokenStats,
    mask: torch.Tensor,
    estimator: Estimator = "snis",
    normalize: Normalize = "token",
    entropy: Entropy = "rb",
    baseline: Baseline = "none",
    logp_ref: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L] coefficients (α, β) with δH₁ = Σ_ik α_ik ℓ̇_ik + β_ik ḣ_ik for statistics at θ₀:
    α = (a − Ĥ d) / Σ m, β = c / Σ m with the terms of ``first_order_terms`` (same arguments)."""
    t = first_order_terms(stats, mask, estimator, normalize, entropy, baseline, logp_ref, groups)
    total = t.den.sum()
    h_hat = (t.num.sum() / total).item()
    return (t.num_logp - h_hat * t.den_logp) / total, t.num_entropy / total


def contract(alpha: torch.Tensor, beta: torch.Tensor, tangent: TokenStats) -> torch.Tensor:
    """Σ_ik α_ik ℓ̇_ik + β_ik ḣ_ik."""
    return (alpha * tangent.logp).sum() + (beta * tangent.entropy).sum()


def _taylor_derivatives(r0: Rows, r1: Rows, r2: Rows | None, logp_ref: torch.Tensor, denom: torch.Tensor,
                       baselines: Baselines | None = None):
    """(d/dε, ½ d²/dε² or None) at ε = 0 of Ĥ along the quadratic Taylor path of the per-row statistics,
    S_i + εṠ_i + ½ε²S̈_i and H_i alike (the same first two derivatives as the true path), with log-weights
    relative to ``logp_ref`` (S(θ₀) for a sample of π_θ₀; a sampling policy's S^q for a reused sample):
    forward-mode AD of ``snis_value``, the second by forward over forward (``r2`` None: first only)."""
    path = lambda a0, a1, a2, eps: a0 + eps * a1 + (0.0 if a2 is None else 0.5 * eps**2 * a2)

    def along(eps):
        return snis_value(
            path(r0.logp, r1.logp, None if r2 is None else r2.logp, eps),
            path(r0.entropy, r1.entropy, None if r2 is None else r2.entropy, eps),
            logp_ref,
            denom,
            baselines,
        )

    zero = torch.zeros((), dtype=torch.float64, device=denom.device)
    slope = lambda eps: torch.func.jvp(along, (eps,), (torch.ones_like(eps),))[1]
    second = None if r2 is None else 0.5 * torch.func.jvp(slope, (zero,), (torch.ones_like(zero),))[1]
    return slope(zero), second


def second_order(value: TokenStats, tangent: TokenStats, second: TokenStats, mask, normalize: Normalize, entropy: Entropy,
                 logp_ref: torch.Tensor | None = None, baselines: Baselines | None = None):
    """δH₂ = ½ d²/dε² Ĥ(θ₀ + εΔθ) at 0 (``_taylor_derivatives`` with weights relative to ``logp_ref``, the
    sampling policy's S^q; None: θ₀)."""
    denom = denominators(mask.to(value.logp.device), normalize)
    r0 = rows(value, entropy)
    reference = r0.logp if logp_ref is None else logp_ref.to(r0.logp.device)
    return _taylor_derivatives(r0, rows(tangent, entropy), rows(second, entropy), reference, denom, baselines)[1]


def second_order_terms(value: TokenStats, tangent: TokenStats, second: TokenStats, mask, normalize: Normalize,
                       entropy: Entropy, logp_ref: torch.Tensor | None = None,
                       baselines: Baselines | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ½ d²/dε² of ``snis_terms`` at θ₀ along the statistics' Taylor path (n̈_i/2, m̈_i/2):
    v_i [½(S̈_i + Ṡ_i²)(H_i − b_i^H) + Ṡ_i Ḣ_i + ½Ḧ_i] and v_i ½(S̈_i + Ṡ_i²)(D_i − b_i^D); then
    δH₂ = (Σ n̈/2 − δH₁ Σ ṁ − Ĥ Σ m̈/2) / Σ m."""
    denom = denominators(mask.to(value.logp.device), normalize)
    r0, r1, r2 = rows(value, entropy), rows(tangent, entropy), rows(second, entropy)
    logw = log_weights(r0.logp, r0.logp if logp_ref is None else logp_ref.to(r0.logp.device))
    v = torch.exp(logw - logw.max())
    zero = torch.zeros_like(denom)
    b = Baselines(zero, zero) if baselines is None else baselines
    curvature = 0.5 * (r2.logp + r1.logp**2)
    num = v * (curvature * (r0.entropy - b.entropy) + r1.logp * r1.entropy + 0.5 * r2.entropy)
    return num, v * curvature * (denom - b.denom)


def covariance_baseline(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, lr: float) -> float:
    """Cui et al. (2025): ΔH ≈ −η Cov(log π, A) over the update batch's response tokens."""
    mask = mask.to(logp.device).bool()
    ell = logp[mask]
    adv = advantages.to(logp.device).double()[:, None].expand_as(logp)[mask]
    return -lr * float(((ell - ell.mean()) * (adv - adv.mean())).mean())
