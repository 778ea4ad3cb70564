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
from test_cli import SMALL, save_checkpoint
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


# --- half or malformed checkpoints: refused in one line naming the file ---


@pytest.fixture
def checkpoint(tmp_path):
    """A model folder named like a Trainer's checkpoint, with a valid optimizer.pt and trainer_state.json."""
    folder = save_checkpoint(tmp_path / "checkpoint-3", seed=0)
    model = fprobe.Policy.from_pretrained(folder, dtype=torch.float64).model
    torch.save(torch.optim.AdamW(model.parameters(), lr=2e-3).state_dict(), folder / checkpoints.OPTIMIZER_FILE)
    (folder / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": 3}))
    return folder


@pytest.fixture
def no_model_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command line started on a model although its inputs were invalid")

    monkeypatch.setattr(cli, "probe_model", refuse)


def cli_error(argv, capsys) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("fprobe: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("fprobe: error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def make_half(folder, case):
    """Break one file of a checkpoint as a half-copied or hand-edited one would be."""
    state, optimizer = folder / checkpoints.STATE_FILE, folder / checkpoints.OPTIMIZER_FILE
    if case == "no trainer_state.json":  # was: exit 0, a fresh AdamW at lr 1e-6 where the checkpoint's is 2e-3
        state.unlink()
        return state, "missing beside"
    if case == "optimizer.pt a folder":  # was: the same
        optimizer.unlink()
        optimizer.mkdir()
        return optimizer, "not a regular file"
    if case == "no optimizer.pt":
        optimizer.unlink()
        return optimizer, "missing beside"
    texts = {
        "no global_step": ('{"epoch": 1}', "no 'global_step'"),  # was: …/checkpoint-3: 'global_step'
        "a list": ("[1, 2]", "expected a JSON object"),  # was: list indices must be integers or slices, not str
        "global_step 1.7": ('{"global_step": 1.7}', "must be a whole number"),  # was: taken as step 1
        "malformed JSON": ('{"global_step": ', "malformed JSON"),  # was: the decoder's message without the file
    }
    text, message = texts[case]
    state.write_text(text)
    return state, message


HALF = ["no trainer_state.json", "optimizer.pt a folder", "no optimizer.pt", "no global_step", "a list",
        "global_step 1.7", "malformed JSON"]


@pytest.mark.parametrize("case", HALF)
def test_a_half_or_malformed_checkpoint_is_refused_naming_the_file_before_any_work(
    case, checkpoint, tmp_path, no_model_work, capsys
):
    path, message = make_half(checkpoint, case)
    line = cli_error(["probe", "--model", str(checkpoint), "--out", str(tmp_path / "r.json"), "--quiet"], capsys)
    assert str(path) in line and message in line
    assert not (tmp_path / "r.json").exists()


def test_the_intact_checkpoint_reads_its_step(checkpoint):
    assert checkpoints.is_trainer_checkpoint(checkpoint)
    assert checkpoints.read_step(checkpoint / checkpoints.STATE_FILE) == 3
    assert not checkpoints.is_trainer_checkpoint(checkpoint.parent)  # a folder with neither file: a plain model


class Payload:
    """An object torch.load(weights_only=True) refuses to unpickle."""


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: path.write_bytes(b""), "empty or truncated"),  # was: EOFError, no file named
        (lambda path: torch.save({"state": {}, "param_groups": [], "extra": Payload()}, path),
         "holds a Python object (test_checkpoints.Payload) that weights_only loading refuses"),  # was: 1,072 characters with ANSI escapes
        (lambda path: path.write_bytes(b"not a torch file at all"), "not a torch.save file"),
        (lambda path: torch.save([1, 2], path), "not an optimizer state_dict"),
    ],
)
def test_a_bad_optimizer_file_is_one_short_line_naming_it(write, message, tmp_path):
    path = tmp_path / "optimizer.pt"
    write(path)
    with pytest.raises(ValueError) as error:
        checkpoints.load_optimizer_state(path, "cpu")
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text
    assert "\n" not in text and "\x1b" not in text and len(text) < 200


def test_an_empty_optimizer_file_in_a_checkpoint_fails_at_its_checkpoint_in_one_line(checkpoint, tmp_path, capsys):
    (checkpoint / checkpoints.OPTIMIZER_FILE).write_bytes(b"")
    argv = ["probe", "--model", str(checkpoint), *SMALL, "--out", str(tmp_path / "r.json"), "--quiet"]
    line = cli_error(argv, capsys)
    assert f"{checkpoint / checkpoints.OPTIMIZER_FILE}: empty or truncated" in line


def test_a_run_with_a_checkpoint_lacking_its_config_is_refused_naming_it(tmp_path, no_model_work, capsys):
    """Was: exit 0, that checkpoint dropped without a word."""
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(run / f"checkpoint-{step}", seed=step)
    (run / "checkpoint-2" / "config.json").unlink()
    (run / "runs").mkdir()  # a trainer's log folder is not a checkpoint
    line = cli_error(["probe", "--model", str(run), "--out", str(tmp_path / "r.jsonl"), "--quiet"], capsys)
    assert f"{run / 'checkpoint-2'} holds no config.json" in line
    (run / "checkpoint-2" / "adapter_config.json").write_text("{}")
    assert "pass the run with --adapter" in cli_error(["probe", "--model", str(run), "--quiet"], capsys)


def test_a_model_folder_without_tokenizer_files_is_named(tmp_path, capsys):
    """Was: ``prompts [84, 104, …] are empty after tokenization`` (transformers builds an empty tokenizer)."""
    folder = save_checkpoint(tmp_path / "model", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    line = cli_error(["probe", "--model", str(folder), *SMALL, "--out", str(tmp_path / "r.json"), "--quiet"], capsys)
    assert f"{folder}: no tokenizer files" in line
