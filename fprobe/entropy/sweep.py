"""Learning-rate sweep from one step: Δθ(η) = (η/η₀) Δθ(η₀), exact for AdamW and SGD given the gradient
and optimizer state (decoupled weight decay included), so K rates cost one gradient and K forward passes."""

import math
from dataclasses import dataclass

import torch

from fprobe import checks, records
from fprobe import tree
from fprobe.entropy import estimators, uncertainty
from fprobe.entropy.context import snis_at, warn_if_low_ess

ESTIMATES = ("delta_h_true", "delta_h1", "delta_h12", "ratio")
COLUMNS = ("lr", *ESTIMATES, *(f"{name}_se" for name in ESTIMATES), "ess_fraction", "ess_low")


@dataclass(frozen=True, kw_only=True, repr=False)
class SweepResult(records.Record):
    """Per learning rate η: ΔH_true, δH₁ = (η/η₀) δH₁(η₀), δH₁+δH₂ (δH₂ scales as (η/η₀)²), ratio, ESS, and
    the standard error of each estimate over E's sequences (``*_se``; None where undefined, see
    ``EntropyChange.se_undefined``).

    ``slope``/``r2``: the log–log fit of |ΔH_true| against η (slope 1 in the linear regime);
    ``eta_10`` = 0.1·η₀·|δH₁/δH₂|, where the second-order term reaches a tenth of the first.
    """

    lr: list
    delta_h_true: list
    delta_h1: list
    delta_h12: list | None
    ratio: list
    delta_h_true_se: list
    delta_h1_se: list
    delta_h12_se: list | None
    ratio_se: list
    ess_fraction: list
    ess_low: list
    slope: float
    r2: float
    eta_10: float | None
    lr0: float

    def records(self) -> list[dict]:
        """One dict per learning rate, keyed by ``COLUMNS``."""
        columns = {k: getattr(self, k) or [None] * len(self.lr) for k in COLUMNS}
        return [{k: columns[k][i] for k in COLUMNS} for i in range(len(self.lr))]

    def __repr__(self) -> str:
        head = f"{'lr':>11} {'ΔH_true':>21} {'δH₁':>21} {'δH₁+δH₂':>21} {'ratio':>17} {'ESS frac':>9}"
        fmt = records.cell
        pm = lambda r, k, w: fmt(r[k], w) if r[f"{k}_se"] is None else f"{r[k]:.4g} ± {r[f'{k}_se']:.2g}".rjust(w)
        lines = [
            f"{fmt(r['lr'], 11)} {pm(r, 'delta_h_true', 21)} {pm(r, 'delta_h1', 21)} {pm(r, 'delta_h12', 21)} "
            f"{pm(r, 'ratio', 17)} {fmt(r['ess_fraction'], 9)}{'  LOW ESS' if r['ess_low'] else ''}"
            for r in self.records()
        ]
        tail = f"log-log slope of |ΔH_true| vs lr: {self.slope:.4f} (R² {self.r2:.4f})"
        if self.eta_10 is not None:
            tail += f"; linear-regime radius η₁₀ = {self.eta_10:.3g}"
        return "\n".join(["SweepResult", head, *lines, tail])

    def plot(self, path=None):
        """ΔH_true / δH₁ (and / (δH₁+δH₂)) against η, and |ΔH_true|, |δH₁|, |δH₁+δH₂| on log–log axes, with
        η₁₀ marked and low-ESS points circled in red. Returns the figure; saves it when ``path`` is given."""
        from fprobe.plots import plot_sweep

        return plot_sweep(self, path)


def loglog_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope and R² of log|y| against log x over the points with x > 0 and y ≠ 0."""
    pairs = [(math.log(a), math.log(abs(b))) for a, b in zip(x, y) if a > 0 and b != 0]
    if len(pairs) < 2:
        return float("nan"), float("nan")
    X = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    Y = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    xc, yc = X - X.mean(), Y - Y.mean()
    slope = float((xc * yc).sum() / (xc * xc).sum())
    residual = yc - slope * xc
    total = float((yc * yc).sum())
    return slope, 1.0 - float((residual * residual).sum()) / total if total else 1.0


def sweep(change, lrs, progress: bool = False) -> SweepResult:
    """Evaluate ``change`` (an EntropyChange/ProbeResult) at each learning rate in ``lrs``."""
    lr0 = change.lr_used
    if lr0 == 0:
        raise ValueError("the probe's learning rate is 0, so its Δθ = 0 cannot be rescaled to other learning rates")
    ctx = change.context
    lrs = [checks.learning_rate(lr, "each learning rate of the sweep") for lr in lrs]
    if not any(lr > 0 for lr in lrs):
        raise ValueError(f"a sweep needs at least one learning rate > 0, got {lrs}")
    true, first, both, ratio, ess, low = [], [], [], [], [], []
    errors = {name: [] for name in ESTIMATES}
    for lr in lrs:
        s = lr / lr0
        if s == 1.0:  # θ₀ + Δθ itself: the change's own ΔH_true and ESS, no forward pass repeated
            dh, ess_fraction = change.delta_h_true, change.ess_fraction
            moved = {k: change.se_terms[k] for k in ("a", "b")}
        else:
            est = snis_at(ctx, tree.axpy(s, change.delta_named, ctx.params), progress)
            dh, ess_fraction = float(est.value) - change.h_orig, float(est.ess_fraction)
            moved = dict(zip("ab", estimators.snis_terms(est.rows.logp, est.rows.entropy, ctx.logp_ref, ctx.denom, ctx.baselines)))
        terms = {k: v for k, v in change.se_terms.items() if k not in ("a", "b")} | moved
        estimates, needs = uncertainty.along_the_step(s)
        se = uncertainty.standard_errors(terms, ctx.E.group_ids, estimates=estimates, needs=needs).se
        for name in ESTIMATES:
            errors[name].append(se.get(name))
        d1 = s * change.delta_h1
        true.append(dh)
        first.append(d1)
        if change.delta_h2 is not None:
            both.append(d1 + s * s * change.delta_h2)
        ratio.append(dh / d1 if d1 else float("nan"))
        ess.append(ess_fraction)
        low.append(warn_if_low_ess(ess[-1], ctx.settings.ess_threshold, f"at lr={lr:g}"))
    slope, r2 = loglog_fit(lrs, true)
    eta_10 = 0.1 * lr0 * abs(change.delta_h1 / change.delta_h2) if change.delta_h2 else None
    return SweepResult(
        lr=lrs, delta_h_true=true, delta_h1=first, delta_h12=both if change.delta_h2 is not None else None, ratio=ratio,
        delta_h_true_se=errors["delta_h_true"], delta_h1_se=errors["delta_h1"],
        delta_h12_se=errors["delta_h12"] if change.delta_h2 is not None else None, ratio_se=errors["ratio"],
        ess_fraction=ess, ess_low=low, slope=slope, r2=r2, eta_10=eta_10, lr0=lr0,
    )
