"""Group-relative advantages and the GRPO-family policy-gradient losses (TRL's ``loss_type``).

Every loss is −Σ_i c_i Σ_k A_i · clip-ratio_ik with per-row weights c_i fixed by the *whole*
update batch, so that micro-batch losses add up to the full-batch loss exactly:

- ``dr_grpo``:             c_i = 1 / (B · L_max)   (L_max the configured maximum response length)
- ``token_mean`` (bnpo): c_i = 1 / Σ_j T_j
- ``seq_mean_token_mean`` (grpo): c_i = 1 / (B · T_i)
- ``Dapo(num_items)`` (dapo, TRL's default): c_i = 1 / N, N a token count fixed outside U (TRL's
  ``num_items_in_batch``: the response tokens of the whole generation batch); ``token_mean`` when N = Σ_j T_j
- ``RowWeights(c)``: the c_i themselves, for a trainer whose normalisers depend on how it split U
  (TRL's per-micro-batch means: ``fprobe.trl``)

On policy the ratio r_ik = exp(ℓ_ik − sg(ℓ_ik)) is 1, so the loss's gradient is −Σ c_i A_i ∇S_i
and the clip range only enters the objective's value, as in PPO/GRPO's single first step.
"""

from typing import Literal, NamedTuple

import torch

from fprobe.rollouts import Rollouts

LOSS_TYPES = ("dr_grpo", "token_mean", "seq_mean_token_mean")


class Dapo(NamedTuple):
    """TRL's ``dapo`` loss: Σ_i Σ_k A_i ℓ_ik / N, N = ``num_items`` the response tokens of the whole
    generation batch (over all processes), which may be more than U's when one generation batch feeds
    several optimizer steps."""

    num_items: float


class RowWeights(NamedTuple):
    """A loss given by its row weights c_i (float64, one per row of U)."""

    weights: torch.Tensor


LossType = Literal["dr_grpo", "token_mean", "seq_mean_token_mean"] | Dapo | RowWeights



def row_weights(batch: Rollouts, loss_type: LossType) -> torch.Tensor:
    """c_i of the loss (see the module docstring), computed on the whole update batch, float64."""
    lengths = batch.lengths.double()
    n = len(batch)
    if isinstance(loss_type, RowWeights):
        if loss_type.weights.shape != (n,):
            raise ValueError(f"RowWeights has shape {tuple(loss_type.weights.shape)}, the batch {n} rows")
        return loss_type.weights.double()
    if isinstance(loss_type, Dapo):
        if not loss_type.num_items > 0:
            raise ValueError(f"dapo's num_items must be > 0, got {loss_type.num_items}")
        return torch.full((n,), 1.0 / float(loss_type.num_items), dtype=torch.float64)
    if loss_type == "dr_grpo":
        max_len = batch.max_response_length or int(batch.lengths.max())
        return torch.full((n,), 1.0 / (n * max_len), dtype=torch.float64)
    if loss_type == "token_mean":
        return torch.full((n,), 1.0 / float(lengths.sum()), dtype=torch.float64)
    if loss_type == "seq_mean_token_mean":
        return 1.0 / (n * lengths)
    raise ValueError(f"unknown loss {loss_type!r}: use one of {LOSS_TYPES}, Dapo(num_items) or RowWeights(weights)")


def _token_objectives(logp: torch.Tensor, batch: Rollouts, clip: float = 0.2) -> torch.Tensor:
    """Per-token clipped objective min(r_ik A_i, clip(r_ik, 1−ε, 1+ε) A_i), r_ik = exp(ℓ_ik − sg(ℓ_ik)),
    [B, L], zero off the response mask (before the row weights c_i and the sign of the loss)."""
    if batch.advantages is None:
        raise ValueError("the update batch has no advantages: pass advantages= (see fprobe.group_advantages)")
    mask = batch.response_mask.to(logp.device)
    adv = batch.advantages.to(device=logp.device, dtype=torch.float64)[:, None]
    ratio = torch.exp(logp - logp.detach())
    objective = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    return objective * mask


def token_losses(logp: torch.Tensor, batch: Rollouts, weights: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """Per-token loss L_ik = −c_i · ``_token_objectives``_ik, [B, L]; Σ_k L_ik = L_i of ``sequence_losses``."""
    return -weights.to(logp.device)[:, None] * _token_objectives(logp, batch, clip)


def sequence_losses(logp: torch.Tensor, batch: Rollouts, weights: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """Per-row loss L_i = −c_i Σ_k min(r_ik A_i, clip(r_ik, 1−ε, 1+ε) A_i), r_ik = exp(ℓ_ik − sg(ℓ_ik)).

    ``logp`` is [B, L] float64 (zero off the response mask); the batch loss is Σ_i L_i.
    """
    return -weights.to(logp.device) * _token_objectives(logp, batch, clip).sum(-1)
