"""The one-call API: ``entropy_change`` along any Δθ, and ``probe`` = one ``rl_step`` then ``entropy_change``."""

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import estimators, passes, results, tree
from .optim import Optimizer
from .rollouts import Rollouts
from .step import Step, rl_step


class LowESSWarning(UserWarning):
    """The importance weights at the new parameters are degenerate: the step left the linear regime."""


@dataclass(frozen=True)
class Settings:
    """How Ĥ and δH₁ are estimated (see ``fprobe.estimators``)."""

    estimator: estimators.Estimator = "snis"
    normalize: estimators.Normalize = "token"
    entropy: estimators.Entropy = "rb"
    baseline: estimators.Baseline = "none"
    method: str = "jvp"
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH
    ess_threshold: float = 0.5


@dataclass(frozen=True)
class Context:
    """What a learning-rate sweep or a decomposition reuses: the policy, θ₀, E and Ĥ's ingredients at θ₀."""

    policy: object
    params: tree.Params
    E: Rollouts
    rows0: estimators.Rows
    denom: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    settings: Settings


@dataclass(frozen=True, repr=False)
class EntropyChange:
    """ΔH_true = Ĥ(θ₀+Δθ) − Ĥ(θ₀) on E by SNIS, δH₁ = d/dε Ĥ(θ₀+εΔθ)|₀, δH₂ = ½ d²/dε² (if asked)."""

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
    delta_named: tree.Params = field(repr=False)
    context: Context = field(repr=False)

    def rows(self) -> list[tuple[str, object]]:
        return [
            ("H(θ₀)", self.h_orig),
            ("H(θ₀+Δθ)", self.h_upd),
            ("ΔH_true", self.delta_h_true),
            ("δH₁", self.delta_h1),
            ("δH₂", self.delta_h2),
            ("ΔH_true / δH₁", self.ratio),
            ("ESS fraction", self.ess_fraction),
            ("max weight", self.max_weight),
            ("‖Δθ‖₂", self.delta_l2),
            ("lr", self.lr_used),
            ("E: sequences, tokens", f"{self.n_eval}, {self.n_eval_tokens}"),
        ] + [(f"time {phase} [s]", round(t, 3)) for phase, t in self.timings.items()]

    def __repr__(self) -> str:
        flag = "  (LOW ESS: outside the linear regime)" if self.ess_low else ""
        return results.table(f"{type(self).__name__}{flag}", self.rows())

    def _repr_html_(self) -> str:
        return f"<pre>{self!r}</pre>"

    def to_dict(self) -> dict:
        return results.to_dict(self)

    def to_json(self, **kwargs) -> str:
        return results.to_json(self, **kwargs)

    def sweep(self, lrs, progress: bool = False):
        """ΔH_true, δH₁ (and δH₁+δH₂) at each learning rate, from this one Δθ scaled by η/η₀."""
        from .sweep import sweep

        return sweep(self, lrs, progress)


@dataclass(frozen=True, repr=False)
class ProbeResult(EntropyChange):
    """``EntropyChange`` of one RL step, with the step's loss, gradient norm and Cui et al.'s
    covariance baseline −η Cov(log π, A) over U's tokens. ``opt_state`` is the state the step started
    from; ``step.opt_state`` the state after it."""

    loss: float = 0.0
    grad_norm: float = 0.0
    clip_coef: float = 1.0
    update_lost: float | None = None
    cov_baseline: float = 0.0
    loss_type: str = "dr_grpo"
    clip: float = 0.2
    step: Step = field(default=None, repr=False)
    U: Rollouts = field(default=None, repr=False)
    optimizer: Optimizer = field(default=None, repr=False)
    opt_state: object = field(default=None, repr=False)

    def rows(self) -> list[tuple[str, object]]:
        extra = [("covariance baseline", self.cov_baseline), ("loss", self.loss), ("‖g‖₂", self.grad_norm)]
        if self.update_lost is not None:
            extra.append(("update lost to rounding", self.update_lost))
        base = super().rows()
        return base[:6] + extra + base[6:]

    def contributions(self):
        """Exact per-sequence and per-token parts of δH₁ (see ``fprobe.decompose``)."""
        from .decompose import decompose

        return decompose(self)


def _first_order(policy, params, delta, E, settings: Settings, second_order: bool, progress: bool, timings: dict):
    """(statistics at θ₀, α, β, δH₁, δH₂) with δH₁ by one jvp (or by gradient · Δθ for method='grad')."""
    mask = E.response_mask
    coefficients = lambda stats: estimators.first_order_coefficients(
        stats, mask, settings.estimator, settings.normalize, settings.entropy, settings.baseline
    )
    start, delta_h2 = time.perf_counter(), None
    if settings.method == "jvp" or second_order:
        jet = passes.jet(policy, params, delta, E, 2 if second_order else 1, settings.micro_batch, progress)
        stats0 = jet.value
        alpha, beta = coefficients(stats0)
        delta_h1 = float(estimators.contract(alpha, beta, jet.tangent))
        if second_order:
            delta_h2 = float(estimators.second_order(jet.value, jet.tangent, jet.second, mask, settings.normalize, settings.entropy))
        timings["jvp2" if second_order else "jvp"] = time.perf_counter() - start
        start = time.perf_counter()
    if settings.method == "grad":
        if not second_order:
            stats0 = passes.forward(policy, params, E, settings.micro_batch, progress)
            alpha, beta = coefficients(stats0)
        _, grad_h, _ = passes.gradient(policy, params, E, passes.linear_functional(alpha, beta), settings.micro_batch, progress)
        delta_h1 = float(tree.vdot(grad_h, delta))
        timings["grad"] = time.perf_counter() - start
    elif settings.method != "jvp":
        raise ValueError(f"method must be 'jvp' or 'grad', got {settings.method!r}")
    return stats0, alpha, beta, delta_h1, delta_h2


def snis_at(context: Context, params, progress: bool = False) -> estimators.Snis:
    """Ĥ and ESS on E at ``params``: one micro-batched forward pass."""
    stats = passes.forward(context.policy, params, context.E, context.settings.micro_batch, progress)
    return estimators.snis(estimators.rows(stats, context.settings.entropy), context.rows0.logp, context.denom)


def warn_if_low_ess(ess_fraction: float, threshold: float, where: str) -> bool:
    low = ess_fraction < threshold
    if low:
        warnings.warn(
            f"ESS fraction {ess_fraction:.3g} < {threshold} {where}: the importance weights are degenerate and the "
            "step is outside the linear regime; ΔH_true is unreliable",
            LowESSWarning,
            stacklevel=3,
        )
    return low


def entropy_change(
    policy,
    E: Rollouts,
    delta,
    *,
    params=None,
    lr: float | None = None,
    estimator: estimators.Estimator = "snis",
    normalize: estimators.Normalize = "token",
    entropy: estimators.Entropy = "rb",
    baseline: estimators.Baseline = "none",
    method: str = "jvp",
    second_order: bool = False,
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH,
    ess_threshold: float = 0.5,
    progress: bool = False,
    new_params=None,
) -> EntropyChange:
    """What moving the policy's parameters by ``delta`` (any name-keyed Δθ, e.g. the difference of two
    checkpoints) does to the entropy on E: ΔH_true by SNIS at θ₀+Δθ (``functional_call``, the model
    untouched), δH₁ (jvp, or ``method="grad"``: ∇Ĥ · Δθ), δH₂ if ``second_order``.

    ``lr`` is the learning rate that produced Δθ (it sets the sweep's scale; default 1). ``new_params``
    are θ₀+Δθ exactly as the model sees them (``rl_step``'s ``params``, which can differ from
    ``params + delta`` by an ulp where the update nearly cancels a parameter); default ``params + delta``.
    """
    settings = Settings(estimator, normalize, entropy, baseline, method, micro_batch, ess_threshold)
    params = tree.check_like(policy.params, policy.params if params is None else params, "params")
    delta = tree.check_like(params, delta, "delta")
    tree.check_finite(delta, "delta")
    timings = {}
    stats0, alpha, beta, delta_h1, delta_h2 = _first_order(policy, params, delta, E, settings, second_order, progress, timings)
    rows0 = estimators.rows(stats0, entropy)
    denom = estimators.denominators(E.response_mask, normalize)
    context = Context(policy, params, E, rows0, denom, alpha, beta, settings)
    start = time.perf_counter()
    h0 = float(estimators.snis_value(rows0.logp, rows0.entropy, rows0.logp, denom))
    new_params = tree.add(params, delta) if new_params is None else tree.check_like(params, new_params, "new_params")
    new = snis_at(context, new_params, progress)
    timings["forward_new"] = time.perf_counter() - start
    change = float(new.value) - h0
    return EntropyChange(
        h_orig=h0,
        h_upd=float(new.value),
        delta_h_true=change,
        delta_h1=delta_h1,
        delta_h2=delta_h2,
        ratio=change / delta_h1 if delta_h1 else float("nan"),
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
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH,
    progress: bool = False,
    **estimate,
) -> ProbeResult:
    """Exactly one optimizer step on U (``rl_step``), then ``entropy_change`` on E along its Δθ.

    ``opt_state`` defaults to a fresh ``optimizer.init``; ``estimate`` takes ``entropy_change``'s options
    (estimator, normalize, entropy, baseline, method, second_order, ess_threshold).
    """
    params = policy.params
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    start = time.perf_counter()
    step = rl_step(
        policy, params, optimizer, opt_state, U, lr=lr, loss=loss, clip=clip, max_grad_norm=max_grad_norm, micro_batch=micro_batch
    )
    step_time = time.perf_counter() - start
    change = entropy_change(
        policy, E, step.delta, params=params, new_params=step.params, lr=step.lr, micro_batch=micro_batch, progress=progress, **estimate
    )
    return ProbeResult(
        **{**vars(change), "timings": {"step": step_time, **change.timings}},
        loss=step.loss,
        grad_norm=step.grad_norm,
        clip_coef=step.clip_coef,
        update_lost=step.update_lost,
        cov_baseline=estimators.covariance_baseline(step.logp, U.response_mask, U.advantages, step.lr),
        loss_type=loss,
        clip=clip,
        step=step,
        U=U,
        optimizer=optimizer,
        opt_state=opt_state,
    )
