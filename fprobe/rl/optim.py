"""Pure optimizers over name-keyed trees, bit-equal to ``torch.optim.AdamW`` / ``torch.optim.SGD``.

An optimizer is an ``Optimizer(init, update)`` pair in optax's shape, with one difference:
``update(grads, state, params, lr=None) -> (new_params, new_state)`` returns the new parameters
themselves, computed in torch's own order of operations, because that is what bit-equality with torch
requires; Δθ = new_params − params is then exactly what the model sees. Nothing is mutated.
Hyperparameters may differ per parameter (torch param groups); ``lr`` overrides the learning rate of
this one update, scaling every group's rate alike.

Each parameter follows one of torch's two implementations, chosen as torch chooses (``foreach``: True,
False, or None for torch's default — the multi-tensor path when every parameter is on an accelerator):
the single-tensor loop, or the multi-tensor path on torch's ``_foreach`` kernels, bit-equal to the
trainer's optimizer whichever it ran. States are lazy, as torch's: a parameter that has not taken a
step has no moment tensors yet (its first step reads them as zeros without filling any).

Each factory also writes its update as an affine function of the gradient g it received,
``affine(state, new_state, params, lr=None)``: Δθ = gain ⊙ g + momentum + decay_rate · θ, exactly, given the
states before and after the step (``fprobe.decompose`` splits δH₁ over U's sequences with it).
"""

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from fprobe import tree

_Hyper = dict[str, float]


class AdamWState(NamedTuple):
    """Per-parameter step counts and moments; a parameter absent from ``exp_avg``/``exp_avg_sq`` (or from
    ``step``) has taken no step yet: its moments are zero, as torch creates them at the first step."""

    step: dict[str, int]
    exp_avg: tree.Params
    exp_avg_sq: tree.Params


class SGDState(NamedTuple):
    momentum_buffer: tree.Params


class AffineTerms(NamedTuple):
    """One parameter's update as an affine function of its gradient g: Δθ = gain ⊙ g + momentum + decay_rate · θ.

    ``gain`` a float or a float64 tensor shaped like the parameter; ``momentum`` a float64 tensor, or None where it
    is zero; ``decay_rate`` a float (0.0 without weight decay): the decay term is that multiple of θ itself, so no
    copy of θ is made.
    """

    gain: float | torch.Tensor
    momentum: torch.Tensor | None
    decay_rate: float


class Optimizer(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params, lr=None) -> (new_params, state)``;
    ``affine(state, new_state, params, lr=None)`` -> ``(name, AffineTerms)`` per parameter, lazily (one
    parameter's float64 temporaries at a time): the update that took ``state`` to ``new_state`` with
    the same ``lr``, written as Δθ = gain ⊙ g + momentum + decay_rate · θ in the gradient g it received.

    ``lr`` is the base learning rate; ``hyper(name)`` the hyperparameters of one parameter.
    """

    name: str
    init: Callable
    update: Callable
    affine: Callable[..., Iterator[tuple[str, AffineTerms]]]
    lr: float
    hyper: Callable[[str], _Hyper]


_NON_NEGATIVE = ("≥ 0", lambda v: v >= 0)
_HYPER_RANGES = {  # torch.optim's own checks: a value outside makes the update divide by zero or flip
    "lr": _NON_NEGATIVE, "eps": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE, "momentum": _NON_NEGATIVE,
    "beta1": ("in [0, 1)", lambda v: 0 <= v < 1), "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def _check_hyper(hyper: _Hyper, where: str) -> None:
    """Every hyperparameter a finite number within ``_HYPER_RANGES``; ValueError naming it."""
    for key, value in hyper.items():
        condition, holds = _HYPER_RANGES.get(key, ("", lambda v: True))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and holds(value)):
            raise ValueError(f"{where}: {key}={value!r} must be a finite number {condition}".rstrip())


def _hyper_lookup(defaults: _Hyper, groups: Mapping[str, _Hyper] | None) -> Callable[[str], _Hyper]:
    groups = dict(groups or {})
    _check_hyper(defaults, "optimizer")
    for name, overrides in groups.items():
        _check_hyper(overrides, f"optimizer hyperparameters of {name!r}")
    return lambda name: {**defaults, **groups.get(name, {})}


def _lr_for(hyper: _Hyper, base_lr: float, lr: float | None) -> float:
    """This parameter's rate for one update: its group's rate, times lr / base_lr when ``lr`` overrides
    the base rate (an override equal to the base rate is none)."""
    if lr is None or lr == base_lr:
        return hyper["lr"]
    if hyper["lr"] == base_lr:
        return lr
    return hyper["lr"] * lr / base_lr if base_lr else lr


def _uses_foreach(foreach: bool | None, params: Iterable[torch.Tensor]) -> bool:
    """torch.optim's choice of implementation: ``foreach`` as given, or for None torch's default (the
    multi-tensor path when every parameter is a plain tensor on a device with ``_foreach`` kernels)."""
    if foreach is not None:
        return bool(foreach)
    return _default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)[1]


def _zero_start(x: torch.Tensor) -> torch.Tensor:
    """A zero tensor shaped like ``x`` that allocates nothing (a broadcast scalar): the moments of a
    parameter's first step, which torch's kernels then read as the zeros torch would have filled."""
    return x.new_zeros(()).expand_as(x)


def _scratch(tensors: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``like(x)``: an uninitialised tensor shaped like ``x``, carved from one buffer per dtype and device sized for
    the largest of ``tensors``, for a temporary that dies before the next one is made (AdamW's denominator in
    torch's single-tensor loop): the same values as a fresh tensor, without a parameter tree's worth of fresh
    memory (on a CPU, the page faults of fresh memory cost more than the arithmetic)."""
    sizes: dict[tuple, int] = {}
    for x in tensors:
        sizes[x.dtype, x.device] = max(sizes.get((x.dtype, x.device), 0), x.numel())
    buffers: dict[tuple, torch.Tensor] = {}

    def like(x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in buffers or buffers[key].numel() < x.numel():
            buffers[key] = torch.empty(max(sizes.get(key, 0), x.numel()), dtype=x.dtype, device=x.device)
        return buffers[key][: x.numel()].view(x.shape)

    return like


def _by_group(params: Mapping[str, torch.Tensor], key: Callable[[str], tuple]) -> dict[tuple, list[str]]:
    """Names grouped by ``key(name)`` (their hyperparameters), in order of first appearance."""
    groups: dict[tuple, list[str]] = {}
    for name in params:
        groups.setdefault(key(name), []).append(name)
    return groups


def _in_order(names: Iterable[str], *trees: Mapping) -> tuple[dict, ...]:
    """Each of ``trees`` restricted to ``names`` and put in their order (names absent stay absent)."""
    names = list(names)
    return tuple({n: t[n] for n in names if n in t} for t in trees)


def adamw(
    lr: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    groups: Mapping[str, _Hyper] | None = None,
    foreach: bool | None = False,
) -> Optimizer:
    """AdamW as ``torch.optim.AdamW``, in torch's order:
    θ ← θ(1 − ηλ);  m ← lerp(m, g, 1−β₁);  v ← β₂v + (1−β₂)g²;
    θ ← θ − (η/(1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε).
    ``groups`` maps names to per-parameter overrides of lr, beta1, beta2, eps, weight_decay and foreach
    (1.0: torch's multi-tensor path, 0.0: its single-tensor loop); ``foreach`` is the default
    (None: torch's default for the parameters of each update, ``_uses_foreach``).

    Affine form (t the new step count, P = 1 / (√v_t / √(1−β₂ᵗ) + ε) with v_t the *new* second moment):
    gain = −η(1−β₁)/(1−β₁ᵗ) · P,  momentum = −ηβ₁/(1−β₁ᵗ) · P ⊙ m_{t−1},  decay_rate = −ηλ.
    v_t contains g², so Δθ is not linear in g; it is exactly affine in g once P is taken from the step."""
    defaults = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
    if foreach is not None:
        defaults["foreach"] = float(foreach)
    hyper = _hyper_lookup(defaults, groups)

    def init(params: tree.Params) -> AdamWState:
        return AdamWState({name: 0 for name in params}, {}, {})

    def single_tensor(h, rate, names, grads, state, params, out):
        """torch's ``_single_tensor_adam`` for one group, functionally; writes into the ``out`` trees."""
        new_params, exp_avg, exp_avg_sq = out
        scratch = _scratch([params[n] for n in names])
        for name in names:
            p, g, step = params[name], grads[name], state.step.get(name, 0) + 1
            decayed = h["weight_decay"] != 0
            if decayed:
                p = p * (1 - rate * h["weight_decay"])
            m = torch.lerp(state.exp_avg.get(name, _zero_start(g)), g, 1 - h["beta1"])
            v_start = state.exp_avg_sq.get(name)
            v = _zero_start(g).addcmul(g, g, value=1 - h["beta2"]) if v_start is None else (
                (v_start * h["beta2"]).addcmul_(g, g, value=1 - h["beta2"]))
            step_size = rate / (1 - h["beta1"] ** float(step))
            denom = torch.sqrt(v, out=scratch(v)).div_((1 - h["beta2"] ** float(step)) ** 0.5).add_(h["eps"])
            new_params[name] = p.addcdiv_(m, denom, value=-step_size) if decayed else p.addcdiv(m, denom, value=-step_size)
            exp_avg[name], exp_avg_sq[name] = m, v

    def multi_tensor(h, rate, names, grads, state, params, out):
        """torch's ``_multi_tensor_adam`` (not capturable) for one group, functionally, on ``_foreach`` kernels."""
        new_params, exp_avg, exp_avg_sq = out
        gs = [grads[n] for n in names]
        ps = [params[n] for n in names]
        steps = [float(state.step.get(n, 0) + 1) for n in names]
        decayed = h["weight_decay"] != 0
        if decayed:
            ps = torch._foreach_mul(ps, 1 - rate * h["weight_decay"])
        ms = torch._foreach_lerp([state.exp_avg.get(n, _zero_start(g)) for n, g in zip(names, gs)], gs, 1 - h["beta1"])
        vs = torch._foreach_mul([state.exp_avg_sq.get(n, _zero_start(g)) for n, g in zip(names, gs)], h["beta2"])
        torch._foreach_addcmul_(vs, gs, gs, 1 - h["beta2"])
        step_size = [(rate / (1 - h["beta1"] ** t)) * -1 for t in steps]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [(1 - h["beta2"] ** t) ** 0.5 for t in steps])
        torch._foreach_add_(denom, h["eps"])
        if decayed:
            torch._foreach_addcdiv_(ps, ms, denom, step_size)
        else:
            ps = torch._foreach_addcdiv(ps, ms, denom, step_size)
        del denom
        for n, p, m, v in zip(names, ps, ms, vs):
            new_params[n], exp_avg[n], exp_avg_sq[n] = p, m, v

    def update(grads, state: AdamWState, params, lr_override: float | None = None):
        out = ({}, {}, {})
        for key, names in _by_group(params, lambda n: tuple(sorted(hyper(n).items()))).items():
            h = dict(key)
            rate = _lr_for(h, lr, lr_override)
            fast = _uses_foreach(None if "foreach" not in h else bool(h["foreach"]), (params[n] for n in names))
            (multi_tensor if fast else single_tensor)(h, rate, names, grads, state, params, out)
        new_params, exp_avg, exp_avg_sq = _in_order(params, *out)
        steps = {name: state.step.get(name, 0) + 1 for name in params}
        return new_params, AdamWState(steps, exp_avg, exp_avg_sq)

    def terms(name: str, state: AdamWState, new_state: AdamWState, lr_override) -> AffineTerms:
        h = hyper(name)
        rate, t = _lr_for(h, lr, lr_override), float(new_state.step[name])
        step_size = rate / (1 - h["beta1"] ** t)
        # float64 temporaries of this one parameter only, each made once and then updated in place
        precond = new_state.exp_avg_sq[name].double().sqrt().div_((1 - h["beta2"] ** t) ** 0.5).add_(h["eps"]).reciprocal_()
        m = state.exp_avg.get(name)
        moved = m is not None and bool(m.any())
        gain = precond * (-step_size * (1 - h["beta1"])) if moved else precond.mul_(-step_size * (1 - h["beta1"]))
        return AffineTerms(
            gain=gain,
            momentum=precond.mul_(m).mul_(-step_size * h["beta1"]) if moved else None,
            decay_rate=-rate * h["weight_decay"],
        )

    def affine(state: AdamWState, new_state: AdamWState, params, lr_override: float | None = None):
        stale = next((n for n in params if new_state.step.get(n, 0) != state.step.get(n, 0) + 1), None)
        if stale is not None:
            raise ValueError(
                f"optimizer states do not belong to one step: parameter {stale!r} went from step "
                f"{state.step.get(stale, 0)} to {new_state.step.get(stale, 0)}"
            )
        return ((name, terms(name, state, new_state, lr_override)) for name in params)

    return Optimizer("adamw", init, update, affine, lr, hyper)


def sgd(
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    groups: Mapping[str, _Hyper] | None = None,
    foreach: bool | None = False,
) -> Optimizer:
    """SGD as ``torch.optim.SGD``: d = g + λθ;  b ← d (first step) or μb + (1−τ)d;
    d ← d + μb (Nesterov) or b;  θ ← θ − η d.  ``foreach`` as for ``adamw`` (torch's two paths run the
    same kernels in the same order, on ``_foreach`` lists or one tensor at a time).

    Affine form, with κ the factor of d in the step: no momentum, κ = 1; first step with momentum (the
    buffer becomes d), κ = 1 + μ (Nesterov) or 1; with a buffer b, κ = 1 + μ(1−τ) (Nesterov) or 1 − τ and
    momentum = −ημ²b (Nesterov) or −ημb. Then gain = −ηκ and decay_rate = −ηκλ (coupled weight decay)."""
    defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=float(nesterov))
    if foreach is not None:
        defaults["foreach"] = float(foreach)
    hyper = _hyper_lookup(defaults, groups)

    def init(params: tree.Params) -> SGDState:
        return SGDState({})

    def single_tensor(h, rate, names, grads, params, buffers, new_params):
        for name in names:
            p, d = params[name], grads[name]
            if h["weight_decay"] != 0:
                d = d.add(p, alpha=h["weight_decay"])
            if h["momentum"] != 0:
                previous = buffers.get(name)
                buf = d.clone() if previous is None else (previous * h["momentum"]).add_(d, alpha=1 - h["dampening"])
                buffers[name] = buf
                d = d.add(buf, alpha=h["momentum"]) if h["nesterov"] else buf
            new_params[name] = p.add(d, alpha=-rate)

    def multi_tensor(h, rate, names, grads, params, buffers, new_params):
        ps, ds = [params[n] for n in names], [grads[n] for n in names]
        if h["weight_decay"] != 0:
            ds = torch._foreach_add(ds, ps, alpha=h["weight_decay"])
        if h["momentum"] != 0:
            previous = [buffers.get(n) for n in names]
            if all(b is not None for b in previous):
                bufs = torch._foreach_mul(previous, h["momentum"])
                torch._foreach_add_(bufs, ds, alpha=1 - h["dampening"])
            else:
                bufs = [d.clone() if b is None else (b * h["momentum"]).add_(d, alpha=1 - h["dampening"])
                        for b, d in zip(previous, ds)]
            buffers.update(zip(names, bufs))
            ds = torch._foreach_add(ds, bufs, alpha=h["momentum"]) if h["nesterov"] else bufs
        new_params.update(zip(names, torch._foreach_add(ps, ds, alpha=-rate)))

    def update(grads, state: SGDState, params, lr_override: float | None = None):
        new_params, buffers = {}, dict(state.momentum_buffer)
        for key, names in _by_group(params, lambda n: tuple(sorted(hyper(n).items()))).items():
            h = dict(key)
            rate = _lr_for(h, lr, lr_override)
            fast = _uses_foreach(None if "foreach" not in h else bool(h["foreach"]), (params[n] for n in names))
            (multi_tensor if fast else single_tensor)(h, rate, names, grads, params, buffers, new_params)
        (new_params,) = _in_order(params, new_params)
        return new_params, SGDState(buffers)

    def terms(name: str, state: SGDState, lr_override) -> AffineTerms:
        h = hyper(name)
        rate, mu, nesterov = _lr_for(h, lr, lr_override), h["momentum"], bool(h["nesterov"])
        buffer = state.momentum_buffer.get(name) if mu != 0 else None
        if mu == 0:
            kappa, momentum = 1.0, None
        elif buffer is None:
            kappa, momentum = (1.0 + mu if nesterov else 1.0), None
        else:
            kappa = 1.0 + mu * (1 - h["dampening"]) if nesterov else 1 - h["dampening"]
            momentum = buffer.to(torch.float64, copy=True).mul_(-rate * (mu * mu if nesterov else mu))
        return AffineTerms(-rate * kappa, momentum, -rate * kappa * h["weight_decay"])

    def affine(state: SGDState, new_state: SGDState, params, lr_override: float | None = None):
        # SGD's affine form needs only the state before the step (its momentum buffers)
        return ((name, terms(name, state, lr_override)) for name in params)

    return Optimizer("sgd", init, update, affine, lr, hyper)


def clip_by_global_norm(grads: tree.Params, max_norm: float) -> tuple[tree.Params, float]:
    """As ``torch.nn.utils.clip_grad_norm_``: coef = min(1, max_norm / (‖g‖ + 1e-6)); returns (coef·g, coef)."""
    norms = [torch.linalg.vector_norm(g, 2.0) for g in grads.values()]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return tree.tree_map(lambda g: g * coef.to(g.dtype), grads), float(coef)


_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


def _group_hyper(group: Mapping, kind: str) -> _Hyper:
    unsupported = [k for k in ("amsgrad", "maximize") if group.get(k)]
    if kind == "adam" and not group.get("decoupled_weight_decay", True) and group["weight_decay"]:
        unsupported.append("coupled weight decay (torch.optim.Adam)")
    if unsupported:
        raise ValueError(f"torch optimizer option(s) {unsupported} are not supported by fprobe.optim")
    path = {} if group.get("foreach") is None else dict(foreach=float(bool(group["foreach"])))
    if kind == "adam":
        return dict(
            lr=float(group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), **path,
        )
    return {k: float(group[k]) for k in _SGD_KEYS} | path


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
    from each param group, and so does the implementation (``foreach``: torch's multi-tensor path or its
    single-tensor loop, None for torch's default; torch's ``fused`` kernels are not reproduced bit for bit,
    and their states are read as the multi-tensor path's); tensors are copied (to each parameter's device and dtype), so later steps of
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
        opt = adamw(lr=per_name[names[0]]["lr"], groups=per_name, foreach=None)
        return opt, AdamWState(
            {n: _step_count(state[n], n) if n in state else 0 for n in params},
            {n: copy(n, "exp_avg") for n in params if n in state},
            {n: copy(n, "exp_avg_sq") for n in params if n in state},
        )
    opt = sgd(lr=per_name[names[0]]["lr"], groups=per_name, foreach=None)
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
