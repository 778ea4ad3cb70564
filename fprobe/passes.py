"""Micro-batched passes of a policy over a batch: forward, forward-mode (jvp, jvp of jvp) and
reverse-mode (vjp of a functional of the token statistics). Each returns [n, L] tensors for the
whole batch, so peak memory is set by the micro-batch, not by the batch. Under torch.distributed
each rank runs its block of rows; statistics are gathered and gradients all-reduced here."""

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import distributed, tree
from .rollouts import Rollouts
from .tokens import TokenStats, token_stats

DEFAULT_MICRO_BATCH = 16


class StatsJet(NamedTuple):
    """Token statistics along θ₀ + εΔθ: value, first and (optionally) second ε-derivatives."""

    value: TokenStats
    tangent: TokenStats
    second: TokenStats | None = None


def _progress(items, desc: str, show: bool):
    return tqdm(items, desc=desc, leave=False, disable=not show or len(items) < 2)


def _cat(parts: list[TokenStats]) -> TokenStats:
    """Concatenate micro-batch statistics, then every rank's rows in order."""
    return TokenStats(*(distributed.gather_rows(torch.cat(field)) for field in zip(*parts)))


def _local(batch: Rollouts) -> tuple[Rollouts, int]:
    """This rank's rows of ``batch`` and the global index of its first row."""
    rows = distributed.local_rows(len(batch))
    if rows.start == rows.stop:
        raise ValueError(f"a batch of {len(batch)} rows cannot be shared by {distributed.world()[1]} processes")
    return (batch if rows == slice(0, len(batch)) else batch.select(rows)), rows.start


def forward(policy, params, batch: Rollouts, micro_batch=DEFAULT_MICRO_BATCH, progress=False) -> TokenStats:
    """(ℓ, h) at ``params``, no graph kept."""
    local, _ = _local(batch)
    with torch.no_grad():
        return _cat([token_stats(policy, params, mb) for mb in _progress(local.micro_batches(micro_batch), "forward", progress)])


def jet(policy, params, delta, batch: Rollouts, order: int = 1, micro_batch=DEFAULT_MICRO_BATCH, progress=False) -> StatsJet:
    """(ℓ, h) at θ₀ with d/dε (one ``torch.func.jvp``) and, for ``order=2``, d²/dε² (jvp of jvp) along Δθ."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    primals, tangents = tree.detach(params), tree.detach(delta)
    local, _ = _local(batch)
    parts = []
    with torch.no_grad():
        for mb in _progress(local.micro_batches(micro_batch), "jvp", progress):
            stats = lambda p, mb=mb: token_stats(policy, p, mb)
            first = lambda p: torch.func.jvp(stats, (p,), (tangents,))
            if order == 1:
                parts.append(StatsJet(*first(primals)))
            else:
                (value, tangent), (_, second) = torch.func.jvp(first, (primals,), (tangents,))
                parts.append(StatsJet(value, tangent, second))
    return StatsJet(*(None if field[0] is None else _cat(field) for field in zip(*parts)))


def gradient(policy, params, batch: Rollouts, functional, micro_batch=DEFAULT_MICRO_BATCH, progress=False):
    """(Σ value, ∇_θ Σ value, stats) for ``functional(stats, micro_batch, rows) -> scalar`` summed over
    micro-batches (``rows`` is the micro-batch's slice of the batch), gradients by ``torch.func.vjp``;
    ``stats`` are the detached token statistics at ``params``."""
    primals = tree.detach(params)
    local, start = _local(batch)
    total, grads, parts = 0.0, None, []
    for mb in _progress(local.micro_batches(micro_batch), "vjp", progress):
        rows = slice(start, start + len(mb))
        start += len(mb)

        def value_and_stats(p, mb=mb, rows=rows):
            stats = token_stats(policy, p, mb)
            return functional(stats, mb, rows), stats

        value, pullback, stats = torch.func.vjp(value_and_stats, primals, has_aux=True)
        (g,) = pullback(torch.ones_like(value))
        total += float(value)
        grads = g if grads is None else tree.add(grads, g)
        parts.append(TokenStats(*(x.detach() for x in stats)))
    device = next(iter(primals.values())).device
    return distributed.all_reduce_sum(total, device), distributed.all_reduce_tree(grads), _cat(parts)


def linear_functional(alpha: torch.Tensor, beta: torch.Tensor):
    """The functional Σ_ik (α_ik ℓ_ik + β_ik h_ik) for ``gradient``; α, β are [n, L] over the whole batch."""

    def functional(stats: TokenStats, mb: Rollouts, rows: slice) -> torch.Tensor:
        device = stats.logp.device
        return (alpha[rows].to(device) * stats.logp).sum() + (beta[rows].to(device) * stats.entropy).sum()

    return functional
