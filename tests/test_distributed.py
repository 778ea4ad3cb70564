"""Data-parallel probing on the gloo backend equals the single-process probe on the same global batch (its standard
errors included: to 1e-12 along one fixed Δθ); the lockstep row blocks of sharded passes."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fprobe import distributed

WORKER = Path(__file__).parent / "workers" / "distributed_probe.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, out_dir, mode, world_size):
    """Start one worker process per rank, as torchrun would, on the loopback interface."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), model_dir, str(out_dir), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait(procs, timeout=240):
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Rank files of a 1-process and a 2-process run on the same global batches (7 and 5 rows: uneven)."""
    single, double = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("double")
    procs = launch(model_dir("gpt2"), single, "probe", 1) + launch(model_dir("gpt2"), double, "probe", 2)
    for code, out in wait(procs):
        assert code == 0, out
    load = lambda d, r: torch.load(d / f"rank{r}.pt", weights_only=True)
    return load(single, 0), [load(double, r) for r in range(2)]


def close(a, b, rel=1e-12):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-300


@pytest.mark.slow
def test_two_ranks_equal_one_process(runs):
    one, ranks = runs
    for r in ranks:
        assert r["size"] == 2 and r["updates"] == 1
        scale = abs(one["numbers"]["h_orig"])  # ΔH_true is a difference of two Ĥ: compare on Ĥ's scale
        for name, want in one["numbers"].items():
            got = r["numbers"][name]
            assert abs(got - want) <= 1e-13 * scale if name == "delta_h_true" else close(got, want), (name, got, want)
        for name, want in one["fixed_se"].items():  # along one fixed Δθ: to 1e-12
            assert want > 0 and close(r["fixed_se"][name], want), (name, r["fixed_se"][name], want)
        for name, want in one["probe_se"].items():  # along each run's own Δθ, which agree to 1e-10 (below)
            assert want > 0 and close(r["probe_se"][name], want, rel=1e-9), (name, r["probe_se"][name], want)
        for got, want in zip(r["sweep"], one["sweep"]):
            assert abs(got - want) <= 1e-13 * scale
        for name, p in one["params"].items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(r["delta"][name], one["delta"][name], rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(r["per_sequence"], one["per_sequence"], rtol=1e-10, atol=1e-17)
        torch.testing.assert_close(r["per_token"], one["per_token"], rtol=1e-10, atol=1e-17)
    for name in one["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank(model_dir, tmp_path):
    start = time.monotonic()
    results = wait(launch(model_dir("gpt2"), tmp_path, "fail", 2), timeout=120)
    assert all(code != 0 for code, _ in results), results
    assert "rank 1 fails on purpose" in results[1][1]
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_command_line_under_torchrun_equals_one_process(tmp_path):
    """torchrun samples each rank's rows (per-prompt random streams), probes data-parallel, and rank 0
    writes the same record as a single process."""
    import json

    args = ["probe", "--n-eval", "12", "--n-update-prompts", "3", "--group-size", "3", "--quiet", "--micro-batch", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    single = run([sys.executable, "-m", "fprobe", *args, "--out", str(tmp_path / "one.json")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    double = run([*torchrun, "-m", "fprobe", *args, "--out", str(tmp_path / "two.json")])
    assert single.returncode == 0 and double.returncode == 0, (single.stderr, double.stderr)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["sampling"] == two["sampling"]
    for name in ("h_orig", "delta_h_true", "delta_h1", "ess", "loss", "grad_norm", "delta_l2"):
        assert close(two["result"][name], one["result"][name]), name


@given(n=st.integers(1, 60), size=st.integers(1, 9))
def test_lockstep_blocks_cover_the_batch_in_order_with_equal_lengths(n, size):
    """Every rank gets ⌈n / size⌉ rows; their own rows, rank after rank, are 0..n−1 in order; padding repeats a valid row."""
    blocks = [distributed.lockstep_block(n, rank, size) for rank in range(size)]
    assert {len(rows) for rows, _ in blocks} == {-(-n // size)}
    assert [i for rows, own in blocks for i in rows[:own]] == list(range(n))
    assert all(0 <= i < n for rows, _ in blocks for i in rows)
    assert [own for _, own in blocks] == [stop - start for start, stop in (distributed.shard_bounds(n, r, size) for r in range(size))]
