"""The ``fprobe`` command line: the no-argument run against the Python API, resuming an interrupted
multi-checkpoint run, sweeps, optimizer states, and one-line errors that leave earlier records intact."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fprobe
from fprobe.cli import command as cli
from fprobe.sampling import toy
from helpers import SUBPROCESS_ENV, no_pass, save_checkpoint, strict_json

SMALL = ["--n-eval", "4", "--n-update-prompts", "2", "--group-size", "2", "--max-new-tokens", "4"]
REWARDS = "fprobe_cli_test_rewards"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A training run's folder of three checkpoints (natural order 5, 10, 20)."""
    root = tmp_path_factory.mktemp("run")
    for seed, step in enumerate((20, 5, 10)):
        save_checkpoint(root / f"checkpoint-{step}", seed)
    return root


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    """A module of test rewards, importable as ``fprobe_cli_test_rewards:<name>``."""
    root = tmp_path_factory.mktemp("rewards")
    (root / f"{REWARDS}.py").write_text(
        "import time\n\n"
        "def parity(prompt, response, example):\n    return float(sum(map(ord, response)) % 2)\n\n"
        "def slow(prompt, response, example):\n    time.sleep(0.25)\n    return parity(prompt, response, example)\n\n"
        "def explode(prompt, response, example):\n    raise RuntimeError('reward server unreachable')\n"
    )
    return root


@pytest.fixture
def rewards_importable(reward_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_dir))


def run_cli(*argv, env=SUBPROCESS_ENV, cwd=None, **kw):
    return subprocess.Popen([*argv], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_probe_without_arguments_matches_the_python_api(tmp_path):
    """``python -m fprobe probe`` (and the ``fprobe`` console script) with no options: the built-in toy
    policy, end to end, JSON equal to the library's numbers on the same seed (its time is a benchmark's
    business, not a test's: on a loaded machine it took 92 s)."""
    module_out, script_dir = tmp_path / "m" / "results.json", tmp_path / "s"
    script_dir.mkdir()
    script = Path(sys.executable).parent / "fprobe"
    module_run = run_cli(sys.executable, "-m", "fprobe", "probe", "--out", str(module_out))
    script_run = run_cli(str(script), "probe", "--quiet", cwd=script_dir) if script.exists() else None
    stdout, stderr = module_run.communicate(timeout=180)
    assert module_run.returncode == 0, stderr
    for needle in ("ΔH_true", "δH₁", "ΔH_true / δH₁", "ESS fraction", "‖Δθ‖₂", "time jvp"):
        assert needle in stdout
    record = json.loads(module_out.read_text())

    args = cli.resolve_defaults(cli.build_parser().parse_args(["probe"]))
    policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=torch.float64, temperature=args.temperature)
    tokenizer = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    E, U = fprobe.sample(
        policy, tokenizer, toy.make_prompts(cli.TOY_POOL_SIZE, args.seed), n_eval=args.n_eval,
        n_update_prompts=args.n_update_prompts, group_size=args.group_size, reward=toy.verify,
        max_new_tokens=policy.model.generation_config.max_new_tokens, seed=args.seed,
    )
    expected = fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=cli.DEFAULT_LR))
    for name in ("delta_h_true", "delta_h1", "h_orig", "ess_fraction", "delta_l2"):
        assert record["result"][name] == pytest.approx(getattr(expected, name), rel=1e-12, abs=0), name
    assert 0.99 < record["result"]["ratio"] < 1.01, "the default learning rate should sit in the linear regime"
    assert record["sampling"]["mean_reward"] == pytest.approx(float(U.rewards.mean()), abs=0)

    if script_run is not None:
        _, stderr = script_run.communicate(timeout=180)
        assert script_run.returncode == 0, stderr
        script_record = json.loads((script_dir / "results.json").read_text())
        assert script_record["result"]["delta_h1"] == record["result"]["delta_h1"]


def test_interrupted_multi_checkpoint_run_resumes_with_every_record_once(
    tmp_path, checkpoints, reward_dir, rewards_importable
):
    out = tmp_path / "run.jsonl"
    argv = ["probe", "--model", str(checkpoints), "--reward", f"{REWARDS}:slow", *SMALL, "--out", str(out), "--quiet"]
    proc = run_cli(sys.executable, "-m", "fprobe", *argv, env={**SUBPROCESS_ENV, "PYTHONPATH": str(reward_dir)})
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().endswith("\n")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no record within 120 s"
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    interrupted = out.read_text()
    assert 1 <= interrupted.count("\n") < 3, "the run should have been killed between checkpoints"

    assert cli.main(argv) == 0
    resumed = out.read_text()
    assert resumed.startswith(interrupted), "earlier records are kept byte for byte"
    records = [json.loads(line) for line in resumed.splitlines()]
    expected = [str((checkpoints / f"checkpoint-{step}").resolve()) for step in (5, 10, 20)]
    assert [r["model"] for r in records] == expected
    assert all(r["key"]["model"] == r["model"] and r["key"]["reward"] == f"{REWARDS}:slow" for r in records)

    assert cli.main(argv) == 0
    assert out.read_text() == resumed, "a complete run is skipped entirely"


def test_sweep_with_lora_writes_table_and_plot(tmp_path, checkpoints, rewards_importable):
    out = tmp_path / "sweep.json"
    model = str(checkpoints / "checkpoint-5")
    argv = [
        "sweep", "--model", model, "--lora", "2,4,c_attn", "--reward", f"{REWARDS}:parity", *SMALL, "--group-size", "4",
        "--lrs", "1e-5,1e-4,1e-3", "--out", str(out), "--quiet",
    ]
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["sweep"]["lr"] == [1e-5, 1e-4, 1e-3] and len(record["sweep"]["delta_h_true"]) == 3
    assert record["result"]["grad_norm"] > 0 and record["result"]["delta_h1"] != 0
    assert all("lora_" in name for name, _ in record["result"]["top_params"])
    assert (tmp_path / "sweep.png").stat().st_size > 0 and record["plot"] == str(tmp_path / "sweep.png")


def test_optimizer_state_is_read_from_each_checkpoint(tmp_path):
    """A torch AdamW state saved beside the checkpoint sets the learning rate and the moments of the step."""
    checkpoint = save_checkpoint(tmp_path / "checkpoint-1", seed=3)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    ids = torch.tensor([[2, 5, 6, 7, 8, 1]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    out = tmp_path / "r.json"
    argv = ["probe", "--model", str(checkpoint), "--optimizer-state", "optimizer.pt", *SMALL, "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())["result"]
    assert result["lr_used"] == 3e-4 and result["delta_l2"] > 0


EARLIER = json.dumps({"key": {"model": "an earlier checkpoint"}, "result": {"delta_h_true": 1.5}}) + "\n"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing model", "not found"),
        ("empty prompt file", "no prompts in"),
        ("malformed prompt line", "prompts.jsonl:2: malformed JSON"),
        ("malformed results line", "run.jsonl:2: malformed JSON"),
        ("unknown reward", "unknown reward 'nonsense'"),
        ("reward that raises", "reward server unreachable"),
    ],
)
def test_bad_input_is_one_error_line_and_leaves_earlier_records(
    case, message, tmp_path, checkpoints, rewards_importable, capsys
):
    out = tmp_path / "run.jsonl"
    out.write_text(EARLIER + ("{truncated\n" if case == "malformed results line" else ""))
    before = out.read_text()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n' if case == "malformed prompt line" else "")
    options = {
        "missing model": ["--model", str(tmp_path / "no-such-model")],
        "empty prompt file": ["--prompts", str(prompts)],
        "malformed prompt line": ["--prompts", str(prompts)],
        "malformed results line": [],
        "unknown reward": ["--reward", "nonsense"],
        "reward that raises": ["--reward", f"{REWARDS}:explode"],
    }[case]
    argv = ["probe", "--model", str(checkpoints / "checkpoint-5"), *SMALL, "--out", str(out), "--quiet", *options]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fprobe: error: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert out.read_text() == before


def test_lora_and_learning_rate_options_parse():
    assert cli.parse_lora("8,16,q_proj+v_proj") == (8, 16.0, ["q_proj", "v_proj"])
    assert cli.parse_lora("4,8,c_attn:c_proj") == (4, 8.0, ["c_attn", "c_proj"])
    assert cli.parse_lrs("1e-6, 1e-5") == [1e-6, 1e-5]

def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe", "--lora", "8,q_proj"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("fprobe probe: error: argument --lora: expected r,alpha,targets")


def test_probe_prints_standard_errors_and_the_eval_size_for_ten_percent(tmp_path, capsys):
    """The table shows value ± se and the record holds the *_se fields; E of 2 responses per prompt has 2
    units; with ΔH_true's se above a quarter of |ΔH_true| the |E| for a 10% error is printed; an --n-eval that
    is not whole groups is one error line."""
    out = tmp_path / "one.json"
    argv = ["probe", "--n-eval", "8", "--eval-group-size", "2", "--n-update-prompts", "2", "--group-size", "2",
            "--max-new-tokens", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())["result"]
    assert result["se_units"] == 4 and result["delta_h_true_se"] > 0 and "±" in stdout
    relative = result["delta_h_true_se"] / abs(result["delta_h_true"])
    needed = fprobe.entropy.uncertainty.rows_for(0.1, result["delta_h_true"], result["delta_h_true_se"], 8)
    assert (f"|E| ≈ {needed} (--n-eval)" in stdout) == (relative > 0.25)
    assert cli.main(["probe", "--n-eval", "7", "--eval-group-size", "2", "--quiet"]) == 2
    assert "--eval-group-size 2" in capsys.readouterr().err


def save_adapter(path: Path, seed: int) -> Path:
    """A LoRA adapter on the built-in policy (random, not the identity), saved as a LoRA run saves a checkpoint."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(toy.DEFAULT_MODEL_PATH)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(path)
    return path


def test_a_lora_runs_checkpoints_are_probed_as_one_run_of_adapters(tmp_path):
    """Was: --adapter took one path, so a LoRA run's checkpoints could not be probed together."""
    run = tmp_path / "lora-run"
    for step in (10, 2):
        save_adapter(run / f"checkpoint-{step}", seed=step)
    out = tmp_path / "run.jsonl"
    assert cli.main(["probe", "--adapter", str(run), *SMALL, "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [str((run / f"checkpoint-{step}").resolve()) for step in (2, 10)]
    assert [r["key"]["adapter"] for r in records] == expected
    for record, adapter in zip(records, expected):  # each record is the one-adapter run's
        single = tmp_path / f"{Path(adapter).name}.json"
        assert cli.main(["probe", "--adapter", adapter, *SMALL, "--out", str(single), "--quiet"]) == 0
        alone = json.loads(single.read_text())
        assert alone["key"] == record["key"] and alone["result"]["delta_h1"] == record["result"]["delta_h1"]
    assert records[0]["result"]["delta_h1"] != records[1]["result"]["delta_h1"]


def test_adapters_pair_with_models_or_are_refused_before_any_work(tmp_path, checkpoints, capsys, monkeypatch):
    from fprobe.cli import plan

    adapters = [str(save_adapter(tmp_path / f"a{i}", seed=i)) for i in range(3)]
    models = [str(checkpoints / "checkpoint-5"), str(checkpoints / "checkpoint-10")]
    units = plan.pair(plan.expand_models(models), plan.expand_adapters(adapters[:2]))
    assert [(u.model, u.adapter) for u in units] == [
        (str(Path(m).resolve()), str(Path(a).resolve())) for m, a in zip(models, adapters[:2])]
    monkeypatch.setattr(cli, "probe_model", lambda *args: pytest.fail("probed despite a bad pairing"))
    assert cli.main(["probe", "--model", *models, "--adapter", *adapters, "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "--adapter gives 3 adapters for 2 models" in capsys.readouterr().err

# --- bad options, unwritable outputs, closed pipes and concurrent runs: one error line, no record lost


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


def test_a_checkpoint_named_twice_is_one_model(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run / f"checkpoint-{step}", seed=step)
    one = str(run / "checkpoint-1")
    assert cli.expand_models([one, one]) == [str((run / "checkpoint-1").resolve())]
    assert cli.expand_models([str(run), str(run / "checkpoint-2")]) == [
        str((run / f"checkpoint-{step}").resolve()) for step in (1, 2)
    ]


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


QUIET_SMALLEST = ["--n-eval", "2", "--n-update-prompts", "1", "--group-size", "2", "--max-new-tokens", "2", "--quiet"]


def test_cli_refuses_lr_zero_with_a_sweep_or_plot_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_policy", no_pass)
    for argv in (["probe", "--lr", "0", "--plot", str(tmp_path / "p.png")], ["sweep", "--lr", "0"]):
        assert cli.main([*argv, "--out", str(tmp_path / "r.json")]) == cli.EXIT_ERROR
        assert "--lr 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_keeps_the_record_when_the_optimizer_states_rate_is_zero(tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(str(fprobe.sampling.toy.DEFAULT_MODEL_PATH))
    torch.save(torch.optim.AdamW(list(model.parameters()), lr=0.0).state_dict(), tmp_path / "state.pt")
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    argv = ["probe", *QUIET_SMALLEST, "--optimizer-state", str(tmp_path / "state.pt"), "--out", str(out), "--plot", str(plot)]
    assert cli.main(argv) == 0  # was: exit 2 after the whole run, no record written
    record = strict_json(out.read_text())
    assert record["result"]["lr_used"] == 0.0 and record["result"]["delta_l2"] == 0.0
    assert "sweep" not in record and "plot" not in record and not plot.exists()
    assert "learning rate is 0" in capsys.readouterr().err


def test_a_closed_stderr_loses_no_record(tmp_path, monkeypatch):
    """``fprobe probe 2>&1 | head -c5``: head gone, a warning written to stderr raised BrokenPipeError inside
    the run, which ended with no results file (and exit 1, from printing the error to the same pipe)."""
    record = {"key": {"model": "stub"}, "result": {"delta_h1": 1.5}}

    def probe_model(args, model, pool, reward, key, plot):
        import warnings

        warnings.warn("a warning on the way")
        return record, None, "report"

    monkeypatch.setattr(cli, "probe_model", probe_model)
    read, write = os.pipe()
    os.close(read)  # the reader went away
    with os.fdopen(write, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        assert cli.main(["probe", "--quiet", "--out", str(tmp_path / "r.json")]) == 0
        absent = ["probe", "--quiet", "--prompts", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "s.json")]
        assert cli.main(absent) == cli.EXIT_ERROR  # the error line to the closed pipe: no BrokenPipeError out of main
    assert strict_json((tmp_path / "r.json").read_text()) == record


def test_cli_lrs_without_a_positive_rate_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:  # was: the run, the record, then exit 2 from the plot
        cli.main(["sweep", "--lrs", "0,0"])
    assert exit_.value.code == cli.EXIT_ERROR and "at least one > 0" in capsys.readouterr().err


def test_a_stderr_closed_from_the_start_sends_no_warning_to_stdout(tmp_path, monkeypatch, capsys):
    """``fprobe probe --out /dev/stdout 2>&-``: Python sets sys.stderr to None; the warnings must not land in stdout."""

    def probe_model(args, model, pool, reward, key, plot):
        import warnings

        warnings.warn("a warning on the way")
        return {"key": {"model": "stub"}}, None, "report"

    monkeypatch.setattr(cli, "probe_model", probe_model)
    monkeypatch.setattr(sys, "stderr", None)
    assert cli.main(["probe", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "report" in out and "warning" not in out
