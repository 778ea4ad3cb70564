"""What a measurement on E keeps from θ₀ (``Context``), guarded against tensors changed in place since;
Ĥ by SNIS at any new parameters from it; the low-ESS warning.

Ĥ(θ) = Σ_i w_i H_i / Σ_i w_i D_i with log w_i = S_i(θ) − S_i^q, q the policy that sampled E
(see ``fprobe.entropy.estimators``).
"""

import dataclasses
from dataclasses import dataclass

import optree
import torch

from fprobe import tree
from fprobe.entropy import estimators
from fprobe.entropy.settings import Settings
from fprobe.model import passes
from fprobe.rollouts import Rollouts
from fprobe.warnings import LowESSWarning, warn


def _version_of(x: torch.Tensor) -> int | None:
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
    return {a.codify(prefix): (x, _version_of(x)) for a, x in zip(accessors, leaves) if isinstance(x, torch.Tensor)}


def batch_tensors(batch: Rollouts) -> dict:
    """The tensor fields of a batch by name."""
    return {f.name: x for f in dataclasses.fields(batch) if isinstance(x := getattr(batch, f.name), torch.Tensor)}


@dataclass(frozen=True)
class Context:
    """What a learning-rate sweep or a decomposition reuses: the policy, θ₀, E, and Ĥ's ingredients at
    θ₀ (per-row S_i and H_i, denominators D_i, first-order coefficients α, β), ``logp_ref``, the
    sequence log-probs S_i^q of the policy that sampled E (S_i(θ₀) for a sample of π_θ₀), and Ĥ's
    per-prompt control variates (``baseline='prompt'``; None otherwise)."""

    policy: object
    params: tree.Params
    E: Rollouts
    rows0: estimators.Rows
    denom: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    settings: Settings
    logp_ref: torch.Tensor
    baselines: estimators.Baselines | None = None  # Ĥ's control variates (baseline='prompt')
    versions: dict | None = None  # {label: (tensor, its version counter)} when measured: see check_unchanged

    def __post_init__(self):
        if self.versions is None:
            object.__setattr__(self, "versions", tensor_versions(self.params, "θ₀") | tensor_versions(batch_tensors(self.E), "E"))

    def check_unchanged(self) -> None:
        """Raise if a tensor of θ₀ or of a batch was changed in place since the measurement (e.g. the model was
        trained further: ``policy.params`` are views of its weights), which would mix two models in one result."""
        changed = [label for label, (x, version) in self.versions.items() if version is not None and _version_of(x) != version]
        if changed:
            raise RuntimeError(
                f"tensors of this result were changed in place since it was measured ({', '.join(changed[:3])}"
                f"{'...' if len(changed) > 3 else ''}; e.g. the model trained further): its sweep, contributions or "
                "predictors would mix two models or batches; probe again, or probe with params the model does not "
                "share (e.g. fprobe.tree.tree_map(torch.clone, policy.params))"
            )



def snis_at(context: Context, params, progress: bool = False) -> estimators.Snis:
    """Ĥ and ESS on E at ``params``: one micro-batched forward pass."""
    context.check_unchanged()
    stats = passes.forward(context.policy, params, context.E, context.settings.micro_batch, progress)
    return estimators.snis(estimators.rows(stats, context.settings.entropy), context.logp_ref, context.denom, context.baselines)


def warn_if_low_ess(ess_fraction: float, threshold: float, where: str) -> bool:
    """Whether the ESS fraction is below ``threshold``; if so, a ``LowESSWarning`` at the caller's line."""
    low = ess_fraction < threshold
    if low:
        warn(
            f"ESS fraction {ess_fraction:.6g} < {threshold} {where}: the importance weights are degenerate and the "
            "step is outside the linear regime; ΔH_true is unreliable",
            LowESSWarning,
        )
    return low
