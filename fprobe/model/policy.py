"""A transformers causal LM (optionally with a PEFT LoRA adapter) as a pure function of its parameters.

``policy.apply(params, input_ids, attention_mask) -> logits`` runs the model through
``torch.func.functional_call``: the trainable parameters come from ``params`` (a name-keyed
tree, names as in ``model.named_parameters()``), frozen weights and buffers stay inside the model.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from fprobe import distributed
from fprobe.model import attention
from fprobe import tree
from fprobe.rollouts import check_token_ids


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the attention mask (cumsum − 1), so left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _dropout_rates(module: torch.nn.Module) -> dict[str, float]:
    """The dropout probabilities a module applies itself: an ``nn.Dropout`` module's ``p``, and the float
    attributes named ``*dropout*`` or ``*pdrop*`` that transformers' attention modules pass to their
    attention function as its ``dropout`` argument (e.g. Llama/Qwen2's ``attention_dropout``)."""
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return {"": module.p}
    return {
        f".{name}": value for name, value in vars(module).items()
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float)
    }


def active_dropout(model: torch.nn.Module) -> list[str]:
    """Names of the dropout that would act in the model's current mode: dropout modules, and modules in
    train mode whose dropout rate attribute is > 0 (``_dropout_rates``)."""
    return [
        f"{name}{attribute}"
        for name, m in model.named_modules() if m.training
        for attribute, rate in _dropout_rates(m).items() if rate > 0
    ]


def check_no_dropout(model: torch.nn.Module) -> None:
    names = active_dropout(model)
    if names:
        raise ValueError(
            f"the model is in train mode with active dropout ({names[0]!r} and {len(names) - 1} more): "
            "fprobe needs a deterministic policy; call model.eval()"
        )


_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")  # transformers', PEFT's


@contextlib.contextmanager
def _input_require_grads_hooks_suspended(model: torch.nn.Module):
    """Within: without transformers' or PEFT's input-require-grads forward hooks (they call ``requires_grad_``
    inside forward, which breaks ``jvp``; with gradient checkpointing every generation adds one more, and only
    the last is on record in ``_require_grads_hooks``, so they are found by name); on exit every module's
    forward hooks are put back as they were, in their order."""
    hooks = [(module._forward_hooks, list(module._forward_hooks.items())) for module in model.modules()]
    for table, items in hooks:
        for key, hook in items:
            if getattr(hook, "__name__", None) in _INPUT_GRAD_HOOKS:
                del table[key]
    try:
        yield
    finally:
        for table, items in hooks:
            table.clear()
            table.update(items)


@contextlib.contextmanager
def modes_kept(model: torch.nn.Module):
    """Within: the model in eval mode (no dropout, no gradient checkpointing) and without input-require-grads
    hooks (``_input_require_grads_hooks_suspended``); on exit every module's ``training`` flag is put back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with _input_require_grads_hooks_suspended(model):
            yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _exact_float32_matmul(device: torch.device):
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


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def narrower(dtype, than: torch.dtype) -> bool:
    """Whether ``dtype`` is a floating dtype with fewer significand bits than ``than`` (bf16, fp16 < float32 < float64)."""
    return dtype in _FLOATS and torch.finfo(dtype).eps > torch.finfo(than).eps


def upcast(x, dtype: torch.dtype):
    """``x`` in ``dtype`` if it is a floating tensor narrower than ``dtype`` (exactly: every narrower value is a ``dtype``
    value); anything else as it is."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and narrower(x.dtype, dtype) else x


def exact_delta(new: tree.Params, old: tree.Params) -> tree.Params:
    """Δθ = new − old in float32 at least. The difference of two bf16/fp16 values is exact in float32 (unless one is
    below 2⁻¹⁶ of the other, where it rounds by 2⁻²⁴ of itself), but not in their own dtype (a weight that crosses
    zero or changes by more than half of itself)."""
    return tree.tree_map(lambda a, b: torch.sub(upcast(a, torch.float32), upcast(b, torch.float32)), new, old)


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
    derivative, so forward-over-forward (δH₂) through ``F.silu`` fails."""
    return x * torch.sigmoid(x)


_PRIMITIVE = {torch.nn.functional.layer_norm: _layer_norm, torch.nn.functional.silu: _silu}

# Matrix products do not promote dtypes: a narrower weight (a float32 one kept by transformers in a float64 model,
# ``_keep_in_fp32_modules``, e.g. DeepSeek-V3's router), met by an operand in the computation's dtype, is upcast.
_MATMULS = {
    torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
    torch.addmm, torch.baddbmm, torch.einsum,
}

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
    under a bf16 one; ``_casts_down``); matrix products upcast narrower operands (``_MATMULS``). Inside
    ``perturbed_rounding`` each floating result is perturbed by one random rounding."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.dtype
        if func in _PRIMITIVE and not attention.in_reverse_mode():
            out = _PRIMITIVE[func](*args, **kwargs)
        elif func in _CASTS and _casts_down(func, args, kwargs, dtype):
            out = args[0]
        else:
            if _casts_down(func, args, kwargs, dtype):
                args, kwargs = _kept_in(args, kwargs, dtype)
            if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == dtype for a in args):
                args = tuple(upcast(a, dtype) for a in args)
            out = func(*args, **kwargs)
        rounding = _ROUNDING.get()
        return out if rounding is None or _is_attribute_read(func) else _perturbed(out, rounding, dtype)


@contextlib.contextmanager
def _autocast_off(model: torch.nn.Module, device: torch.device):
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


def _widest_dtype(model: torch.nn.Module) -> torch.dtype:
    """The widest floating dtype of the model's parameters, at least float32: fprobe's calls compute in it."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype in _FLOATS} | {torch.float32}
    return min(dtypes, key=lambda d: torch.finfo(d).eps)


def _held_tensors_upcast(model: torch.nn.Module, params: Mapping, dtype: torch.dtype) -> dict:
    """Exact copies of the model's parameters outside ``params`` (frozen weights, e.g. a bf16 LoRA base) narrower than
    ``dtype``, in ``dtype``, and of its bf16/fp16 buffers, in float32 (transformers keeps buffers such as rotary
    frequencies in float32 on purpose, in a float64 model too): what ``functional_call`` runs the model with besides
    ``params``."""
    frozen = [(name, p, dtype) for name, p in model.named_parameters() if name not in params]
    buffers = [(name, b, torch.float32) for name, b in model.named_buffers()]
    return {name: x.detach().to(to) for name, x, to in frozen + buffers if narrower(x.dtype, to)}


def _check_eval_dtype(eval_dtype, widest: torch.dtype) -> None:
    """``eval_dtype`` must be float32 or float64, and not narrower than the model's own parameters."""
    if eval_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"eval_dtype must be torch.float32 or torch.float64 (or None: the model's own), got {eval_dtype!r}")
    if narrower(eval_dtype, widest):
        raise ValueError(f"eval_dtype {eval_dtype} is narrower than the model's {widest} parameters: fprobe never computes below them")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself (a PEFT model's base); TypeError for anything else."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "set_attn_implementation"):
        raise TypeError(f"{type(base).__name__} is not a transformers model: fprobe needs a transformers causal LM")
    return base


def _check_attention_interface(model: torch.nn.Module) -> None:
    """fprobe can give the model its attention only if every attention layer dispatches through
    transformers' AttentionInterface, without attention sinks (learned per-head logits, e.g. gpt-oss)."""
    sinks = [name for name, m in model.named_modules() if isinstance(getattr(m, "sinks", None), torch.Tensor)]
    if sinks:
        raise ValueError(f"{sinks[0]!r} has attention sinks (s_aux), which fprobe's attention does not support")
    for module in model.modules():
        if hasattr(module, "_can_set_attn_implementation") and not module._can_set_attn_implementation():
            raise TypeError(
                f"{type(module).__name__} does not route attention through transformers' AttentionInterface, "
                "so fprobe cannot give it a forward-mode-differentiable attention"
            )


_EAGER_EXPERTS = "eager"


def attention_configs(model: torch.nn.Module) -> list:
    """Every transformers config that names an attention implementation for part of ``model``: the
    configs of its transformers (sub)models and, recursively, their sub-configs; each once."""
    found, stack = {}, [m.config for m in model.modules() if hasattr(m, "_can_set_attn_implementation")]
    while stack:
        config = stack.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        stack += [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
    return list(found.values())


@contextlib.contextmanager
def fprobe_kernels_installed(model: torch.nn.Module):
    """Within: the model runs fprobe's attention (``fprobe.attention``) and transformers' eager MoE
    experts (its default ``grouped_mm`` kernel has no forward-mode derivative and no float64); on exit
    every config's implementations are put back exactly as they were, so a model shared with a trainer
    is left as found."""
    saved = [
        (config, config._attn_implementation_internal, getattr(config, "_experts_implementation_internal", None))
        for config in attention_configs(model)
    ]
    name = attention.register()
    for config, _, experts in saved:
        config._attn_implementation_internal = name
        if experts is not None:
            config._experts_implementation_internal = _EAGER_EXPERTS
    try:
        yield
    finally:
        for config, implementation, experts in saved:
            config._attn_implementation_internal = implementation
            if experts is not None:
                config._experts_implementation_internal = experts


def lora_config(lora):
    """A ``peft.LoraConfig`` from a LoraConfig, a dict of its fields, or ``(r, alpha, targets)``."""
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if isinstance(lora, Mapping):
        return LoraConfig(task_type="CAUSAL_LM", **lora)
    r, alpha, targets = lora
    return LoraConfig(task_type="CAUSAL_LM", r=int(r), lora_alpha=float(alpha), target_modules=list(targets), lora_dropout=0.0)


@contextlib.contextmanager
def fprobe_numerics(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None):
    """Within: every call of ``model`` runs with fprobe's numerics (``Policy.apply``'s and the sharded
    passes'): input-require-grads hooks suspended, exact float32 matmuls, fprobe's attention and eager
    experts, no autocast, computed in ``dtype`` (``Numerics``; None: ``_widest_dtype(model)``)."""
    with (
        _input_require_grads_hooks_suspended(model),
        _exact_float32_matmul(device),
        fprobe_kernels_installed(model),
        _autocast_off(model, device),
        Numerics(_widest_dtype(model) if dtype is None else dtype),
    ):
        yield


def _check_not_sharded(model: torch.nn.Module) -> None:
    """ValueError for a model whose trainable parameters are DTensors (FSDP2): ``functional_call`` on such a
    module runs its own all-gathered weights and silently ignores the parameters it is given, and forward-mode
    AD does not pass its all-gathers, so none of ``Policy``'s functional paths would measure what they say."""
    sharded = next((name for name, p in model.named_parameters() if p.requires_grad and distributed.is_dtensor(p)), None)
    if sharded is not None:
        raise ValueError(
            f"the model's parameters are sharded (FSDP2: {sharded!r} is a DTensor): functional_call on a sharded "
            "module ignores the parameters it is given and forward-mode AD does not pass its all-gathers, so "
            "fprobe.Policy cannot evaluate it; probe a TRL run with fprobe.trl.attach (sharded mode), or gather "
            "whole parameters into an unsharded copy of the model"
        )


@dataclass(frozen=True, eq=False)
class Policy:
    """π_θ(· | prefix) = softmax(logits / temperature) of a transformers causal LM.

    ``Policy(model)`` wraps an already built model; ``Policy.from_pretrained`` loads one.
    The model must be in eval mode (no dropout). It is left as it is: fprobe's calls switch it to
    fprobe's attention and back (``fprobe_kernels_installed``), so it can be shared with a trainer.
    """

    model: torch.nn.Module
    temperature: float = 1.0
    chunk_size: int | None = None  # rows of logits upcast to float64 at a time; None: sized by vocabulary (fprobe.tokens)
    eval_dtype: torch.dtype | None = None  # the computation's dtype (float32 or float64); None: ``_widest_dtype(model)``

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_size is not None and not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive number of rows or None, got {self.chunk_size!r}")
        _check_not_sharded(self.model)
        if self.eval_dtype is not None:
            _check_eval_dtype(self.eval_dtype, _widest_dtype(self.model))
        _check_attention_interface(_base_model(self.model))
        check_no_dropout(self.model)
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to probe")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora=None,
        adapter: str | Path | None = None,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        trust_remote_code: bool = False,
        eval_dtype: torch.dtype | None = None,
    ) -> "Policy":
        """Load a causal LM offline (with transformers' default attention for its own use, e.g. generation); optionally add a new LoRA adapter
        (``lora``: LoraConfig, dict, or (r, alpha, target_modules)) or load a trained one (``adapter``)."""
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(name_or_path),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=None,
            )
        except OSError as e:
            where = "" if Path(name_or_path).is_dir() else (
                "not a local folder and not in the local cache (fprobe does not download at run time): ")
            raise FileNotFoundError(f"cannot load model {str(name_or_path)!r}: {where}{e}") from e
        model = model.to(device).eval()
        if lora is not None and adapter is not None:
            raise ValueError("give either lora (a new adapter) or adapter (a trained one), not both")
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(lora)).eval()
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True).eval()
        return cls(model, temperature=temperature, chunk_size=chunk_size, eval_dtype=eval_dtype)

    @property
    def params(self) -> tree.Params:
        """The trainable parameters (requires_grad), detached, by name; tied weights appear once."""
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype every pass computes in: ``eval_dtype``, or the widest of the parameters' (at least float32)."""
        return _widest_dtype(self.model) if self.eval_dtype is None else self.eval_dtype

    def evaluated_in(self, eval_dtype: torch.dtype | None) -> "Policy":
        """This policy with passes computed in ``eval_dtype`` (itself for None or its own)."""
        return self if eval_dtype in (None, self.eval_dtype) else dataclasses.replace(self, eval_dtype=eval_dtype)

    def apply(self, params: Mapping, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] of the model at ``params``, divided by the temperature, computed in ``self.dtype``: narrower
        (bf16/fp16) parameters, frozen weights and buffers enter as exact ``self.dtype`` copies (memory: one such copy
        of the narrower weights during the call), and no autocast acts (``_autocast_off``)."""
        check_no_dropout(self.model)
        check_token_ids(input_ids, self.model.get_input_embeddings().num_embeddings)
        dtype, device = self.dtype, self.device
        attention_mask = attention_mask.to(device)
        kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        tensors = {**_held_tensors_upcast(self.model, params, dtype), **{name: upcast(p, dtype) for name, p in params.items()}}
        with fprobe_numerics(self.model, device, dtype):
            out = functional_call(self.model, tensors, (input_ids.to(device),), kwargs)
        logits = out.logits
        return logits if self.temperature == 1.0 else logits / self.temperature
