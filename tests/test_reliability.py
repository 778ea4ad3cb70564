"""Issue 12: results lost, duplicated or silently wrong, crashes and unclear messages — one test (or a
few) per case, numbered as in the issue, then cases found by attacking the fixes."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import VOCAB, make_batch
from test_cli import SMALL, SUBPROCESS_ENV, save_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

import fprobe
from fprobe.cli import command as cli
from fprobe.rl import optim
from fprobe.sampling import prompts
from fprobe import files
from fprobe.sampling import rewards
from fprobe.sampling import generate as sampling
from fprobe.sampling import toy
from fprobe import tree
from fprobe.rollouts import Rollouts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-1", seed=0)


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if the CLI starts probing a model: path and option errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("probe_model ran although the options were invalid")

    monkeypatch.setattr(cli, "probe_model", refuse)


def one_error_line(capsys) -> str:
    """The one error line on stderr (warning lines aside), with no traceback anywhere."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("fprobe: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("fprobe: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def run_python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )


# ---------------------------------------------------------------------------------------------------------
# 1. concurrent appends keep every record exactly once

APPENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fprobe import files
    path, writer, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    (path.parent / f"ready-{writer}").touch()
    while len(list(path.parent.glob("ready-*"))) < 2:
        time.sleep(0.01)
    for i in range(n):
        files.append_json_line(path, {"key": {"writer": writer, "i": i}}, unique="key")
""")


def test_two_processes_appending_keep_every_record_exactly_once(tmp_path):
    out = tmp_path / "r.jsonl"
    writers = [run_python(APPENDER, str(out), w, "200") for w in ("a", "b")]
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    keys = [(r["key"]["writer"], r["key"]["i"]) for r in map(json.loads, out.read_text().splitlines())]
    assert sorted(keys) == sorted((w, i) for w in ("a", "b") for i in range(200))


def test_append_skips_a_key_already_written(tmp_path):
    out = tmp_path / "r.jsonl"
    assert files.append_json_line(out, {"key": {"model": "m", "lora": (2, 4.0)}, "v": 1}, unique="key")
    assert not files.append_json_line(out, {"key": {"lora": [2, 4.0], "model": "m"}, "v": 2}, unique="key")
    assert [json.loads(line)["v"] for line in out.read_text().splitlines()] == [1]


def test_two_concurrent_cli_runs_on_one_checkpoint_write_one_record(tmp_path, checkpoint):
    out = tmp_path / "r.jsonl"
    argv = [sys.executable, "-m", "fprobe", "probe", "--model", str(checkpoint), *SMALL, "--out", str(out)]
    runs = [subprocess.Popen(argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=180) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    assert len(out.read_text().splitlines()) == 1
    reports = "".join(stdout for stdout, _ in outputs)
    skipped = reports.count("already in") + reports.count("a concurrent run wrote this record")
    assert reports.count(f"wrote {out}") == 1 and skipped == 1, reports


# ---------------------------------------------------------------------------------------------------------
# 2. a checkpoint named twice is probed once


def test_a_checkpoint_named_twice_is_one_model(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run / f"checkpoint-{step}", seed=step)
    one = str(run / "checkpoint-1")
    assert cli.expand_models([one, one]) == [str((run / "checkpoint-1").resolve())]
    assert cli.expand_models([str(run), str(run / "checkpoint-2")]) == [
        str((run / f"checkpoint-{step}").resolve()) for step in (1, 2)
    ]


# ---------------------------------------------------------------------------------------------------------
# 3. a closed stdout loses neither the record nor prints a traceback


def test_closed_stdout_keeps_the_record_and_prints_no_traceback(tmp_path, checkpoint):
    out = tmp_path / "r.json"
    argv = [sys.executable, "-m", "fprobe", "probe", "--model", str(checkpoint), *SMALL, "--out", str(out)]
    proc = subprocess.Popen(argv, env={**SUBPROCESS_ENV, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -c5` does once it has its bytes
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=180) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert json.loads(out.read_text())["model"] == str(checkpoint.resolve())


# ---------------------------------------------------------------------------------------------------------
# 4., 5. output and plot paths are checked before any work; the record is written before the plot


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--plot", "{tmp}/x.notanimage"], "'.notanimage' is not an image type matplotlib writes; use one of"),
        (["--plot", "{tmp}/x"], "no image suffix"),
        (["--plot", "{tmp}/afile/x.png"], "afile is a file, not a folder"),
        (["--out", "{tmp}/afile/r.json"], "afile is a file, not a folder"),
        (["--out", "{tmp}/afile/deeper/r.jsonl"], "afile is a file, not a folder"),
        (["--out", "{tmp}"], "is a folder, not a file"),
    ],
)
def test_unwritable_output_and_plot_paths_fail_before_any_work(
    options, message, tmp_path, checkpoint, no_model_work, capsys
):
    (tmp_path / "afile").write_text("a regular file\n")
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    argv = ["sweep", "--model", str(checkpoint), *SMALL, "--out", str(tmp_path / "s.json"), *options]
    assert cli.main(argv) == 2
    assert message in one_error_line(capsys)


def test_record_is_written_before_the_plot_is_made(tmp_path, checkpoint, monkeypatch, capsys):
    def failing_plot(self, path=None):
        raise OSError("disk full while plotting")

    monkeypatch.setattr(fprobe.SweepResult, "plot", failing_plot)
    out = tmp_path / "s.json"
    assert cli.main(["sweep", "--model", str(checkpoint), *SMALL, "--lrs", "1e-6,1e-5", "--out", str(out)]) == 2
    assert "disk full while plotting" in one_error_line(capsys)
    assert json.loads(out.read_text())["sweep"]["delta_h_true"][0] is not None


# ---------------------------------------------------------------------------------------------------------
# 6. result files follow the umask or keep their mode; symlinks are written through


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_new_result_files_follow_the_umask(tmp_path, umask_027):
    files.write_atomic(tmp_path / "r.json", "{}\n")
    files.append_json_line(tmp_path / "r.jsonl", {"key": 1}, unique="key")
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "r.jsonl").stat().st_mode) == 0o640


def test_rewritten_result_file_keeps_its_mode(tmp_path, umask_027):
    out = tmp_path / "r.json"
    out.write_text("old\n")
    out.chmod(0o604)
    files.write_atomic(out, "new\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o604 and out.read_text() == "new\n"


def test_a_symlinked_output_is_written_through_to_its_target(tmp_path):
    target, link = tmp_path / "store" / "r.json", tmp_path / "r.json"
    target.parent.mkdir()
    target.write_text("old\n")
    link.symlink_to(target)
    files.write_atomic(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    jsonl_target, jsonl_link = tmp_path / "store" / "r.jsonl", tmp_path / "r.jsonl"
    jsonl_link.symlink_to(jsonl_target)
    files.append_json_line(jsonl_link, {"key": 1}, unique="key")
    assert jsonl_link.is_symlink() and jsonl_target.read_text() == '{"key": 1}\n'


def test_a_pipe_output_is_written_to_not_replaced(tmp_path):
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    files.check_writable(fifo, "--out")
    files.write_atomic(fifo, '{"a": 1}\n')
    reader.join(timeout=10)
    assert received == ['{"a": 1}\n'] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_out_dev_stdout_prints_the_record(tmp_path, checkpoint):
    """``--out /dev/stdout --quiet``: the JSON record on stdout (before: /dev/stdout renamed over, as root)."""
    argv = [sys.executable, "-m", "fprobe", "probe", "--model", str(checkpoint), *SMALL, "--out", "/dev/stdout", "--quiet"]
    done = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == str(checkpoint.resolve())
    assert Path("/dev/stdout").is_symlink() or not Path("/dev/stdout").is_file()


def test_jsonl_output_to_a_pipe_is_refused_before_any_work(tmp_path, checkpoint, no_model_work, capsys):
    fifo = tmp_path / "r.jsonl"
    os.mkfifo(fifo)
    assert cli.main(["probe", "--model", str(checkpoint), *SMALL, "--out", str(fifo)]) == 2
    assert "JSONL results are read back to resume, so they need a regular file" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------------
# 7. an imported optimizer state is checked, naming the parameter


@pytest.fixture
def adamw_state():
    """(state_dict, names, params) of a torch AdamW after one step on a two-parameter model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    return opt.state_dict(), list(params), params


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(1, dtype=torch.float64)),
         "parameter '0.bias': exp_avg has shape (1,), the parameter (2,)"),
        (lambda sd: sd["state"][0].update(exp_avg_sq=torch.zeros(2, 3, dtype=torch.long)),
         "parameter '0.weight': exp_avg_sq has dtype torch.int64"),
        (lambda sd: sd["state"][0].pop("exp_avg"), "parameter '0.weight': 'exp_avg' is missing"),
        (lambda sd: sd["state"][0].update(step=torch.tensor(-1.0)), "parameter '0.weight': step"),
        (lambda sd: sd.pop("param_groups"), "no param_groups (missing or empty)"),
        (lambda sd: sd.update(param_groups=[]), "no param_groups (missing or empty)"),
        (lambda sd: sd["param_groups"][0].pop("params"), "param_groups[0] is not a param group"),
        (lambda sd: sd.pop("state"), "not a torch optimizer state_dict"),
        (lambda sd: sd["state"].update({5: {}}), "parameter indices [5] that no param group lists"),
    ],
)
def test_a_malformed_optimizer_state_is_rejected(adamw_state, corrupt, message):
    state_dict, names, params = adamw_state
    optim.from_torch(state_dict, names, params)  # the intact state imports
    corrupt(state_dict)
    with pytest.raises(ValueError) as error:
        optim.from_torch(state_dict, names, params)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# 8. rollouts: unconditioned response tokens, non-integer ids, ids outside the vocabulary


def test_a_response_token_after_padding_only_is_rejected_naming_the_row():
    ids = torch.full((3, 6), 5)
    attention = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]).bool()
    with pytest.raises(ValueError, match=r"rows \[1\] have a response token whose whole prefix is padding"):
        Rollouts(ids, attention, response)
    attention[1, 1] = 1  # one prompt token before the response: fine
    assert len(Rollouts(ids, attention, response)) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_token_ids_are_rejected(dtype):
    batch = make_batch()
    with pytest.raises(TypeError, match=f"integer token ids, got dtype {dtype}"):
        Rollouts(batch.input_ids.to(dtype), batch.attention_mask, batch.response_mask)


@pytest.mark.parametrize("bad_id", [VOCAB, -1])
def test_token_ids_outside_the_vocabulary_are_rejected_naming_the_rows(load_policy, bad_id):
    policy, batch = load_policy("gpt2"), make_batch()
    ids = batch.input_ids.clone()
    ids[2, -1] = bad_id
    ids[4, 0] = bad_id
    E = Rollouts(ids, batch.attention_mask, batch.response_mask)
    with pytest.raises(ValueError, match=rf"rows \[2, 4\] hold token ids outside the model's vocabulary \[0, {VOCAB}\)"):
        fprobe.token_stats(policy, policy.params, E)


# ---------------------------------------------------------------------------------------------------------
# 9. Δθ of another dtype or device than the parameters


@pytest.mark.parametrize(
    ("model_dtype", "delta_dtype", "device"),
    [(torch.float64, torch.float32, "cpu"), (torch.bfloat16, torch.float64, "cpu"), (torch.float64, torch.float64, "meta")],
)
def test_delta_of_another_dtype_or_device_is_rejected_naming_the_parameter(load_policy, model_dtype, delta_dtype, device):
    policy = load_policy("gpt2", model_dtype)
    delta = {n: torch.zeros(p.shape, dtype=delta_dtype, device=device) for n, p in policy.params.items()}
    first = next(iter(policy.params))
    attribute, mine, theirs = (
        ("device", "meta", "cpu") if device == "meta" else ("dtype", delta_dtype, model_dtype)
    )
    with pytest.raises(ValueError) as error:
        fprobe.entropy_change(policy, make_batch(with_advantages=False), delta)
    assert str(error.value) == f"delta[{first!r}] has {attribute} {mine}, the parameter has {theirs}"


def test_check_like_accepts_a_matching_tree_and_names_a_non_tensor():
    ref = {"w": torch.zeros(2, dtype=torch.float64)}
    assert tree.check_like(ref, {"w": torch.ones(2, dtype=torch.float64)})["w"].sum() == 2
    with pytest.raises(TypeError, match=r"delta\['w'\] is a list, not a tensor"):
        tree.check_like(ref, {"w": [1.0, 1.0]}, "delta")


# ---------------------------------------------------------------------------------------------------------
# 10. sampling from a model with NaN weights raises


def test_sampling_a_model_with_nan_weights_raises():
    policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    with torch.no_grad():
        next(policy.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="logits are NaN or infinite in 4 of 4 rows"):
        fprobe.sample(policy, tokenizer, toy.make_prompts(8, seed=0), n_eval=2, n_update_prompts=1, group_size=2,
                      reward="toy", max_new_tokens=3)


def test_prompts_the_model_has_no_embedding_for_are_named_before_generation():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=15, n_positions=32, bos_token_id=2, eos_token_id=1)
    policy = fprobe.Policy(AutoModelForCausalLM.from_config(config).double().eval())  # 15 ids; the tokenizer has 17 ("=" is 15)
    tokenizer = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    pool = [{"prompt": "1+1"}, {"prompt": "1+1="}]
    assert max(tokenizer("1+1")["input_ids"]) < 15 <= max(tokenizer("1+1=")["input_ids"])
    with pytest.raises(ValueError, match=r"prompts \[1\] \(1 in all\) tokenize to ids outside the model's vocabulary \[0, 15\)"):
        fprobe.sample(policy, tokenizer, pool, n_eval=2, n_update_prompts=1, group_size=1, reward="toy", max_new_tokens=2)


def test_check_scores_accepts_masked_logits_and_rejects_rows_without_a_distribution():
    masked = torch.tensor([[0.0, -float("inf"), 1.0], [2.0, 1.0, -float("inf")]])
    sampling.check_scores(masked)  # -inf marks excluded tokens: fine
    for bad in (float("nan"), float("inf")):
        scores = masked.clone()
        scores[1, 0] = bad
        with pytest.raises(FloatingPointError, match="in 1 of 2 rows"):
            sampling.check_scores(scores)
    with pytest.raises(FloatingPointError, match="in 1 of 2 rows"):
        sampling.check_scores(torch.tensor([[0.0, 1.0], [-float("inf"), -float("inf")]]))


# ---------------------------------------------------------------------------------------------------------
# 11. most of a bf16 update rounded away: a warning that says what to do


def test_bf16_step_that_loses_most_of_its_update_warns(load_policy):
    policy, batch = load_policy("gpt2", torch.bfloat16), make_batch()
    opt = fprobe.optim.adamw(lr=1e-7, weight_decay=0.0)
    with pytest.warns(fprobe.UpdateLostWarning) as caught:
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch)
    assert step.update_lost > 0.5
    (warning,) = caught
    message = str(warning.message)
    assert f"{step.update_lost:.1%} of the update was rounded away by the bfloat16 parameters" in message
    assert "dtype=torch.float32" in message and "LoRA adapter (lora=...)" in message
    assert warning.filename == __file__, "attributed to the caller's line"


def test_lora_on_a_bf16_base_keeps_its_update_as_the_warning_says(load_policy):
    policy = load_policy("gpt2", torch.bfloat16, lora=(2, 4, ["c_attn"]))
    assert {p.dtype for p in policy.params.values()} == {torch.float32}
    assert {p.dtype for p in policy.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    opt = fprobe.optim.adamw(lr=1e-7, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.UpdateLostWarning)
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), make_batch())
    assert step.update_lost is None and step.delta_l2 > 0


def test_bf16_step_that_keeps_most_of_its_update_does_not_warn(load_policy):
    policy, batch = load_policy("gpt2", torch.bfloat16), make_batch()
    opt = fprobe.optim.adamw(lr=1e-2, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.UpdateLostWarning)
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch)
    assert step.update_lost < 0.5


# ---------------------------------------------------------------------------------------------------------
# 12. option errors are one line, not a traceback


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "--device", "bogus"], "--device 'bogus' is not a device"),
        (["sweep", "--out", "/"], "--out '/' is a folder, not a file"),
        (["sweep", "--out", ""], "--out '' is a folder, not a file"),
        (["probe", "--out", ""], "--out '' is a folder, not a file"),
    ],
)
def test_bad_device_and_output_are_one_error_line(argv, message, no_model_work, capsys):
    assert cli.main(argv) == 2
    assert message in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------------
# 13. learning rates: finite and non-negative, checked up front


@pytest.mark.parametrize("text", ["-1e-6", "nan", "inf", "-inf", "fast"])
def test_negative_or_non_finite_learning_rates_are_usage_errors(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe", f"--lr={text}"])
    assert exit_info.value.code == 2
    assert f"argument --lr: expected a finite, non-negative learning rate, got {text!r}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sweep", f"--lrs=1e-6,{text}"])
    assert f"got '1e-6,{text}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "text", "expected"),
    [(o, t, "a positive whole number") for o in ("--n-eval", "--n-update-prompts", "--group-size", "--max-new-tokens",
                                                "--micro-batch", "--generation-batch") for t in ("0", "-2", "1.5")]
    + [(o, t, "a finite number > 0") for o in ("--temperature", "--timeout") for t in ("0", "-1", "nan", "inf")],
)
def test_sizes_and_temperature_are_checked_by_the_parser(option, text, expected, capsys):
    """Before any model is loaded (a large model takes minutes), not after it."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe", f"{option}={text}"])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected {expected}, got {text!r}" in capsys.readouterr().err


def test_zero_learning_rate_stays_allowed():
    assert cli.parse_lr("0") == 0.0 and cli.parse_lr("1e-6") == 1e-6
    assert cli.parse_lrs("0,1e-6") == [0.0, 1e-6]


# ---------------------------------------------------------------------------------------------------------
# 14. a reward module in the working directory, or given as a file path


REWARD_MODULE = "def half(prompt, response, example):\n    return 0.5\n"


def test_reward_module_in_the_working_directory_is_importable(tmp_path, monkeypatch):
    (tmp_path / "fprobe_issue12_reward.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert str(tmp_path) not in sys.path
    reward = rewards.resolve_reward("fprobe_issue12_reward:half")
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


# ---------------------------------------------------------------------------------------------------------
# 15. messages name their subject


def test_non_utf8_prompt_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "1+1="}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: the prompt file is not UTF-8 text \(byte 16 of the line\)"):
        prompts.load_prompts(path)


def test_a_prompt_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    assert prompts.load_prompts(path) == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}]


def test_a_truncated_checkpoint_is_named_and_earlier_records_kept(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run / f"checkpoint-{step}", seed=step)
    weights = run / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "r.jsonl"
    capsys.readouterr()
    assert cli.main(["probe", "--model", str(run), *SMALL, "--out", str(out), "--quiet"]) == 2
    assert f"{(run / 'checkpoint-2').resolve()}: " in one_error_line(capsys)
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["model"] == str((run / "checkpoint-1").resolve())


def test_a_model_folder_without_weights_is_not_called_uncached(tmp_path, checkpoint):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    with pytest.raises(FileNotFoundError) as error:
        fprobe.Policy.from_pretrained(folder)
    assert "local cache" not in str(error.value) and str(folder) in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# --traceback (issue 13, item 10)


def test_traceback_option_and_environment_variable_reraise(no_model_work, monkeypatch, capsys):
    argv = ["probe", "--device", "bogus"]
    with pytest.raises(ValueError, match="--device 'bogus' is not a device"):
        cli.main([*argv, "--traceback"])
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="--device 'bogus' is not a device"):
        cli.main(argv)
    monkeypatch.setenv(cli.TRACEBACK_ENV, "0")
    assert cli.main(argv) == 2
    one_error_line(capsys)


def test_traceback_is_not_part_of_the_resume_key():
    parse = lambda *extra: cli.resolve_defaults(cli.build_parser().parse_args(["probe", *extra]))
    assert cli.settings_key(parse("--traceback"), "m") == cli.settings_key(parse(), "m")


# ---------------------------------------------------------------------------------------------------------
# Also: all-zero advantages warn; rewards must be real numbers


def test_all_zero_advantages_warn_and_the_step_is_weight_decay_alone(load_policy):
    policy, batch = load_policy("gpt2"), make_batch()
    U = Rollouts(batch.input_ids, batch.attention_mask, batch.response_mask,
                 advantages=torch.zeros(len(batch), dtype=torch.float64), group_ids=torch.arange(len(batch)))
    opt = fprobe.optim.adamw(lr=1e-3, weight_decay=0.1)
    with pytest.warns(fprobe.ZeroAdvantagesWarning, match="Δθ is weight decay"):
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U)
    for name, p in policy.params.items():  # θ(1 − ηλ) − θ, and no gradient term
        torch.testing.assert_close(step.delta[name], p * (1 - 1e-3 * 0.1) - p, rtol=0, atol=1e-18)


def test_nonzero_advantages_do_not_warn(load_policy):
    policy, U = load_policy("gpt2"), make_batch()
    opt = fprobe.optim.adamw(lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.ZeroAdvantagesWarning)
        fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U)


@pytest.mark.parametrize("value", ["1.0", True, None, [1.0], torch.tensor([1.0, 0.0]), 1j])
def test_a_reward_that_is_not_a_real_number_is_rejected_naming_row_and_prompt(value):
    reward = lambda prompt, response, example: value if prompt == "2+2=" else 1.0
    with pytest.raises(ValueError) as error:
        rewards.score(reward, ["1+1=", "2+2="], ["2", "4"], [{}, {}])
    assert f"returned {value!r} ({type(value).__name__}) on row 1 (prompt '2+2=')" in str(error.value)


@pytest.mark.parametrize("value", [1, 0.25, np.float32(0.25), np.int64(1), torch.tensor(0.25), torch.tensor([2])])
def test_real_number_rewards_of_any_kind_are_accepted(value):
    assert rewards.score(lambda *_: value, ["p"], ["r"], [{}]) == [float(value)]


# ---------------------------------------------------------------------------------------------------------
# Attacks on the fixes


def test_a_record_torn_by_a_killed_writer_is_cut_off_and_the_run_resumes(tmp_path):
    out = tmp_path / "r.jsonl"
    whole = json.dumps({"key": {"model": "a"}}) + "\n"
    out.write_text(whole + '{"key": {"model": "b"}, "result": {"delta')  # killed mid-line
    assert [r["key"] for _, r in files.read_jsonl_locked(out, "results file")] == [{"model": "a"}]
    assert files.append_json_line(out, {"key": {"model": "b"}}, unique="key")
    assert out.read_text() == whole + json.dumps({"key": {"model": "b"}}) + "\n"


KILLED_MID_WRITE = textwrap.dedent("""
    import fcntl, os, sys, time
    file = open(sys.argv[1], "ab")
    fcntl.flock(file.fileno(), fcntl.LOCK_EX)
    os.write(file.fileno(), b'{"key": {"model": "b"}, "res')
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_writer_killed_mid_line_holding_the_lock_blocks_nothing(tmp_path):
    import fcntl

    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"key": {"model": "a"}}) + "\n")
    writer = run_python(KILLED_MID_WRITE, str(out))
    assert writer.stdout.readline() == "locked\n"
    writer.kill()
    writer.communicate()
    with out.open("ab") as probe:
        fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the dead writer's lock remained
    assert files.append_json_line(out, {"key": {"model": "b"}}, unique="key")
    assert [r["key"]["model"] for r in map(json.loads, out.read_text().splitlines())] == ["a", "b"]


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": 1}')  # written by hand or by another tool
    assert files.append_json_line(out, {"key": 2}, unique="key")
    assert out.read_text() == '{"key": 1}\n{"key": 2}\n'


def test_a_malformed_earlier_line_is_still_an_error_and_the_file_is_untouched(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": 1}\n{truncated\n{"key": 3}\n')
    with pytest.raises(ValueError, match="r.jsonl:2: malformed JSON"):
        files.append_json_line(out, {"key": 4}, unique="key")
    assert out.read_text() == '{"key": 1}\n{truncated\n{"key": 3}\n'


def test_an_output_in_folders_still_to_be_made_is_writable(tmp_path):
    files.check_writable(tmp_path / "new" / "deeper" / "r.json", "--out")
    files.append_json_line(tmp_path / "new" / "deeper" / "r.jsonl", {"key": 1}, unique="key")
    assert (tmp_path / "new" / "deeper" / "r.jsonl").read_text() == '{"key": 1}\n'
