"""fprobe's own attention kernel, registered with transformers under the name ``"fprobe"``.

softmax(Q Kᵀ · s + M) V computed in the input's dtype, with plain differentiable ops so that
forward-mode AD (``torch.func.jvp``) works and float64 models stay float64 end to end.
SDPA/flash kernels have no forward-mode AD, and transformers' eager kernel rounds the
attention softmax to float32. The additive mask M (causal, padding, sliding window) comes from
transformers' eager mask function, registered under the same name: without a mask function a
custom attention receives ``attention_mask=None`` and silently attends to future tokens.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .softmax import softmax

NAME = "fprobe"


def repeat_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each of x's KV heads so that it has ``n_heads`` heads."""
    n_kv = x.shape[1]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads")
    return x.repeat_interleave(n_heads // n_kv, dim=1)


def fprobe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, L, D] query/key/value → ([B, L, H, D] output, [B, H, L, L] attention weights)."""
    if dropout and module.training:
        raise ValueError("fprobe attention runs without dropout: put the model in eval mode")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by fprobe's attention")
    key = repeat_kv_heads(key, query.shape[1])
    value = repeat_kv_heads(value, query.shape[1])
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(scores.dtype)
    weights = softmax(scores, dim=-1)  # torch.softmax, with a cheap jvp inside passes.jet (fprobe.softmax)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register() -> str:
    """Register the kernel and its additive mask with transformers; idempotent. Returns the name."""
    AttentionInterface.register(NAME, fprobe_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
