"""Cheap first-order forward-mode rules for a jvp of the policy: its two softmax-shaped steps and its
linear layers.

Torch's jvp of (log-)softmax recomputes exp(x − max) through ``logsumexp_jvp`` (amax, sub, exp, sum,
div over the whole input), and the entropy −Σ π log π adds three more passes: in a jvp of the model
on CPU these were the largest excess over a backward pass. Inside ``cheap_jvp()`` — entered by
``passes.jet`` for first order only — fprobe uses instead, from the saved outputs:

- ``softmax`` (attention):  ẏ = y ⊙ (ẋ − Σ y ẋ)  (2.5× faster than torch's jvp);
- ``logp_and_entropy`` (a chunk of logits z → ℓ = log π(y), h = −Σ π log π, exactly as
  ``fprobe.tokens`` computes them):  ℓ̇ = ż_y − μ̇,  ḣ = −Σ π ż log π − μ̇ h,  μ̇ = Σ π ż
  (three passes over the [N, V] float64 chunk instead of about nine);
- ``F.linear`` (every linear layer, routed by a torch-function mode):  ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ with only the
  terms whose tangent exists. torch's own rule multiplies a zero tangent for a weight that has none
  (a frozen weight under LoRA, whose activations do carry one), so each frozen linear cost two
  tangent products instead of one.

The same derivatives to rounding. Values are torch's own ops, bit for bit, and so are reverse-mode
gradients of ``softmax`` (``_softmax_backward_data``, as autograd). Outside ``cheap_jvp()`` nothing
changes: these rules treat their saved outputs as constants under an outer jvp, so forward over
forward must not, and does not, use them. δH₂'s second-order Taylor pass (``fprobe.model.taylor``) has its own
rules; the closed form for the token statistics of a jet of logits is here (``_taylor_statistics``).
"""

import contextlib
import contextvars

import torch

from fprobe.model import taylor

_CHEAP = contextvars.ContextVar("fprobe_cheap_softmax_jvp", default=False)


class _Linear(torch.autograd.Function):
    """``F.linear`` whose jvp multiplies only the tangents that exist; forward-mode only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_forward(x, weight)
        ctx.set_materialize_grads(False)  # an input without a tangent reaches ``jvp`` as None, not as zeros
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        x, weight = ctx.saved_tensors
        terms = [torch.nn.functional.linear(a, w) for a, w in ((x_t, weight), (x, weight_t)) if a is not None and w is not None]
        out = terms[0] if len(terms) == 1 else terms[0] + terms[1] if terms else None
        if bias_t is not None:
            out = bias_t.expand(*x.shape[:-1], bias_t.shape[-1]) if out is None else out + bias_t
        return out

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fprobe.softmax's linear rule is for first-order forward mode only (cheap_jvp)")


def _linear(input, weight, bias=None):
    return _Linear.apply(input, weight, bias)


class _CheapLinear(torch.overrides.TorchFunctionMode):
    """Routes ``F.linear`` to ``_Linear`` (its forward is ``F.linear`` itself: the same values, bit for bit),
    except under autocast, whose casts torch's own rule follows."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and not torch.is_autocast_enabled(args[0].device.type):
            return _linear(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cheap_jvp():
    """Within: ``softmax``, ``logp_and_entropy`` and every ``F.linear`` carry the cheap first-order jvp rules
    (not valid for jvp of jvp, nor for reverse mode)."""
    token = _CHEAP.set(True)
    try:
        with _CheapLinear():
            yield
    finally:
        _CHEAP.reset(token)


class _Softmax(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        return torch.softmax(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, y, ctx.dim, y.dtype), None

    @staticmethod
    def jvp(ctx, x_t, _):
        (y,) = ctx.saved_tensors
        return y * (x_t - (y * x_t).sum(ctx.dim, keepdim=True))


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return _Softmax.apply(x, dim) if _CHEAP.get() else torch.softmax(x, dim)


def _chunk_statistics(logits: torch.Tensor, targets: torch.Tensor):
    """(ℓ, h, π, π log π) of [N, V] logits in float64: ℓ = log π(target), h = −Σ π log π."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    probs = logprobs.exp()
    plogp = probs * logprobs
    return logprobs.gather(-1, targets[:, None])[:, 0], -plogp.sum(-1), probs, plogp


def _logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None])[:, 0]


class _Recomputed(torch.autograd.Function):
    """(ℓ, h) — or ℓ alone — of a chunk of logits, for reverse mode: the backward pass recomputes π from
    the saved logits as they came (float32, say) instead of keeping [N, V] float64 log π, π and π log π
    from the forward pass, so a gradient pass holds no more vocabulary-sized memory than a float32
    trainer's. ∂ℓ/∂z = e_y − π and ∂h/∂z = −π ⊙ (log π + h); for ℓ alone the gradient is bit for bit
    autograd's (``grad − exp(log π)·Σ grad``). Written with differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx, logits, targets, with_entropy):
        ctx.save_for_backward(logits, targets)
        if not with_entropy:
            return _logp(logits, targets), None
        return tuple(_chunk_statistics(logits, targets)[:2])

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets = ctx.saved_tensors
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        probs = logprobs.exp()
        weight = grad_logp[:, None]
        if grad_entropy is not None:
            entropy = -(probs * logprobs).sum(-1, keepdim=True)
            weight = weight + grad_entropy[:, None] * (logprobs + entropy)
        grad = (-probs * weight).scatter_add(-1, targets[:, None], grad_logp[:, None])
        return grad.to(logits.dtype), None, None


def logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ = log π(target) of [N, V] logits in float64, the same values as ``logp_and_entropy``'s ℓ,
    without the entropy's [N, V] temporaries (for passes that read ℓ only); memory-lean in reverse mode."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _Recomputed.apply(logits, targets, False)[0]
    return _logp(logits, targets)


class _LogpEntropy(torch.autograd.Function):
    """(ℓ, h) of a chunk of logits; forward-mode only (used inside ``cheap_jvp``, under no_grad)."""

    @staticmethod
    def forward(ctx, logits, targets):
        logp, entropy, probs, plogp = _chunk_statistics(logits, targets)
        ctx.save_for_forward(probs, plogp, entropy)
        ctx.targets = targets
        return logp, entropy

    @staticmethod
    def jvp(ctx, logits_t, _):
        probs, plogp, entropy = ctx.saved_tensors
        z_t = logits_t.double()[:, :, None]
        dot = lambda a: torch.bmm(a[:, None, :], z_t)[:, 0, 0]  # Σ_v a_v ż_v, no [N, V] temporary
        mean_t = dot(probs)
        logp_t = z_t[:, :, 0].gather(-1, ctx.targets[:, None])[:, 0] - mean_t
        return logp_t, -dot(plogp) - mean_t * entropy

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fprobe.softmax.logp_and_entropy is for first-order forward mode only (cheap_jvp)")


def _taylor_statistics(logits: taylor.Jet, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jets of (ℓ, h) of a jet of logits z, in closed form from π and π log π (L = log π, ⟨a, b⟩ = Σ_v a_v b_v):
    μ̇ = ⟨π, ż⟩, σ² = ⟨π, ż²⟩ − μ̇², μ̈ = ⟨π, z̈⟩ + σ²;  ℓ̇ = ż_y − μ̇,  ℓ̈ = z̈_y − μ̈;
    ḣ = −⟨πL, ż⟩ − μ̇ h,  ḧ = −(⟨πL, ż²⟩ − 2 μ̇ ⟨πL, ż⟩ − μ̇² h) − ⟨πL, z̈⟩ − μ̈ h − σ².
    Sums as batched dot products (no [N, V] temporaries but ż²); values bit for bit ``_chunk_statistics``'."""
    z0, z1, z2 = taylor.parts(logits)
    logp, entropy, probs, plogp = _chunk_statistics(z0, targets)
    column = lambda z: None if z is None else z.double()[:, :, None]
    z1, z2 = column(z1), column(z2)
    dot = lambda a, z: torch.bmm(a[:, None, :], z)[:, 0, 0]
    at_target = lambda z: z[:, :, 0].gather(-1, targets[:, None])[:, 0]
    logp1 = entropy1 = logp2 = entropy2 = None
    if z1 is not None:
        mean1, cross1, square = dot(probs, z1), dot(plogp, z1), z1 * z1
        variance = dot(probs, square) - mean1 * mean1
        logp1, entropy1 = at_target(z1) - mean1, -cross1 - mean1 * entropy
        mean2 = variance if z2 is None else dot(probs, z2) + variance
        entropy2 = -(dot(plogp, square) - 2 * mean1 * cross1 - mean1 * mean1 * entropy) - mean2 * entropy - variance
        entropy2 = entropy2 if z2 is None else entropy2 - dot(plogp, z2)
    elif z2 is not None:
        mean2 = dot(probs, z2)
        entropy2 = -dot(plogp, z2) - mean2 * entropy
    if z2 is not None or z1 is not None:
        logp2 = -mean2 if z2 is None else at_target(z2) - mean2
    return taylor.jet(logp, logp1, logp2), taylor.jet(entropy, entropy1, entropy2)


def logp_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ, h) of [N, V] logits in float64; with the fused first-order jvp rule inside ``cheap_jvp()``, the closed-form
    second-order rule on a ``taylor.Jet``, and a backward pass that recomputes from the logits when a gradient is
    being taken."""
    if isinstance(logits, taylor.Jet):
        return _taylor_statistics(logits, targets)
    if _CHEAP.get():
        return _LogpEntropy.apply(logits, targets)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _Recomputed.apply(logits, targets, True)
    return _chunk_statistics(logits, targets)[:2]
