"""Per-token statistics of a policy on a batch: log-prob of the sampled token and full-vocabulary entropy."""

from typing import NamedTuple

import torch

from fprobe.model import vocab
from fprobe.rollouts import Rollouts

# Bytes of the float64 work of one chunk of logits (``vocab.Workspace``: z − max z, exp(z − max z), their product
# and an upcast tangent), four [rows, V] float64 arrays (a backward pass recomputes three of them, while every
# activation of the model is still held). On a CPU a chunk that stays near the caches runs each of its passes faster
# (at Qwen's 152k vocabulary, 3 rows a chunk took 0.74× the time of 13, values and jvp alike); on a GPU larger chunks
# mean fewer kernels.
CHUNK_BYTES = {"cpu": 16 * 2**20}
CHUNK_BYTES_DEFAULT = 64 * 2**20  # 256 rows at an 8k vocabulary, 13 at Qwen's 152k


class TokenStats(NamedTuple):
    """[B, L] float64 tensors aligned with ``input_ids``, zero outside the response mask.

    logp[i, k] = ℓ_ik = log π(y_k | y_<k);  entropy[i, k] = h_ik = −Σ_v π(v | y_<k) log π(v | y_<k),
    or None where a pass does not need it (the RL step's gradient reads ℓ only).
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None


def chunk_rows(vocab_size: int, device: torch.device | str = "cpu", *, budget: int | None = None) -> int:
    """Rows of logits per chunk so that the chunk's four [rows, V] float64 temporaries fit ``budget`` bytes (by default
    ``CHUNK_BYTES`` of the device's type)."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES_DEFAULT) if budget is None else budget
    return max(1, budget // (4 * 8 * vocab_size))


def chunked_statistics(logits: torch.Tensor, targets: torch.Tensor, chunk: int | None = None, with_entropy: bool = True,
                       rows: torch.Tensor | None = None):
    """(ℓ, h) of [N, V] logits, upcast to float64 ``chunk`` rows at a time into one reused ``vocab.Workspace`` (never
    [N, V] float64 whole); h is None without ``with_entropy``. ``chunk`` defaults to ``chunk_rows(V, device)``. With ``rows``
    (indices into ``logits``' first dimension, one per target) each chunk reads its rows of ``logits`` in place where
    they are consecutive and gathers them otherwise, so no gathered copy of the logits exists beyond one chunk."""
    chunk = chunk_rows(logits.shape[-1], logits.device) if chunk is None else chunk
    space = vocab.workspace(min(chunk, len(targets)), logits.shape[-1], logits.device)
    blocks = logits.split(chunk) if rows is None else _row_blocks(logits, rows, chunk)
    parts = [
        vocab.logp_and_entropy(block, ys, space) if with_entropy else (vocab.logp(block, ys, space), None)
        for block, ys in zip(blocks, targets.split(chunk))
    ]  # with a cheap jvp rule inside passes.jet
    logp = torch.cat([p[0] for p in parts])
    return logp, torch.cat([p[1] for p in parts]) if with_entropy else None


def _row_blocks(logits: torch.Tensor, rows: torch.Tensor, chunk: int):
    """``logits[rows]`` ``chunk`` rows at a time: a view where a chunk's rows are consecutive, else a gathered copy."""
    for index, first in zip(rows.split(chunk), rows.cpu().split(chunk)):  # one transfer of the indices, not one per chunk
        start, n = int(first[0]), len(first)
        consecutive = int(first[-1]) - start == n - 1
        yield logits[start:start + n] if consecutive else logits.index_select(0, index)


def left_aligned(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` rotated left by its number of leading padding positions: left padding moves to
    the right end. Real tokens keep their order, their position ids (cumsum − 1) and their distances,
    so every logit at a real position is unchanged, and the mask becomes plain causal with padding only
    after the tokens — which SDPA's ``is_causal`` handles without any [L, L] mask (``fprobe.attention``)."""
    shift = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)
    width = x.shape[1]
    index = (torch.arange(width, device=x.device) + shift) % width
    return x.gather(1, index)


def token_stats(policy, params, batch: Rollouts, with_entropy: bool = True) -> TokenStats:
    """(ℓ, h) of ``batch``'s response tokens under π_params, in float64 (h None without ``with_entropy``),
    ``policy.chunk_size`` rows of logits at a time.

    The model sees the rows left-aligned (``left_aligned``). Response tokens are read in row-major
    order, which the rotation preserves, so they are placed back with the batch's own response mask."""
    device = policy.device
    attention_mask = batch.attention_mask.to(device)
    aligned = lambda x: left_aligned(x.to(device), attention_mask)
    ids, response = aligned(batch.input_ids), aligned(batch.response_mask)
    predicting = response[:, 1:]
    targets = ids[:, 1:][predicting]
    start = first_predicting_position(predicting)  # no logits before it: the LM head skips the prompts' shared part
    logits = policy.apply(params, ids, aligned(attention_mask), keep_last=ids.shape[1] - start)
    predicting = predicting[:, start:]
    width = logits.shape[1]
    rows = (torch.arange(len(ids), device=device)[:, None] * width + torch.arange(width - 1, device=device))[predicting]
    if torch.is_grad_enabled() and logits.requires_grad:  # reverse mode: the backward of a gather per chunk
        # would write a whole [B·L, V] gradient per chunk, so the predicting rows are gathered once (its backward: one
        # [B·L, V] gradient, the rows added in; a boolean index of a slice wrote and copied two)
        logp, entropy = chunked_statistics(logits.flatten(0, 1).index_select(0, rows), targets, policy.chunk_size, with_entropy)
    else:
        logp, entropy = chunked_statistics(logits.flatten(0, 1), targets, policy.chunk_size, with_entropy, rows)
    mask = batch.response_mask.to(device)
    return TokenStats(scatter_rows(logp, mask), None if entropy is None else scatter_rows(entropy, mask))


def first_predicting_position(predicting: torch.Tensor) -> int:
    """The first position (column) at which any row predicts a response token (0 for none)."""
    columns = predicting.any(0).nonzero()
    return int(columns[0, 0]) if len(columns) else 0


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place a flat vector of per-token values at the True positions of ``mask`` ([B, L], zeros elsewhere)."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)
