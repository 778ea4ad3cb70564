"""TRL's micro-batches as fprobe reads them: what ``GRPOTrainer.compute_loss`` saw, U joined from them, the
per-row normalisers c_i of TRL's losses, and why a step or a micro-batch is not one fprobe models."""

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fprobe.rl import losses
from fprobe.rollouts import Rollouts

_TRL_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
_NOT_MODELLED_INPUTS = {
    "old_per_token_logps": "TRL kept old log-probs (num_iterations > 1, or steps_per_generation does not divide "
    "gradient_accumulation_steps): importance ratios other than 1 are not modelled",
    "ref_per_token_logps": "a KL term (beta > 0) is not modelled",
    "importance_sampling_ratio": "vLLM importance-sampling corrections are not modelled",
    "tool_mask": "tool-call masks (multi-turn) are not modelled",
    "pixel_values": "multimodal inputs are not modelled",
}


class MicroBatch(NamedTuple):
    """One micro-batch as TRL's ``compute_loss`` saw it (CPU copies), with the accumulation steps then in force."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    num_items: float
    accumulation_steps: int


def static_skip_reason(trainer) -> str | None:
    """Why the step cross-check cannot model this run's loss, from its configuration (None if it can)."""
    args = trainer.args
    reasons = [
        (trainer.loss_type not in _TRL_LOSSES, f"loss_type {trainer.loss_type!r} is not one of {_TRL_LOSSES}"),
        (trainer.beta != 0.0, f"beta = {trainer.beta}: a KL term is not modelled"),
        (trainer.num_iterations > 1, f"num_iterations = {trainer.num_iterations}: ratios other than 1 are not modelled"),
        (trainer.use_vllm, "vLLM generation and its importance-sampling corrections are not modelled"),
        (trainer._entropy_bonus_enabled, "an entropy bonus (entropy_coef) is not modelled"),
        (trainer.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 is not modelled"),
        (trainer.importance_sampling_level != "token", "sequence-level importance sampling is not modelled"),
        (trainer.off_policy_mask_threshold is not None, "off_policy_mask_threshold is not modelled"),
        (args.delta is not None, "two-sided clipping (delta) is not modelled"),
        (trainer.aux_loss_enabled, "a router auxiliary loss is not modelled"),
    ]
    return next((why for bad, why in reasons if bad), None)


def micro_batch_from_inputs(inputs: dict, accumulation_steps: int) -> MicroBatch:
    """CPU copies of what TRL's ``compute_loss`` gets (``_generate_and_score_completions``' output slice)."""
    cpu = lambda key: inputs[key].detach().to("cpu", copy=True)
    return MicroBatch(
        cpu("prompt_ids"), cpu("prompt_mask"), cpu("completion_ids"), cpu("completion_mask"),
        inputs["advantages"].detach().to("cpu", torch.float64, copy=True), float(inputs["num_items_in_batch"]),
        int(accumulation_steps),
    )


def input_skip_reason(inputs: dict) -> str | None:
    """Why a micro-batch's loss is not one fprobe models (None if it is)."""
    present = [why for key, why in _NOT_MODELLED_INPUTS.items() if inputs.get(key) is not None]
    if present:
        return present[0]
    if inputs["advantages"].dim() != 1:
        return "per-token advantages are not modelled"
    if bool((inputs["completion_mask"].sum(-1) == 0).any()):
        return "rows without completion tokens (mask_truncated_completions) are not modelled"
    return None


def _padded(x: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def update_batch(micro_batches: Sequence[MicroBatch], max_completion_length: int) -> Rollouts:
    """U: every micro-batch's rows in order, as [left padding, prompt, completion, right padding]; the
    response mask is the completion mask. Added padding holds token 0 (masked out, any id would do)."""
    prompt_width = max(mb.prompt_ids.shape[1] for mb in micro_batches)
    completion_width = max(mb.completion_ids.shape[1] for mb in micro_batches)
    join = lambda name, left, width, value: torch.cat([_padded(getattr(mb, name), width, left, value) for mb in micro_batches])
    prompt_mask = join("prompt_mask", True, prompt_width, 0)
    completion_mask = join("completion_mask", False, completion_width, 0)
    return Rollouts(
        torch.cat([join("prompt_ids", True, prompt_width, 0), join("completion_ids", False, completion_width, 0)], 1),
        torch.cat([prompt_mask, completion_mask], 1),
        torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1),
        advantages=torch.cat([mb.advantages for mb in micro_batches]),
        max_response_length=max_completion_length,
    )


def trl_row_weights(
    micro_batches: Sequence[MicroBatch], loss_type: str, n_processes: int, steps_per_generation: int, max_completion_length: int
) -> torch.Tensor:
    """c_i of TRL's ``_compute_loss`` for every row of the step's micro-batches (all processes, in order).

    Per micro-batch of G = ``accumulation_steps``, on one process: ``grpo`` mean_i(Σ_k A ℓ / T_i) / G;
    ``bnpo`` Σ A ℓ / Σ T (that micro-batch's tokens) / G; ``dr_grpo`` Σ A ℓ / (B_mb · L_max) / G; ``dapo``
    Σ A ℓ / (N / P · G / steps_per_generation), N = ``num_items_in_batch``. Gradients add over micro-batches
    and are averaged over the P processes (DDP), hence a further 1/P."""
    named = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "dr_grpo"}
    parts = []
    for mb in micro_batches:
        rows = update_batch([mb], max_completion_length)
        if loss_type == "dapo":
            local = losses.row_weights(rows, losses.Dapo(mb.num_items / n_processes * mb.accumulation_steps / steps_per_generation))
        else:
            local = losses.row_weights(rows, named[loss_type]) / mb.accumulation_steps
        parts.append(local / n_processes)
    return torch.cat(parts)
