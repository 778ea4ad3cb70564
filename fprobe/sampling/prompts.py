"""Prompt records: loading from JSONL or Python lists, and chat formatting.

A record is a dict with a string ``prompt``, an optional ``answer`` and any other fields; the
whole record is handed to the reward as its ``example``.
"""

import os
from collections.abc import Sequence
from pathlib import Path

from fprobe.files import read_json_lines


def check_record(record, where: str) -> dict:
    """``record`` as a new dict, or a ValueError at ``where`` if it is not a dict with a string prompt."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with a 'prompt' field, got {type(record).__name__}")
    if not isinstance(record.get("prompt"), str):
        problem = "has no 'prompt' field" if "prompt" not in record else "has a 'prompt' that is not a string"
        raise ValueError(f"{where}: record {problem}")
    return dict(record)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, one JSON object a line; blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return [check_record(record, where) for where, record in read_json_lines(path, "prompt file")]


def records_from_list(items: Sequence) -> list[dict]:
    """Records from a list of prompt strings or dicts."""
    return [
        {"prompt": item} if isinstance(item, str) else check_record(item, f"prompt list item {index}")
        for index, item in enumerate(items)
    ]


def load_prompts(source: str | os.PathLike | Sequence) -> list[dict]:
    """Prompt records from a JSONL path (str or Path) or a list of strings or dicts.

    Records are copied; fields other than ``prompt`` and ``answer`` are kept for the reward.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        records, origin = read_jsonl(path), str(path)
    elif isinstance(source, Sequence):
        records, origin = records_from_list(source), "the given list"
    else:
        raise TypeError(f"prompts must be a JSONL path or a list, got {type(source).__name__}")
    if not records:
        raise ValueError(f"no prompts in {origin}")
    return records


def apply_chat_template(tokenizer, prompts: Sequence[str | dict]) -> list[str]:
    """Each prompt as a single user turn in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template; pass the prompts as raw text instead "
            "or set tokenizer.chat_template"
        )
    texts = (p["prompt"] if isinstance(p, dict) else p for p in prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in texts
    ]
