"""Per-token statistics of a policy on a batch: log-prob of the sampled token and full-vocabulary entropy."""

from typing import NamedTuple

import torch

from . import softmax
from .rollouts import Rollouts

CHUNK_TOKENS = 1024


class TokenStats(NamedTuple):
    """[B, L] float64 tensors aligned with ``input_ids``, zero outside the response mask.

    logp[i, k] = ℓ_ik = log π(y_k | y_<k);  entropy[i, k] = h_ik = −Σ_v π(v | y_<k) log π(v | y_<k).
    """

    logp: torch.Tensor
    entropy: torch.Tensor


def logp_and_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_TOKENS):
    """ℓ and h of [N, V] logits, upcast to float64 ``chunk`` rows at a time (never [N, V] float64 whole)."""
    logps, entropies = [], []
    for rows, ys in zip(logits.split(chunk), targets.split(chunk)):
        logp, entropy = softmax.logp_and_entropy(rows, ys)  # with a cheap jvp rule inside passes.jet
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies)


def token_stats(policy, params, batch: Rollouts, chunk: int = CHUNK_TOKENS) -> TokenStats:
    """(ℓ, h) of ``batch``'s response tokens under π_params, in float64."""
    logits = policy.apply(params, batch.input_ids, batch.attention_mask)
    mask = batch.response_mask.to(logits.device)
    ids = batch.input_ids.to(logits.device)
    predicting = mask[:, 1:]
    logp, entropy = logp_and_entropy(logits[:, :-1][predicting], ids[:, 1:][predicting], chunk)
    return TokenStats(scatter_rows(logp, mask), scatter_rows(entropy, mask))


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place a flat vector of per-token values at the True positions of ``mask`` ([B, L], zeros elsewhere)."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)
