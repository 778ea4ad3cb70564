"""The built-in toy task: multi-digit addition written as text.

A prompt is ``"12+345="`` and the expected response is ``"357"`` followed by EOS.
``DEFAULT_MODEL_PATH`` is a tiny Qwen2 model shipped with fprobe that was trained only
partly on this task (``scripts/train_tiny_policy.py``), so that its sampled answers are
right about half of the time: a policy with something left to learn, and entropy to lose.
"""

import random
import re
from pathlib import Path

DEFAULT_MODEL_PATH = Path(__file__).parents[1] / "assets" / "tiny-adder"
DEFAULT_DIGITS = 3

_DIGITS_ONLY = re.compile(r"\d+")


def _random_addend(rng: random.Random, digits: int) -> int:
    """A number of 1 to ``digits`` digits, the length drawn uniformly first."""
    length = rng.randint(1, digits)
    low = 0 if length == 1 else 10 ** (length - 1)
    return rng.randint(low, 10**length - 1)


def make_prompts(n: int, seed: int, digits: int = DEFAULT_DIGITS) -> list[dict]:
    """``n`` addition problems ``{"prompt": "a+b=", "answer": "a+b"}``, reproducible from ``seed``."""
    if n < 0 or digits < 1:
        raise ValueError(f"need n >= 0 and digits >= 1, got n={n}, digits={digits}")
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = _random_addend(rng, digits), _random_addend(rng, digits)
        records.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return records


def verify(prompt: str, response: str, example: dict) -> float:
    """1.0 if ``response`` (surrounding whitespace ignored) is the digits of ``example["answer"]``.

    Anything else -- extra text, no digits, a missing or non-numeric answer -- scores 0.0;
    it never raises.
    """
    try:
        answer = str(example["answer"]).strip()
    except (KeyError, TypeError):
        return 0.0
    if not isinstance(response, str):
        return 0.0
    given = response.strip()
    if not (_DIGITS_ONLY.fullmatch(given) and _DIGITS_ONLY.fullmatch(answer)):
        return 0.0
    return 1.0 if int(given) == int(answer) else 0.0
