"""Prompt records: loading from JSONL or Python lists, and chat formatting.

A record is a dict with a ``prompt`` — a string, or a conversation (a list of ``{"role", "content"}``
messages, e.g. a system turn then a user turn, rendered through the tokenizer's chat template) — an
optional ``answer`` and any other fields; the whole record is handed to the reward as its ``example``.
"""

import os
from collections.abc import Sequence
from pathlib import Path

from fprobe.files import read_json_lines


def is_conversation(prompt) -> bool:
    """A non-empty list of messages, each a dict with a string ``role`` and a string ``content``."""
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    )


def _check_record(record, where: str) -> dict:
    """``record`` as a new dict, or a ValueError at ``where`` if it is not a dict whose prompt is a string or a
    conversation (``is_conversation``)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with a 'prompt' field, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not (isinstance(prompt, str) or is_conversation(prompt)):
        problem = "has no 'prompt' field" if "prompt" not in record else (
            "has a 'prompt' that is not a string or a list of {'role', 'content'} messages")
        raise ValueError(f"{where}: record {problem}")
    return {**record, "prompt": [dict(m) for m in prompt]} if isinstance(prompt, list) else dict(record)


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, one JSON object a line; blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return [_check_record(record, where) for where, record in read_json_lines(path, "prompt file")]


def _records_from_list(items: Sequence) -> list[dict]:
    """Records from a list of prompt strings or dicts."""
    return [
        {"prompt": item} if isinstance(item, str) else _check_record(item, f"prompt list item {index}")
        for index, item in enumerate(items)
    ]


def load_prompts(source: str | os.PathLike | Sequence) -> list[dict]:
    """Prompt records from a JSONL path (str or Path) or a list of strings or dicts.

    Records are copied; fields other than ``prompt`` and ``answer`` are kept for the reward.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        records, origin = _read_jsonl(path), str(path)
    elif isinstance(source, Sequence):
        records, origin = _records_from_list(source), "the given list"
    else:
        raise TypeError(f"prompts must be a JSONL path or a list, got {type(source).__name__}")
    if not records:
        raise ValueError(f"no prompts in {origin}")
    return records


def conversation(prompt) -> list[dict]:
    """The messages of a prompt: a conversation as it is, a string as a single user turn."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def apply_chat_template(tokenizer, prompts: Sequence[str | list | dict]) -> list[str]:
    """Each prompt (a string: a single user turn; or a conversation, system turn included) in the
    tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template; pass the prompts as raw text instead "
            "or set tokenizer.chat_template"
        )
    prompts = (p["prompt"] if isinstance(p, dict) else p for p in prompts)
    return [
        tokenizer.apply_chat_template(conversation(prompt), tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]


def prompt_texts(tokenizer, records: Sequence[dict], chat_template: bool) -> list[str]:
    """The text each record's prompt is tokenized from: in the chat template, or raw (then a conversation
    is refused, naming the first, since only the template can render it)."""
    if chat_template:
        return apply_chat_template(tokenizer, records)
    for index, record in enumerate(records):
        if isinstance(record["prompt"], list):
            raise ValueError(f"prompt {index} is a conversation: it needs the tokenizer's chat template "
                             "(chat_template=True, or --chat-template)")
    return [record["prompt"] for record in records]
