"""Every warning fprobe raises, and ``warn``, which attributes them to the caller's own line: the first frame outside the fprobe package,
however deep inside ``probe(...)``, ``.sweep(...)`` or ``.contributions()`` the warning was raised."""

import os
import sys
import warnings

PACKAGE_DIR = os.path.dirname(__file__) + os.sep


class LowESSWarning(UserWarning):
    """The importance weights at the new parameters are degenerate: the step left the linear regime."""


class UpdateLostWarning(UserWarning):
    """Most of the update was rounded away by low-precision (bf16/fp16) parameters."""


class ZeroAdvantagesWarning(UserWarning):
    """Every advantage in the update batch is zero: the step is weight decay (and momentum) alone."""


class DecompositionWarning(UserWarning):
    """The parts of δH₁ do not add up to it (low-precision parameters: bf16, fp16)."""


class ShardingWarning(UserWarning):
    """The run's sharding is not what its configuration asked for (e.g. accelerate's FSDP dropped on CPU: DDP)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside fprobe."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
