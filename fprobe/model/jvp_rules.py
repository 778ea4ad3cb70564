"""Cheap first-order forward-mode rules for the jvp of δH₁ (``passes.jet``, order 1, on dual tensors).

Torch's own rules are right but, at a real size, spend as much time as the matrix products on work they need not
do. Inside ``cheap_jvp()`` fprobe uses instead:

- ``F.linear`` (every linear layer, routed by ``call``):  ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ with only the terms
  whose tangent exists — torch's rule multiplies a zero tangent for a frozen weight (LoRA), two tangent products
  where one is due — and the second product accumulated into the first (``addmm_``: no separate sum);
- a product, matrix product, quotient, sum or difference with one tangent (a rotary table, an attention scale, a
  frozen norm weight, a residual add or a frozen key under LoRA):  ẋ·c, ẋ c, ẋ / c, ±ẋ. torch's formula puts a
  ``_efficientzerotensor`` for the missing tangent, whose kernels run through torch's Python reference
  implementations: about 1 ms a call on a CPU, twenty times the op. A product of two tangents: ẋ·y + x·ẏ, the second
  term added into the first (``addcmul_``);
- ``softmax`` (attention):  ẏ = y ⊙ (ẋ − Σ y ẋ), from the saved output (2.5× faster than torch's jvp, which
  recomputes exp(x − max));
- ``silu`` (x·σ(x), as ``fprobe.model.numerics`` writes SiLU):  one fused ``silu_backward`` pass for the tangent
  instead of four;
- the token statistics of a chunk of logits: ``fprobe.model.vocab`` (its ``_first_order`` rule).

Values are torch's own ops, bit for bit; tangents are torch's bit for bit where one operand carries a tangent and
to rounding where the rules fuse two terms; reverse-mode gradients of ``softmax`` are autograd's
(``_softmax_backward_data``). Outside ``cheap_jvp()`` nothing changes: these rules treat their saved values as
constants under an outer jvp, so forward over forward (δH₂) must not, and does not, use them; its second-order
Taylor pass (``fprobe.model.taylor``) has its own rules.
"""

import contextlib
import contextvars

import torch
from torch.autograd import forward_ad

_CHEAP = contextvars.ContextVar("fprobe_cheap_jvp", default=False)


def cheap() -> bool:
    """Whether the cheap first-order rules are on (inside ``cheap_jvp()``)."""
    return _CHEAP.get()


class _Affine(torch.autograd.Function):
    """y = x Wᵀ + b (``F.linear``) or y = b + x M (``torch.addmm``, as GPT-2's Conv1D), whose jvp multiplies only the
    tangents that exist, the second product accumulated into the first; forward-mode only."""

    @staticmethod
    def forward(ctx, x, weight, bias, linear: bool):
        ctx.save_for_forward(x, weight)
        ctx.linear = linear
        ctx.set_materialize_grads(False)  # an input without a tangent reaches ``jvp`` as None, not as zeros
        out = torch.nn.functional.linear(x, weight, bias) if linear else torch.addmm(bias, x, weight)
        ctx.out_shape = out.shape
        return out

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _):
        x, weight = ctx.saved_tensors
        out = None
        for a, w in ((x_t, weight), (x, weight_t)):
            if a is None or w is None:
                continue
            a, w = a.reshape(-1, a.shape[-1]), w.t() if ctx.linear else w
            out = torch.mm(a, w) if out is None else out.addmm_(a, w)  # no separate sum of the two products
        if out is not None:
            out = out.view(ctx.out_shape)
        if bias_t is not None:  # a copy, never the bias's own tangent; broadcast as torch broadcasts the bias
            out = bias_t.expand(ctx.out_shape).clone() if out is None else out.add_(bias_t)
        return out

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fprobe's cheap linear rule is for first-order forward mode only (cheap_jvp)")


class _SiLU(torch.autograd.Function):
    """x·σ(x) from primitive ops, as ``fprobe.model.numerics`` computes SiLU (the same values, bit for bit), whose
    jvp is one fused pass, ẋ·σ(x)(1 + x(1 − σ(x))) (torch's ``silu_backward``), instead of the four of its
    primitive ops' rules; forward-mode only."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_forward(x)
        return torch.sigmoid(x).mul_(x)  # σ(x)·x = x·σ(x), bit for bit, into σ's array: one fresh activation, not two

    @staticmethod
    def jvp(ctx, x_t):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(x_t, x)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fprobe's cheap SiLU rule is for first-order forward mode only (cheap_jvp)")


def traced(x: torch.Tensor) -> bool:
    """Whether a forward-mode transform follows ``x`` (a ``torch.func`` wrapper, as in forward over forward, or a dual
    tensor), whose ops take no ``out=`` buffer and must not write into an operand."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x) or forward_ad.unpack_dual(x).tangent is not None


def silu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(x) from primitive ops (forward over forward through it is exact), with the fused jvp rule inside
    ``cheap_jvp()``; a plain forward (no graph, no transform, no jet) writes the product into σ's own array."""
    if _CHEAP.get():
        return _SiLU.apply(x)
    if type(x) is torch.Tensor and not torch.is_grad_enabled() and not traced(x):
        return torch.sigmoid(x).mul_(x)
    return x * torch.sigmoid(x)


# Binary ops whose jvp fprobe forms itself (``_binary``). torch's formula (e.g. ẋ·c + ċ·x) puts a
# ``_efficientzerotensor`` where a tangent is missing, and the zero tensor's kernels run through torch's Python
# reference implementations: about 1 ms a call on a CPU, twenty times the op at the 0.5B shape.
_T = torch.Tensor
_PRODUCTS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}
_MATMULS = {torch.matmul, _T.matmul, _T.__matmul__, torch.mm, torch.bmm}
_DIVIDES = {torch.div, _T.div, _T.__truediv__}
_ADDS = {torch.add, _T.add, _T.__add__, _T.__radd__}
_SUBTRACTS = {torch.sub, _T.sub, _T.__sub__}
_RSUBTRACTS = {_T.__rsub__}
_BINARY = _PRODUCTS | _MATMULS | _DIVIDES | _ADDS | _SUBTRACTS | _RSUBTRACTS


def _unpacked(x) -> tuple:
    """(primal, tangent or None) of a tensor; (x, None) for anything else."""
    return tuple(forward_ad.unpack_dual(x)) if isinstance(x, torch.Tensor) else (x, None)


def _binary(func, args):
    """``func(a, b)`` with its jvp formed here, or None where torch's rule is as cheap. With one tangent, where the op
    is linear in that operand (a product or matrix product, a quotient by the other operand, a sum or difference):
    f(ȧ, b) or f(a, ḃ), ȧ / b, ±ȧ — torch's tangent bit for bit (its formula adds a zero tensor to it). With two, for
    an elementwise product: ȧ·b + a·ḃ by one ``addcmul_`` into ȧ·b instead of two products and a sum (to rounding).
    The primal is ``func`` on the primals: the same values, bit for bit."""
    a, b = args
    (pa, ta), (pb, tb) = _unpacked(a), _unpacked(b)
    if ta is None and tb is None:
        return None
    if ta is not None and tb is not None:
        if func not in _PRODUCTS:
            return None
        primal = func(pa, pb)
        return forward_ad.make_dual(primal, (ta * pb).addcmul_(pa, tb).expand_as(primal))  # into ȧ·b: no second array
    moving = 0 if ta is not None else 1
    if func in _DIVIDES and moving == 1:
        return None
    primal = func(pa, b) if moving == 0 else func(a, pb)
    tangent = ta if moving == 0 else tb
    if func in _PRODUCTS or func in _MATMULS:
        tangent = func(tangent, b) if moving == 0 else func(a, tangent)
    elif func in _DIVIDES:
        tangent = tangent / b
    elif func in _SUBTRACTS and moving == 1 or func in _RSUBTRACTS and moving == 0:
        tangent = -tangent
    else:  # a sum's tangent is the operand's own: copied, as torch's rule does, so that no two tangents share memory
        tangent = tangent.to(primal.dtype, copy=True)
    return forward_ad.make_dual(primal, tangent.to(primal.dtype).expand_as(primal))


_AFFINE = {torch.nn.functional.linear, torch.addmm}


def _linear_operands(input, weight, bias=None):
    return input, weight, bias


def _addmm_operands(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    return (mat1, mat2, input) if beta == 1 and alpha == 1 and out is None else None


def _affine(func, args, kwargs):
    """``F.linear(x, W, b)`` or ``torch.addmm(b, x, M)`` through ``_Affine``; None (torch's own rule) for a scaled
    ``addmm`` (beta, alpha), a 1-D weight, no input features, and under autocast, whose casts torch's rule follows."""
    linear = func is torch.nn.functional.linear
    operands = _linear_operands(*args, **kwargs) if linear else _addmm_operands(*args, **kwargs)
    if operands is None or torch.is_autocast_enabled(operands[0].device.type):
        return None
    x, weight, _ = operands
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] == 0:
        return None
    return _Affine.apply(*operands, linear)


def call(func, args=(), kwargs=None):
    """``func(*args, **kwargs)`` with the cheap rules: ``F.linear`` and ``torch.addmm`` through ``_Affine`` (its forward
    is the op itself: the same values, bit for bit; ``_affine``), and the jvp of a product, quotient, sum or difference
    formed here where that is cheaper (``_binary``). ``fprobe.model.numerics.Numerics`` routes every op of the model
    here inside ``cheap_jvp()``: one Python dispatch per op, not one per mode."""
    kwargs = kwargs or {}
    if func in _AFFINE:
        affine = _affine(func, args, kwargs)
        if affine is not None:
            return affine
    if func in _BINARY and len(args) == 2 and not kwargs:
        out = _binary(func, args)
        if out is not None:
            return out
    return func(*args, **kwargs)


class _Rules(torch.overrides.TorchFunctionMode):
    """``call`` as a mode, for code that runs inside another mode's handler (``Numerics``' primitive layer norm)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return call(func, args, kwargs)


def routed():
    """Within: every op through ``call`` while the cheap rules are on (``cheap()``); nothing otherwise."""
    return _Rules() if _CHEAP.get() else contextlib.nullcontext()


@contextlib.contextmanager
def cheap_jvp():
    """Within: the cheap first-order jvp rules (module docstring; not valid for jvp of jvp, nor for reverse mode). The
    model's ops reach them through ``Numerics`` (``call``), the vocabulary statistics through ``cheap()``."""
    token = _CHEAP.set(True)
    try:
        yield
    finally:
        _CHEAP.reset(token)


class _Softmax(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        return torch.softmax(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, y, ctx.dim, y.dtype), None

    @staticmethod
    def jvp(ctx, x_t, _):
        (y,) = ctx.saved_tensors
        return y * (x_t - (y * x_t).sum(ctx.dim, keepdim=True))


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax along ``dim``, with the cheap jvp rule inside ``cheap_jvp()``."""
    return _Softmax.apply(x, dim) if _CHEAP.get() else torch.softmax(x, dim)
