"""The one-call API: ``entropy_change`` along any Δθ, and ``probe`` = one ``rl_step`` then ``entropy_change``."""

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

from fprobe.entropy import decompose
from fprobe.entropy import estimators
from fprobe.model import passes
from fprobe.entropy import predictors
from fprobe import records
from fprobe.entropy import sweep
from fprobe import tree
from fprobe.entropy.evaluation import Context, Method, Settings, batch_tensors, first_order, snis_at, tensor_versions, warn_if_low_ess
from fprobe.rl.optim import Optimizer
from fprobe.records import internal
from fprobe.rollouts import Rollouts
from fprobe.rl.step import Step, rl_step

Row = tuple[str, str]  # (label in the table, field name)


def with_rows_after(rows: tuple[Row, ...], after: str, extra: tuple[Row, ...]) -> tuple[Row, ...]:
    """``rows`` with ``extra`` inserted after the row of field ``after``."""
    index = [name for _, name in rows].index(after) + 1
    return rows[:index] + extra + rows[index:]


@dataclass(frozen=True, kw_only=True, repr=False)
class EntropyChange(records.Record):
    """ΔH_true = Ĥ(θ₀+Δθ) − Ĥ(θ₀) on E by SNIS, δH₁ = d/dε Ĥ(θ₀+εΔθ)|₀, δH₂ = ½ d²/dε² (if asked).

    Keeps Δθ (``delta_named``) and θ₀'s statistics on E (``context``): all a sweep needs.
    """

    h_orig: float
    h_upd: float
    delta_h_true: float
    delta_h1: float
    delta_h2: float | None
    ratio: float
    ess: float
    ess_fraction: float
    max_weight: float
    ess_low: bool
    delta_l2: float
    lr_used: float
    n_eval: int
    n_eval_tokens: int
    top_params: list
    timings: dict
    settings: dict
    delta_named: tree.Params = internal()
    context: Context = internal()

    ROWS: ClassVar[tuple[Row, ...]] = (
        ("H(θ₀)", "h_orig"),
        ("H(θ₀+Δθ)", "h_upd"),
        ("ΔH_true", "delta_h_true"),
        ("δH₁", "delta_h1"),
        ("δH₂", "delta_h2"),
        ("ΔH_true / δH₁", "ratio"),
        ("ESS fraction", "ess_fraction"),
        ("max weight", "max_weight"),
        ("‖Δθ‖₂", "delta_l2"),
        ("lr", "lr_used"),
        ("E: sequences", "n_eval"),
        ("E: response tokens", "n_eval_tokens"),
    )

    def rows(self) -> list[tuple[str, object]]:
        """(label, value) for the table: ``ROWS`` by field name, then the time of each pass."""
        return [(label, getattr(self, name)) for label, name in self.ROWS] + [
            (f"time {phase} [s]", round(t, 3)) for phase, t in self.timings.items()
        ]

    def __repr__(self) -> str:
        flag = "  (LOW ESS: outside the linear regime)" if self.ess_low else ""
        return records.table(f"{type(self).__name__}{flag}", self.rows())

    def sweep(self, lrs, progress: bool = False) -> sweep.SweepResult:
        """ΔH_true, δH₁ (and δH₁+δH₂) at each learning rate, from this one Δθ scaled by η/η₀."""
        return sweep.sweep(self, lrs, progress)


@dataclass(frozen=True, kw_only=True, repr=False)
class ProbeResult(EntropyChange):
    """``EntropyChange`` of one RL step, with the step's loss, gradient norm and Cui et al.'s
    covariance baseline −η Cov(log π, A) over U's tokens.

    Lean by default: besides Δθ it keeps only references (the policy, U, the optimizer, the state the
    step started from). The step itself — new parameters and optimizer state, 3× the parameters
    for AdamW — is kept with ``probe(..., keep_step=True)``; otherwise ``replay_step()`` takes it again
    when asked (one gradient pass on U and one update: the cost of the probe's own step).
    """

    loss: float
    grad_norm: float
    clip_coef: float
    update_lost: float | None
    cov_baseline: float
    loss_type: str
    clip: float
    max_grad_norm: float | None
    lr_given: float | None = internal()
    micro_batch: int | None = internal()
    step: Step | None = internal()
    U: Rollouts = internal()
    optimizer: Optimizer = internal()
    opt_state: object = internal()

    ROWS: ClassVar[tuple[Row, ...]] = with_rows_after(
        EntropyChange.ROWS,
        "ratio",
        (("covariance baseline", "cov_baseline"), ("loss", "loss"), ("‖g‖₂", "grad_norm"), ("update lost to rounding", "update_lost")),
    )

    @property
    def start_state(self):
        """The optimizer state the step started from (a fresh ``optimizer.init`` when none was given)."""
        return self.optimizer.init(self.context.params) if self.opt_state is None else self.opt_state

    def replay_step(self) -> Step:
        """The probe's step: the kept one (``keep_step=True``), or the same ``rl_step`` taken again from
        θ₀, the starting state and U; its Δθ must equal the probe's (a changed model or a
        non-deterministic kernel would make the decomposition wrong, so that raises)."""
        self.context.check_unchanged()
        if self.step is not None:
            return self.step
        step = rl_step(
            self.context.policy, self.context.params, self.optimizer, self.start_state, self.U, lr=self.lr_given,
            loss=self.loss_type, clip=self.clip, max_grad_norm=self.max_grad_norm, micro_batch=self.micro_batch,
        )
        difference = float(tree.norm(tree.sub(step.delta, self.delta_named)))
        if difference > 1e-6 * self.delta_l2:
            raise RuntimeError(
                f"replaying the probe's step gave a different Δθ (relative difference {difference / self.delta_l2:.2g}): "
                "the model's parameters changed since the probe, or a kernel is not deterministic; "
                "probe with keep_step=True to keep the step"
            )
        return step

    def contributions(self, micro_batch: int | None | Literal["probe"] = "probe", progress: bool = False):
        """Exact per-sequence and per-token parts of δH₁ (see ``fprobe.decompose``); without
        ``keep_step=True`` this first replays the step (``replay_step``)."""
        return decompose.decompose(self, micro_batch=micro_batch, progress=progress)

    def predictors(self) -> predictors.PredictorComparison:
        """The published logit-space predictors of the entropy change, scored against the true per-token
        change Δh_ik at U's states, with fprobe's own ḣ_ik as the reference (see ``fprobe.predictors``).
        Cost: one jvp on U and one forward pass on U at θ₀+Δθ."""
        return predictors.from_probe(self)


def entropy_change(
    policy,
    E: Rollouts,
    delta,
    *,
    params=None,
    new_params=None,
    lr: float | None = None,
    estimator: estimators.Estimator = "snis",
    normalize: estimators.Normalize = "token",
    entropy: estimators.Entropy = "rb",
    baseline: estimators.Baseline = "none",
    method: Method = "jvp",
    second_order: bool = False,
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH,
    ess_threshold: float = 0.5,
    progress: bool = False,
) -> EntropyChange:
    """What moving the policy's parameters by ``delta`` (any name-keyed Δθ, e.g. the difference of two
    checkpoints) does to the entropy on E: ΔH_true by SNIS at θ₀+Δθ (``functional_call``, the model
    untouched), δH₁ (jvp, or ``method="grad"``: ∇Ĥ · Δθ), δH₂ if ``second_order``.

    ``params`` is θ₀ (default: the policy's parameters). ``new_params`` are θ₀+Δθ exactly as the model
    sees them (``rl_step``'s ``params``, which can differ from ``params + delta`` by an ulp where the
    update nearly cancels a parameter); default ``params + delta``. ``lr`` is the learning rate that
    produced Δθ (it sets the sweep's scale; default 1). ``micro_batch``: rows per pass (None: all).
    """
    settings = Settings(
        estimator=estimator, normalize=normalize, entropy=entropy, baseline=baseline, method=method,
        micro_batch=micro_batch, ess_threshold=ess_threshold,
    )
    if lr is not None and (isinstance(lr, bool) or not math.isfinite(float(lr)) or float(lr) < 0):
        raise ValueError(f"lr (the learning rate that produced delta) must be a finite number >= 0, got {lr!r}")
    params = tree.check_like(policy.params, policy.params if params is None else params, "params")
    delta = tree.check_like(params, delta, "delta")
    tree.check_finite(delta, "delta")
    if new_params is not None:
        new_params = tree.check_like(params, new_params, "new_params")
    timings = {}
    first = first_order(policy, params, delta, E, settings, second_order, progress, timings)
    rows0 = estimators.rows(first.stats0, entropy)
    denom = estimators.denominators(E.response_mask, normalize).to(rows0.logp.device)
    context = Context(policy, params, E, rows0, denom, first.alpha, first.beta, settings)
    start = time.perf_counter()
    h0 = float(estimators.snis_value(rows0.logp, rows0.entropy, rows0.logp, denom))
    new = snis_at(context, tree.add(params, delta) if new_params is None else new_params, progress)
    timings["forward_new"] = time.perf_counter() - start
    change = float(new.value) - h0
    return EntropyChange(
        h_orig=h0,
        h_upd=float(new.value),
        delta_h_true=change,
        delta_h1=first.delta_h1,
        delta_h2=first.delta_h2,
        ratio=change / first.delta_h1 if first.delta_h1 else float("nan"),
        ess=float(new.ess),
        ess_fraction=float(new.ess_fraction),
        max_weight=float(new.max_weight),
        ess_low=warn_if_low_ess(float(new.ess_fraction), ess_threshold, "at θ₀+Δθ"),
        delta_l2=float(tree.norm(delta)),
        lr_used=1.0 if lr is None else float(lr),
        n_eval=len(E),
        n_eval_tokens=E.n_tokens,
        top_params=tree.top_k(delta, 10),
        timings=timings,
        settings=dataclasses.asdict(settings),
        delta_named=delta,
        context=context,
    )


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
    estimator: estimators.Estimator = "snis",
    normalize: estimators.Normalize = "token",
    entropy: estimators.Entropy = "rb",
    baseline: estimators.Baseline = "none",
    method: Method = "jvp",
    second_order: bool = False,
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH,
    ess_threshold: float = 0.5,
    keep_step: bool = False,
    progress: bool = False,
) -> ProbeResult:
    """Exactly one optimizer step on U (``rl_step``), then ``entropy_change`` on E along its Δθ.

    ``opt_state`` defaults to a fresh ``optimizer.init``. The estimator options are ``entropy_change``'s;
    they are checked before any pass runs. ``keep_step`` keeps the step's new parameters and optimizer
    state in the result (otherwise they are freed once ΔH_true is measured).
    """
    estimate = dict(
        estimator=estimator, normalize=normalize, entropy=entropy, baseline=baseline, method=method,
        micro_batch=micro_batch, ess_threshold=ess_threshold,
    )
    Settings(**estimate)
    params = policy.params
    start = time.perf_counter()
    step = rl_step(
        policy, params, optimizer, optimizer.init(params) if opt_state is None else opt_state, U,
        lr=lr, loss=loss, clip=clip, max_grad_norm=max_grad_norm, micro_batch=micro_batch,
    )
    step_time = time.perf_counter() - start
    cov_baseline = estimators.covariance_baseline(step.logp, U.response_mask, U.advantages, step.lr)
    taken = dict(loss=step.loss, grad_norm=step.grad_norm, clip_coef=step.clip_coef, update_lost=step.update_lost)
    delta, new_params, lr_used = step.delta, step.params, step.lr
    step = step if keep_step else None  # the new optimizer state is freed before the passes on E
    change = entropy_change(
        policy, E, delta, params=params, new_params=new_params, lr=lr_used, second_order=second_order,
        progress=progress, **estimate,
    )
    fields = {f.name: getattr(change, f.name) for f in dataclasses.fields(change)}
    # U is reused by contributions and predictors, the starting state by replay_step
    versions = fields["context"].versions | tensor_versions(batch_tensors(U), "U") | tensor_versions(opt_state, "opt_state")
    fields["context"] = dataclasses.replace(fields["context"], versions=versions)
    return ProbeResult(
        **{**fields, "timings": {"step": step_time, **change.timings}},
        **taken,
        cov_baseline=cov_baseline,
        loss_type=loss,
        clip=clip,
        max_grad_norm=max_grad_norm,
        lr_given=lr,
        micro_batch=micro_batch,
        step=step,
        U=U,
        optimizer=optimizer,
        opt_state=opt_state,
    )
