"""Capture a TRL trainer's own optimizer steps as ``fprobe.rl.capture.CapturedStep``: the small callback that
the probe (``fprobe.trl.probe``) builds on.

Step k is the update that makes the trainer's ``global_step`` k. For a step to capture, a ``compute_loss``
wrapper copies each micro-batch the loss sees; just before the optimizer update (``on_pre_optimizer_step``)
θ_k is copied, with the scheduler's learning rate and (when asked) the torch optimizer's state imported as an
fprobe optimizer; a post-step hook on the torch optimizer counts its updates; after the update
(``on_step_end``) Δθ = θ_{k+1} − θ_k. The hooks and the wrapper exist only while ``train()`` runs, and are
taken off when it ends, however it ends.
"""

import contextlib
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import TrainerCallback

from fprobe import distributed, tree
from fprobe.model.numerics import exact_delta
from fprobe.rl import optim
from fprobe.rl.capture import CapturedStep, Replayable
from fprobe.trl import batches
from fprobe.trl.batches import MicroBatch


class TrainerFacts(NamedTuple):
    """What fprobe reads of a GRPOTrainer's configuration, once, at attach."""

    temperature: float
    max_completion_length: int
    loss_type: str
    steps_per_generation: int
    max_grad_norm: float | None
    low_precision: bool
    skip_reason: str | None  # why the run's loss is not one fprobe models (None: it is)


def trainer_facts(trainer) -> TrainerFacts:
    args = trainer.args
    return TrainerFacts(
        temperature=trainer.temperature,
        max_completion_length=trainer.max_completion_length,
        loss_type=trainer.loss_type,
        steps_per_generation=args.steps_per_generation,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        low_precision=bool(args.bf16 or args.fp16),
        skip_reason=batches.static_skip_reason(trainer),
    )


class Before(NamedTuple):
    """What is kept at θ_k, before the optimizer update of captured step ``step``; ``context`` is what the
    ``before_update`` hook returned."""

    step: int
    params: tree.Params
    lr: float
    replay: Replayable | None
    skip_reason: str | None
    context: object
    seconds: float  # spent here, before the update


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class StepCapture(TrainerCallback):
    """A TRL callback that hands ``on_captured(CapturedStep, context)`` every step ``k`` with ``probed(k)``.

    ``before_update(step, θ_k)`` runs just before that step's optimizer update, while the model holds θ_k
    (to sample from π_θk, say), and its return value comes back as ``context``. ``replay``: keep U, its row
    weights and the optimizer state, so that the step can be replayed. ``trainable()`` gives the trainable
    parameters by name (views of the model's)."""

    def __init__(self, trainer, facts: TrainerFacts, trainable: Callable[[], tree.Params], probed: Callable[[int], bool],
                 before_update: Callable, on_captured: Callable, replay: bool):
        self.trainer = trainer
        self.facts = facts
        self.trainable = trainable
        self.probed = probed
        self.before_update = before_update
        self.on_captured = on_captured
        self.replay = replay
        self._capturing = False
        self._updates = 0
        self._micro: list[MicroBatch] = []
        self._input_reason: str | None = None
        self._before: Before | None = None
        self._step_started = 0.0
        self._hook = None
        self._wrapper = None  # the compute_loss wrapper while installed
        self._own_compute_loss = None  # an instance attribute compute_loss the trainer had before train()

    # -- hooks live only while train() runs

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._uninstall()  # what a train() that raised (Ctrl-C, an error) left, which would count and capture twice
        self._hook = _torch_optimizer(optimizer).register_step_post_hook(self._count_update)
        trainer, compute_loss = self.trainer, self.trainer.compute_loss
        self._own_compute_loss = vars(trainer).get("compute_loss")

        def capturing_compute_loss(model, inputs, *rest, **kw):
            if self._capturing:
                self._capture(inputs)
            return compute_loss(model, inputs, *rest, **kw)

        trainer.compute_loss = self._wrapper = capturing_compute_loss
        self._capturing = False
        self._before = None

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()

    def _uninstall(self) -> None:
        """Remove the update counter and the ``compute_loss`` wrapper, if installed (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._wrapper is not None:
            if vars(self.trainer).get("compute_loss") is self._wrapper:
                if self._own_compute_loss is None:
                    del self.trainer.compute_loss
                else:
                    self.trainer.compute_loss = self._own_compute_loss
            self._wrapper = self._own_compute_loss = None
        self._capturing = False

    @contextlib.contextmanager
    def cleaned_up_on_error(self):
        """An exception (or Ctrl-C) inside the probe ends train(): take the hooks off the trainer then."""
        try:
            yield
        except BaseException:
            self._uninstall()
            self._before = None
            raise

    def _count_update(self, optimizer, args, kwargs):
        self._updates += 1

    def _capture(self, inputs: dict) -> None:
        reason = batches.input_skip_reason(inputs)
        self._input_reason = self._input_reason or reason
        if reason is None and self.replay and self.facts.skip_reason is None:
            self._micro.append(batches.micro_batch_from_inputs(inputs, self.trainer.current_gradient_accumulation_steps))

    # -- the step

    def on_step_begin(self, args, state, control, **kwargs):
        self._capturing = self.probed(state.global_step + 1)
        self._updates, self._micro, self._input_reason, self._before = 0, [], None, None
        self._step_started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._capturing:
            return
        self._capturing = False
        start = time.perf_counter()
        step = state.global_step + 1
        optimizer = _torch_optimizer(optimizer)
        with self.cleaned_up_on_error():
            params = tree.tree_map(lambda p: p.detach().clone(), self.trainable())
            replay, reason = self._replayable(optimizer, params) if self.replay else (None, "check_step=False")
            context = self.before_update(step, params)
        self._before = Before(step, params, float(optimizer.param_groups[0]["lr"]), replay, reason, context,
                              time.perf_counter() - start)

    def _replayable(self, optimizer: torch.optim.Optimizer, params: tree.Params) -> tuple[Replayable | None, str | None]:
        """The replay's inputs from every process's micro-batches, or why there are none."""
        local = self.facts.skip_reason or self._input_reason
        reason = next((r for r in distributed.gather_lists([local]) if r is not None), None)
        if reason is not None:
            return None, reason
        micro = distributed.gather_lists(self._micro)
        facts = self.facts
        U = batches.update_batch(micro, facts.max_completion_length)
        weights = batches.trl_row_weights(micro, facts.loss_type, distributed.world()[1], facts.steps_per_generation,
                                          facts.max_completion_length)
        try:
            fprobe_optimizer, opt_state = optim.from_torch_optimizer(optimizer, self.trainer.model.named_parameters(), params)
        except ValueError as error:
            return None, str(error)
        return Replayable(U, weights, fprobe_optimizer, opt_state, facts.max_grad_norm), None

    def on_step_end(self, args, state, control, **kwargs):
        before, self._before = self._before, None
        if before is None:
            return
        step_seconds = time.perf_counter() - self._step_started - before.seconds
        with self.cleaned_up_on_error():
            new_params = tree.tree_map(lambda p: p.detach().clone(), self.trainable())
            captured = CapturedStep(
                step=state.global_step, params=before.params, new_params=new_params,
                delta=exact_delta(new_params, before.params), lr=before.lr, updates=self._updates,
                replay=before.replay, skip_reason=before.skip_reason, step_seconds=step_seconds,
            )
            self.on_captured(captured, before.context, control)


def capture_steps(trainer, on_captured: Callable, *, every: int = 1, before_update: Callable | None = None) -> StepCapture:
    """Add a ``StepCapture`` to a TRL ``GRPOTrainer`` that hands ``on_captured(CapturedStep, context, control)``
    every ``every``-th optimizer step, with the replay inputs (U, TRL's row weights, the optimizer state);
    ``before_update(step, θ_k)`` (optional) runs before each captured update and gives ``context``."""
    from fprobe.model.policy import Policy

    policy = Policy(trainer.model, temperature=trainer.temperature)
    capture = StepCapture(trainer, trainer_facts(trainer), lambda: policy.params, lambda step: step % every == 0,
                          before_update or (lambda step, params: None), on_captured, replay=True)
    trainer.add_callback(capture)
    return capture
