"""``probe`` = exactly one ``rl_step`` on U, then the measurement on E along its Δθ (``entropy_change``)."""

import time
from dataclasses import dataclass
from typing import ClassVar, Literal, Unpack

import torch

from fprobe import records, tree
from fprobe.entropy import decompose, estimators, predictors
from fprobe.entropy.context import batch_tensors, tensor_versions
from fprobe.entropy.measure import EntropyChange, Row, check_eval_batch, measure
from fprobe.entropy.settings import EstimatorOptions, settings_from
from fprobe.records import internal
from fprobe.rl.optim import Optimizer
from fprobe.rl.step import (
    Step,
    StepByParameter,
    Update,
    by_parameter,
    rl_step,
    rl_step_by_parameter,
)
from fprobe.rollouts import Rollouts


def _with_rows_after(rows: tuple[Row, ...], after: str, extra: tuple[Row, ...]) -> tuple[Row, ...]:
    """``rows`` with ``extra`` inserted after the row of field ``after``."""
    index = [name for _, name in rows].index(after) + 1
    return rows[:index] + extra + rows[index:]


@dataclass(frozen=True, kw_only=True, repr=False)
class ProbeResult(records.Record):
    """The ``EntropyChange`` of one RL step (``change``; its fields read as the result's own:
    ``res.delta_h_true``), with the step's loss, gradient norm, clip coefficient, the update lost to rounding
    and Cui et al.'s covariance baseline −η Cov(log π, A) over U's tokens.

    Lean by default: besides Δθ it keeps only references (the policy, U, the optimizer, the state the
    step started from). The step itself — new parameters and optimizer state, 3× the parameters
    for AdamW — is kept with ``probe(..., keep_step=True)``; otherwise ``replay_step()`` takes it again
    when asked (one gradient pass on U and one update: the cost of the probe's own step).
    """

    change: EntropyChange = internal()
    loss: float
    grad_norm: float
    clip_coef: float
    update_lost: float | None
    cov_baseline: float
    loss_type: str
    clip: float
    max_grad_norm: float | None
    step_seconds: float = internal()
    step_policy: object = internal()  # the policy the step was taken with (the measurement's may compute in eval_dtype)
    lr_given: float | None = internal()
    step: Step | None = internal()
    U: Rollouts = internal()
    optimizer: Optimizer = internal()
    opt_state: object = internal()

    ROWS: ClassVar[tuple[Row, ...]] = _with_rows_after(
        EntropyChange.ROWS,
        "ratio",
        (("covariance baseline", "cov_baseline"), ("loss", "loss"), ("‖g‖₂", "grad_norm"), ("update lost to rounding", "update_lost")),
    )

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "change":
            raise AttributeError(name)
        return getattr(self.change, name)

    @property
    def timings(self) -> dict:
        """Seconds of each pass: the step's, then the measurement's."""
        return {"step": self.step_seconds, **self.change.timings}

    def to_dict(self) -> dict:
        """The measurement's fields (the step's time among its timings), then the step's."""
        return {**self.change.to_dict(), "timings": self.timings, **records.to_dict(self)}

    rows = EntropyChange.rows
    __repr__ = EntropyChange.__repr__
    sweep = EntropyChange.sweep

    @property
    def step_params(self) -> tree.Params:
        """θ₀ in the dtypes the step was taken in (the measurement keeps it as exact copies in its evaluation dtype)."""
        dtypes = {name: p.dtype for name, p in self.step_policy.params.items()}
        return {name: x.to(dtypes[name]) for name, x in self.context.params.items()}

    @property
    def start_state(self):
        """The optimizer state the step started from (a fresh ``optimizer.init`` when none was given)."""
        return self.optimizer.init(self.step_params) if self.opt_state is None else self.opt_state

    def _replay_options(self) -> dict:
        """The probe's step's options, to take it again from θ₀, the starting state and U."""
        return {"lr": self.lr_given, "loss": self.loss_type, "clip": self.clip, "max_grad_norm": self.max_grad_norm,
                "micro_batch": self.context.settings.micro_batch}

    def _check_replayed(self, difference: float) -> None:
        """‖Δθ_replayed − Δθ‖ within 1e-6 ‖Δθ‖, or RuntimeError (a changed model or a non-deterministic kernel would
        make the decomposition wrong)."""
        if difference > 1e-6 * self.delta_l2:
            raise RuntimeError(
                f"replaying the probe's step gave a different Δθ (relative difference {difference / self.delta_l2:.2g}): "
                "the model's parameters changed since the probe, or a kernel is not deterministic; "
                "probe with keep_step=True to keep the step"
            )

    def replay_step(self) -> Step:
        """The probe's step: the kept one (``keep_step=True``), or the same ``rl_step`` taken again from
        θ₀, the starting state and U; its Δθ must equal the probe's (a changed model or a
        non-deterministic kernel would make the decomposition wrong, so that raises)."""
        self.context.check_unchanged()
        if self.step is not None:
            return self.step
        step = rl_step(self.step_policy, self.step_params, self.optimizer, self.start_state, self.U, **self._replay_options())
        self._check_replayed(float(tree.norm(tree.sub(step.delta, self.delta_named))))
        return step

    def _step_by_parameter(self, order) -> StepByParameter:
        """The probe's step one parameter at a time in ``order``: the kept one, or replayed by ``rl_step_by_parameter``
        (no new parameter tree, each gradient dropped once used), its Δθ checked as ``replay_step`` checks it once
        every update is through."""
        if self.step is not None:
            return by_parameter(self.step, self.start_state, order)
        step = rl_step_by_parameter(self.step_policy, self.step_params, self.optimizer, self.start_state, self.U,
                                    order=order, **self._replay_options())

        differences = {}

        def recorded(update: Update) -> Update:
            difference = update.delta - self.delta_named[update.name]
            differences[update.name] = tree.dot64(difference, difference)
            return update

        def checked():  # ``yield from map``: no reference to an update outlives the caller's
            yield from map(recorded, step.updates)
            self._check_replayed(float(tree.leaf_sum({n: differences[n] for n in self.delta_named}).sqrt()))

        return step._replace(updates=checked())

    def contributions(self, micro_batch: int | None | Literal["probe"] = "probe", progress: bool = False):
        """Exact per-sequence and per-token parts of δH₁ (see ``fprobe.entropy.decompose``); without
        ``keep_step=True`` this replays the step one parameter at a time (as ``replay_step``, and checked as it is,
        without holding its new parameters)."""
        micro_batch = self.context.settings.micro_batch if micro_batch == "probe" else micro_batch
        self.context.settings.replace(micro_batch=micro_batch)  # checked before the step is replayed
        self.context.check_unchanged()
        return decompose.decompose(
            self.context, self._step_by_parameter, self.U, self.optimizer, self.delta_h1,
            self.loss_type, self.clip, micro_batch=micro_batch, progress=progress,
        )

    def predictors(self) -> predictors.PredictorComparison:
        """The published logit-space predictors of the entropy change, scored against the true per-token
        change Δh_ik at U's states, with fprobe's own ḣ_ik as the reference (see ``fprobe.entropy.predictors``).
        Cost: one jvp on U and two forward passes on U (at θ₀+Δθ, and at θ₀ for Wang et al.'s N)."""
        return predictors.from_probe(self)


def probe(
    policy,
    E: Rollouts,
    U: Rollouts,
    optimizer: Optimizer,
    opt_state=None,
    *,
    lr: float | None = None,
    loss: str = "dr_grpo",
    clip: float = 0.2,
    max_grad_norm: float | None = None,
    second_order: bool = False,
    keep_step: bool = False,
    progress: bool = False,
    **options: Unpack[EstimatorOptions],
) -> ProbeResult:
    """Exactly one optimizer step on U (``rl_step``), then ``entropy_change`` on E along its Δθ.

    ``opt_state`` defaults to a fresh ``optimizer.init``. ``options`` are the estimator settings
    (``fprobe.entropy.settings.Settings``; ``micro_batch`` also sets the step's rows per pass); they are
    checked before any pass runs. ``keep_step`` keeps the step's new parameters and optimizer state in the
    result (otherwise they are freed once ΔH_true is measured).
    """
    settings = settings_from(options)
    check_eval_batch(E, settings)
    params = policy.params
    start = time.perf_counter()
    step = rl_step(
        policy, params, optimizer, optimizer.init(params) if opt_state is None else opt_state, U,
        lr=lr, loss=loss, clip=clip, max_grad_norm=max_grad_norm, micro_batch=settings.micro_batch,
    )
    step_seconds = time.perf_counter() - start
    cov_baseline = estimators.covariance_baseline(step.logp, U.response_mask, U.advantages, step.lr)
    taken = dict(loss=step.loss, grad_norm=step.grad_norm, clip_coef=step.clip_coef, update_lost=step.update_lost)
    delta, new_params, lr_used = step.delta, step.params, step.lr
    step = step if keep_step else None  # the new optimizer state is freed before the passes on E
    change = measure(policy, E, delta, params, new_params, lr_used, settings, second_order=second_order, progress=progress)
    # U is reused by contributions and predictors, the starting state by replay_step
    change.context.versions.update(tensor_versions(batch_tensors(U), "U") | tensor_versions(opt_state, "opt_state"))
    return ProbeResult(
        change=change, **taken, cov_baseline=cov_baseline, loss_type=loss, clip=clip, max_grad_norm=max_grad_norm,
        step_seconds=step_seconds, step_policy=policy, lr_given=lr, step=step, U=U, optimizer=optimizer, opt_state=opt_state,
    )
