"""The one measurement on E along any Δθ: ``entropy_change`` → ``EntropyChange``.

ΔH_true = Ĥ(θ₀+Δθ) − Ĥ(θ₀) by SNIS at the new parameters (``functional_call``, the model untouched),
δH₁ = d/dε Ĥ(θ₀+εΔθ)|₀ by one jvp (or ∇Ĥ · Δθ), δH₂ = ½ d²/dε² by a second-order Taylor pass, with
Ĥ(θ) = Σ_i w_i H_i / Σ_i w_i D_i and log w_i = S_i(θ) − S_i^q, q the policy that sampled E: π_θ₀ itself
(every w_i(θ₀) = 1), or an earlier policy when E is reused (``logp_sampler`` = S^q).
"""

import time
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Unpack

import torch

from fprobe import checks, records, tree
from fprobe.entropy import estimators, precision, sweep, uncertainty
from fprobe.entropy.context import Context, batch_tensors, snis_at, tensor_versions, warn_if_low_ess
from fprobe.entropy.settings import EstimatorOptions, Settings, settings_from
from fprobe.model import passes
from fprobe.model.numerics import upcast
from fprobe.model.tokens import TokenStats
from fprobe.records import internal
from fprobe.rollouts import Rollouts

Row = tuple[str, str]  # (label in the table, field name)


class _FirstOrder(NamedTuple):
    """Statistics of E at θ₀, the coefficients (α, β) with δH₁ = Σ α ℓ̇ + β ḣ, δH₁, δH₂ (or None), and the
    statistics' first and second ε-derivatives where a jvp computed them (None otherwise)."""

    stats0: TokenStats
    alpha: torch.Tensor
    beta: torch.Tensor
    delta_h1: float
    delta_h2: float | None
    tangent: TokenStats | None = None
    second: TokenStats | None = None


def first_order(policy, params, delta, E: Rollouts, settings: Settings, second_order: bool = False, progress: bool = False,
                timings: dict | None = None, logp_ref: torch.Tensor | None = None) -> _FirstOrder:
    """δH₁ = d/dε Ĥ(θ₀+εΔθ)|₀ by one jvp (``method="jvp"``) or as ∇Ĥ · Δθ (``"grad"``: a forward and a
    vjp of the same linear functional); δH₂ = ½ d²/dε² from the same pass, second-order
    (``passes.jet(order=2)``), when ``second_order``.
    ``logp_ref``: S^q of the policy that sampled E (None: θ₀). ``timings`` (if given) receives the seconds
    of each pass."""
    timings = {} if timings is None else timings
    mask = E.response_mask
    coefficients = lambda stats: estimators.first_order_coefficients(
        stats, mask, settings.estimator, settings.normalize, settings.entropy, settings.baseline, logp_ref, E.group_ids
    )
    start, delta_h2, jet = time.perf_counter(), None, None
    if settings.method == "jvp" or second_order:
        jet = passes.jet(policy, params, delta, E, 2 if second_order else 1, settings.micro_batch, progress)
        stats0 = jet.value
        alpha, beta = coefficients(stats0)
        delta_h1 = float(estimators.contract(alpha, beta, jet.tangent))
        if second_order:
            r0 = estimators.rows(stats0, settings.entropy)
            denom = estimators.denominators(mask.to(r0.logp.device), settings.normalize)
            baselines = estimators.baselines_for(r0, denom, settings.baseline, E.group_ids)
            delta_h2 = float(estimators.second_order(
                jet.value, jet.tangent, jet.second, mask, settings.normalize, settings.entropy, logp_ref, baselines))
        timings["jvp2" if second_order else "jvp"] = time.perf_counter() - start
        start = time.perf_counter()
    if settings.method == "grad":
        if not second_order:
            stats0 = passes.forward(policy, params, E, settings.micro_batch, progress)
            alpha, beta = coefficients(stats0)
        _, grad_h, _ = passes.gradient(policy, params, E, passes.linear_functional(alpha, beta), settings.micro_batch, progress)
        delta_h1 = float(tree.vdot(grad_h, delta))
        timings["grad"] = time.perf_counter() - start
    return _FirstOrder(stats0, alpha, beta, delta_h1, delta_h2, None if jet is None else jet.tangent,
                      None if jet is None else jet.second)


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
    eval_dtype: str
    rounding_floor: float
    rounding_floor_h1: float | None
    precision_low: bool
    delta_l2: float
    lr_used: float
    n_eval: int
    n_eval_tokens: int
    top_params: list
    timings: dict
    settings: dict
    h_orig_se: float | None
    h_upd_se: float | None
    delta_h_true_se: float | None
    delta_h1_se: float | None
    delta_h2_se: float | None
    ratio_se: float | None
    se_units: int
    se_undefined: dict
    delta_named: tree.Params = internal()
    context: Context = internal()
    se_terms: dict = internal()

    ROWS: ClassVar[tuple[Row, ...]] = (
        ("H(θ₀)", "h_orig"),
        ("H(θ₀+Δθ)", "h_upd"),
        ("ΔH_true", "delta_h_true"),
        ("δH₁", "delta_h1"),
        ("δH₂", "delta_h2"),
        ("ΔH_true / δH₁", "ratio"),
        ("ESS fraction", "ess_fraction"),
        ("max weight", "max_weight"),
        ("rounding floor of ΔH_true", "rounding_floor"),
        ("rounding floor of δH₁", "rounding_floor_h1"),
        ("‖Δθ‖₂", "delta_l2"),
        ("lr", "lr_used"),
        ("E: sequences", "n_eval"),
        ("E: response tokens", "n_eval_tokens"),
    )

    def rows(self) -> list[tuple[str, object]]:
        """(label, value) for the table: ``ROWS`` by field name (``value ± se`` where it has a standard error), then
        the time of each pass."""
        shown = lambda name: _with_error(getattr(self, name), getattr(self, f"{name}_se", None))
        return [(label, shown(name)) for label, name in self.ROWS] + [
            (f"time {phase} [s]", round(t, 3)) for phase, t in self.timings.items()
        ]

    def n_eval_for(self, rel_se: float = 0.1, of: str = "delta_h_true") -> int | None:
        """The |E| (rows, sampled as this E was) at which the standard error of ``of`` would be ``rel_se`` of its
        |value|, from the measured per-sequence variance (se ∝ 1/√|E|); None where the se is undefined."""
        if f"{of}_se" not in self.__dataclass_fields__:
            raise ValueError(f"of must name an estimate with a standard error ({', '.join(uncertainty.ESTIMATES)}), got {of!r}")
        return uncertainty.rows_for(rel_se, getattr(self, of), getattr(self, f"{of}_se"), self.n_eval)

    def __repr__(self) -> str:
        flag = "  (LOW ESS: outside the linear regime)" if self.ess_low else ""
        flag += f"  (BELOW THE {self.eval_dtype} ROUNDING FLOOR: use eval_dtype=torch.float64)" if self.precision_low else ""
        return records.table(f"{type(self).__name__}{flag}", self.rows())

    def sweep(self, lrs, progress: bool = False) -> sweep.SweepResult:
        """ΔH_true, δH₁ (and δH₁+δH₂) at each learning rate, from this one Δθ scaled by η/η₀."""
        return sweep.sweep(self, lrs, progress)


def _upcast_tree(params: tree.Params, dtype: torch.dtype) -> tree.Params:
    """Every leaf narrower than ``dtype`` as an exact ``dtype`` copy; the others as they are."""
    return tree.tree_map(lambda x: upcast(x, dtype), params)


def _with_error(value, se) -> object:
    """``value ± se`` as table text where a standard error is known; the value itself otherwise."""
    if se is None or value is None:
        return value
    return f"{records.format_number(value)} ± {se:.2g}"


def check_eval_batch(E: Rollouts, settings: Settings) -> None:
    """What the settings need of E, checked before any pass: group ids for ``baseline='prompt'``."""
    if settings.baseline == "prompt":
        estimators.check_groups(E.group_ids, len(E))


def measure(policy, E: Rollouts, delta, params, new_params, lr: float | None, settings: Settings, *, logp_sampler=None,
            second_order: bool = False, progress: bool = False) -> EntropyChange:
    """``entropy_change`` on checked arguments (``params``, ``delta``, ``new_params`` trees like the policy's).

    Every pass computes in ``policy.dtype`` (``settings.eval_dtype`` if set): θ₀ and Δθ as exact copies in it where
    narrower (bf16 weights and a float32 Δθ = θ_{k+1} − θ_k; one more copy of the trainable parameters and of Δθ),
    the new parameters as they are (upcast inside each call). ``rounding_floor`` estimates the rounding error of
    ΔH_true and δH₁ in that dtype (``fprobe.entropy.precision``; one more jvp of E's first rows)."""
    check_eval_batch(E, settings)
    timings = {}
    versions = tensor_versions(params, "θ₀") | tensor_versions(batch_tensors(E), "E")  # the caller's, not the copies'
    policy = policy.evaluated_in(settings.eval_dtype)
    params, delta = _upcast_tree(params, policy.dtype), _upcast_tree(delta, policy.dtype)
    first = first_order(policy, params, delta, E, settings, second_order, progress, timings, logp_sampler)
    rows0 = estimators.rows(first.stats0, settings.entropy)
    denom = estimators.denominators(E.response_mask, settings.normalize).to(rows0.logp.device)
    logp_ref = rows0.logp if logp_sampler is None else logp_sampler.to(rows0.logp.device)
    baselines = estimators.baselines_for(rows0, denom, settings.baseline, E.group_ids)
    context = Context(policy, params, E, rows0, denom, first.alpha, first.beta, settings, logp_ref, baselines, versions)
    start = time.perf_counter()
    h0 = float(estimators.snis_value(rows0.logp, rows0.entropy, logp_ref, denom, baselines))
    new = snis_at(context, tree.add(params, delta) if new_params is None else new_params, progress)
    timings["forward_new"] = time.perf_counter() - start
    change = float(new.value) - h0
    start = time.perf_counter()
    plain = None if first.tangent is None else passes.StatsJet(first.stats0, first.tangent)
    floor = precision.rounding_floor(policy, params, delta, E, first.stats0, settings, plain,
                                     None if logp_sampler is None else logp_ref)
    timings["rounding_floor"] = time.perf_counter() - start
    errors = uncertainty.of_statistics(
        first.stats0, E.response_mask, estimator=settings.estimator, normalize=settings.normalize,
        entropy=settings.entropy, baseline=settings.baseline, groups=E.group_ids, logp_ref=logp_sampler,
        tangent=first.tangent, second=first.second, moved=new.rows,
        missing=dict.fromkeys(("n1", "m1"), uncertainty.GRAD_METHOD),
    )
    se = {f"{name}_se": errors.se.get(name) for name in uncertainty.ESTIMATES}
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
        ess_low=warn_if_low_ess(float(new.ess_fraction), settings.ess_threshold, "at θ₀+Δθ"),
        eval_dtype=floor.dtype,
        rounding_floor=floor.delta_h_true,
        rounding_floor_h1=floor.delta_h1,
        precision_low=precision.warn_if_below_floor(change, floor),
        delta_l2=float(tree.norm(delta)),
        lr_used=1.0 if lr is None else float(lr),
        n_eval=len(E),
        n_eval_tokens=E.n_tokens,
        top_params=tree.top_k(delta, 10),
        timings=timings,
        settings={**settings.__dict__, "eval_dtype": floor.dtype},
        **se,
        se_units=errors.n_units,
        se_undefined=errors.undefined,
        delta_named=delta,
        context=context,
        se_terms=errors.terms,
    )


def _check_delta(params: tree.Params, delta) -> tree.Params:
    """``delta`` like ``params`` (``tree.check_like``), in their dtype, or in float32 for bf16/fp16 ones (``Step.delta``,
    ``fprobe.model.numerics.exact_delta``)."""
    float32 = lambda name: isinstance(delta.get(name), torch.Tensor) and delta[name].dtype == torch.float32
    return tree.check_like({name: upcast(p, torch.float32) if float32(name) else p for name, p in params.items()}, delta, "delta")


def _check_logp_sampler(logp_sampler, E: Rollouts) -> torch.Tensor | None:
    """S^q: one finite float per row of E, or None."""
    if logp_sampler is None:
        return None
    logp = torch.as_tensor(logp_sampler, dtype=torch.float64)
    if logp.shape != (len(E),):
        raise ValueError(f"logp_sampler must hold one sequence log-prob per row of E ({len(E)}), got shape {tuple(logp.shape)}")
    bad = torch.nonzero(~torch.isfinite(logp)).flatten().tolist()
    if bad:
        raise ValueError(f"logp_sampler is not finite for evaluation rows {bad}")
    return logp


def entropy_change(
    policy,
    E: Rollouts,
    delta,
    *,
    params=None,
    new_params=None,
    lr: float | None = None,
    logp_sampler: torch.Tensor | None = None,
    second_order: bool = False,
    progress: bool = False,
    **options: Unpack[EstimatorOptions],
) -> EntropyChange:
    """What moving the policy's parameters by ``delta`` (any name-keyed Δθ, e.g. the difference of two
    checkpoints) does to the entropy on E: ΔH_true by SNIS at θ₀+Δθ (``functional_call``, the model
    untouched), δH₁ (jvp, or ``method="grad"``: ∇Ĥ · Δθ), δH₂ if ``second_order``.

    ``params`` is θ₀ (default: the policy's parameters). ``new_params`` are θ₀+Δθ exactly as the model
    sees them (``rl_step``'s ``params``, which can differ from ``params + delta`` by an ulp where the
    update nearly cancels a parameter); default ``params + delta``. ``lr`` is the learning rate that
    produced Δθ (it sets the sweep's scale; default 1). ``logp_sampler`` [n]: the sequence log-probs S^q
    of the policy q that sampled E, when that is not π_θ₀ (a reused E); every estimate then
    importance-weights from q. ``options``: the estimator settings (``fprobe.entropy.settings.Settings``).
    """
    settings = settings_from(options)
    if lr is not None:
        checks.learning_rate(lr, "lr (the learning rate that produced delta)")
    params = tree.check_like(policy.params, policy.params if params is None else params, "params")
    delta = _check_delta(params, delta)
    tree.check_finite(delta, "delta")
    if new_params is not None:
        new_params = tree.check_like(params, new_params, "new_params")
    return measure(policy, E, delta, params, new_params, lr, settings, logp_sampler=_check_logp_sampler(logp_sampler, E),
                   second_order=second_order, progress=progress)
