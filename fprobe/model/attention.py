"""fprobe's own attention, registered with transformers under the name ``"fprobe"``.

Forward passes and forward-mode AD (the jvp of δH₁, the second-order Taylor pass of δH₂) compute
softmax(Q Kᵀ·s + M) V in query blocks, in the input's dtype, from plain differentiable ops:
S_b = Q_b Kᵀ·s + M_b, P_b = softmax(S_b), O_b = P_b V. Forward-mode AD frees each block and its
tangent before the next, so memory is O(B·H·b·L), never [B, H, L, L]: linear in L at a fixed block.
SDPA/flash kernels have no forward-mode AD, and transformers' eager kernel rounds the softmax to float32.

Reverse-mode passes (inside ``for_reverse_mode()``: the RL step's gradient, ``method="grad"``) would
save every block for the backward pass, so there the kernel calls torch's
``scaled_dot_product_attention`` with ``is_causal=True`` — the memory-efficient kernel a trainer's step
uses — whenever the mask is plain causal with padding only at the ends of rows (``MaskBlocks.causal_prefix``;
``fprobe.tokens`` lays every row out that way); other masks (sliding windows, holes) and soft-capped
scores (Gemma-2) take the blocked path in reverse mode too.

The mask is never built whole: the mask function registered under the same name returns a
``_MaskBlocks``, which evaluates transformers' own mask function (causal, padding, sliding window, …:
exactly the entries of transformers' eager mask) one query block at a time. Without a registered mask
function a custom attention receives ``attention_mask=None`` and silently attends to future tokens.
"""

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask, sdpa_mask

from fprobe.model.jvp_rules import softmax

NAME = "fprobe"

# Bytes of one block of attention scores [B, H, b, L] (the block's softmax, its tangent and the
# products take a few times this), by device type. On a CPU, blocks that stay small use less memory
# than one block of the same size would as a whole (a jvp at L = 1024: 110 MiB with 8 MiB blocks,
# 243 MiB with one 32 MiB block, 183 MiB unblocked); a GPU needs large blocks to keep busy.
BLOCK_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}

_REVERSE = contextvars.ContextVar("fprobe_attention_reverse_mode", default=False)


def in_reverse_mode() -> bool:
    """Whether the current pass is differentiated in reverse mode (inside ``for_reverse_mode()``)."""
    return _REVERSE.get()


@contextlib.contextmanager
def for_reverse_mode():
    """Within: attention for a pass that is differentiated in reverse mode (SDPA where the mask allows)."""
    token = _REVERSE.set(True)
    try:
        yield
    finally:
        _REVERSE.reset(token)


@dataclass(frozen=True, eq=False)
class _MaskBlocks:
    """The attention mask of one forward pass, evaluated a block of query rows at a time.

    ``rows(start, stop)`` is the boolean [B, 1, stop − start, kv_length] block (True: attend) that
    transformers' ``sdpa_mask`` — and so its eager mask — gives for those query rows.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable
    padding: torch.Tensor | None  # [B, kv_offset + kv_length] bool, or None
    use_vmap: bool
    device: torch.device

    def __getattr__(self, name: str):
        """A model whose own attention code reads the mask as a tensor (``.dtype``, ``.shape``, …) ends here
        with an error that says why, rather than deep in its code."""
        raise AttributeError(
            f"the model's own code reads the attention mask as a tensor (.{name}), but inside fprobe's calls the mask "
            "is evaluated in blocks of query rows (fprobe.attention.MaskBlocks): this model cannot run fprobe's attention"
        )

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return sdpa_mask(
            batch_size=self.batch_size,
            q_length=stop - start,
            kv_length=self.kv_length,
            q_offset=self.q_offset + start,
            kv_offset=self.kv_offset,
            mask_function=self.mask_function,
            attention_mask=self.padding,
            allow_is_causal_skip=False,
            use_vmap=self.use_vmap,
            device=self.device,
        )

    def allowed(self, start: int, stop: int) -> torch.Tensor:
        """The block a kernel applies: for a ``causal_prefix`` mask only the causal pattern
        [stop − start, kv_length] (real query rows see no padded key anyway, and padded query rows are
        treated as SDPA's ``is_causal`` treats them), which is cheaper to build; otherwise ``rows``."""
        if not self.causal_prefix:
            return self.rows(start, stop)
        queries = torch.arange(start, stop, device=self.device)[:, None]
        return queries >= torch.arange(self.kv_length, device=self.device)

    def bias(self, start: int, stop: int, keys: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive block of ``allowed`` over the first ``keys`` keys: 0 where allowed, the dtype's
        lowest value elsewhere (as transformers' eager mask). When one block covers every query row
        (short sequences) it is built once and shared by all layers of the forward pass."""
        whole = (start, stop) == (0, self.q_length)
        cache = self.__dict__.setdefault("_whole_bias", {})
        if whole and (keys, dtype) in cache:
            return cache[keys, dtype]
        allowed = self.allowed(start, stop)[..., :keys]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill_(~allowed, torch.finfo(dtype).min)
        if whole:
            cache[keys, dtype] = bias
        return bias

    def visible_keys(self, stop: int) -> int:
        """Keys [0, n) that query rows before ``stop`` may see: with a causal mask, none after the last row."""
        if self.mask_function is causal_mask_function:
            return max(0, min(self.kv_length, self.q_offset + stop - self.kv_offset))
        return self.kv_length

    @functools.cached_property
    def causal_prefix(self) -> bool:
        """Plain causal attention over rows whose padding comes only after their tokens: then
        ``is_causal=True`` without a mask gives every real query row exactly the eager mask's keys
        (padded keys lie after every real query; padded query rows are never read)."""
        if self.mask_function is not causal_mask_function or self.q_offset or self.kv_offset:
            return False
        if self.q_length != self.kv_length:
            return False
        return self.padding is None or not bool((self.padding[:, 1:] & ~self.padding[:, :-1]).any())


def mask_blocks(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> _MaskBlocks:
    """The mask function registered under ``"fprobe"``: transformers' arguments, nothing evaluated yet."""
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return _MaskBlocks(
        batch_size, q_length, kv_length, int(q_offset), int(kv_offset), mask_function,
        None if padding is None else padding.bool(), use_vmap, torch.device(device),
    )


def repeat_kv_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each of x's KV heads so that it has ``n_heads`` heads."""
    n_kv = x.shape[1]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads")
    return x.repeat_interleave(n_heads // n_kv, dim=1)


def _block_rows(batch: int, heads: int, kv_length: int, itemsize: int, device_type: str = "cpu") -> int:
    """Query rows per block so that one block of scores [batch, heads, rows, kv_length] fits the
    device's ``BLOCK_BYTES`` (read at call time; other accelerators take CUDA's)."""
    budget = BLOCK_BYTES.get(device_type, BLOCK_BYTES["cuda"])
    return max(1, budget // (batch * heads * max(1, kv_length) * itemsize))


def _masked_scores(scores: torch.Tensor, mask, start: int, stop: int) -> torch.Tensor:
    """Scores of query rows [start, stop) plus the mask's additive block (``MaskBlocks.bias``: built
    without the head dimension and broadcast in the addition; a broadcast ``masked_fill`` of the
    scores is several times slower on CPU); a 4-D tensor mask given by the caller is used as
    transformers would (boolean, or additive)."""
    keys = scores.shape[-1]
    if mask is None:
        return scores
    if isinstance(mask, _MaskBlocks):
        return scores + mask.bias(start, stop, keys, scores.dtype)
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask[..., start:stop, :keys], torch.finfo(scores.dtype).min)
    return scores + mask[..., start:stop, :keys].to(scores.dtype)


def blocked_attention(query, key, value, mask, scaling: float, softcap: float | None) -> torch.Tensor:
    """softmax(Q Kᵀ·s (soft-capped) + M) V over blocks of query rows; [B, H, L, D] → [B, H, L, D]."""
    B, H, L, _ = query.shape
    step = _block_rows(B, H, key.shape[-2], query.element_size(), query.device.type)
    blocks = []
    for start in range(0, L, step):
        stop = min(L, start + step)
        keys = mask.visible_keys(stop) if isinstance(mask, _MaskBlocks) else key.shape[-2]
        scores = torch.matmul(query[:, :, start:stop], key[:, :, :keys].transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        weights = softmax(_masked_scores(scores, mask, start, stop), dim=-1)  # cheap jvp inside passes.jet
        blocks.append(torch.matmul(weights, value[:, :, :keys]))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def fprobe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """[B, H, L, D] query, [B, KV, L, D] key/value → ([B, L, H, D] output, None: weights are never formed whole)."""
    if dropout and module.training:
        raise ValueError("fprobe attention runs without dropout: put the model in eval mode")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by fprobe's attention")
    key = repeat_kv_heads(key, query.shape[1])
    value = repeat_kv_heads(value, query.shape[1])
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if in_reverse_mode() and softcap is None and isinstance(attention_mask, _MaskBlocks) and attention_mask.causal_prefix:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        out = blocked_attention(query, key, value, attention_mask, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the kernel and its mask function with transformers (on first use: importing fprobe changes
    nothing in transformers); idempotent. Returns the name."""
    AttentionInterface.register(NAME, fprobe_attention)
    AttentionMaskInterface.register(NAME, mask_blocks)
    return NAME
