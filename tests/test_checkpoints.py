"""fprobe.checkpoints: a TRL run's checkpoint-N folders read back against the live optimizer after step N."""

import json
import pickle

import pytest
import torch
from transformers import TrainerCallback

import fprobe
from fprobe.rl import checkpoints
from fprobe.cli import command as cli
from fprobe.rl import optim
from fprobe.sampling import toy
from test_trl import make_trainer


class LiveOptimizer(TrainerCallback):
    """At the end of each step: the torch optimizer's state keyed by name (through the parameters' identity,
    not by the Trainer's grouping), and the rate its update used."""

    def __init__(self, model):
        self.model, self.state, self.lr = model, {}, {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lr[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        self.state[state.global_step] = optim.from_torch_optimizer(optimizer.optimizer, self.model.named_parameters(), params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three saved steps of a run with weight decay (two param groups: q/k/v biases and norms undecayed)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    trainer, _ = make_trainer(tmp, "dapo", steps=3, save_strategy="steps", save_steps=1, logging_steps=2)
    live = LiveOptimizer(trainer.model)
    trainer.add_callback(live)
    trainer.train()
    return tmp / "run", live


def test_saved_state_is_keyed_to_the_right_names(run):
    folder, live = run
    policy = fprobe.Policy.from_pretrained(folder / "checkpoint-2", dtype=torch.float64)
    saved = checkpoints.load(folder / "checkpoint-2", policy)
    _, expected = live.state[2]
    decay, no_decay = checkpoints.trainer_parameter_groups(policy.model)
    assert decay and no_decay, "both groups must be non-empty for the mapping to be tested"
    assert saved.step == 2 and saved.opt_state.step == expected.step
    for name in policy.params:
        assert torch.equal(saved.opt_state.exp_avg[name], expected.exp_avg[name]), name
        assert torch.equal(saved.opt_state.exp_avg_sq[name], expected.exp_avg_sq[name]), name
    assert saved.optimizer.hyper(no_decay[0])["weight_decay"] == 0.0 and saved.optimizer.hyper(decay[0])["weight_decay"] == 0.1


def test_learning_rate_is_the_next_updates(run):
    """checkpoint-2 holds θ₂; the step a probe takes from it is update 3, at the rate the live optimizer used for it."""
    folder, live = run
    policy = fprobe.Policy.from_pretrained(folder / "checkpoint-2", dtype=torch.float64)
    saved = checkpoints.load(folder / "checkpoint-2", policy)
    assert saved.lr == live.lr[3] != live.lr[2] and saved.optimizer.lr == live.lr[3]
    assert all(saved.optimizer.hyper(name)["lr"] == live.lr[3] for name in policy.params)


def test_training_args_are_never_unpickled(run, monkeypatch):
    folder, _ = run
    assert (folder / "checkpoint-1" / "training_args.bin").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    policy = fprobe.Policy.from_pretrained(folder / "checkpoint-1", dtype=torch.float64)
    assert checkpoints.load(folder / "checkpoint-1", policy).step == 1


def test_an_optimizer_of_another_grouping_is_rejected(run, tmp_path):
    folder, _ = run
    policy = fprobe.Policy.from_pretrained(folder / "checkpoint-1", dtype=torch.float64)
    state = torch.load(folder / "checkpoint-1" / "optimizer.pt", weights_only=True)
    state["param_groups"] = [{**state["param_groups"][0], "params": state["param_groups"][0]["params"] + state["param_groups"][1]["params"]}]
    bad = tmp_path / "checkpoint-1"
    bad.mkdir()
    torch.save(state, bad / "optimizer.pt")
    (bad / "trainer_state.json").write_text((folder / "checkpoint-1" / "trainer_state.json").read_text())
    with pytest.raises(ValueError, match="the Trainer's split of this model's trainable parameters"):
        checkpoints.load(bad, policy)


def test_command_line_probes_a_checkpoint_with_its_state_and_rate(run, tmp_path):
    folder, live = run
    out = tmp_path / "probe.json"
    code = cli.main(["probe", "--model", str(folder / "checkpoint-2"), "--out", str(out), "--n-eval", "4",
                     "--n-update-prompts", "2", "--group-size", "4", "--max-new-tokens", "6", "--quiet"])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["result"]["lr_used"] == live.lr[3]


def test_a_lora_runs_checkpoint_is_probed_through_its_adapter(tmp_path):
    trainer, _ = make_trainer(tmp_path, "dapo", lora=True, steps=3, save_strategy="steps", save_steps=2, logging_steps=1)
    live = LiveOptimizer(trainer.model)
    trainer.add_callback(live)
    trainer.train()
    adapter = tmp_path / "run" / "checkpoint-2"
    policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=torch.float64, adapter=adapter)
    saved = checkpoints.load(adapter, policy)
    _, expected = live.state[2]
    assert list(policy.params) == list(expected.exp_avg) and all("lora_" in name for name in policy.params)
    assert all(torch.equal(saved.opt_state.exp_avg_sq[n], expected.exp_avg_sq[n]) for n in policy.params)
    out = tmp_path / "probe.json"
    code = cli.main(["probe", "--model", str(toy.DEFAULT_MODEL_PATH), "--adapter", str(adapter), "--out", str(out), "--n-eval", "4",
                     "--n-update-prompts", "2", "--group-size", "4", "--max-new-tokens", "6", "--quiet"])
    assert code == 0 and json.loads(out.read_text())["result"]["lr_used"] == live.lr[3]
