"""A transformers causal LM (optionally with a PEFT LoRA adapter) as a pure function of its parameters.

``policy.apply(params, input_ids, attention_mask) -> logits`` runs the model through
``torch.func.functional_call``: the trainable parameters come from ``params`` (a name-keyed
tree, names as in ``model.named_parameters()``), frozen weights and buffers stay inside the model.
"""

import contextlib
import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from fprobe import distributed
from fprobe.model import attention
from fprobe import tree
from fprobe.model.numerics import FLOATS, Numerics, autocast_off, exact_float32_matmul, narrower, upcast
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


def _widest_dtype(model: torch.nn.Module) -> torch.dtype:
    """The widest floating dtype of the model's parameters, at least float32: fprobe's calls compute in it."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype in FLOATS} | {torch.float32}
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


def computation_dtype(model: torch.nn.Module, eval_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype fprobe's passes on ``model`` compute in: ``eval_dtype`` (float32 or float64, not narrower than the
    parameters: ValueError otherwise), else the widest parameter dtype, at least float32."""
    widest = _widest_dtype(model)
    if eval_dtype is None:
        return widest
    _check_eval_dtype(eval_dtype, widest)
    return eval_dtype


def last_logits(forward, model: torch.nn.Module, keep_last: int) -> torch.Tensor:
    """The logits of ``forward(**head)``'s output at the last ``keep_last`` positions (all of them for 0): the LM head runs
    on those positions alone where ``model`` takes transformers' ``logits_to_keep``; elsewhere the logits are sliced."""
    if keep_last <= 0:
        return forward().logits
    logits = forward(logits_to_keep=keep_last).logits if _takes_logits_to_keep(model) else forward().logits
    return logits[:, -keep_last:]  # a view; it also serves a model that takes logits_to_keep but keeps every position


def without_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """A PEFT model's base model; any other model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward takes transformers' ``logits_to_keep`` (its LM head then runs on those positions)."""
    return "logits_to_keep" in inspect.signature(without_adapter(model).forward).parameters


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model itself (a PEFT model's base); TypeError for anything else."""
    base = without_adapter(model)
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
        exact_float32_matmul(device),
        fprobe_kernels_installed(model),
        autocast_off(model, device),
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
        computation_dtype(self.model, self.eval_dtype)
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
        return computation_dtype(self.model, self.eval_dtype)

    def evaluated_in(self, eval_dtype: torch.dtype | None) -> "Policy":
        """This policy with passes computed in ``eval_dtype`` (itself for None or its own)."""
        return self if eval_dtype in (None, self.eval_dtype) else dataclasses.replace(self, eval_dtype=eval_dtype)

    def apply(self, params: Mapping, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        """Logits [B, L, V] of the model at ``params``, divided by the temperature, computed in ``self.dtype``: narrower
        (bf16/fp16) parameters, frozen weights and buffers enter as exact ``self.dtype`` copies (memory: one such copy
        of the narrower weights during the call), and no autocast acts (``autocast_off``). ``keep_last`` > 0: the logits
        of the last ``keep_last`` positions only, [B, keep_last, V] (the LM head runs on those positions alone where the
        model takes transformers' ``logits_to_keep``)."""
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
            forward = lambda **head: functional_call(self.model, tensors, (input_ids.to(device),), kwargs | head)
            logits = last_logits(forward, self.model, keep_last)
        return logits if self.temperature == 1.0 else logits / self.temperature
