"""Ĥ on the evaluation batch E at θ₀ and at any new parameters: the estimator settings, what is kept
from θ₀ (``Context``), the first-order pass (δH₁ by jvp or gradient · Δθ, δH₂), SNIS at new
parameters and the low-ESS warning. ``probe`` and ``sweep`` both build on this module.

Ĥ(θ) = Σ_i w_i H_i / Σ_i w_i D_i with log w_i = S_i(θ) − S_i(θ₀) (see ``fprobe.estimators``).
"""

import dataclasses
import time
import typing
from dataclasses import dataclass
from typing import Literal

import optree
import torch

from fprobe.entropy import estimators
from fprobe.model import passes
from fprobe import tree
from fprobe.rollouts import Rollouts
from fprobe.model.tokens import TokenStats
from fprobe.warnings import LowESSWarning, warn

Method = Literal["jvp", "grad"]


def check_choice(name: str, value, allowed: type) -> None:
    """``value`` must be one of the strings of the ``Literal`` type ``allowed``."""
    options = typing.get_args(allowed)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How Ĥ and δH₁ are estimated; checked when made, so a typo fails before any pass runs.

    ``micro_batch``: rows per pass (None: the whole batch in one pass); peak memory is set by it.
    """

    estimator: estimators.Estimator = "snis"
    normalize: estimators.Normalize = "token"
    entropy: estimators.Entropy = "rb"
    baseline: estimators.Baseline = "none"
    method: Method = "jvp"
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH
    ess_threshold: float = 0.5

    def __post_init__(self):
        for name, allowed in (
            ("estimator", estimators.Estimator),
            ("normalize", estimators.Normalize),
            ("entropy", estimators.Entropy),
            ("baseline", estimators.Baseline),
            ("method", Method),
        ):
            check_choice(name, getattr(self, name), allowed)
        if self.baseline != "none" and self.estimator != "togo":
            raise ValueError(f"baseline={self.baseline!r} applies to estimator='togo' only (got estimator={self.estimator!r})")
        if self.micro_batch is not None and (isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise ValueError(f"micro_batch must be a positive number of rows or None (whole batch), got {self.micro_batch!r}")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold is a fraction of the batch size, in [0, 1]; got {self.ess_threshold!r}")


def version_of(x: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (shared by a parameter and its detached views); None for an
    inference-mode tensor, which has none."""
    try:
        return x._version
    except RuntimeError:
        return None


def tensor_versions(tree, prefix: str) -> dict:
    """{label: (tensor, its version counter)} for every tensor leaf of a pytree (dicts, NamedTuple optimizer
    states, …), labelled like ``opt_state.exp_avg['w']``, for ``Context.check_unchanged``."""
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree)
    return {a.codify(prefix): (x, version_of(x)) for a, x in zip(accessors, leaves) if isinstance(x, torch.Tensor)}


def batch_tensors(batch: Rollouts) -> dict:
    """The tensor fields of a batch by name."""
    return {f.name: x for f in dataclasses.fields(batch) if isinstance(x := getattr(batch, f.name), torch.Tensor)}


@dataclass(frozen=True)
class Context:
    """What a learning-rate sweep or a decomposition reuses: the policy, θ₀, E, and Ĥ's ingredients at
    θ₀ (per-row S_i and H_i, denominators D_i, first-order coefficients α, β)."""

    policy: object
    params: tree.Params
    E: Rollouts
    rows0: estimators.Rows
    denom: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    settings: Settings
    versions: dict | None = None  # {label: (tensor, its version counter)} when measured: see check_unchanged

    def __post_init__(self):
        if self.versions is None:
            object.__setattr__(self, "versions", tensor_versions(self.params, "θ₀") | tensor_versions(batch_tensors(self.E), "E"))

    def check_unchanged(self) -> None:
        """Raise if a tensor of θ₀ or of a batch was changed in place since the measurement (e.g. the model was
        trained further: ``policy.params`` are views of its weights), which would mix two models in one result."""
        changed = [label for label, (x, version) in self.versions.items() if version is not None and version_of(x) != version]
        if changed:
            raise RuntimeError(
                f"tensors of this result were changed in place since it was measured ({', '.join(changed[:3])}"
                f"{'...' if len(changed) > 3 else ''}; e.g. the model trained further): its sweep, contributions or "
                "predictors would mix two models or batches; probe again, or probe with params the model does not "
                "share (e.g. fprobe.tree.tree_map(torch.clone, policy.params))"
            )


class FirstOrder(typing.NamedTuple):
    """Statistics of E at θ₀, the coefficients (α, β) with δH₁ = Σ α ℓ̇ + β ḣ, δH₁, δH₂ (or None)."""

    stats0: TokenStats
    alpha: torch.Tensor
    beta: torch.Tensor
    delta_h1: float
    delta_h2: float | None


def first_order(policy, params, delta, E: Rollouts, settings: Settings, second_order: bool = False, progress: bool = False,
                timings: dict | None = None) -> FirstOrder:
    """δH₁ = d/dε Ĥ(θ₀+εΔθ)|₀ by one jvp (``method="jvp"``) or as ∇Ĥ · Δθ (``"grad"``: a forward and a
    vjp of the same linear functional); δH₂ = ½ d²/dε² by forward over forward when ``second_order``.
    ``timings`` (if given) receives the seconds of each pass."""
    timings = {} if timings is None else timings
    mask = E.response_mask
    coefficients = lambda stats: estimators.first_order_coefficients(
        stats, mask, settings.estimator, settings.normalize, settings.entropy, settings.baseline
    )
    start, delta_h2 = time.perf_counter(), None
    if settings.method == "jvp" or second_order:
        jet = passes.jet(policy, params, delta, E, 2 if second_order else 1, settings.micro_batch, progress)
        stats0 = jet.value
        alpha, beta = coefficients(stats0)
        delta_h1 = float(estimators.contract(alpha, beta, jet.tangent))
        if second_order:
            delta_h2 = float(estimators.second_order(jet.value, jet.tangent, jet.second, mask, settings.normalize, settings.entropy))
        timings["jvp2" if second_order else "jvp"] = time.perf_counter() - start
        start = time.perf_counter()
    if settings.method == "grad":
        if not second_order:
            stats0 = passes.forward(policy, params, E, settings.micro_batch, progress)
            alpha, beta = coefficients(stats0)
        _, grad_h, _ = passes.gradient(policy, params, E, passes.linear_functional(alpha, beta), settings.micro_batch, progress)
        delta_h1 = float(tree.vdot(grad_h, delta))
        timings["grad"] = time.perf_counter() - start
    return FirstOrder(stats0, alpha, beta, delta_h1, delta_h2)


def snis_at(context: Context, params, progress: bool = False) -> estimators.Snis:
    """Ĥ and ESS on E at ``params``: one micro-batched forward pass."""
    context.check_unchanged()
    stats = passes.forward(context.policy, params, context.E, context.settings.micro_batch, progress)
    return estimators.snis(estimators.rows(stats, context.settings.entropy), context.rows0.logp, context.denom)


def warn_if_low_ess(ess_fraction: float, threshold: float, where: str) -> bool:
    """Whether the ESS fraction is below ``threshold``; if so, a ``LowESSWarning`` at the caller's line."""
    low = ess_fraction < threshold
    if low:
        warn(
            f"ESS fraction {ess_fraction:.3g} < {threshold} {where}: the importance weights are degenerate and the "
            "step is outside the linear regime; ΔH_true is unreliable",
            LowESSWarning,
        )
    return low
