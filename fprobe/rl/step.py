"""One policy-gradient step as a pure function: (params, opt_state, U) -> (new params, new state, Δθ)."""

import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import optree
import torch

from fprobe import checks
from fprobe.rl import losses
from fprobe.model import passes
from fprobe.model.numerics import exact_delta
from fprobe import tree
from fprobe.rl.optim import Optimizer, clip_by_global_norm
from fprobe.rollouts import Rollouts
from fprobe.model.tokens import TokenStats
from fprobe.warnings import UpdateLostWarning, ZeroAdvantagesWarning, warn

_UPDATE_LOST_WARNING_LEVEL = 0.5  # warn when more than this fraction of the update is rounded away


def _warn_if_zero_advantages(U: Rollouts) -> None:
    if U.advantages is not None and not bool(U.advantages.any()):
        warn(
            "every advantage in the update batch is 0 (constant rewards within each group, or groups of one "
            "response): the policy-gradient term vanishes and Δθ is weight decay (and momentum) alone",
            ZeroAdvantagesWarning,
        )


def _warn_if_update_lost(lost: float | None, params: tree.Params) -> None:
    if lost is not None and lost > _UPDATE_LOST_WARNING_LEVEL:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()} - {"float32", "float64"})
        warn(
            f"{lost:.1%} of the update was rounded away by the {'/'.join(dtypes)} parameters (the step is too "
            "small for their precision), so ΔH and δH₁ describe the rounded step, not the intended one: load the "
            "policy in float32 (Policy.from_pretrained(..., dtype=torch.float32)), or probe a LoRA adapter "
            "(lora=...), which stays float32 while the base model stays bf16",
            UpdateLostWarning,
        )


@dataclass(frozen=True, eq=False, kw_only=True)
class Step:
    """The result of one optimizer update. ``delta`` = ``params`` − old params, exactly as the model
    sees it (float32 for bf16/fp16 parameters, where their own dtype would round the difference); ``logp`` holds U's token log-probs at the old parameters; ``update_lost`` is the fraction
    ‖intended − applied‖/‖intended‖ of the update that the parameter dtype rounded away (None for
    float32/float64 parameters)."""

    params: tree.Params
    opt_state: object
    delta: tree.Params
    lr: float
    loss: float
    grad_norm: float
    clip_coef: float
    update_lost: float | None
    logp: torch.Tensor = field(repr=False)

    @functools.cached_property
    def delta_l2(self) -> float:
        """‖Δθ‖₂ in float64, computed on first use (a pass over a parameter tree that a step need not pay for)."""
        return float(tree.norm(self.delta))


def _check_step_options(optimizer: Optimizer, opt_state, params, lr, clip, max_grad_norm) -> None:
    """Before any pass: a learning rate by ``fprobe.checks``' rule, a finite, non-negative clip range, a finite positive
    ``max_grad_norm`` (a negative one would flip the step), and an ``opt_state`` of this optimizer whose
    tensors are keyed by these parameters' names, with their shapes, dtypes and devices (a wrong shape
    would broadcast silently)."""
    def real(value) -> float:
        try:
            return float("nan") if isinstance(value, bool) else float(value)
        except (TypeError, ValueError, RuntimeError):
            return float("nan")

    checks.learning_rate(optimizer.lr if lr is None else lr, "the learning rate")
    if not (math.isfinite(real(clip)) and real(clip) >= 0):
        raise ValueError(f"clip must be a finite number >= 0, got {clip!r}")
    if max_grad_norm is not None and not (math.isfinite(real(max_grad_norm)) and real(max_grad_norm) > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0 (or None: no clipping), got {max_grad_norm!r}")
    if opt_state is None:
        return
    try:
        expected = type(optimizer.init({}))
    except Exception:  # a custom optimizer whose init needs parameters: its state's type is not checked
        expected = type(opt_state)
    if type(opt_state) is not expected:
        raise TypeError(f"opt_state is a {type(opt_state).__name__}, but the {optimizer.name} optimizer keeps a {expected.__name__}")
    for slot, value in zip(getattr(opt_state, "_fields", ()), opt_state):
        if not isinstance(value, Mapping):
            continue
        unknown = [name for name in value if name not in params]
        if unknown:
            raise ValueError(f"opt_state.{slot} holds names that are not the policy's parameters: {unknown[:8]}")
        if any(isinstance(v, torch.Tensor) for v in value.values()):
            tree.check_like({name: params[name] for name in value}, value, f"opt_state.{slot}")
            tree.check_finite(value, f"opt_state.{slot}")


def loss_and_grad(
    policy, params: tree.Params, U: Rollouts, loss: losses.LossType = "dr_grpo", micro_batch: int | None = None, clip: float = 0.2
) -> tuple[float, tree.Params, TokenStats]:
    """(Σ_i L_i, ∇_θ Σ_i L_i, U's token statistics at θ₀), summed over micro-batches with U's normaliser."""
    weights = losses.row_weights(U, loss)

    def batch_loss(stats: TokenStats, mb: Rollouts, rows: slice) -> torch.Tensor:
        return losses.sequence_losses(stats.logp, mb, weights[rows], clip).sum()

    return passes.gradient(policy, params, U, batch_loss, micro_batch, with_entropy=False)


class _Gradient(NamedTuple):
    value: float
    grads: tree.Params
    logp: torch.Tensor
    grad_norm: float
    clip_coef: float


def _step_gradient(policy, params, optimizer, opt_state, U, lr, loss, clip, max_grad_norm, micro_batch) -> _Gradient:
    """The checks before a step, then its (clipped) gradient on U: what ``rl_step`` and ``rl_step_by_parameter`` share."""
    _check_step_options(optimizer, opt_state, params, lr, clip, max_grad_norm)
    tree.check_finite(params, "the value")
    _warn_if_zero_advantages(U)
    value, grads, stats = loss_and_grad(policy, params, U, loss, micro_batch, clip)
    if not torch.isfinite(torch.tensor(value)):
        raise FloatingPointError(f"the {loss} loss on the update batch is not finite ({value})")
    grad_norm = float(tree.norm(grads))
    if not math.isfinite(grad_norm):  # a finite float64 norm proves every entry finite: the entry-wise check runs only here
        tree.check_finite(grads, "the gradient")
    clip_coef = 1.0
    if max_grad_norm is not None:
        grads, clip_coef = clip_by_global_norm(grads, max_grad_norm)
    return _Gradient(value, grads, stats.logp, grad_norm, clip_coef)


def rl_step(
    policy,
    params: tree.Params,
    optimizer: Optimizer,
    opt_state,
    U: Rollouts,
    *,
    lr: float | None = None,
    loss: losses.LossType = "dr_grpo",
    clip: float = 0.2,
    max_grad_norm: float | None = None,
    micro_batch: int | None = None,
) -> Step:
    """Exactly one optimizer update on the update batch U. Pure: mutates neither its inputs nor the model.

    ``lr`` overrides the optimizer's learning rate for this step only.
    """
    params = tree.check_like(policy.params, params, "params")
    value, grads, logp, grad_norm, clip_coef = _step_gradient(policy, params, optimizer, opt_state, U, lr, loss, clip,
                                                              max_grad_norm, micro_batch)
    new_params, new_state, lost = _apply_update(optimizer, grads, opt_state, params, lr)
    delta = exact_delta(new_params, params, into=_dead(grads, new_params, new_state))  # Δθ in the spent gradient's memory
    del grads
    if not tree.all_finite(delta.values()):  # θ₀ is finite, so a finite Δθ proves the new θ finite
        tree.check_finite(new_params, "the updated value")
        tree.check_finite(delta, "Δθ")
    _warn_if_update_lost(lost, params)
    return Step(
        params=new_params,
        opt_state=new_state,
        delta=delta,
        lr=optimizer.lr if lr is None else lr,
        loss=value,
        grad_norm=grad_norm,
        clip_coef=clip_coef,
        update_lost=lost,
        logp=logp,
    )


class Update(NamedTuple):
    """One parameter's share of a step: its name, the optimizer state before and after restricted to it
    (``restrict``), and its Δθ."""

    name: str
    state: object
    new_state: object
    delta: torch.Tensor


class StepByParameter(NamedTuple):
    """A step's scalars and U's token log-probs at θ₀, with its ``updates`` one parameter at a time (an iterator)."""

    lr: float
    clip_coef: float
    logp: torch.Tensor
    updates: Iterator[Update]


def restrict(state, names) -> object:
    """An optimizer state (a NamedTuple of name-keyed mappings, or None) restricted to ``names``."""
    if state is None:
        return None
    return type(state)(*({n: v[n] for n in names if n in v} if isinstance(v, Mapping) else v for v in state))


def by_parameter(step: Step, opt_state, order) -> StepByParameter:
    """A whole ``Step`` taken from ``opt_state``, as its updates one parameter at a time in ``order``."""
    updates = (Update(n, restrict(opt_state, [n]), restrict(step.opt_state, [n]), step.delta[n]) for n in order)
    return StepByParameter(step.lr, step.clip_coef, step.logp, updates)


def rl_step_by_parameter(
    policy, params: tree.Params, optimizer: Optimizer, opt_state, U: Rollouts, *, order, lr: float | None = None,
    loss: losses.LossType = "dr_grpo", clip: float = 0.2, max_grad_norm: float | None = None, micro_batch: int | None = None,
) -> StepByParameter:
    """``rl_step``'s gradient pass, then its update one parameter at a time in ``order`` as ``updates`` is iterated:
    the same values bit for bit (the optimizers update each parameter by itself, on torch's kernels for one
    tensor or a list alike), for what needs the step's states but never its whole new parameter tree. Each
    gradient is dropped once its parameter is updated (its memory holds that parameter's Δθ); nothing of the new
    parameters is kept. (With ``foreach=None``, torch's choice of kernels is made per parameter: it differs from ``rl_step``'s only in a
    param group that mixes devices.)"""
    params = tree.check_like(policy.params, params, "params")
    _, grads, logp, _, clip_coef = _step_gradient(policy, params, optimizer, opt_state, U, lr, loss, clip, max_grad_norm,
                                                  micro_batch)

    def update_of(name: str) -> Update:
        one, state, g = {name: params[name]}, restrict(opt_state, [name]), grads.pop(name)
        new_params, new_state, _ = _apply_update(optimizer, {name: g}, state, one, lr)
        tree.check_finite(new_params, "the updated value")
        return Update(name, state, new_state, exact_delta(new_params, one, into=_dead({name: g}, new_params, new_state))[name])

    # map, not a generator: nothing of an update stays referenced here once the caller has let it go
    return StepByParameter(optimizer.lr if lr is None else lr, clip_coef, logp, map(update_of, order))


def _dead(grads: tree.Params, *results) -> tree.Params:
    """The gradients whose memory none of ``results`` (the update's new parameters and state) shares: spent once the
    update is made, so they may receive Δθ (an optimizer of one's own may keep g itself as a state)."""
    kept = {x.untyped_storage().data_ptr() for x in optree.tree_leaves(results) if isinstance(x, torch.Tensor)}
    return {name: g for name, g in grads.items() if g.untyped_storage().data_ptr() not in kept}


def _cast_tensors(state, dtype_of):
    """Every tensor leaf of a name-keyed optimizer state cast to ``dtype_of(name)``."""
    return optree.tree_map_with_path(
        lambda path, x: x.to(dtype_of(path[-1])) if isinstance(x, torch.Tensor) else x, state
    )


def _apply_update(optimizer: Optimizer, grads, opt_state, params, lr):
    """The one optimizer update → (new params, new state, fraction of the update lost to rounding).

    Float32/float64 parameters are updated in their own dtype (bit-equal to torch.optim). Lower
    precision parameters (bf16, fp16) are updated in float64 and rounded once to their dtype; the
    lost fraction is ‖Δθ_float64 − Δθ_applied‖ / ‖Δθ_float64‖ (None for float32/float64).
    """
    if all(p.dtype in (torch.float32, torch.float64) for p in params.values()):
        new_params, new_state = optimizer.update(grads, opt_state, params, lr)
        return new_params, new_state, None
    wide = lambda t: _cast_tensors(t, lambda name: torch.float64)
    narrow = lambda t: _cast_tensors(t, lambda name: params[name].dtype)
    new64, state64 = optimizer.update(wide(grads), wide(opt_state), wide(params), lr)
    new_params = narrow(new64)
    intended = tree.sub(new64, wide(params))
    applied = tree.sub(wide(new_params), wide(params))
    size = float(tree.norm(intended))
    return new_params, narrow(state64), float(tree.norm(tree.sub(intended, applied))) / size if size else 0.0
