"""The rules fprobe's public functions check their arguments against, each stated once, with one wording.

Every check raises ``ValueError`` (``TypeError`` for a wrong kind of value) naming the argument, before any pass runs.
"""

import math
import typing


def learning_rate(value, name: str = "lr") -> float:
    """A learning rate: a real number, finite and ≥ 0."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if isinstance(value, bool) or not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return rate


def fraction(value, name: str) -> float:
    """A fraction in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def positive_int(value, name: str, unit: str) -> int:
    """A whole number ≥ 1 of ``unit``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive number of {unit}, got {value!r}")
    return value


def micro_batch(value) -> int | None:
    """Rows per pass: a whole number ≥ 1, or None for the whole batch in one pass."""
    return None if value is None else positive_int(value, "micro_batch", "rows or None (whole batch)")


def choice(name: str, value, allowed) -> None:
    """``value`` is one of the strings of the ``Literal`` type ``allowed``."""
    options = typing.get_args(allowed)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
