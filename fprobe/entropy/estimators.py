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
Baseline = Literal["none", "position"]


class Rows(NamedTuple):
    """Per-sequence S_i = Σ_k ℓ_ik and H_i."""

    logp: torch.Tensor
    entropy: torch.Tensor


class Snis(NamedTuple):
    """Ĥ and its importance-weight diagnostics: ESS = (Σw)²/Σw², its fraction of n, max w_i/Σw."""

    value: torch.Tensor
    ess: torch.Tensor
    ess_fraction: torch.Tensor
    max_weight: torch.Tensor


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


def snis_value(logp: torch.Tensor, entropy: torch.Tensor, logp0: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """Ĥ = Σ w H / Σ w D with w = exp(log w − max log w) (the max taken as a constant)."""
    logw = logp - logp0
    w = torch.exp(logw - logw.detach().max())
    return (w * entropy).sum() / (w * denom).sum()


def effective_sample_size(logw: torch.Tensor) -> torch.Tensor:
    """ESS = (Σw)² / Σw² of the weights w = exp(log w − max log w)."""
    w = torch.exp(logw - logw.max())
    return w.sum() ** 2 / (w**2).sum()


def snis(r: Rows, logp0: torch.Tensor, denom: torch.Tensor) -> Snis:
    """Ĥ with its diagnostics: ESS, ESS / n and the largest normalised weight."""
    logw = log_weights(r.logp, logp0)
    ess = effective_sample_size(logw)
    return Snis(snis_value(r.logp, r.entropy, logp0, denom), ess, ess / len(logw), torch.softmax(logw, 0).max())


def entropy_to_go(stats: TokenStats, mask: torch.Tensor, entropy: Entropy) -> torch.Tensor:
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


def first_order_coefficients(
    stats: TokenStats,
    mask: torch.Tensor,
    estimator: Estimator = "snis",
    normalize: Normalize = "token",
    entropy: Entropy = "rb",
    baseline: Baseline = "none",
    logp_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L] coefficients (α, β) with δH₁ = Σ_ik α_ik ℓ̇_ik + β_ik ḣ_ik for statistics at θ₀.

    ``snis``: the exact derivative of Ĥ, δH₁ = [Σ w_i Ḣ_i + Σ w_i (H_i − Ĥ D_i) Ṡ_i] / Σ w_i D_i, with
    w_i = exp(S_i(θ₀) − S_i^q) relative to the policy q that sampled E (``logp_ref`` = S^q; None: q = π_θ₀,
    every w_i = 1). ``togo``: the same expectation with H_i ℓ̇_ik → (G_ik − b_ik) ℓ̇_ik and
    D_i ℓ̇_ik → (D_i − D_≤k) ℓ̇_ik, where D_≤k = k per token (0 per sequence, whose D_i ℓ̇_ik term
    vanishes in expectation).
    """
    mask = mask.to(stats.logp.device).double()  # E's masks may live on the CPU, the statistics on the policy's device
    r = rows(stats, entropy)
    logw = log_weights(r.logp, r.logp if logp_ref is None else logp_ref.to(r.logp.device))
    w = torch.exp(logw - logw.max())
    denom = denominators(mask, normalize)
    total = (w * denom).sum()
    h_hat = ((w * r.entropy).sum() / total).item()
    if estimator == "snis":
        score_weight = (r.entropy - h_hat * denom)[:, None] * mask
    elif estimator == "togo":
        to_go = entropy_to_go(stats, mask, entropy)
        if baseline == "position":
            to_go = to_go - position_baseline(to_go, mask)
        elif baseline != "none":
            raise ValueError(f"baseline must be 'none' or 'position', got {baseline!r}")
        denom_to_go = (denom[:, None] - mask.cumsum(-1)) * mask if normalize == "token" else torch.zeros_like(mask)
        score_weight = to_go - h_hat * denom_to_go
    else:
        raise ValueError(f"estimator must be 'snis' or 'togo', got {estimator!r}")
    weighted = w[:, None] * mask
    if entropy == "rb":
        return w[:, None] * score_weight / total, weighted / total
    return (w[:, None] * score_weight - weighted) / total, torch.zeros_like(mask)


def contract(alpha: torch.Tensor, beta: torch.Tensor, tangent: TokenStats) -> torch.Tensor:
    """Σ_ik α_ik ℓ̇_ik + β_ik ḣ_ik."""
    return (alpha * tangent.logp).sum() + (beta * tangent.entropy).sum()


def taylor_derivatives(r0: Rows, r1: Rows, r2: Rows | None, logp_ref: torch.Tensor, denom: torch.Tensor):
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
        )

    zero = torch.zeros((), dtype=torch.float64, device=denom.device)
    slope = lambda eps: torch.func.jvp(along, (eps,), (torch.ones_like(eps),))[1]
    second = None if r2 is None else 0.5 * torch.func.jvp(slope, (zero,), (torch.ones_like(zero),))[1]
    return slope(zero), second


def second_order(value: TokenStats, tangent: TokenStats, second: TokenStats, mask, normalize: Normalize, entropy: Entropy,
                 logp_ref: torch.Tensor | None = None):
    """δH₂ = ½ d²/dε² Ĥ(θ₀ + εΔθ) at 0 (``taylor_derivatives`` with weights relative to ``logp_ref``, the
    sampling policy's S^q; None: θ₀)."""
    denom = denominators(mask.to(value.logp.device), normalize)
    r0 = rows(value, entropy)
    reference = r0.logp if logp_ref is None else logp_ref.to(r0.logp.device)
    return taylor_derivatives(r0, rows(tangent, entropy), rows(second, entropy), reference, denom)[1]


def covariance_baseline(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, lr: float) -> float:
    """Cui et al. (2025): ΔH ≈ −η Cov(log π, A) over the update batch's response tokens."""
    mask = mask.to(logp.device).bool()
    ell = logp[mask]
    adv = advantages.to(logp.device).double()[:, None].expand_as(logp)[mask]
    return -lr * float(((ell - ell.mean()) * (adv - adv.mean())).mean())
