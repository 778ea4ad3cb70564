"""Smoke tests of the benchmark scripts: each runs with ``--quick`` in a subprocess (all at once,
to keep this file short) and prints its tables. No timing is asserted (timings on shared CI machines
mean nothing); the numerical agreements that the scripts check are."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ("jvp_vs_grad", "probe_vs_imperative", "scaling", "long_sequences", "probe_memory", "real_size", "decompose_cost")


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


def test_decompose_cost_quick(quick_runs):
    stdout, result = result_of(quick_runs, "decompose_cost")
    assert result["relative_residual"] < 1e-10, "the per-sequence parts must sum to δH₁"
    assert "contributions() / (vjp on E + jvp on U)" in stdout


def test_gpu_script_runs_the_cuda_tests_and_every_gpu_benchmark_at_1024_tokens():
    script = (BENCHMARKS / "gpu.sh").read_text()
    for name in ("tests/test_cuda.py", "jvp_vs_grad.py", "probe_vs_imperative.py", "real_size.py", "long_sequences.py", "probe_memory.py"):
        assert name in script, name
    assert "DEV=cuda" in script and "--lengths 1024" in script and "--length 1024" in script


def test_isolated_measures_memory_in_a_fresh_process():
    """The per-method memory runner: 64 MiB written in a forked process shows up as 60–256 MiB."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import common

    result = common.Isolated().start()(common.allocate_and_measure, 64 * 2**20)
    assert 60 * 2**20 <= result["extra_bytes"] < 256 * 2**20, result


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_document_how_to_run_them(name):
    assert f"python benchmarks/{name}.py --quick" in (BENCHMARKS / f"{name}.py").read_text()
    assert f"{name}.py" in (BENCHMARKS / "README.md").read_text()
