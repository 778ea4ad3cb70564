"""How Ĥ and δH₁ are estimated: one frozen ``Settings`` value, its options declared once.

``entropy_change(..., **options)`` and ``probe(..., **options)`` take exactly these keywords
(``EstimatorOptions``) and build one ``Settings`` from them, which checks every option before any pass runs.
"""

import dataclasses
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch

from fprobe import checks
from fprobe.entropy import estimators
from fprobe.model import passes

_Method = Literal["jvp", "grad"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``estimator``: δH₁'s estimator (``snis``: the exact derivative of ΔH_true's estimator; ``togo``:
    entropy-to-go, same expectation); ``normalize``: Ĥ per response ``token`` or per ``seq``uence;
    ``entropy``: per-sequence entropy ``rb`` (Rao–Blackwell, Σ_k h_k) or ``naive`` (−S); ``baseline``:
    ``togo``'s ``position`` baseline, or ``snis``'s ``prompt`` control variates (per-prompt leave-one-out means;
    E needs group ids); ``method``: δH₁ by ``jvp`` or by ``grad`` (∇Ĥ · Δθ); ``micro_batch``: rows per
    pass (None: the whole batch in one pass; peak memory is set by it); ``ess_threshold``: the ESS
    fraction below which a ``LowESSWarning`` flags the result; ``eval_dtype``: the dtype every pass computes
    in (``torch.float64``: on a float64 copy of the weights inside fprobe's calls; None: the widest of the
    model's parameter dtypes, float32 for bf16/fp16 ones; ``fprobe.Policy.dtype``)."""

    estimator: estimators.Estimator = "snis"
    normalize: estimators.Normalize = "token"
    entropy: estimators.Entropy = "rb"
    baseline: estimators.Baseline = "none"
    method: _Method = "jvp"
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH
    ess_threshold: float = 0.5
    eval_dtype: torch.dtype | None = None

    def __post_init__(self):
        for name, allowed in (
            ("estimator", estimators.Estimator),
            ("normalize", estimators.Normalize),
            ("entropy", estimators.Entropy),
            ("baseline", estimators.Baseline),
            ("method", _Method),
        ):
            checks.choice(name, getattr(self, name), allowed)
        estimators.check_baseline(self.estimator, self.baseline)
        checks.micro_batch(self.micro_batch)
        checks.fraction(self.ess_threshold, "ess_threshold")
        if self.eval_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"eval_dtype must be torch.float32, torch.float64 or None (the model's own), got {self.eval_dtype!r}")

    def replace(self, **changes) -> "Settings":
        """A copy with ``changes``, checked like a new one."""
        return dataclasses.replace(self, **changes)


class EstimatorOptions(TypedDict, total=False):
    """The keyword arguments that make a ``Settings`` (see there)."""

    estimator: estimators.Estimator
    normalize: estimators.Normalize
    entropy: estimators.Entropy
    baseline: estimators.Baseline
    method: _Method
    micro_batch: int | None
    ess_threshold: float
    eval_dtype: torch.dtype | None


def settings_from(options: dict) -> Settings:
    """``Settings(**options)``, with a clear error for a keyword that is not an estimator option."""
    unknown = sorted(set(options) - set(EstimatorOptions.__annotations__))
    if unknown:
        raise TypeError(f"unknown estimator option(s) {', '.join(unknown)}; the options are {', '.join(EstimatorOptions.__annotations__)}")
    return Settings(**options)
