"""Smoke tests of the benchmark scripts: each runs with ``--quick`` in a subprocess (all at once,
to keep this file short) and prints its tables. No timing is asserted (timings on shared CI machines
mean nothing); the numerical agreements that the scripts check are. The command lines that gpu.sh runs
and that the README and the scripts document are parsed by the scripts' own argparse."""

import argparse
import ast
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ("jvp_vs_grad", "probe_vs_imperative", "scaling", "long_sequences", "probe_memory", "real_size", "decompose_cost", "trl_cost")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """name -> (stdout, JSON result) of ``benchmarks/<name>.py --quick``, the scripts run concurrently."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--json", str(tmp / f"{name}.json")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in SCRIPTS
    }
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        path = tmp / f"{name}.json"
        results[name] = (proc.returncode, stdout, stderr, json.loads(path.read_text()) if path.exists() else None)
    return results


def result_of(quick_runs, name):
    code, stdout, stderr, result = quick_runs[name]
    assert code == 0 and result is not None, f"{name} --quick failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout, result


def test_jvp_vs_grad_quick(quick_runs):
    stdout, result = result_of(quick_runs, "jvp_vs_grad")
    assert "jvp/grad time" in stdout
    assert [r["mode"] for r in result["records"]] == ["full", "lora"]
    for record in result["records"]:
        assert set(record["times"]) == {"forward", "jvp", "grad", "double_backward"}
        # three ways to the same δH₁ (float32 model, float64 statistics)
        assert record["rel_jvp_grad"] < 1e-4 and record["rel_dbl_grad"] < 1e-4, record


def test_probe_vs_imperative_quick(quick_runs):
    stdout, result = result_of(quick_runs, "probe_vs_imperative")
    assert result["restored"], "the imperative probe must restore the model and the optimizer bit for bit"
    for probe, _, _, rel_delta, rel_true, rel_first in result["checks"]:
        assert float(rel_delta) < 1e-4, f"{probe}: Δθ differs from the imperative probe's by {rel_delta}"
        assert float(rel_true) < 1e-3 and float(rel_first) < 1e-4, (probe, rel_true, rel_first)
    assert set(result["times"]) == {"fprobe", "fprobe:grad", "imperative"}


def test_scaling_quick(quick_runs):
    stdout, result = result_of(quick_runs, "scaling")
    assert set(result) >= {"e_scaling", "sweep", "overhead"}
    assert result["sweep"]["max_rel_diff"] < 5e-2  # float32 parameters round Δθ(η) = fl(θ + u) − θ
    assert "sum of the passes" in stdout


def test_long_sequences_quick(quick_runs):
    stdout, result = result_of(quick_runs, "long_sequences")
    # blocked and whole-matrix attention are the same function: ΔH_true, δH₁, δH₂ agree to rounding
    assert max(result["rel_blocked_whole"]) < 1e-6, result["rel_blocked_whole"]
    assert {r["pass_"] for r in result["memory"]} == {"forward", "jvp", "jvp2", "step"}
    assert {f"{name}:{impl}" for name in ("forward", "jvp", "jvp2", "step") for impl in ("blocked", "whole")} == set(result["times"])
    assert "blocked / whole" in stdout


def test_probe_memory_quick(quick_runs):
    stdout, result = result_of(quick_runs, "probe_memory")
    assert [r["mode"] for r in result["records"]] == ["full", "lora"]
    assert all(set(r["memory_mib"]) == {"bare step", "probe", "probe (grad)"} for r in result["records"])
    assert "probe / (step + tree)" in stdout


def test_real_size_quick(quick_runs):
    stdout, result = result_of(quick_runs, "real_size")
    assert abs(result["ratio"] - 1) < 0.05, "a tiny learning rate must sit in the linear regime"
    assert {"step", "jvp"} <= set(result["timings"]) and "probe (total)" in stdout


def test_real_size_times_only_the_methods_asked():
    """``--methods`` times a subset (the step against the bare step, for a quick before/after) and forms only the
    ratios whose two passes it timed; a method it does not know is a usage error."""
    real_size = importlib.import_module("benchmarks.real_size")
    argv = ["--quick", "--methods", "bare step,rl_step", "--no-memory", "--repeats", "1", "--warmup", "0", "--modes", "full",
            "--threads", "0"]  # 0: leave this process's thread count alone
    with contextlib.redirect_stdout(io.StringIO()):
        (record,) = real_size.main(argv)
        with pytest.raises(SystemExit):
            real_size.main(["--quick", "--methods", "rl_step,jvp3"])
    assert set(record["times"]) == {"bare step", "rl_step", "bare step (system)", "rl_step (system)"}
    assert set(record["ratios"]) == {"rl_step / bare step", "rl_step / bare step (user)", "rl_step / bare step (best)"}


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_the_bare_passes_keep_the_logits_a_trainer_keeps(arch):
    """The bare forward and step run the LM head on the response positions alone (``logits_to_keep`` = response + 1,
    as TRL's trainer and fprobe's passes): the whole forward's logits there, and the loss of the whole logits (to float32 rounding: a sum over fewer
    positions)."""
    import torch

    common = importlib.import_module("benchmarks.common")
    model = common.build_model(arch, "1m", torch.float64)
    U = common.make_rollouts(4, 6, common.VOCAB["1m"], prompt=5, seed=3)
    assert common.first_kept_position(U) == 4  # the last prompt column predicts the first response token
    with torch.no_grad():
        whole = model(U.input_ids, attention_mask=U.attention_mask,
                      position_ids=fprobe_positions(U.attention_mask), use_cache=False).logits
        kept, start = common.trainer_logits(model, U, "cpu")
        assert start == 4 and torch.equal(kept, whole[:, start:])
        every, first = common.trainer_logits(model, U, "cpu", whole=True)  # the first yardstick
        assert first == 0 and torch.equal(every, whole)
        logp = torch.log_softmax(whole[:, :-1].float(), -1).gather(-1, U.input_ids[:, 1:, None])[..., 0]
        loss = -(U.advantages.float()[:, None] * U.response_mask[:, 1:] * logp).sum() / 7
        torch.testing.assert_close(common.trainer_loss(model, U, "cpu", 7), loss, rtol=1e-6, atol=0)  # float32 sums


def fprobe_positions(attention_mask):
    from fprobe.model.policy import position_ids_from_mask

    return position_ids_from_mask(attention_mask)


def test_real_size_restarts_itself_on_a_caching_heap():
    """``--malloc-cache`` runs the script again with glibc's tunables set (read only at a process's start)."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "real_size.py"), "--quick", "--malloc-cache", "--no-memory",
                          "--methods", "bare step,rl_step", "--modes", "full", "--warmup", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("# fprobe at a real size") == 1 and "a caching glibc heap" in out.stdout


def test_the_caching_heap_keeps_the_users_own_glibc_tunables(monkeypatch):
    """``--malloc-cache`` adds its tunables to any the user set (and the interpreter's options survive the restart);
    the memory server gets the user's alone."""
    from benchmarks import common

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")
    monkeypatch.setattr(os, "execv", mock.Mock())
    common.restart_with_caching_malloc()
    os.execv.assert_called_once_with(sys.executable, sys.orig_argv)
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.check=0:" + common.CACHING_TUNABLES and common.caching_malloc()
    assert common._tunables_without_caching() == "glibc.malloc.check=0"
    common.restart_with_caching_malloc()  # already on the caching heap: no second restart
    assert os.execv.call_count == 1


def test_real_size_restarts_only_as_the_main_script(monkeypatch):
    """A memory run's process (forked from a server whose environment has no caching heap) imports the script again,
    as ``__mp_main__`` with the parent's argv: ``--malloc-cache`` must not re-execute it there (each memory run became
    a whole benchmark run, whose memory runs did the same, without end)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "real_size.py"), "--malloc-cache"])
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")  # not the caching heap's, as in the memory server
    monkeypatch.setattr(os, "execv", mock.Mock(side_effect=AssertionError("re-executed")))
    runpy.run_path(str(BENCHMARKS / "real_size.py"), run_name="__mp_main__")  # as multiprocessing's children import it
    os.execv.assert_not_called()


def test_real_size_measures_another_checkouts_fprobe_with_its_own_helpers(tmp_path):
    """``--fprobe-root`` on a checkout (a worktree of an earlier commit, with its own benchmarks/) takes that checkout's
    fprobe and this script's ``benchmarks.common`` (an earlier one lacks what this script calls)."""
    (tmp_path / "fprobe").symlink_to(ROOT / "fprobe")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "common.py").write_text("raise ImportError('an earlier checkout')\n")
    script = (f"import runpy, sys; sys.argv = ['real_size.py', '--fprobe-root', {str(tmp_path)!r}]; "
              f"g = runpy.run_path({str(BENCHMARKS / 'real_size.py')!r}, run_name='imported'); "
              "print(g['fprobe'].__file__); print(g['common'].__file__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "fprobe" / "__init__.py"), str(BENCHMARKS / "common.py")]


def test_decompose_cost_quick(quick_runs):
    stdout, result = result_of(quick_runs, "decompose_cost")
    assert result["relative_residual"] < 1e-10, "the per-sequence parts must sum to δH₁"
    assert "contributions() / (vjp on E + jvp on U)" in stdout


def test_trl_cost_quick(quick_runs):
    stdout, result = result_of(quick_runs, "trl_cost")
    records = result["records"]
    assert [r["step"] for r in records] == [1, 2], "every step of the quick run is probed"
    assert all(r["delta_l2"] > 0 and r["delta_h_true"] is not None for r in records), "a real update, measured"
    ratios = sorted(r["probe_seconds"] / r["step_seconds"] for r in records)
    assert result["ratio"] == pytest.approx(sum(ratios) / 2) and "median probe / step" in stdout


class Parsed(Exception):
    """Raised in place of running a benchmark once its command line is parsed."""


def parsed_options(name: str, argv: list[str]) -> argparse.Namespace:
    """The options ``benchmarks/<name>.py`` parses from ``argv`` with its own argparse (its ``main`` stopped
    right after parsing), each option spelled in full as the script declares it (no abbreviation)."""
    sys.path.insert(0, str(ROOT))
    main = importlib.import_module(f"benchmarks.{name}").main
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        spelled = {arg.partition("=")[0] for arg in args if arg.startswith("--")}
        assert spelled <= set(parser._option_string_actions), f"{name}.py: {spelled - set(parser._option_string_actions)}"
        raise Parsed(parse(parser, args, namespace))

    errors = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop), contextlib.redirect_stderr(errors):
        try:
            main(list(argv))
        except Parsed as parsed:
            return parsed.args[0]
        except SystemExit:
            pass
    pytest.fail(f"benchmarks/{name}.py refuses {argv}: {errors.getvalue()}")


def gpu_script_commands(tmp_path: Path, *options: str) -> list[list[str]]:
    """The commands ``bash benchmarks/gpu.sh [options] OUT`` runs, each as [program, *arguments], with
    ``$PYTHON`` and ``nvidia-smi`` replaced by a recorder that only writes its command line down."""
    bin_dir, log = tmp_path / "bin", tmp_path / "commands.jsonl"
    bin_dir.mkdir(parents=True)
    recorder = bin_dir / "python"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n")
    recorder.chmod(0o755)
    (bin_dir / "nvidia-smi").symlink_to(recorder)
    env = {**os.environ, "PYTHON": str(recorder), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), *options, str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


GPU_BENCHMARKS = {"real_size", "jvp_vs_grad", "probe_vs_imperative", "long_sequences", "probe_memory"}


def benchmark_runs(commands: list[list[str]]) -> dict[str, argparse.Namespace]:
    """name -> parsed options of each ``python benchmarks/<name>.py ...`` among ``commands`` (files checked to exist)."""
    runs = {}
    for _, script, *argv in (c for c in commands if len(c) > 1 and c[1].startswith("benchmarks/")):
        assert (ROOT / script).is_file(), script
        runs[Path(script).stem] = parsed_options(Path(script).stem, argv)
    return runs


def test_gpu_script_runs_the_cuda_tests_and_every_gpu_benchmark_at_1024_tokens(tmp_path):
    commands = gpu_script_commands(tmp_path)
    assert commands[0][:2] == ["python", "-c"] and commands[1][0] == "nvidia-smi"  # the device is checked first
    (pytest_line,) = [c[3:] for c in commands if c[1:3] == ["-m", "pytest"]]
    assert "tests/test_cuda.py" in pytest_line
    collected = subprocess.run([sys.executable, "-m", "pytest", *pytest_line, "--collect-only", "-p", "no:cacheprovider"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0 and " collected" in collected.stdout, collected.stdout + collected.stderr
    runs = benchmark_runs(commands)
    assert set(runs) == GPU_BENCHMARKS
    for name, options in runs.items():
        assert options.device == "cuda" and Path(options.json).parent == tmp_path / "out", name
        assert not vars(options).get("quick", vars(options).get("tiny")), name
        if "lengths" in vars(options):
            assert "1024" in options.lengths.split(","), (name, options.lengths)
        elif "length" in vars(options):
            assert options.length == 1024, (name, options.length)


def test_gpu_script_tiny_runs_the_same_lines_on_the_cpu_at_quick_sizes(tmp_path):
    gpu, tiny = gpu_script_commands(tmp_path / "gpu"), gpu_script_commands(tmp_path / "tiny", "--tiny")
    assert not any(c[1] == "-c" or c[0] == "nvidia-smi" for c in tiny)  # no CUDA device needed
    assert [c for c in tiny if c[1:3] == ["-m", "pytest"]] == [c for c in gpu if c[1:3] == ["-m", "pytest"]]
    gpu_runs, tiny_runs = benchmark_runs(gpu), benchmark_runs(tiny)
    assert set(tiny_runs) == set(gpu_runs)
    for name, options in tiny_runs.items():
        quick = "quick" if "quick" in vars(options) else "tiny"
        assert options.device == "cpu" and vars(options)[quick], name
        same = {k: v for k, v in vars(options).items() if k not in ("device", quick, "json")}
        assert same == {k: v for k, v in vars(gpu_runs[name]).items() if k not in ("device", quick, "json")}, name


def test_isolated_measures_memory_in_a_fresh_process():
    """The per-method memory runner: 64 MiB written in a forked process shows up as 60–256 MiB."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import common

    result = common.Isolated().start()(common.allocate_and_measure, 64 * 2**20)
    assert 60 * 2**20 <= result["extra_bytes"] < 256 * 2**20, result


DOCUMENTED = re.compile(r"^\s*python benchmarks/(\w+)\.py([^#\n]*)", re.MULTILINE)


def documented_command_lines(text: str, name: str) -> list[list[str]]:
    """The arguments of each ``python benchmarks/<name>.py ...`` line in ``text`` (comments cut off, lines continued
    with a backslash joined)."""
    return [shlex.split(rest) for script, rest in DOCUMENTED.findall(text.replace("\\\n", " ")) if script == name]


@pytest.mark.parametrize("name", SCRIPTS)
def test_documented_command_lines_are_accepted_by_their_scripts(name):
    """Every command line the README and the script's own docstring show parses with the script's options,
    and both show its smoke-test (``--quick``) run."""
    own = ast.get_docstring(ast.parse((BENCHMARKS / f"{name}.py").read_text()))
    for text in (own, (BENCHMARKS / "README.md").read_text()):
        parsed = [parsed_options(name, argv) for argv in documented_command_lines(text, name)]
        assert any(vars(options).get("quick", vars(options).get("tiny")) for options in parsed), name
