"""Micro-batched passes of a policy over a batch: forward, forward-mode (jvp; second order by a Taylor pass) and
reverse-mode (gradient of a functional of the token statistics). Each returns [n, L] tensors for the
whole batch, so peak memory is set by the micro-batch, not by the batch. Under torch.distributed
each rank runs its block of rows; statistics are gathered and gradients all-reduced here."""

import contextlib
import re
from typing import NamedTuple

import torch
from torch.autograd import forward_ad
from tqdm.auto import tqdm

from fprobe.model import attention, taylor
from fprobe import distributed
from fprobe import tree
from fprobe.rollouts import Rollouts
from fprobe.model.jvp_rules import cheap_jvp
from fprobe.model.tokens import TokenStats, token_stats

DEFAULT_MICRO_BATCH = 16


class StatsJet(NamedTuple):
    """Token statistics along θ₀ + εΔθ: value, first and (optionally) second ε-derivatives."""

    value: TokenStats
    tangent: TokenStats
    second: TokenStats | None = None


def _progress(items, desc: str, show: bool):
    return tqdm(items, desc=desc, leave=False, disable=not show or len(items) < 2)


def _cat(parts: list[TokenStats]) -> TokenStats:
    """Concatenate micro-batch statistics, then every rank's rows in order (a field left out stays None)."""
    return TokenStats(*(None if field[0] is None else distributed.gather_rows(torch.cat(field)) for field in zip(*parts)))


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


def _dual_jvp(f, primals, tangents) -> tuple[TokenStats, TokenStats]:
    """``torch.func.jvp(f, (primals,), (tangents,))`` for ``f: params -> TokenStats``, computed with
    ``torch.autograd.forward_ad`` dual tensors: the same forward-mode formulas, bit for bit, without
    functorch's per-op dispatch (15-20% faster on CPU); forward over forward still needs ``torch.func``.
    Inside, the linear layers, SiLU, binary ops with one tangent, the attention softmax and the token statistics use
    cheap first-order jvp rules (``fprobe.model.jvp_rules``: the same values bit for bit, the same tangents to rounding)."""
    with forward_ad.dual_level(), cheap_jvp():
        out = f({name: forward_ad.make_dual(p, tangents[name]) for name, p in primals.items()})
        pairs = [forward_ad.unpack_dual(x) for x in out]
    tangent = [torch.zeros_like(p.primal) if p.tangent is None else p.tangent for p in pairs]
    return TokenStats(*(p.primal for p in pairs)), TokenStats(*tangent)


def _nested_jvp(f, primals, tangents) -> StatsJet:
    """(f, d/dε f, d²/dε² f) along primals + ε·tangents by ``torch.func.jvp`` of ``torch.func.jvp`` (torch's generic
    rules for every op)."""
    first = lambda p: torch.func.jvp(f, (p,), (tangents,))
    (value, tangent), (_, second) = torch.func.jvp(first, (primals,), (tangents,))
    return StatsJet(value, tangent, second)


def _taylor_jvp2(f, primals, tangents) -> StatsJet:
    """``_nested_jvp`` in one second-order Taylor pass (``fprobe.model.taylor``: each op propagates (y, ẏ, ÿ) once,
    about 5 matrix products per linear layer instead of 8); raises ``taylor.NoRule`` at an op it has no rule for."""
    out = f({name: taylor.Jet(p, tangents[name]) for name, p in primals.items()})
    components = [taylor.parts(x) for x in out]
    filled = lambda k: TokenStats(*(torch.zeros_like(c.value) if c[k] is None else c[k] for c in components))
    return StatsJet(TokenStats(*(c.value for c in components)), filled(1), filled(2))


@contextlib.contextmanager
def _forward_mode_errors_explained(model):
    """torch's error for an op or custom ``autograd.Function`` without a forward-mode derivative, re-raised
    with what it means here: no jvp (δH₁'s default, δH₂) through this model; the gradient path still works."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as error:
        if not re.search(r"forward[ -]?(mode )?AD", str(error)):
            raise
        raise NotImplementedError(
            f"{type(model).__name__} runs an operation with no forward-mode derivative, so fprobe cannot take a jvp "
            f"through it (δH₁ by jvp, δH₂): use method='grad' for δH₁ (torch: {' '.join(str(error).split())})"
        ) from error


def jet(policy, params, delta, batch: Rollouts, order: int = 1, micro_batch=DEFAULT_MICRO_BATCH, progress=False) -> StatsJet:
    """(ℓ, h) at θ₀ with d/dε (one jvp) and, for ``order=2``, d²/dε² along Δθ: one second-order Taylor pass
    (``_taylor_jvp2``), or jvp of jvp (``_nested_jvp``) for a model with an op the Taylor pass has no rule for."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    primals, tangents = tree.detach(params), tree.detach(delta)
    local, _ = _local(batch)
    parts, second_order = [], _taylor_jvp2
    with torch.no_grad(), _forward_mode_errors_explained(policy.model):
        for mb in _progress(local.micro_batches(micro_batch), "jvp", progress):
            stats = lambda p, mb=mb: token_stats(policy, p, mb)
            if order == 1:
                parts.append(StatsJet(*_dual_jvp(stats, primals, tangents)))
                continue
            try:
                parts.append(second_order(stats, primals, tangents))
            except taylor.NoRule:
                second_order = _nested_jvp
                parts.append(second_order(stats, primals, tangents))
    return StatsJet(*(None if field[0] is None else _cat(field) for field in zip(*parts)))


def gradient(policy, params, batch: Rollouts, functional, micro_batch=DEFAULT_MICRO_BATCH, progress=False, with_entropy=True):
    """(Σ value, ∇_θ Σ value, stats) for ``functional(stats, micro_batch, rows) -> scalar`` summed over
    micro-batches (``rows`` is the micro-batch's slice of the batch). Gradients accumulate in place in
    fresh leaves' ``.grad`` by ``torch.autograd.backward``, as ``loss.backward()`` accumulates them in a
    training loop (bit for bit; one gradient tree in memory; ``torch.func.vjp`` decomposes some backward
    kernels, SiLU's among them, which rounds differently, and is slower); ``stats`` are the detached
    token statistics at ``params`` (``stats.entropy`` None without ``with_entropy``, for functionals of
    ℓ only). Attention runs in its reverse-mode form (``fprobe.attention.for_reverse_mode``: SDPA,
    memory linear in L)."""
    leaves = {name: x.detach().requires_grad_() for name, x in tree.detach(params).items()}
    local, start = _local(batch)
    total, parts = 0.0, []
    for mb in _progress(local.micro_batches(micro_batch), "vjp", progress):
        rows = slice(start, start + len(mb))
        start += len(mb)
        with torch.enable_grad(), attention.for_reverse_mode():
            stats = token_stats(policy, leaves, mb, with_entropy)
            value = functional(stats, mb, rows)
            torch.autograd.backward(value, inputs=list(leaves.values()))
        total += float(value.detach())
        parts.append(TokenStats(*(None if x is None else x.detach() for x in stats)))
    grads = {name: torch.zeros_like(x) if x.grad is None else x.grad for name, x in leaves.items()}
    device = next(iter(leaves.values())).device
    return distributed.all_reduce_sum(total, device), distributed.all_reduce_tree(grads), _cat(parts)


def linear_functional(alpha: torch.Tensor, beta: torch.Tensor):
    """The functional Σ_ik (α_ik ℓ_ik + β_ik h_ik) for ``gradient``; α, β are [n, L] over the whole batch."""

    def functional(stats: TokenStats, mb: Rollouts, rows: slice) -> torch.Tensor:
        device = stats.logp.device
        return (alpha[rows].to(device) * stats.logp).sum() + (beta[rows].to(device) * stats.entropy).sum()

    return functional
