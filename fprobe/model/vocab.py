"""ℓ = log π(y) and h = −Σ_v π_v log π_v of a chunk of logits z ∈ [N, V], in float64, in each mode a pass needs.

With z' = z − max_v z_v (ℓ and h do not change under a shift, so it is a constant to every derivative), e = exp z'
and s = Σ_v e_v:  log π = z' − log s,  ℓ = z'_y − log s,  h = log s − Σ_v e_v z'_v / s, two non-negative terms
(z' ≤ 0, s ≥ 1), so no cancellation; a logit of −∞ (a token the model rules out) counts as π = 0, π log π = 0
(z' is floored at −1000, where e is 0 anyway).
One exponential per entry, and the [N, V] float64 arrays z', e and e ⊙ z' are
written into a ``Workspace`` that the caller reuses chunk after chunk: on a CPU, fresh 16–48 MiB arrays per chunk cost
page faults that took as long as the arithmetic. Every sum over the vocabulary against a tangent a is one batched
product of [e; e ⊙ z'] with a: ⟨π, a⟩ = ⟨e, a⟩/s and ⟨π log π, a⟩ = ⟨e z', a⟩/s − log s ⟨π, a⟩ (``_dots``).

- no graph: the values (``logp_and_entropy``, ``logp``);
- reverse mode (``_Recomputed``): the backward pass recomputes π from the saved logits as they came (float32,
  say), so a gradient pass holds no [N, V] float64 array beyond the chunk being differentiated;
- first-order forward mode inside ``jvp_rules.cheap_jvp()`` (``_first_order``): μ̇ = ⟨π, ż⟩, ℓ̇ = ż_y − μ̇,
  ḣ = −⟨π log π, ż⟩ − μ̇ h, from one product with ż;
- a ``taylor.Jet`` of logits: the closed-form second-order jets (``_taylor_statistics``).
"""

from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from fprobe.model import jvp_rules, taylor


class Workspace(NamedTuple):
    """float64 buffers for up to ``rows`` rows of logits, reused by each chunk in turn: z', [e; e ⊙ z'] and an upcast
    tangent. Four [rows, V] float64 arrays (``fprobe.model.tokens.chunk_rows`` sizes a chunk by them)."""

    shifted: torch.Tensor  # [rows, V]
    weights: torch.Tensor  # [rows, 2, V]
    tangent: torch.Tensor  # [rows, V]


def workspace(rows: int, vocab: int, device) -> Workspace:
    empty = lambda *shape: torch.empty(shape, dtype=torch.float64, device=device)
    return Workspace(empty(rows, vocab), empty(rows, 2, vocab), empty(rows, vocab))


# z' is clamped here: exp(−1000) = 0 in float64, so e and e ⊙ z' are the same, bit for bit, for every finite logit, and a
# −∞ logit gives e = 0, e ⊙ z' = 0 (not 0·(−∞) = NaN) and finite products in a backward pass.
_FLOOR = -1000.0


class _Exponentials(NamedTuple):
    """Of a chunk of logits: z' = max(z − max z, ``_FLOOR``), weights [e; e ⊙ z'] ([N, 2, V]; [N, 1, V] for ℓ alone),
    log s, the row sums of the weights (s and Σ e z'), and z_y − max z at the targets, not clamped (ℓ of a ruled-out
    target is −∞, as log-softmax's)."""

    shifted: torch.Tensor
    weights: torch.Tensor
    log_sum: torch.Tensor
    sums: torch.Tensor
    target: torch.Tensor


def _exponentials(logits: torch.Tensor, targets: torch.Tensor, space: Workspace | None = None, products: bool = True) -> _Exponentials:
    """z', e (and e ⊙ z' with ``products``) of [N, V] logits in float64 — into ``space`` where given, else into fresh
    tensors (for a pass that differentiates through this function: autograd and ``torch.func`` take no ``out=``)."""
    n = len(logits)
    into = (lambda name, *index: None) if space is None else (lambda name, *index: getattr(space, name)[(slice(0, n), *index)])
    shift = logits.detach().amax(-1, keepdim=True).double()
    buffer = into("shifted")  # the upcast, then the shift in place: a float32 − float64 sub upcasts into a temporary first
    shifted = (logits.to(torch.float64, copy=True) if buffer is None else buffer.copy_(logits)).sub_(shift)
    target = shifted.gather(-1, targets[:, None])[:, 0]  # before the floor
    shifted = torch.clamp_min(shifted, _FLOOR, out=into("shifted"))
    e = torch.exp(shifted, out=into("weights", 0))
    parts = (e, torch.mul(e, shifted, out=into("weights", 1))) if products else (e,)
    weights = into("weights", slice(0, len(parts))) if space is not None else torch.stack(parts, 1) if products else e[:, None]
    sums = weights.sum(-1)
    return _Exponentials(shifted, weights, sums[:, 0].log(), sums, target)


def _values(ex: _Exponentials) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ℓ, h) — h None for weights without e ⊙ z'."""
    logp = ex.target - ex.log_sum
    entropy = ex.log_sum - ex.sums[:, 1] / ex.sums[:, 0] if ex.sums.shape[1] > 1 else None
    return logp, entropy


def _dots(ex: _Exponentials, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(⟨π, a⟩, ⟨π log π, a⟩) for float64 [N, V] ``a``, by one batched product with [e; e ⊙ z'] (no [N, V] temporary),
    taken as a [1, V] × [V, 2] product per row: on a CPU half the time of [2, V] × [V, 1], a matrix-vector product."""
    d = torch.bmm(a[:, None, :], ex.weights.transpose(1, 2))[:, 0, :] / ex.sums[:, :1]
    return d[:, 0], d[:, 1] - ex.log_sum * d[:, 0]


def _tangent64(z: torch.Tensor, space: Workspace | None) -> torch.Tensor:
    """A tangent of a chunk of logits in float64: into ``space``'s tangent buffer where given."""
    return z.double() if space is None else space.tangent[: len(z)].copy_(z)


def _at(a: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return a.gather(-1, targets[:, None])[:, 0]


class _Recomputed(torch.autograd.Function):
    """(ℓ, h) — or ℓ alone — of a chunk of logits, for reverse mode: the backward pass recomputes π from the saved
    logits instead of keeping [N, V] float64 arrays from the forward pass. ∂ℓ/∂z = e_y − π, ∂h/∂z = −π ⊙ (log π + h);
    for ℓ alone the gradient is autograd's through ``_values``, bit for bit (e · (−g/s), then g added at y). The
    backward recomputes into the forward's ``Workspace`` (fresh arrays per chunk cost page faults that took longer
    than the arithmetic), or, where it is itself differentiated (double backward), with differentiable ops."""

    @staticmethod
    def forward(ctx, logits, targets, with_entropy, space):
        ctx.save_for_backward(logits, targets)
        ctx.space = space
        return _values(_exponentials(logits, targets, space, with_entropy))

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets = ctx.saved_tensors
        space = None if torch.is_grad_enabled() else ctx.space
        ex = _exponentials(logits, targets, space, products=grad_entropy is not None)
        buffer = None if space is None else space.tangent[: len(logits)]
        if grad_entropy is None:
            scale = -grad_logp[:, None] / ex.sums[:, :1]
        else:  # −(g_ℓ + g_h (z' − log s + h)) / s, each step into the buffer
            centred = torch.sub(ex.shifted, (ex.log_sum - _values(ex)[1])[:, None], out=buffer)
            weight = torch.add(torch.mul(centred, grad_entropy[:, None], out=buffer), grad_logp[:, None], out=buffer)
            scale = torch.div(torch.neg(weight, out=buffer), ex.sums[:, :1], out=buffer)
        grad = torch.mul(scale, ex.weights[:, 0], out=buffer).scatter_add_(-1, targets[:, None], grad_logp[:, None])
        return grad.to(logits.dtype, copy=True), None, None, None


def _first_order(logits: torch.Tensor, targets: torch.Tensor, space: Workspace | None):
    """(ℓ, h) of a chunk of (dual) logits with the fused first-order jvp rule, forward mode only (inside ``cheap_jvp``):
    the values of the primal, and ℓ̇ = ż_y − μ̇, ḣ = −⟨π log π, ż⟩ − μ̇ h from one product with ż, made dual here."""
    z, z_t = forward_ad.unpack_dual(logits)
    if torch.is_grad_enabled() and z.requires_grad:
        raise RuntimeError("fprobe.model.vocab's first-order rule is for forward mode only (cheap_jvp, no graph)")
    ex = _exponentials(z, targets, space)
    logp, entropy = _values(ex)
    if z_t is None:
        return logp, entropy
    z_t = _tangent64(z_t, space)
    mean_t, cross_t = _dots(ex, z_t)
    return forward_ad.make_dual(logp, _at(z_t, targets) - mean_t), forward_ad.make_dual(entropy, -cross_t - mean_t * entropy)


def _taylor_statistics(logits: taylor.Jet, targets: torch.Tensor, space: Workspace | None):
    """Jets of (ℓ, h) of a jet of logits z, in closed form (L = log π, ⟨a, b⟩ = Σ_v a_v b_v):
    μ̇ = ⟨π, ż⟩, σ² = ⟨π, ż²⟩ − μ̇², μ̈ = ⟨π, z̈⟩ + σ²;  ℓ̇ = ż_y − μ̇,  ℓ̈ = z̈_y − μ̈;
    ḣ = −⟨πL, ż⟩ − μ̇ h,  ḧ = −(⟨πL, ż²⟩ − 2 μ̇ ⟨πL, ż⟩ − μ̇² h) − ⟨πL, z̈⟩ − μ̈ h − σ².
    Values bit for bit those of the other modes."""
    z0, z1, z2 = taylor.parts(logits)
    ex = _exponentials(z0, targets, space)
    logp, entropy = _values(ex)
    z1 = None if z1 is None else _tangent64(z1, space)
    z2 = None if z2 is None else z2.double()
    logp1 = entropy1 = logp2 = entropy2 = None
    if z1 is not None:
        square = z1 * z1
        (mean1, cross1), (mean_square, cross_square) = _dots(ex, z1), _dots(ex, square)
        variance = mean_square - mean1 * mean1
        logp1, entropy1 = _at(z1, targets) - mean1, -cross1 - mean1 * entropy
        mean2, cross2 = (0, 0) if z2 is None else _dots(ex, z2)
        mean2 = mean2 + variance
        entropy2 = -(cross_square - 2 * mean1 * cross1 - mean1 * mean1 * entropy) - mean2 * entropy - variance - cross2
    elif z2 is not None:
        mean2, cross2 = _dots(ex, z2)
        entropy2 = -cross2 - mean2 * entropy
    if z2 is not None or z1 is not None:
        logp2 = -mean2 if z2 is None else _at(z2, targets) - mean2
    return taylor.jet(logp, logp1, logp2), taylor.jet(entropy, entropy1, entropy2)


def logp_and_entropy(logits: torch.Tensor, targets: torch.Tensor, space: Workspace | None = None):
    """(ℓ, h) of [N, V] logits in float64: with the fused first-order jvp rule inside ``cheap_jvp()``, the closed-form
    second-order rule on a ``taylor.Jet``, and a backward pass that recomputes from the logits when a gradient is
    being taken. ``space``: buffers to reuse (``workspace``)."""
    if isinstance(logits, taylor.Jet):
        return _taylor_statistics(logits, targets, space)
    if jvp_rules.cheap():
        return _first_order(logits, targets, space)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _Recomputed.apply(logits, targets, True, space)
    return _values(_exponentials(logits, targets, None if jvp_rules.traced(logits) else space))


def logp(logits: torch.Tensor, targets: torch.Tensor, space: Workspace | None = None) -> torch.Tensor:
    """ℓ = log π(target) of [N, V] logits in float64, the same values as ``logp_and_entropy``'s ℓ, without the
    entropy's products (for passes that read ℓ only); memory-lean in reverse mode."""
    if isinstance(logits, taylor.Jet):
        return _taylor_statistics(logits, targets, space)[0]
    if torch.is_grad_enabled() and logits.requires_grad:
        return _Recomputed.apply(logits, targets, False, space)[0]
    return _values(_exponentials(logits, targets, None if jvp_rules.traced(logits) else space, products=False))[0]
