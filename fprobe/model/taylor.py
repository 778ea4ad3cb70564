"""Second-order Taylor mode: every tensor of a forward pass carries its jet (y, ẏ, ÿ) = (f, d/dε f, d²/dε² f) along
θ₀ + εΔθ, and each aten op propagates the jet once.

Forward over forward (``torch.func.jvp`` of ``torch.func.jvp``) also computes the outer tangent of every primal,
which along the same Δθ equals the inner tangent: a linear layer y = x Wᵀ costs 8 products there (1 value, 2 + 2
tangents, 3 for the second derivative), 5 here. The rules, with only the terms whose components exist (a frozen
weight under LoRA has none, a parameter's second derivative is zero):

- linear ops (views, cat, gather, embedding, sums, casts, …): each component through the op itself;
- bilinear ops B (mul, mm, bmm, addmm):  Ḃ = B(ẋ, y) + B(x, ẏ),  B̈ = B(ẍ, y) + 2 B(ẋ, ẏ) + B(x, ÿ);
- smooth unary f (exp, rsqrt, pow, sigmoid, tanh, reciprocal):  ÿ = f′(x) ẍ + f″(x) ẋ²;
- softmax:  ẏ = y ⊙ u, u = ẋ − Σ y ẋ;  ÿ = ẏ ⊙ u + y ⊙ (ẍ − Σ y ẍ − Σ ẏ ẋ);  log-softmax:  L̇ = ẋ − Σ π ẋ,
  L̈ = ẍ − Σ π ẍ − (Σ π ẋ² − (Σ π ẋ)²);
- ops whose results are not floating (comparisons, indices, counts) read the values only.

Values come from the same aten calls as a plain forward pass, bit for bit. An op on a jet with no rule here (or one
that writes into its inputs) raises ``NoRule``; ``fprobe.model.passes.jet`` then falls back to nested ``torch.func``.
"""

from typing import NamedTuple

import torch
from torch.utils._pytree import tree_map

aten = torch.ops.aten


class NoRule(NotImplementedError):
    """An aten op met a jet for which this module has no second-order rule."""


class Parts(NamedTuple):
    """A jet's components: the value and its first and second ε-derivatives (None: zero)."""

    value: torch.Tensor
    first: torch.Tensor | None
    second: torch.Tensor | None


def _fit(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A component shaped and typed as its value (broadcast terms expanded, promoted terms cast)."""
    if t is None:
        return None
    if t.dtype != like.dtype:
        t = t.to(like.dtype)
    return t if t.shape == like.shape else t.expand(like.shape)


class Jet(torch.Tensor):
    """A tensor with its first and second ε-derivatives; ops on it propagate all three (module docstring)."""

    @staticmethod
    def __new__(cls, value: torch.Tensor, first: torch.Tensor | None = None, second: torch.Tensor | None = None):
        return torch.Tensor._make_wrapper_subclass(
            cls, value.shape, strides=value.stride(), storage_offset=value.storage_offset(), dtype=value.dtype,
            device=value.device, layout=value.layout, requires_grad=False,
        )

    def __init__(self, value, first=None, second=None):
        self.parts = Parts(value, _fit(first, value), _fit(second, value))

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Jet({self.parts.value!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        rule = _RULES.get(packet)
        if rule is not None and not func._schema.is_mutable:
            return rule(func, *args, **kwargs)
        if packet in _LINEAR and not func._schema.is_mutable:
            return _linear(func, _LINEAR[packet], args, kwargs)
        return _values_only(func, args, kwargs)


def jet(value: torch.Tensor, first: torch.Tensor | None = None, second: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` with its derivatives as a ``Jet`` (the value itself where both are zero)."""
    return value if first is None and second is None else Jet(value, first, second)


def parts(x) -> Parts:
    """(value, first, second) of a jet; a plain tensor (or number) has no derivatives."""
    return x.parts if isinstance(x, Jet) else Parts(x, None, None)


def _component(x, k: int):
    if isinstance(x, (list, tuple)):
        return type(x)(_component(a, k) for a in x)
    return x.parts[k] if isinstance(x, Jet) else x


def _total(*terms):
    """The sum of the terms that exist (None if none does)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    out = present[0]
    for t in present[1:]:
        out = out + t
    return out


def _has_jet(tree) -> bool:
    found = []
    tree_map(lambda x: found.append(x) if isinstance(x, Jet) else None, tree)
    return bool(found)


def _values_only(func, args, kwargs):
    """An op without a rule: allowed on jets only when none of its results is floating (no derivative to carry)."""
    if not _has_jet((args, kwargs)):
        return func(*args, **kwargs)
    if func._schema.is_mutable:
        raise NoRule(f"{func} writes into a tensor inside a second-order Taylor pass")
    out = func(*tree_map(lambda x: _component(x, 0), args), **tree_map(lambda x: _component(x, 0), kwargs))
    floating = []
    tree_map(lambda x: floating.append(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None, out)
    if floating:
        raise NoRule(f"no second-order Taylor rule for {func}")
    return out


def _wrap(value, first, second):
    """Jets of an op's results: one tensor, or a list/tuple of them (split, unbind)."""
    if isinstance(value, (list, tuple)):
        n = len(value)
        first, second = [None] * n if first is None else first, [None] * n if second is None else second
        return type(value)(jet(v, f, s) for v, f, s in zip(value, first, second))
    return jet(value, first, second)


def _filled(a, k: int):
    """Component k of a slot's tensor (or list of them), zeros where it has none."""
    if isinstance(a, (list, tuple)):
        return [_filled(x, k) for x in a]
    p = parts(a)
    return torch.zeros_like(p.value) if p[k] is None else p[k]


def _present(a, k: int) -> bool:
    return any(_present(x, k) for x in a) if isinstance(a, (list, tuple)) else parts(a)[k] is not None


def _linear(func, slots: tuple[int, ...], args, kwargs):
    """A linear op in the arguments at ``slots`` (a tensor or a list of tensors each): each derivative through the op,
    with zeros for the tensors in those slots that lack it (None where none has it)."""
    through = lambda k: func(*[(_filled(a, k) if k else _component(a, 0)) if i in slots else a for i, a in enumerate(args)],
                             **kwargs)
    derivative = lambda k: through(k) if any(_present(args[i], k) for i in slots if i < len(args)) else None
    return _wrap(through(0), derivative(1), derivative(2))


# op → the positions of the arguments it is linear in (jointly)
_LINEAR = {
    op: (0,) for op in (
        aten.alias, aten.clone, aten.expand, aten.slice, aten.select, aten.unsqueeze,
        aten.squeeze, aten.t, aten.transpose, aten.permute, aten.split, aten.split_with_sizes, aten.unbind,
        aten.cat, aten.stack, aten.index_select, aten.gather, aten.index, aten.embedding, aten._to_copy, aten.neg,
        aten.sum, aten.mean, aten.flip, aten.roll, aten.narrow, aten.repeat, aten.repeat_interleave, aten.tril,
        aten.triu, aten.diagonal, aten.unfold,
    )
}
_LINEAR |= {aten.masked_scatter: (0, 2), aten.where: (1, 2)}


def _derivatives(op, x, y) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(Ḃ, B̈) of a bilinear B = op: Ḃ = B(ẋ, y) + B(x, ẏ), B̈ = B(ẍ, y) + 2 B(ẋ, ẏ) + B(x, ÿ)."""
    (x0, x1, x2), (y0, y1, y2) = parts(x), parts(y)
    b = lambda a, c: None if a is None or c is None else op(a, c)
    cross = b(x1, y1)
    return _total(b(x1, y0), b(x0, y1)), _total(b(x2, y0), None if cross is None else cross + cross, b(x0, y2))


def _bilinear(func, x, y):
    return jet(func(parts(x).value, parts(y).value), *_derivatives(func, x, y))


def _div(func, x, y, rounding_mode=None):
    """x / y; a jet y through x · (1/y)."""
    if rounding_mode is not None:
        return _values_only(func, (x, y), {"rounding_mode": rounding_mode})
    if not isinstance(y, Jet):
        return _linear(func, (0,), (x, y), {})
    return jet(func(parts(x).value, y.parts.value), *_derivatives(aten.mul.Tensor, x, _reciprocal(aten.reciprocal.default, y)))


_SIGNS = {aten.add: (1, 1), aten.sub: (1, -1), aten.rsub: (-1, 1)}  # (x, y) ↦ x + α y, x − α y, y − α x


def _add(func, x, y, alpha=1):
    """add, sub, rsub: linear in both operands (α scales y, or x for rsub)."""
    sx, sy = _SIGNS[func.overloadpacket]
    cx, cy = (sx * alpha, sy) if func.overloadpacket is aten.rsub else (sx, sy * alpha)
    (x0, x1, x2), (y0, y1, y2) = parts(x), parts(y)
    scaled = lambda t, c: None if t is None else t if c == 1 else t * c
    value = func(x0, y0) if alpha == 1 else func(x0, y0, alpha=alpha)
    return jet(value, _total(scaled(x1, cx), scaled(y1, cy)), _total(scaled(x2, cx), scaled(y2, cy)))


def _addmm(func, bias, m1, m2, beta=1, alpha=1):
    """β b + α m1 m2."""
    scale = lambda t, s: None if t is None else t if s == 1 else t * s
    (b0, b1, b2), (p1, p2) = parts(bias), _derivatives(aten.mm.default, m1, m2)
    value = func(b0, parts(m1).value, parts(m2).value, beta=beta, alpha=alpha)
    return jet(value, _total(scale(b1, beta), scale(p1, alpha)), _total(scale(b2, beta), scale(p2, alpha)))


def _view(func, x, size):
    """A view of each component (``reshape`` where a component's strides admit no view: an expanded term)."""
    x0, x1, x2 = parts(x)
    return jet(func(x0, size), *(None if t is None else t.reshape(size) for t in (x1, x2)))


def _masked_fill(func, x, mask, value):
    """x with ``value`` where ``mask``: the derivatives are zero there."""
    if isinstance(value, Jet) or isinstance(mask, Jet):
        raise NoRule(f"no second-order Taylor rule for {func} with a jet mask or fill value")
    x0, x1, x2 = parts(x)
    return jet(func(x0, mask, value), *(None if t is None else t.masked_fill(mask, 0) for t in (x1, x2)))


def _constant(func, x, *args, **kwargs):
    """Ops whose result does not depend on the values of the jet (zeros_like, …)."""
    return func(parts(x).value, *args, **kwargs)


def _unary(value, d1, d2, x1, x2):
    """f(x) with f′ = d1, f″ = d2 (tensors or numbers): ẏ = f′ ẋ, ÿ = f′ ẍ + f″ ẋ²."""
    first = None if x1 is None else d1 * x1
    second = _total(None if x2 is None else d1 * x2, None if x1 is None else d2 * (x1 * x1))
    return jet(value, first, second)


def _exp(func, x):
    x0, x1, x2 = parts(x)
    y = func(x0)
    return _unary(y, y, y, x1, x2)


def _rsqrt(func, x):
    x0, x1, x2 = parts(x)
    y = func(x0)
    y3 = y * y * y
    return _unary(y, -0.5 * y3, 0.75 * y3 * y * y, x1, x2)


def _reciprocal(func, x):
    x0, x1, x2 = parts(x)
    y = func(x0)
    y2 = y * y
    return _unary(y, -y2, 2 * y2 * y, x1, x2)


def _sigmoid(func, x):
    x0, x1, x2 = parts(x)
    y = func(x0)
    d1 = y * (1 - y)
    return _unary(y, d1, d1 * (1 - 2 * y), x1, x2)


def _tanh(func, x):
    x0, x1, x2 = parts(x)
    y = func(x0)
    d1 = 1 - y * y
    return _unary(y, d1, -2 * y * d1, x1, x2)


def _pow(func, x, exponent):
    if func is not aten.pow.Tensor_Scalar:
        raise NoRule(f"no second-order Taylor rule for {func}")
    x0, x1, x2 = parts(x)
    y = func(x0, exponent)
    if exponent == 2:
        return _unary(y, 2 * x0, 2.0, x1, x2)
    return _unary(y, exponent * x0.pow(exponent - 1), exponent * (exponent - 1) * x0.pow(exponent - 2), x1, x2)


def _softmax(func, x, dim, half_to_float=False):
    x0, x1, x2 = parts(x)
    y = func(x0, dim, half_to_float)
    if x1 is None and x2 is None:
        return y
    dot = lambda a, b: (a * b).sum(dim, keepdim=True)
    first = second = None
    if x1 is not None:
        u = x1 - dot(y, x1)
        first = y * u
    if x2 is not None:
        second = y * (x2 - dot(y, x2))
    if x1 is not None:
        second = _total(second, first * u - y * dot(first, x1))
    return jet(y, first, second)


def _log_softmax(func, x, dim, half_to_float=False):
    x0, x1, x2 = parts(x)
    y = func(x0, dim, half_to_float)
    probs = y.exp()
    mean = lambda a: (probs * a).sum(dim, keepdim=True)
    first = None if x1 is None else x1 - mean(x1)
    second = _total(None if x2 is None else x2 - mean(x2), None if x1 is None else -(mean(x1 * x1) - mean(x1) ** 2))
    return jet(y, first, second)


_RULES = {
    aten.mul: _bilinear, aten.mm: _bilinear, aten.bmm: _bilinear, aten.div: _div, aten.add: _add, aten.sub: _add,
    aten.rsub: _add, aten.addmm: _addmm, aten.exp: _exp, aten.rsqrt: _rsqrt, aten.reciprocal: _reciprocal,
    aten.sigmoid: _sigmoid, aten.tanh: _tanh, aten.pow: _pow, aten._softmax: _softmax, aten._log_softmax: _log_softmax,
    aten.view: _view, aten._unsafe_view: _view, aten.masked_fill: _masked_fill,
    **dict.fromkeys((aten.detach, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.new_zeros,
                     aten.new_ones, aten.new_empty, aten.new_full), _constant),
}
