"""Every warning fprobe raises, and ``warn``, which attributes them to the caller's own line: the first frame
outside fprobe and the libraries that call it, however deep inside ``probe(...)``, ``.sweep(...)``,
``.contributions()`` or a trainer's callbacks the warning was raised."""

import sys
import warnings


class LowESSWarning(UserWarning):
    """The importance weights at the new parameters are degenerate: the step left the linear regime."""


class UpdateLostWarning(UserWarning):
    """Most of the update was rounded away by low-precision (bf16/fp16) parameters."""


class ZeroAdvantagesWarning(UserWarning):
    """Every advantage in the update batch is zero: the step is weight decay (and momentum) alone."""


class PrecisionWarning(UserWarning):
    """|ΔH_true| is not well above its rounding floor at the passes' dtype: the ratio to δH₁ is rounding noise."""


class ImpreciseWarning(UserWarning):
    """The standard error of ΔH_true stays above a chosen fraction of |ΔH_true|: E is too small for that precision."""


class UndefinedScoreWarning(UserWarning):
    """A predictor's agreement scores are NaN: the prediction or the truth is the same at every token of U
    (one response token, or every advantage 0)."""


class DecompositionWarning(UserWarning):
    """The parts of δH₁ do not add up to it (low-precision parameters: bf16, fp16)."""


class ShardingWarning(UserWarning):
    """The run's sharding is not what its configuration asked for (e.g. accelerate's FSDP dropped on CPU: DDP)."""


_CALLERS_WITHIN = ("fprobe", "transformers", "trl", "accelerate", "torch")  # frames a warning is not attributed to


def _outside_libraries(frame) -> bool:
    """Whether ``frame`` runs the user's code: not fprobe's, nor that of the libraries fprobe is called from
    (a TRL trainer calls fprobe's callbacks from transformers' callback handler)."""
    module = frame.f_globals.get("__name__", "")
    return module.partition(".")[0] not in _CALLERS_WITHIN


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside fprobe and the libraries that call it."""
    frame, level = sys._getframe(1), 2
    while frame is not None and not _outside_libraries(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
