"""Sharded (FSDP2) probing on 2 gloo processes equals single-process fprobe on the same θ_k, Δθ and E.

The workers (tests/workers/sharded_probe.py) shard a tiny float64 model with transformers' native FSDP2; the
whole θ_k and θ_{k+1} they save come from torch's ``get_model_state_dict``, and the reference here is
``fprobe.entropy_change`` on an unsharded copy (functional_call, δH₁ by jvp)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fprobe
from helpers import CONFIGS

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, args: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """One process per rank, as torchrun would start them, on the loopback interface."""
    port = str(free_port())
    root = str(Path(__file__).parents[1])
    return [
        subprocess.Popen(
            [sys.executable, str(WORKERS / worker), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONPATH=root),
        )
        for rank in range(world_size)
    ]


def finish(procs, timeout: float) -> list[str]:
    """Wait for every rank (killing all of them past ``timeout``); the outputs, after asserting that each exited 0."""
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank did not finish within {timeout} s (a hang: unequal collective calls?)")
        assert p.returncode == 0, out
        outputs.append(out)
    return outputs


def untied(arch: str, root: Path) -> str:
    """A tiny model of ``arch`` with untied embeddings, saved under ``root``."""
    config = CONFIGS[arch]()
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    path = root / arch
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


ARCHITECTURES = ("qwen2", "llama")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of 2 ranks (tests/workers/sharded_probe.py) for every test here: the engine on both
    architectures, the uneven batches, the TRL run. {"root": its folder, "models": {name: dir}}."""
    from fprobe.sampling import toy

    root = tmp_path_factory.mktemp("sharded")
    models = {arch: untied(arch, root) for arch in ARCHITECTURES} | {"adder": untied_tiny_adder(root)}
    args = [str(root / "out"), models["qwen2"], models["llama"], models["adder"], str(toy.DEFAULT_MODEL_PATH)]
    finish(launch("sharded_probe.py", args), timeout=240)
    return {"root": root / "out", "models": models}


@pytest.fixture(scope="module")
def engine_runs(runs):
    """{arch: (model dir, [rank 0's file, rank 1's file])}."""
    load = lambda arch, r: torch.load(runs["root"] / arch / f"rank{r}.pt", weights_only=False)
    return {arch: (runs["models"][arch], [load(arch, r) for r in range(2)]) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sharded_records_equal_single_process_fprobe(engine_runs, arch):
    model, ranks = engine_runs[arch]
    policy = fprobe.Policy.from_pretrained(model, dtype=torch.float64)
    E, probed = ranks[0]["E"], ranks[0]["probed"]
    for step, (theta_k, theta_k1) in enumerate(zip(probed["theta_k"], probed["theta_k1"])):
        delta = {name: theta_k1[name] - theta_k[name] for name in theta_k}
        want = fprobe.entropy_change(policy, E, delta, params=theta_k, new_params=theta_k1, micro_batch=None)
        for rank in ranks:
            got = rank["probed"]["records"][step]
            assert got["h_orig"] == want.h_orig, (step, got["h_orig"], want.h_orig)
            assert abs(got["delta_h_true"] - want.delta_h_true) <= 1e-10, step
            assert abs(got["delta_h1"] - want.delta_h1) <= 1e-10 * max(1.0, abs(want.delta_h1)), step
            assert abs(got["delta_h1"] - want.delta_h1) <= 1e-6 * abs(want.delta_h1), "δH₁ agrees to rounding, not by luck"
            assert got["delta_l2"] == pytest.approx(float(fprobe.tree.norm(delta)), rel=1e-12)
            assert got["ess_fraction"] == pytest.approx(want.ess_fraction, rel=1e-12)
            assert_se_equal_single_process(got, want)


def assert_se_equal_single_process(got: dict, want) -> None:
    """The sharded record's standard errors are single-process fprobe's (the same functions of the gathered rows);
    δH₁'s and the ratio's are None with the reason the gradient path gives (method='grad' in one process)."""
    from fprobe.entropy import uncertainty

    assert got["se_units"] == want.se_units
    for name in ("h_orig", "h_upd", "delta_h_true"):
        assert want.__dict__[f"{name}_se"] > 0 and abs(got[f"{name}_se"] - want.__dict__[f"{name}_se"]) <= 1e-10 * want.__dict__[f"{name}_se"], name
    assert got["delta_h1_se"] is None and got["ratio_se"] is None and got["delta_h2_se"] is None
    assert set(got["se_undefined"]) == {"delta_h1", "ratio"}
    assert all(uncertainty.GRADIENT_PATH in got["se_undefined"][k] and uncertainty.GRADIENT_PATH in uncertainty.GRAD_METHOD for k in ("delta_h1", "ratio"))


def test_bf16_weights_are_measured_in_the_eval_dtype(runs):
    """A bf16 Qwen2 sharded in bf16, eval_dtype=torch.float64: h_orig, ΔH_true and their se equal single-process fprobe
    (eval_dtype=torch.float64 on the same bf16 θ_k, θ_{k+1} and E) to 1e-12; with the embedding lookup's upcast off
    (activations from bf16) they differ by far more, so this test can fail. δH₁ by the gradient path has ∇Ĥ in bf16
    (FSDP2's .grad and reduce-scatter in the parameters' dtype): within 1e-2 relative of the float64 jvp (measured 9e-4),
    where bf16 activations miss it by over 5%."""
    from fprobe.model.numerics import exact_delta

    ranks = [torch.load(runs["root"] / "precision" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    theta_k, theta_k1, E = ranks[0]["theta_k"], ranks[0]["theta_k1"], ranks[0]["E"]
    assert all(p.dtype == torch.bfloat16 for p in theta_k.values())
    policy = fprobe.Policy.from_pretrained(runs["models"]["qwen2"], dtype=torch.bfloat16, eval_dtype=torch.float64)
    want = fprobe.entropy_change(policy, E, exact_delta(theta_k1, theta_k), params=theta_k, new_params=theta_k1, micro_batch=None)
    for rank in ranks:
        assert rank["resharded"]
        # fprobe's numerics change no operation FSDP2 runs itself (all-gathers, copy-in/out, resharding); the spy sees
        # them (with a mixed-precision param_dtype it finds FSDP2's cast of forward inputs, _cast_fp_tensor)
        assert rank["altered_in_fsdp2"] == set()
        got, plain = rank["records"]["upcast"], rank["records"]["bf16 activations"]
        assert got["eval_dtype"] == "torch.float64" and abs(want.delta_h_true) > 1e-5
        assert abs(got["h_orig"] - want.h_orig) <= 1e-12 and abs(got["delta_h_true"] - want.delta_h_true) <= 1e-12
        assert abs(got["delta_h_true_se"] - want.delta_h_true_se) <= 1e-12
        assert abs(plain["h_orig"] - want.h_orig) > 1e-8 and abs(plain["delta_h_true"] - want.delta_h_true) > 1e-9
        assert abs(got["delta_h1"] - want.delta_h1) <= 1e-2 * abs(want.delta_h1)
        assert abs(plain["delta_h1"] - want.delta_h1) > 5e-2 * abs(want.delta_h1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_probed_training_is_bit_identical_on_every_rank(engine_runs, arch):
    _, ranks = engine_runs[arch]
    for rank in ranks:
        probed, plain = rank["probed"], rank["plain"]
        assert probed["losses"] == plain["losses"]
        assert probed["shards"].keys() == plain["shards"].keys()
        assert all(torch.equal(probed["shards"][n], plain["shards"][n]) for n in plain["shards"])
        for name, state in plain["optimizer"].items():
            assert all(torch.equal(torch.as_tensor(probed["optimizer"][name][k]), torch.as_tensor(v)) for k, v in state.items()), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_restored_and_modules_resharded(engine_runs, arch):
    _, ranks = engine_runs[arch]
    for rank in ranks:
        assert rank["probed"]["grads_kept"] == [True, True], "the trainer's .grad: the same tensors, bit for bit"
        assert rank["probed"]["resharded"] == [True] * 4, "every FSDP module resharded after each pass"


def test_uneven_rows_do_not_hang_and_policy_refuses_a_sharded_model(runs):
    """3 rows (2 + 1 per rank) and 1 row (1 + 0): every rank makes the same forward calls and gets every row (the
    launch itself has a timeout: a hang fails it); ``fprobe.Policy`` (functional_call) refuses the sharded module."""
    for r in range(2):
        counts, refusal = (runs["root"] / "uneven" / f"rank{r}.txt").read_text().split("\n")
        assert counts == "3 1 True True"
        assert "parameters are sharded (FSDP2" in refusal and "ignores the parameters it is given" in refusal


# ---------------------------------------------------------------------------------------------
# fprobe.trl.attach on a GRPOTrainer sharded by transformers' native FSDP2


def untied_tiny_adder(root: Path) -> str:
    """The built-in tiny policy with its lm_head an untied copy of the embedding (the same logits)."""
    from transformers import AutoTokenizer
    from fprobe.sampling import toy

    model = AutoModelForCausalLM.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
    config = model.config
    config.tie_word_embeddings = False
    untied_model = AutoModelForCausalLM.from_config(config)
    state = {**model.state_dict(), "lm_head.weight": model.get_input_embeddings().weight.detach().clone()}
    untied_model.load_state_dict(state)
    path = root / "untied-adder"
    untied_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def trl_run(runs):
    root = runs["root"] / "trl"
    return runs["models"]["adder"], root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_trl_sharded_records_equal_single_process_fprobe(trl_run):
    """Every rank's record equals fprobe on one process at the same θ_k, θ_{k+1} and E; E itself is what one
    process samples from θ_k with the probe's stream; the records file holds rank 0's records."""
    import json

    from transformers import AutoTokenizer
    from fprobe.sampling import generate, toy

    model_dir, root, ranks = trl_run
    policy = fprobe.Policy.from_pretrained(model_dir, dtype=torch.float64, temperature=1.5)
    records = ranks[0]["records"]
    assert [r["step"] for r in records] == [1, 2]
    for i, record in enumerate(records):
        theta_k, theta_k1 = ranks[0]["before"][i], ranks[0]["after"][i]
        E = ranks[0]["E"][record["step"]]
        assert len(E) == 4 and torch.equal(E.input_ids, ranks[1]["E"][record["step"]].input_ids)  # 4 + 1 rows: 3 + 2
        replica = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        replica.load_state_dict(theta_k)
        want_E, _ = fprobe.sample(
            fprobe.Policy(replica, temperature=1.5), AutoTokenizer.from_pretrained(model_dir), toy.make_prompts(64, 0),
            n_eval=4, n_update_prompts=1, group_size=1, reward=lambda *_: 0.0, max_new_tokens=6,
            seed=generate.stream_seed(0, "trl", record["step"]),
        )
        assert torch.equal(E.input_ids, want_E.input_ids) and torch.equal(E.response_mask, want_E.response_mask)
        delta = {name: theta_k1[name] - theta_k[name] for name in theta_k}
        want = fprobe.entropy_change(policy, E, delta, params=theta_k, new_params=theta_k1, micro_batch=None)
        for rank in ranks:
            got = rank["records"][i]
            assert got["mode"] == "sharded" and got["updates"] == 1 and got["delta_h2"] is None
            assert set(got["quantities"]) <= {k for k, v in got.items() if v is not None}
            assert got["h_orig"] == want.h_orig
            assert abs(got["delta_h_true"] - want.delta_h_true) <= 1e-10
            assert abs(got["delta_h1"] - want.delta_h1) <= 1e-10 and abs(got["delta_h1"] - want.delta_h1) <= 1e-6 * abs(want.delta_h1)
            assert got["step_check"].startswith("skipped: the replay needs whole parameters")
            assert got["eval_dtype"] == "torch.float64"
            assert_se_equal_single_process(got, want)
    lines = [json.loads(line) for line in (root / "probe.jsonl").read_text().splitlines()]
    assert [line["delta_h1"] for line in lines] == [r["delta_h1"] for r in records]


def test_trl_sharded_training_is_bit_identical_on_every_rank(trl_run):
    _, _, ranks = trl_run
    for rank in ranks:
        probed, plain = rank["probed"], rank["plain"]
        assert probed["losses"] == plain["losses"] and len(plain["losses"]) == 2
        assert all(torch.equal(probed["shards"][n], plain["shards"][n]) for n in plain["shards"])
        for name, state in plain["optimizer"].items():
            assert state and all(torch.equal(torch.as_tensor(probed["optimizer"][name][k]), torch.as_tensor(v)) for k, v in state.items())


def test_gather_adds_the_jvp_and_second_order_from_whole_parameters_on_rank_0(trl_run):
    """gather=True: δH₁ by jvp and δH₂ from the whole θ_k, θ_{k+1} gathered on rank 0, the same on every rank, equal
    to fprobe on one process; the gradient-path δH₁ agrees with the jvp; training still bit-identical."""
    model_dir, _, ranks = trl_run
    policy = fprobe.Policy.from_pretrained(model_dir, dtype=torch.float64, temperature=1.5)
    for rank in ranks:  # the replica's random initialisation draws from its own generator, not the run's
        assert all(torch.equal(rank["gathered"]["shards"][n], rank["plain"]["shards"][n]) for n in rank["plain"]["shards"])
    for i, record in enumerate(ranks[0]["gathered"]["records"]):
        assert record == ranks[1]["gathered"]["records"][i] | {k: record[k] for k in ("probe_seconds", "step_seconds")}
        assert {"delta_h1_jvp", "delta_h2"} <= set(record["quantities"])
        theta_k, theta_k1 = ranks[0]["before"][i], ranks[0]["after"][i]  # the same run: bit-identical training
        E = ranks[0]["gathered"]["E"][record["step"]]
        want = fprobe.entropy_change(policy, E, {n: theta_k1[n] - theta_k[n] for n in theta_k}, params=theta_k, new_params=theta_k1,
                                     second_order=True, micro_batch=None)
        assert abs(record["delta_h1_jvp"] - want.delta_h1) <= 1e-12
        for name in ("h_orig", "delta_h_true", "delta_h1", "delta_h2", "ratio"):  # with gather=True, every se of one process
            assert record[f"{name}_se"] == pytest.approx(want.__dict__[f"{name}_se"], rel=1e-10), name
        assert record["se_undefined"] == {} and {"delta_h1_se", "ratio_se"} <= set(record["quantities"])
        assert abs(record["delta_h1"] - record["delta_h1_jvp"]) <= 1e-10
        assert record["delta_h2"] == pytest.approx(want.delta_h2, rel=1e-9, abs=1e-15)


def test_tied_embeddings_under_native_fsdp2_are_refused_at_attach(trl_run):
    _, _, ranks = trl_run
    for rank in ranks:
        assert "ties its input and output embeddings" in rank["tied_error"] and "upstream" in rank["tied_error"]


def test_accelerate_fsdp_dropped_on_cpu_is_said_in_a_warning(trl_run):
    """accelerate leaves FSDP off on CPU and trains data-parallel: the probe says so and probes whole parameters."""
    _, _, ranks = trl_run
    for rank in ranks:
        kind, messages = rank["cpu_fsdp"]
        assert kind == "TrlProbe" and len(messages) == 1 and "trains the model data-parallel" in messages[0]


# ---------------------------------------------------------------------------------------------
# routes and refusals at attach (one process: the trainer's sharding flags as accelerate sets them)


@pytest.fixture
def grpo_trainer(tmp_path):
    from test_trl import make_trainer

    return make_trainer(tmp_path, steps=1)[0]


def accelerate_state(monkeypatch, trainer, **state):
    from types import SimpleNamespace

    monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(state=SimpleNamespace(**state)))


def test_accelerate_fsdp1_and_deepspeed_are_refused_at_attach(grpo_trainer, monkeypatch):
    from types import SimpleNamespace

    callbacks = list(grpo_trainer.callback_handler.callbacks)
    with pytest.raises(ValueError, match="gather=True gathers sharded"):
        fprobe.trl.attach(grpo_trainer, gather=True)
    accelerate_state(monkeypatch, grpo_trainer, fsdp_plugin=SimpleNamespace(fsdp_version=1))
    monkeypatch.setattr(grpo_trainer, "is_fsdp_enabled", True)
    with pytest.raises(ValueError, match="FSDP1's flat parameters, which fprobe does not read; use FSDP2"):
        fprobe.trl.attach(grpo_trainer)
    monkeypatch.setattr(grpo_trainer, "is_fsdp_enabled", False)
    accelerate_state(monkeypatch, grpo_trainer, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    monkeypatch.setattr(grpo_trainer, "is_deepspeed_enabled", True)
    with pytest.raises(ValueError, match=r"DeepSpeed \(ZeRO stage 3\).*use FSDP2"):
        fprobe.trl.attach(grpo_trainer)
    assert grpo_trainer.callback_handler.callbacks == callbacks


def test_accelerate_fsdp2_reaches_the_sharded_mode_which_refuses_what_needs_whole_parameters(grpo_trainer, monkeypatch):
    """accelerate shards the model at train(): attach routes by its FSDP2 plugin; what the sharded mode cannot
    measure fails at attach, one error each, and attaches nothing."""
    from types import SimpleNamespace
    from fprobe.trl import sharded as trl_sharded

    accelerate_state(monkeypatch, grpo_trainer, fsdp_plugin=SimpleNamespace(fsdp_version=2))
    monkeypatch.setattr(grpo_trainer, "is_fsdp_enabled", True)
    callbacks = list(grpo_trainer.callback_handler.callbacks)
    E = one_row_E()
    for kwargs, message in (
        (dict(second_order=True), "second_order .* needs whole parameters.*pass gather=True"),
        (dict(contributions=True), "contributions .* need the step replay"),
        (dict(contributions=True, gather=True), "does not gather the optimizer state"),
        (dict(E=E), "draws a fresh E at each probed step"),
        (dict(resample=False), "draws a fresh E at each probed step"),
    ):
        with pytest.raises(ValueError, match=message):
            fprobe.trl.attach(grpo_trainer, **kwargs)
        assert grpo_trainer.callback_handler.callbacks == callbacks
    assert isinstance(fprobe.trl.attach(grpo_trainer), trl_sharded.ShardedTrlProbe)


def one_row_E() -> fprobe.Rollouts:
    ids = torch.tensor([[2, 3, 4]])
    return fprobe.Rollouts(ids, torch.ones_like(ids), torch.tensor([[False, True, True]]))
