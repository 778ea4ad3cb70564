"""``CapturedStep``: one optimizer step that a trainer took, as fprobe measures it — the seam between a
trainer's capture (``fprobe.trl.capture`` for TRL) and the measurement on E.

Δθ = θ_{k+1} − θ_k is exactly what the trainer applied. ``U`` and ``row_weights`` are the micro-batches the
trainer's loss saw, joined in order, with the per-row normalisers c_i of its loss (so that
``rl_step(..., loss=losses.RowWeights(row_weights))`` takes the same step); with the optimizer and its state
before the update they let fprobe replay the step. They are None where the capture cannot model the step
(``skip_reason`` says why) or was not asked to keep them.
"""

from dataclasses import dataclass

import torch

from fprobe import tree
from fprobe.rl.optim import Optimizer
from fprobe.rollouts import Rollouts


@dataclass(frozen=True, eq=False)
class Replayable:
    """What replaying a captured step needs: U, its row weights c_i, the optimizer, its state before the
    update and the gradient-clipping norm (None: no clipping)."""

    U: Rollouts
    row_weights: torch.Tensor
    optimizer: Optimizer
    opt_state: object
    max_grad_norm: float | None


@dataclass(frozen=True, eq=False)
class CapturedStep:
    """Optimizer step ``step`` (the trainer's step count after it): θ_k (``params``), θ_{k+1} (``new_params``)
    and ``delta`` = θ_{k+1} − θ_k of the trainable parameters, the learning rate of the update, the number of
    optimizer updates counted in the step (exactly 1 for a measurable step), the ``replay`` inputs or
    the ``skip_reason`` why there are none, and the trainer's own seconds for the step (the capture's excluded)."""

    step: int
    params: tree.Params
    new_params: tree.Params
    delta: tree.Params
    lr: float
    updates: int
    replay: Replayable | None
    skip_reason: str | None
    step_seconds: float
