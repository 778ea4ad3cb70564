"""Rewards: any callable ``(prompt: str, response: str, example: dict) -> float``.

Built-ins are registered by name (``"numeric"``, ``"toy"``); ``resolve_reward`` also accepts a
callable or ``"module:function"``, and ``score`` applies a reward to a batch of rows.
"""

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

import torch

from fprobe.sampling import toy

_Reward = Callable[[str, str, dict], float]

_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_BOXED = "\\boxed{"
_GSM8K_MARKER = "####"


def _last_boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed); None if absent or unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(_BOXED) - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len(_BOXED) : i]
    return None


def _parse_number(text: str) -> Decimal | None:
    """``text`` as an exact decimal, thousands commas, ``$`` and spaces ignored; None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip()
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _extract_answer(response: str) -> Decimal | None:
    """The number a response gives as its answer, or None.

    Looks in the last ``\\boxed{...}`` (an unclosed one gives None), else after the last
    ``####`` (taking the first number there), else takes the last number anywhere in the response.
    """
    if _BOXED in response:
        region, pick = _last_boxed_content(response), 0
        if region is None:
            return None
    elif _GSM8K_MARKER in response:
        region, pick = response.rsplit(_GSM8K_MARKER, 1)[1], 0
    else:
        region, pick = response, -1
    numbers = _NUMBER.findall(region)
    return _parse_number(numbers[pick]) if numbers else None


def _expected_number(answer) -> Decimal | None:
    """``example["answer"]`` (int, float or numeric string) as an exact decimal, or None."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return Decimal(answer)
    if isinstance(answer, float):
        return Decimal(repr(answer)) if math.isfinite(answer) else None
    if isinstance(answer, str):
        return _parse_number(answer)
    return None


def numeric_match(prompt: str, response: str, example: dict) -> float:
    """1.0 if the response's answer equals ``example["answer"]`` numerically, else 0.0; never raises."""
    try:
        expected = _expected_number(example.get("answer"))
        given = _extract_answer(response) if isinstance(response, str) else None
    except (AttributeError, TypeError, ValueError):
        return 0.0
    if expected is None or given is None:
        return 0.0
    return 1.0 if given == expected else 0.0


BUILTIN_REWARDS: dict[str, _Reward] = {"numeric": numeric_match, "toy": toy.verify}


def _load_module_file(path: Path):
    """Execute a Python file as a fresh module (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"fprobe_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_module_here(name: str):
    """``importlib.import_module(name)``, also finding a module in the current directory (which the
    installed ``fprobe`` command, unlike ``python -m``, does not put on the import path)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name.partition(".")[0] or str(Path.cwd()) in sys.path:
            raise
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(Path.cwd()))


def _import_reward(spec: str) -> _Reward:
    """Import ``"module:function"`` (a module on the import path or in the current directory) or
    ``"path/to/file.py:function"``; only ever called because the user named it."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"reward {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    try:
        is_file = module_name.endswith(".py")
        if is_file and not Path(module_name).is_file():
            raise FileNotFoundError(f"no such file {module_name!r}")
        target = _load_module_file(Path(module_name)) if is_file else _import_module_here(module_name)
    except Exception as error:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {error}") from error
    try:
        for name in attribute.split("."):
            target = getattr(target, name)
    except AttributeError as error:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no {attribute!r}") from error
    if not callable(target):
        raise ValueError(f"reward {spec!r}: {attribute!r} is not callable")
    return target


def resolve_reward(spec: str | _Reward) -> _Reward:
    """A reward from a callable (returned as is), a built-in name, or ``"module:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reward must be a callable or a string, got {type(spec).__name__}")
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" in spec:
        return _import_reward(spec)
    known = ", ".join(sorted(BUILTIN_REWARDS))
    raise ValueError(f"unknown reward {spec!r}; known rewards: {known}, or 'module:function'")


def _reward_name(reward: _Reward) -> str:
    """A readable name for error messages: ``module.qualname`` where available."""
    name = getattr(reward, "__qualname__", None) or getattr(reward, "__name__", None)
    module = getattr(reward, "__module__", None)
    if name is None:
        return repr(reward)
    return f"{module}.{name}" if module else name


def _real_number(value) -> float | None:
    """``value`` as a float if it is a real number (int, float, NumPy scalar, one-element real tensor);
    None for anything else, bools and strings such as ``"1.0"`` included."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def score(reward: _Reward, prompts: Sequence[str], responses: Sequence[str], examples: Sequence[dict]) -> list[float]:
    """``reward`` applied row by row; a raise, a value that is not a real number, or a non-finite one is a
    ValueError naming the row and its prompt."""
    if not len(prompts) == len(responses) == len(examples):
        raise ValueError(
            f"score needs one prompt, response and example per row, got "
            f"{len(prompts)} prompts, {len(responses)} responses, {len(examples)} examples"
        )
    rewards = []
    for row, (prompt, response, example) in enumerate(zip(prompts, responses, examples)):
        try:
            returned = reward(prompt, response, example)
        except Exception as error:
            raise ValueError(f"reward {_reward_name(reward)} failed on row {row}: {error!r}") from error
        value = _real_number(returned)
        if value is None:
            raise ValueError(
                f"reward {_reward_name(reward)} returned {returned!r} ({type(returned).__name__}) on row {row} "
                f"(prompt {prompt[:60]!r}): a reward must be a real number"
            )
        if not math.isfinite(value):
            raise ValueError(f"reward {_reward_name(reward)} returned {value} on row {row} (prompt {prompt[:60]!r})")
        rewards.append(value)
    return rewards


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """A_i = r_i − mean_{group(i)} r, divided by std_{group(i)} r + eps (``scale="group"``), by the
    batch's std + eps (``"batch"``), or not at all (``"none"``); stds unbiased and eps = 1e-4, as in TRL's
    ``GRPOTrainer._generate_and_score_completions`` (trl 1.16: ``advantages / (std_rewards + 1e-4)``)."""
    rewards = rewards.double()
    _, group_index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(rewards))
    means = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, rewards) / counts
    centred = rewards - means[group_index]
    if scale == "none":
        return centred
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale != "group":
        raise ValueError(f"unknown advantage scale {scale!r}: use 'group', 'batch' or 'none'")
    squares = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, centred**2)
    stds = (squares / (counts - 1).clamp(min=1)).sqrt()
    return centred / (stds[group_index] + eps)
