"""Frozen result records: readable tables in a terminal and in Jupyter, dicts and JSON."""

import dataclasses
import json
import math

import torch


def _plain(value):
    """JSON-ready form of a result field (tensors become numbers or lists)."""
    if isinstance(value, torch.Tensor):
        return _plain(value.item() if value.numel() == 1 else value.tolist())  # NaN/Inf entries too
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_INTERNAL = "fprobe_internal"


def internal(**kwargs):
    """A dataclass field that a result keeps for later computations (tensors, trees, references) but
    leaves out of its table, ``to_dict`` and JSON."""
    return dataclasses.field(repr=False, metadata={_INTERNAL: True}, **kwargs)


def to_dict(record) -> dict:
    """The record's fields, less those marked ``internal()``, as plain Python values."""
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record) if not f.metadata.get(_INTERNAL)}


def format_number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.6e}"
    return str(value)


def cell(value: float | None, width: int) -> str:
    """A number right-aligned in ``width`` columns to 4 significant digits; "—" for None."""
    return f"{'—':>{width}}" if value is None else f"{value:>{width}.4g}"


def table(title: str, rows: list[tuple[str, object]]) -> str:
    """A two-column text table."""
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * max(len(title), width + 16)]
    lines += [f"{name:<{width}}  {format_number(value)}" for name, value in rows]
    return "\n".join(lines)


def to_json(record, **kwargs) -> str:
    """The record as JSON: its own ``to_dict`` where it has one (non-finite numbers become null)."""
    return json.dumps(record.to_dict() if isinstance(record, Record) else to_dict(record), **kwargs)


class Record:
    """What fprobe's frozen results share: Jupyter shows their text table (``repr``), ``to_dict`` gives
    the fields less those marked ``internal()``, ``to_json`` the same as JSON."""

    def _repr_html_(self) -> str:
        return f"<pre>{self!r}</pre>"

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self, **kwargs) -> str:
        return to_json(self, **kwargs)
