"""Frozen result records: readable tables in a terminal and in Jupyter, dicts, JSON, atomic files."""

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import torch


def _plain(value):
    """JSON-ready form of a result field (tensors become numbers or lists)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(record) -> dict:
    """The record's public fields (those with ``repr=True``) as plain Python values."""
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record) if f.repr}


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


def table(title: str, rows: list[tuple[str, object]]) -> str:
    """A two-column text table."""
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * max(len(title), width + 16)]
    lines += [f"{name:<{width}}  {format_number(value)}" for name, value in rows]
    return "\n".join(lines)


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_lines(path: Path, what: str):
    """(``"FILE:LINE"``, object) for each non-blank line of a JSONL file; a malformed line raises
    ``ValueError`` naming ``what``, the file and the line number."""
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: malformed JSON line in the {what}: {error.msg}") from None


def to_json(record, **kwargs) -> str:
    return json.dumps(to_dict(record), **kwargs)
