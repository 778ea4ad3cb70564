"""The numerics of fprobe's calls: one computation dtype (float32 or float64) whatever the model's, exact upcasts,
no autocast, float32 matrix products without TF32, primitive-op layer norm and SiLU for forward-mode AD, and the
perturbed rounding the rounding floor is estimated with."""

import contextlib
import contextvars

import torch

from fprobe import tree
from fprobe.model import attention, jvp_rules


@contextlib.contextmanager
def exact_float32_matmul(device: torch.device):
    """On CUDA, float32 means float32: TF32 matmuls off inside, the user's setting restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm from primitive ops. torch's fused ``native_layer_norm`` has a wrong forward-over-forward
    derivative (jvp of jvp treats its saved mean and 1/σ as constants), which would corrupt δH₂."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def narrower(dtype, than: torch.dtype) -> bool:
    """Whether ``dtype`` is a floating dtype with fewer significand bits than ``than`` (bf16, fp16 < float32 < float64)."""
    return dtype in FLOATS and torch.finfo(dtype).eps > torch.finfo(than).eps


def upcast(x, dtype: torch.dtype):
    """``x`` in ``dtype`` if it is a floating tensor narrower than ``dtype`` (exactly: every narrower value is a ``dtype``
    value); anything else as it is."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and narrower(x.dtype, dtype) else x


def exact_delta(new: tree.Params, old: tree.Params, into: tree.Params | None = None) -> tree.Params:
    """Δθ = new − old in float32 at least. The difference of two bf16/fp16 values is exact in float32 (unless one is
    below 2⁻¹⁶ of the other, where it rounds by 2⁻²⁴ of itself), but not in their own dtype (a weight that crosses
    zero or changes by more than half of itself). ``into``: a tree the caller no longer needs (the step's gradient),
    whose tensors receive the differences where shape and dtype agree: one parameter-sized allocation less."""

    def difference(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = upcast(a, torch.float32), upcast(b, torch.float32)
        out = None if into is None else into.get(name)
        if out is not None and out.shape == a.shape and out.dtype == torch.result_type(a, b) and out.device == a.device:
            return torch.sub(a, b, out=out)
        return torch.sub(a, b)

    return {name: difference(name, new[name], old[name]) for name in new}


_CASTS = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16, torch.Tensor.bfloat16: torch.bfloat16}
_CONVERSIONS = (torch.Tensor.to, torch.Tensor.type)


def _casts_down(func, args, kwargs, dtype: torch.dtype) -> bool:
    """Whether ``func(*args, **kwargs)`` casts a ``dtype`` tensor (the computation's) to a narrower floating dtype
    (``.float()``, ``.to(torch.bfloat16)``, ``softmax(x, dtype=torch.float)`` as in Qwen2-MoE/OLMoE routers)."""
    if not (args and isinstance(args[0], torch.Tensor) and args[0].dtype == dtype):
        return False
    if kwargs.get("dtype") is not None and narrower(kwargs["dtype"], dtype):
        return True
    if func in _CASTS:
        return narrower(_CASTS[func], dtype)
    return func in _CONVERSIONS and any(isinstance(a, torch.dtype) and narrower(a, dtype) for a in args[1:])


def _kept_in(args, kwargs, dtype: torch.dtype):
    """``args``/``kwargs`` with every narrower floating dtype replaced by ``dtype``."""
    swap = lambda a: dtype if isinstance(a, torch.dtype) and narrower(a, dtype) else a
    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def _silu(x, inplace=False):
    """x·σ(x) from primitive ops: torch's SiLU jvp calls ``silu_backward``, which has no forward-mode
    derivative, so forward-over-forward (δH₂) through ``F.silu`` fails (``jvp_rules.silu``)."""
    return jvp_rules.silu(x)


_PRIMITIVE = {torch.nn.functional.layer_norm: _layer_norm, torch.nn.functional.silu: _silu}

# Matrix products do not promote dtypes: a narrower weight (a float32 one kept by transformers in a float64 model,
# ``_keep_in_fp32_modules``, e.g. DeepSeek-V3's router), met by an operand in the computation's dtype, is upcast.
_MATMULS = {
    torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
    torch.addmm, torch.baddbmm, torch.einsum,
}

# An embedding lookup's output starts the activations in the computation's dtype when the weights cannot be swapped for
# upcast copies (an FSDP2 module runs its own gathered parameters): the lookup is a copy, so its upcast output equals
# the lookup of an upcast weight, without a copy of the whole table.
_LOOKUPS = {torch.nn.functional.embedding}

_ROUNDING = contextvars.ContextVar("fprobe_perturbed_rounding", default=None)


@contextlib.contextmanager
def perturbed_rounding(seed: int):
    """Within: every result of the model's operations inside ``Policy.apply`` in the computation's dtype is multiplied
    by (1 + u·ξ), ξ uniform in [−1, 1] from fprobe's own generator (``seed``), u that dtype's unit roundoff — one
    random rounding of each operation (Monte Carlo arithmetic), for ``fprobe.entropy.precision``'s rounding floor.
    Narrower results (float32 rotary angles of a float64 model, from float32 buffers and positions) do not depend on
    the parameters: their rounding is the same at θ₀ and θ₀+Δθ, so they are left as they are; so are results that are
    whole numbers (masks, one-hot routing tables, token counts), which no rounding touches."""
    token = _ROUNDING.set({"seed": seed, "generators": {}})
    try:
        yield
    finally:
        _ROUNDING.reset(token)


def _perturbed(out, rounding: dict, dtype: torch.dtype):
    """``out`` (a tensor, or a tuple/list of them) with its ``dtype`` tensors perturbed as ``perturbed_rounding`` says."""
    if isinstance(out, (tuple, list)):
        return type(out)(_perturbed(x, rounding, dtype) for x in out) if not hasattr(out, "_fields") else out
    if not (isinstance(out, torch.Tensor) and out.dtype == dtype and out.numel()) or bool((out == out.trunc()).all()):
        return out  # whole numbers (masks, one-hots, counts) are exact: perturbed, a count of 1.0 could truncate to 0
    device = out.device
    generators = rounding["generators"]
    if device not in generators:
        generators[device] = torch.Generator(device=device).manual_seed(rounding["seed"])
    xi = torch.rand(out.shape, generator=generators[device], device=device, dtype=out.dtype) * 2 - 1
    return out * (1 + xi * (torch.finfo(out.dtype).eps / 2))


def _is_attribute_read(func) -> bool:
    return getattr(func, "__name__", None) == "__get__"


class Numerics(torch.overrides.TorchFunctionMode):
    """The numerics of every fprobe call, in the computation's dtype ``dtype`` (float32 or float64), whatever the model's:
    in forward and forward-mode passes ``F.layer_norm`` and ``F.silu`` run from primitive ops (``_PRIMITIVE``: correct
    second-order forward-mode derivatives; reverse-mode passes keep torch's fused kernels, whose backward is right and
    saves less); casts of ``dtype`` tensors to narrower dtypes keep ``dtype`` (Llama/Qwen RMSNorm casts to float32 and
    back to the weights' dtype, which would put a float32 floor of ~1e-8 under ΔH of a float64 model, and bf16 rounding
    under a bf16 one; ``_casts_down``); matrix products upcast narrower operands (``_MATMULS``); embedding lookups return
    ``dtype`` (``_LOOKUPS``), so that the activations of a model with narrower weights compute in ``dtype``; a linear
    layer's input that is a strided view (the positions ``logits_to_keep`` keeps) is made contiguous first, so that
    ``F.linear`` folds it into one matrix product (on a view torch runs a batched product over an expanded weight: 1.45×
    slower per row for the LM head at 0.5B, and in forward mode every tangent product too). Inside
    ``perturbed_rounding`` each floating result is perturbed by one random rounding."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_attribute_read(func):  # .shape, .dtype, …: nothing to cast, route or perturb
            return func(*args, **kwargs)
        dtype = self.dtype
        if func in _PRIMITIVE and not attention.in_reverse_mode():
            with jvp_rules.routed():  # the primitive ops' own jvp: the cheap rules where they are on
                out = _PRIMITIVE[func](*args, **kwargs)
        elif func in _CASTS and _casts_down(func, args, kwargs, dtype):
            out = args[0]
        else:
            if _casts_down(func, args, kwargs, dtype):
                args, kwargs = _kept_in(args, kwargs, dtype)
            if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == dtype for a in args):
                args = tuple(upcast(a, dtype) for a in args)
            if func is torch.nn.functional.linear and args[0].dim() > 2 and not args[0].is_contiguous():
                args = (args[0].contiguous(), *args[1:])
            out = jvp_rules.call(func, args, kwargs) if jvp_rules.cheap() else func(*args, **kwargs)
            if func in _LOOKUPS:
                out = upcast(out, dtype)
        rounding = _ROUNDING.get()
        return out if rounding is None else _perturbed(out, rounding, dtype)


@contextlib.contextmanager
def autocast_off(model: torch.nn.Module, device: torch.device):
    """Within: no autocast, so that the computation's dtype is the one fprobe chose. A caller's ``torch.autocast`` is
    switched off; so is the one accelerate's mixed precision (a trainer's ``bf16=True``) wraps around ``model.forward``
    (it keeps the unwrapped method as ``model._original_forward``), which is put back on exit."""
    wrapped, original = vars(model).get("forward"), getattr(model, "_original_forward", None)
    unwrap = wrapped is not None and original is not None
    if unwrap:
        model.forward = original
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if unwrap:
            model.forward = wrapped
