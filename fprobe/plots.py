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
