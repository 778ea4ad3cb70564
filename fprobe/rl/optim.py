"""Pure optimizers over name-keyed trees, bit-equal to ``torch.optim.AdamW`` / ``torch.optim.SGD``.

An optimizer is an ``Optimizer(init, update)`` pair in optax's shape, with one difference:
``update(grads, state, params, lr=None) -> (new_params, new_state)`` returns the new parameters
themselves, computed in torch's own order of operations (its single-tensor path), because that is
what bit-equality with torch requires; Δθ = new_params − params is then exactly what the model sees.
Nothing is mutated. Hyperparameters may differ per parameter (torch param groups); ``lr``
overrides the learning rate of this one update, scaling every group's rate alike.

Each factory also writes its update as an affine function of the gradient g it received,
``affine(state, new_state, params, lr=None)``: Δθ = gain ⊙ g + momentum + decay, exactly, given the
states before and after the step (``fprobe.decompose`` splits δH₁ over U's sequences with it).
"""

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

import torch

from fprobe import tree

Hyper = dict[str, float]


class AdamWState(NamedTuple):
    step: dict[str, int]
    exp_avg: tree.Params
    exp_avg_sq: tree.Params


class SGDState(NamedTuple):
    momentum_buffer: tree.Params


class AffineTerms(NamedTuple):
    """One parameter's update as an affine function of its gradient g: Δθ = gain ⊙ g + momentum + decay.

    Float64; ``gain`` a float or a tensor shaped like the parameter, ``momentum`` and ``decay`` tensors,
    or None where they are zero.
    """

    gain: float | torch.Tensor
    momentum: torch.Tensor | None
    decay: torch.Tensor | None


class Optimizer(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params, lr=None) -> (new_params, state)``;
    ``affine(state, new_state, params, lr=None)`` -> ``(name, AffineTerms)`` per parameter, lazily (one
    parameter's float64 temporaries at a time): the update that took ``state`` to ``new_state`` with
    the same ``lr``, written as Δθ = gain ⊙ g + momentum + decay in the gradient g it received.

    ``lr`` is the base learning rate; ``hyper(name)`` the hyperparameters of one parameter.
    """

    name: str
    init: Callable
    update: Callable
    affine: Callable[..., Iterator[tuple[str, AffineTerms]]]
    lr: float
    hyper: Callable[[str], Hyper]


NON_NEGATIVE = ("≥ 0", lambda v: v >= 0)
HYPER_RANGES = {  # torch.optim's own checks: a value outside makes the update divide by zero or flip
    "lr": NON_NEGATIVE, "eps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "momentum": NON_NEGATIVE,
    "beta1": ("in [0, 1)", lambda v: 0 <= v < 1), "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def check_hyper(hyper: Hyper, where: str) -> None:
    """Every hyperparameter a finite number within ``HYPER_RANGES``; ValueError naming it."""
    for key, value in hyper.items():
        condition, holds = HYPER_RANGES.get(key, ("", lambda v: True))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and holds(value)):
            raise ValueError(f"{where}: {key}={value!r} must be a finite number {condition}".rstrip())


def _hyper_lookup(defaults: Hyper, groups: Mapping[str, Hyper] | None) -> Callable[[str], Hyper]:
    groups = dict(groups or {})
    check_hyper(defaults, "optimizer")
    for name, overrides in groups.items():
        check_hyper(overrides, f"optimizer hyperparameters of {name!r}")
    return lambda name: {**defaults, **groups.get(name, {})}


def _lr_for(hyper: Hyper, base_lr: float, lr: float | None) -> float:
    """This parameter's rate for one update: its group's rate, times lr / base_lr when ``lr`` overrides
    the base rate (an override equal to the base rate is none)."""
    if lr is None or lr == base_lr:
        return hyper["lr"]
    if hyper["lr"] == base_lr:
        return lr
    return hyper["lr"] * lr / base_lr if base_lr else lr


def adamw(
    lr: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    groups: Mapping[str, Hyper] | None = None,
) -> Optimizer:
    """AdamW as ``torch.optim.AdamW`` (single-tensor path), in torch's order:
    θ ← θ(1 − ηλ);  m ← lerp(m, g, 1−β₁);  v ← β₂v + (1−β₂)g²;
    θ ← θ − (η/(1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε).
    ``groups`` maps names to per-parameter overrides of lr, beta1, beta2, eps, weight_decay.

    Affine form (t the new step count, P = 1 / (√v_t / √(1−β₂ᵗ) + ε) with v_t the *new* second moment):
    gain = −η(1−β₁)/(1−β₁ᵗ) · P,  momentum = −ηβ₁/(1−β₁ᵗ) · P ⊙ m_{t−1},  decay = −ηλθ.
    v_t contains g², so Δθ is not linear in g; it is exactly affine in g once P is taken from the step."""
    hyper = _hyper_lookup(dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay), groups)

    def init(params: tree.Params) -> AdamWState:
        return AdamWState({name: 0 for name in params}, tree.zeros_like(params), tree.zeros_like(params))

    def update(grads, state: AdamWState, params, lr_override: float | None = None):
        new_params, exp_avg, exp_avg_sq, steps = {}, {}, {}, {}
        for name, p in params.items():
            h = hyper(name)
            g, step = grads[name], state.step[name] + 1
            rate = _lr_for(h, lr, lr_override)
            if h["weight_decay"] != 0:
                p = p * (1 - rate * h["weight_decay"])
            m = torch.lerp(state.exp_avg[name], g, 1 - h["beta1"])
            v = (state.exp_avg_sq[name] * h["beta2"]).addcmul(g, g, value=1 - h["beta2"])
            step_size = rate / (1 - h["beta1"] ** float(step))
            denom = (v.sqrt() / (1 - h["beta2"] ** float(step)) ** 0.5).add(h["eps"])
            new_params[name] = torch.addcdiv(p, m, denom, value=-step_size)
            exp_avg[name], exp_avg_sq[name], steps[name] = m, v, step
        return new_params, AdamWState(steps, exp_avg, exp_avg_sq)

    def terms(name: str, p: torch.Tensor, state: AdamWState, new_state: AdamWState, lr_override) -> AffineTerms:
        h = hyper(name)
        rate, t = _lr_for(h, lr, lr_override), float(new_state.step[name])
        step_size = rate / (1 - h["beta1"] ** t)
        precond = 1.0 / (new_state.exp_avg_sq[name].double().sqrt() / (1 - h["beta2"] ** t) ** 0.5).add(h["eps"])
        m = state.exp_avg[name]
        return AffineTerms(
            gain=precond * (-step_size * (1 - h["beta1"])),
            momentum=precond * m.double() * (-step_size * h["beta1"]) if bool(m.any()) else None,
            decay=p.double() * (-rate * h["weight_decay"]) if h["weight_decay"] != 0 else None,
        )

    def affine(state: AdamWState, new_state: AdamWState, params, lr_override: float | None = None):
        stale = next((n for n in params if new_state.step[n] != state.step[n] + 1), None)
        if stale is not None:
            raise ValueError(
                f"optimizer states do not belong to one step: parameter {stale!r} went from step "
                f"{state.step[stale]} to {new_state.step[stale]}"
            )
        return ((name, terms(name, p, state, new_state, lr_override)) for name, p in params.items())

    return Optimizer("adamw", init, update, affine, lr, hyper)


def sgd(
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    groups: Mapping[str, Hyper] | None = None,
) -> Optimizer:
    """SGD as ``torch.optim.SGD``: d = g + λθ;  b ← d (first step) or μb + (1−τ)d;
    d ← d + μb (Nesterov) or b;  θ ← θ − η d.

    Affine form, with κ the factor of d in the step: no momentum, κ = 1; first step with momentum (the
    buffer becomes d), κ = 1 + μ (Nesterov) or 1; with a buffer b, κ = 1 + μ(1−τ) (Nesterov) or 1 − τ and
    momentum = −ημ²b (Nesterov) or −ημb. Then gain = −ηκ and decay = −ηκλθ (coupled weight decay)."""
    hyper = _hyper_lookup(
        dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=float(nesterov)), groups
    )

    def init(params: tree.Params) -> SGDState:
        return SGDState({})

    def update(grads, state: SGDState, params, lr_override: float | None = None):
        new_params, buffers = {}, dict(state.momentum_buffer)
        for name, p in params.items():
            h = hyper(name)
            d = grads[name]
            if h["weight_decay"] != 0:
                d = d.add(p, alpha=h["weight_decay"])
            if h["momentum"] != 0:
                previous = buffers.get(name)
                buf = d.clone() if previous is None else (previous * h["momentum"]).add(d, alpha=1 - h["dampening"])
                buffers[name] = buf
                d = d.add(buf, alpha=h["momentum"]) if h["nesterov"] else buf
            new_params[name] = p.add(d, alpha=-_lr_for(h, lr, lr_override))
        return new_params, SGDState(buffers)

    def terms(name: str, p: torch.Tensor, state: SGDState, lr_override) -> AffineTerms:
        h = hyper(name)
        rate, mu, nesterov = _lr_for(h, lr, lr_override), h["momentum"], bool(h["nesterov"])
        buffer = state.momentum_buffer.get(name) if mu != 0 else None
        if mu == 0:
            kappa, momentum = 1.0, None
        elif buffer is None:
            kappa, momentum = (1.0 + mu if nesterov else 1.0), None
        else:
            kappa = 1.0 + mu * (1 - h["dampening"]) if nesterov else 1 - h["dampening"]
            momentum = buffer.double() * (-rate * (mu * mu if nesterov else mu))
        decay = p.double() * (-rate * kappa * h["weight_decay"]) if h["weight_decay"] != 0 else None
        return AffineTerms(-rate * kappa, momentum, decay)

    def affine(state: SGDState, new_state: SGDState, params, lr_override: float | None = None):
        # SGD's affine form needs only the state before the step (its momentum buffers)
        return ((name, terms(name, p, state, lr_override)) for name, p in params.items())

    return Optimizer("sgd", init, update, affine, lr, hyper)


def clip_by_global_norm(grads: tree.Params, max_norm: float) -> tuple[tree.Params, float]:
    """As ``torch.nn.utils.clip_grad_norm_``: coef = min(1, max_norm / (‖g‖ + 1e-6)); returns (coef·g, coef)."""
    norms = [torch.linalg.vector_norm(g, 2.0) for g in grads.values()]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return tree.tree_map(lambda g: g * coef.to(g.dtype), grads), float(coef)


_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


def _group_hyper(group: Mapping, kind: str) -> Hyper:
    unsupported = [k for k in ("amsgrad", "maximize") if group.get(k)]
    if kind == "adam" and not group.get("decoupled_weight_decay", True) and group["weight_decay"]:
        unsupported.append("coupled weight decay (torch.optim.Adam)")
    if unsupported:
        raise ValueError(f"torch optimizer option(s) {unsupported} are not supported by fprobe.optim")
    if kind == "adam":
        return dict(
            lr=float(group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
        )
    return {k: float(group[k]) for k in _SGD_KEYS}


def _param_groups(state_dict) -> list[Mapping]:
    """The param groups of a torch optimizer ``state_dict``, after checking the structure torch saves."""
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError("not a torch optimizer state_dict: expected a dict with 'state' and 'param_groups'")
    groups = state_dict.get("param_groups")
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError("the optimizer state_dict has no param_groups (missing or empty): its hyperparameters are unknown")
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            raise ValueError(f"optimizer param_groups[{i}] is not a param group (no 'params' list)")
    return list(groups)


def _state_tensor(state: Mapping, name: str, key: str, param: torch.Tensor) -> torch.Tensor:
    """A copy of parameter ``name``'s ``state[key]`` on the parameter's device and dtype, after checking it is a
    floating-point tensor of the parameter's shape (torch would broadcast a wrong shape silently)."""
    value = state.get(key)
    where = f"optimizer state of parameter {name!r}"
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: {key!r} is missing or not a tensor")
    if value.shape != param.shape:
        raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{where}: {key} has dtype {value.dtype}, not a floating-point dtype")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{where}: {key} has non-finite entries")
    if key == "exp_avg_sq" and bool((value < 0).any()):
        raise ValueError(f"{where}: exp_avg_sq (a running mean of g²) has negative entries")
    return value.detach().to(param.device, param.dtype, copy=True)


def _step_count(state: Mapping, name: str) -> int:
    """Parameter ``name``'s Adam step count: a non-negative whole number (an int or a one-element tensor)."""
    step = state.get("step")
    value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and float(value).is_integer()):
        raise ValueError(f"optimizer state of parameter {name!r}: step {step!r} is not a non-negative whole number")
    return int(value)


def from_torch(
    state_dict: Mapping,
    param_names: Iterable[str],
    params: tree.Params,
) -> tuple[Optimizer, AdamWState | SGDState]:
    """Functional optimizer and state from a ``torch.optim.AdamW``/``Adam``/``SGD`` ``state_dict``.

    ``param_names`` lists the parameter names in the order the optimizer holds them (its param
    groups, in order); ``params`` is the trainable tree that will be probed. Hyperparameters come
    from each param group; tensors are copied (to each parameter's device and dtype), so later steps of
    the torch optimizer change nothing.
    """
    names = list(param_names)
    groups = _param_groups(state_dict)
    first = groups[0]
    # amsgrad only in Adam/AdamW groups, nesterov only in SGD's (NAdam/RAdam/Adamax have betas, RMSprop momentum)
    kind = "adam" if "amsgrad" in first else "sgd" if "nesterov" in first else None
    if kind is None:
        raise ValueError(f"unsupported optimizer state: param group keys {sorted(first)} are neither Adam's nor SGD's")
    index_to_name = {}
    per_name = {}
    for group in groups:
        hyper = _group_hyper(group, kind)
        for index in group["params"]:
            if index >= len(names):
                raise ValueError(f"optimizer state has parameter index {index}, but only {len(names)} names were given")
            index_to_name[index] = names[index]
            per_name[names[index]] = hyper
    tree.check_names(params, per_name, "optimizer parameters")
    stray = [i for i in state_dict["state"] if i not in index_to_name]
    if stray:
        raise ValueError(f"optimizer state has entries for parameter indices {stray} that no param group lists")
    state = {index_to_name[i]: s for i, s in state_dict["state"].items()}
    not_dicts = [n for n, s in state.items() if not isinstance(s, Mapping)]
    if not_dicts:
        raise ValueError(f"optimizer state of parameter {not_dicts[0]!r} is not a dict of its state tensors")
    copy = lambda name, key: _state_tensor(state[name], name, key, params[name])
    if kind == "adam":
        opt = adamw(lr=per_name[names[0]]["lr"], groups=per_name)
        zero = opt.init(params)
        return opt, AdamWState(
            {n: _step_count(state[n], n) if n in state else 0 for n in params},
            {n: copy(n, "exp_avg") if n in state else zero.exp_avg[n] for n in params},
            {n: copy(n, "exp_avg_sq") if n in state else zero.exp_avg_sq[n] for n in params},
        )
    opt = sgd(lr=per_name[names[0]]["lr"], groups=per_name)
    return opt, SGDState(
        {n: copy(n, "momentum_buffer") for n in params if state.get(n, {}).get("momentum_buffer") is not None}
    )


def from_torch_optimizer(optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]], params: tree.Params):
    """``from_torch`` for a live torch optimizer and the model's ``named_parameters()``."""
    name_of = {id(p): name for name, p in named_parameters}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = [i for i, p in enumerate(ordered) if id(p) not in name_of]
    if unknown:
        raise ValueError(f"optimizer parameters at positions {unknown} are not among the model's named parameters")
    return from_torch(optimizer.state_dict(), [name_of[id(p)] for p in ordered], params)
