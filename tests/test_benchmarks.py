"""Smoke tests of the benchmark scripts: each runs with ``--quick`` in a subprocess (the three at once,
to keep this file short) and prints its tables. No timing is asserted (timings on shared CI machines
mean nothing); the numerical agreements that the scripts check are."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ("jvp_vs_grad", "probe_vs_imperative", "scaling")


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
