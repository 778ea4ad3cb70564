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


def plot_sweep(sweep, path=None):
    """ΔH_true vs η with the δH₁ and δH₁+δH₂ lines, linear and log–log; low-ESS points circled."""
    fig, axes = _figure(2)
    lrs = sweep.lrs
    series = [("ΔH_true", sweep.delta_h_true, "o-"), ("δH₁", sweep.delta_h1, "--")]
    if sweep.delta_h12 is not None:
        series.append(("δH₁+δH₂", sweep.delta_h12, ":"))
    low = [i for i, flag in enumerate(sweep.ess_low) if flag]
    for ax, loglog in zip(axes[0], (False, True)):
        for label, values, style in series:
            ys = [abs(v) for v in values] if loglog else values
            ax.plot(lrs, ys, style, label=label if not loglog else f"|{label}|")
        if low:
            ys = [abs(sweep.delta_h_true[i]) if loglog else sweep.delta_h_true[i] for i in low]
            ax.scatter([lrs[i] for i in low], ys, s=120, facecolors="none", edgecolors="red", label="low ESS")
        if loglog:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"log–log slope {sweep.slope:.3f} (R² {sweep.r2:.3f})")
        else:
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set_title("entropy change per token vs learning rate")
        ax.set_xlabel("learning rate η")
        ax.legend()
    axes[0][0].set_ylabel("ΔH")
    fig.tight_layout()
    return _save(fig, path)


def plot_contributions(contributions, path=None):
    """Per-sequence parts δH_j of δH₁ against the advantage A_j and against the mean token log-prob at θ₀
    (the two quantities of Cui et al.'s covariance picture), one point per row of U, coloured by group."""
    fig, axes = _figure(2)
    c = contributions
    ys = c.per_sequence.tolist()
    colours = c.group_ids.tolist() if c.group_ids is not None else None
    panels = [(axes[0][0], c.advantages.tolist(), "advantage A_j"), (axes[0][1], c.mean_logp.tolist(), "mean token log-prob at θ₀")]
    for ax, xs, label in panels:
        points = ax.scatter(xs, ys, c=colours, cmap="tab10" if colours is not None else None, s=24)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel(label)
        ax.set_ylabel("δH_j")
    axes[0][0].axvline(0.0, color="grey", lw=0.5)
    if colours is not None and len(set(colours)) <= 10:
        axes[0][1].legend(*points.legend_elements(), title="group", fontsize="small")
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
