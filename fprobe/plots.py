"""Matplotlib figures of fprobe's results (imported lazily: plotting is optional at run time)."""


def _figure(ncols: int, width: float = 5.0):
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, 4), squeeze=False)


def _save(fig, path):
    if path is not None:
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _mark_low_ess(ax, xs, ys, low):
    if low:
        ax.scatter([xs[i] for i in low], [ys[i] for i in low], s=120, facecolors="none", edgecolors="red", label="low ESS")


def _band(ax, xs, values, errors, absolute=False):
    """A shaded ±1 standard-error band around ``values`` (of |values| when ``absolute``, kept above 0 for a log
    axis), over the points whose se is known."""
    points = [(x, v, e) for x, v, e in zip(xs, values, errors or []) if v is not None and e is not None]
    if not points:
        return
    x, v, e = zip(*points)
    centre = [abs(a) for a in v] if absolute else list(v)
    low = [max(c - s, c / 10) if absolute else c - s for c, s in zip(centre, e)]
    ax.fill_between(x, low, [c + s for c, s in zip(centre, e)], alpha=0.2, lw=0)


def plot_sweep(sweep, path=None):
    """Left: ΔH_true / δH₁ (and / (δH₁+δH₂)) against η, which is 1 in the linear regime. Right: |ΔH_true|,
    |δH₁| and |δH₁+δH₂| against η on log–log axes with the fitted slope. Both on a log η axis, ±1 standard-error
    bands over E's sequences shaded (on the log axis, the band's lower edge is kept above a tenth of the value),
    the linear-regime radius η₁₀ dashed where δH₂ is known, low-ESS points circled in red."""
    fig, axes = _figure(2)
    ratio_ax, loglog_ax = axes[0]
    lrs = sweep.lr
    low = [i for i, flag in enumerate(sweep.ess_low) if flag]
    ratios = [("ΔH_true / δH₁", sweep.ratio, "o-", sweep.ratio_se)]
    series = [("|ΔH_true|", sweep.delta_h_true, "o-", sweep.delta_h_true_se), ("|δH₁|", sweep.delta_h1, "--", sweep.delta_h1_se)]
    if sweep.delta_h12 is not None:
        second = [t / p if p else float("nan") for t, p in zip(sweep.delta_h_true, sweep.delta_h12)]
        ratios.append(("ΔH_true / (δH₁+δH₂)", second, "s:", None))
        series.append(("|δH₁+δH₂|", sweep.delta_h12, ":", sweep.delta_h12_se))
    for label, values, style, errors in ratios:
        ratio_ax.plot(lrs, values, style, label=label)
        _band(ratio_ax, lrs, values, errors)
    _mark_low_ess(ratio_ax, lrs, sweep.ratio, low)
    ratio_ax.axhline(1.0, color="grey", lw=0.5)
    ratio_ax.set_title("ratio to the prediction (1 in the linear regime), ±1 se")
    for label, values, style, errors in series:
        loglog_ax.plot(lrs, [abs(v) for v in values], style, label=label)
        _band(loglog_ax, lrs, values, errors, absolute=True)
    _mark_low_ess(loglog_ax, lrs, [abs(v) for v in sweep.delta_h_true], low)
    loglog_ax.set_yscale("log")
    loglog_ax.set_title(f"|entropy change| ±1 se: log–log slope {sweep.slope:.3f} (R² {sweep.r2:.3f})")
    for ax in (ratio_ax, loglog_ax):
        if sweep.eta_10 is not None:
            ax.axvline(sweep.eta_10, color="grey", ls="--", lw=0.8, label="η₁₀ (δH₂ = δH₁/10)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate η")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_contributions(contributions, path=None):
    """Per-sequence parts δH_j of δH₁ against the advantage A_j and against the mean token log-prob at θ₀
    (the two quantities of Cui et al.'s covariance picture), one point per row of U, coloured by group."""
    import matplotlib.pyplot as plt

    fig, axes = _figure(2)
    c = contributions
    ys = c.per_sequence.tolist()
    groups = sorted(set(c.group_ids.tolist())) if c.group_ids is not None else [None]
    row_group = c.group_ids.tolist() if c.group_ids is not None else [None] * len(ys)
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "viridis", len(groups))
    panels = [(axes[0][0], c.advantages.tolist(), "advantage A_j"), (axes[0][1], c.mean_logp.tolist(), "mean token log-prob at θ₀")]
    for ax, xs, label in panels:
        for k, group in enumerate(groups):
            rows = [i for i, g in enumerate(row_group) if g == group]
            ax.scatter([xs[i] for i in rows], [ys[i] for i in rows], color=colours(k), s=24, label=group)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel(label)
        ax.set_ylabel("δH_j")
    axes[0][0].axvline(0.0, color="grey", lw=0.5)
    if c.group_ids is not None and len(groups) <= 10:
        axes[0][1].legend(title="group", fontsize="small")
    fig.suptitle(
        f"δH₁ = {c.delta_h1:.4g} = momentum {c.momentum:.3g} + decay {c.decay:.3g} + Σ_j δH_j {c.sequences:.4g}"
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_token_contributions(contributions, row: int, path=None, labels=None):
    """Heat-strip of one row's per-token contributions δH_jk over its response tokens (diverging colours,
    centred at zero). ``labels``: token strings, one per response token, or a tokenizer with ``decode``."""
    c = contributions
    n = len(c.per_sequence)
    if not -n <= row < n:
        raise IndexError(f"row {row} is out of range for an update batch of {n} rows")
    mask = c.response_mask[row]
    values = c.per_token[row][mask]
    if labels is not None and hasattr(labels, "decode"):
        if c.token_ids is None:
            raise ValueError("no token ids stored: pass labels as a list of strings")
        labels = [labels.decode([int(t)]) for t in c.token_ids[row][mask]]
    if labels is not None and len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels for {len(values)} response tokens")
    fig, axes = _figure(1, width=max(5.0, 0.4 * len(values)))
    ax = axes[0][0]
    scale = float(values.abs().max()) or 1.0
    image = ax.imshow(values[None, :].numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
    ax.set_yticks([])
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels if labels is not None else range(1, len(values) + 1), rotation=90 if labels is not None else 0)
    ax.set_xlabel("response token")
    adv = float(c.advantages[row])
    ax.set_title(f"row {row % n}: δH_j = {float(c.per_sequence[row]):.4g}, A = {adv:.3g}, {len(values)} tokens")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="δH_jk")
    fig.set_figheight(2.4)
    return _save(fig, path)
