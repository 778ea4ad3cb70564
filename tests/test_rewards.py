import math
import sys

import numpy as np
import pytest
import torch

from fprobe.sampling import rewards, toy
from fprobe.sampling.rewards import numeric_match, resolve_reward, score


def always_half(prompt, response, example):
    return 0.5


def fails_on_b(prompt, response, example):
    if response == "b":
        raise RuntimeError("cannot score b")
    return 1.0


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("The answer is \\boxed{42}.", "42", 1.0),
        ("first \\boxed{7}, then \\boxed{42}", 42, 1.0),
        ("\\boxed{\\text{about } 42} and later 99", 42, 1.0),
        ("\\boxed{41}", 42, 0.0),
        ("work... 3 + 4 = 7\n#### 42", "42", 1.0),
        ("#### 1\n more text\n#### 42 apples", 42, 1.0),
        ("I think 12, no, 42", 42, 1.0),
        ("42 was wrong, it is 43", 42, 0.0),
        ("it drops to -5 degrees", -5, 1.0),
        ("from 2023-5", 5, 1.0),
        ("#### 0.25", 0.25, 1.0),
        ("#### 0.250", "0.25", 1.0),
        ("#### 2.5", 2, 0.0),
        ("#### 1,234,567", "1,234,567", 1.0),
        ("total $1,234.50", 1234.5, 1.0),
        ("the numbers 3, 4, 5", 5, 1.0),
        ("#### 7", 7.0, 1.0),
    ],
)
def test_numeric_match_cases(response, answer, expected):
    assert numeric_match("q", response, {"answer": answer}) == expected


@pytest.mark.parametrize(
    ("response", "example"),
    [
        ("no number here", {"answer": "1"}),
        ("", {"answer": "1"}),
        ("\\boxed{42", {"answer": "42"}),
        ("\\boxed{}", {"answer": "0"}),
        ("#### ", {"answer": "0"}),
        ("42", {}),
        ("42", {"answer": None}),
        ("42", {"answer": "forty-two"}),
        ("42", {"answer": float("nan")}),
        ("1", {"answer": True}),
        (None, {"answer": "1"}),
        ("42", None),
    ],
)
def test_numeric_match_malformed_scores_zero(response, example):
    assert numeric_match("q", response, example) == 0.0


def test_resolve_reward_builtin_names():
    assert resolve_reward("numeric") is numeric_match
    assert resolve_reward("toy") is toy.verify


def test_resolve_reward_passes_callables_through():
    assert resolve_reward(always_half) is always_half


def test_resolve_reward_imports_module_function():
    assert resolve_reward(f"{__name__}:always_half")("p", "r", {}) == 0.5
    assert resolve_reward("fprobe.sampling.toy:verify") is toy.verify


def test_resolve_reward_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"'nope'.*numeric.*toy"):
        resolve_reward("nope")


def test_resolve_reward_import_errors_are_value_errors():
    with pytest.raises(ValueError, match="no_such_module_xyz") as info:
        resolve_reward("no_such_module_xyz:f")
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(ValueError, match="no_such_function"):
        resolve_reward("fprobe.sampling.toy:no_such_function")
    with pytest.raises(ValueError, match="not callable"):
        resolve_reward("fprobe.sampling.toy:DEFAULT_DIGITS")


def test_score_rows():
    assert score(resolve_reward("numeric"), ["a", "b"], ["1", "x"], [{"answer": 1}, {"answer": 2}]) == [1.0, 0.0]


def test_score_names_the_failing_row_and_reward():
    with pytest.raises(ValueError, match=r"fails_on_b.*row 1") as info:
        score(fails_on_b, ["p"] * 3, ["a", "b", "c"], [{}] * 3)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_score_rejects_non_finite_rewards():
    with pytest.raises(ValueError, match="row 0"):
        score(lambda p, r, e: math.nan, ["p"], ["r"], [{}])


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        score(always_half, ["p", "q"], ["r"], [{}])


# --- reward modules by name or path; rewards must be real numbers


REWARD_MODULE = "def half(prompt, response, example):\n    return 0.5\n"


def test_reward_module_in_the_working_directory_is_importable(tmp_path, monkeypatch):
    (tmp_path / "fprobe_cwd_reward.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert str(tmp_path) not in sys.path
    reward = rewards.resolve_reward("fprobe_cwd_reward:half")
    assert reward("p", "r", {}) == 0.5
    assert sys.path == path_before, "the import path is restored"


def test_reward_given_as_a_file_path(tmp_path):
    path = tmp_path / "data" / "my_reward.py"
    path.parent.mkdir()
    path.write_text(REWARD_MODULE)
    assert rewards.resolve_reward(f"{path}:half")("p", "r", {}) == 0.5
    with pytest.raises(ValueError, match="no such file"):
        rewards.resolve_reward(f"{tmp_path / 'missing.py'}:half")


def test_an_unknown_module_still_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cannot import module 'fprobe_no_such_module'"):
        rewards.resolve_reward("fprobe_no_such_module:f")


@pytest.mark.parametrize("value", ["1.0", True, None, [1.0], torch.tensor([1.0, 0.0]), 1j])
def test_a_reward_that_is_not_a_real_number_is_rejected_naming_row_and_prompt(value):
    reward = lambda prompt, response, example: value if prompt == "2+2=" else 1.0
    with pytest.raises(ValueError) as error:
        rewards.score(reward, ["1+1=", "2+2="], ["2", "4"], [{}, {}])
    assert f"returned {value!r} ({type(value).__name__}) on row 1 (prompt '2+2=')" in str(error.value)


@pytest.mark.parametrize("value", [1, 0.25, np.float32(0.25), np.int64(1), torch.tensor(0.25), torch.tensor([2])])
def test_real_number_rewards_of_any_kind_are_accepted(value):
    assert rewards.score(lambda *_: value, ["p"], ["r"], [{}]) == [float(value)]
