"""The command line's plan: every option, default and input checked once, before any model work, into a
frozen ``Plan`` that ``fprobe.cli.command`` runs.

``make_plan(namespace)``: the options with their dependent defaults (``resolve_defaults``), the units of
work (each model, or each model and adapter pair, in order; ``expand_models`` / ``expand_adapters``), the
output file, the prompt pool and the reward. Each refusal is one line naming the option or the file.
"""

import argparse
import collections
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from fprobe import files
from fprobe.cli.parse import EXECUTION_ONLY
from fprobe.rl import checkpoints
from fprobe.sampling import prompts, rewards, toy

TOY_POOL_SIZE = 512
_CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
_MODEL_FILE = "config.json"
_ADAPTER_FILE = "adapter_config.json"


def device_type(name: str) -> str:
    try:
        return torch.device(name).type
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device: {error}") from None


def resolve_defaults(namespace: argparse.Namespace):
    """The parsed options as an immutable named tuple, with the defaults that depend on other options
    filled in (device → dtype, prompts → reward, sweep → its plot path); the namespace is left as it is."""
    options = dict(vars(namespace))
    if options["n_eval"] % options["eval_group_size"]:
        raise ValueError(f"--n-eval {options['n_eval']} is not a whole number of groups of --eval-group-size "
                         f"{options['eval_group_size']}")
    options["device"] = options["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    options["dtype"] = options["dtype"] or ("float64" if device_type(options["device"]) == "cpu" else "float32")
    options["reward"] = options["reward"] or ("toy" if options["prompts"] is None else "numeric")
    if options["command"] == "sweep" and options["plot"] is None and Path(options["out"]).name:
        options["plot"] = str(Path(options["out"]).with_suffix(".png"))  # a nameless --out fails its own check
    return collections.namedtuple("Options", options)(**options)


class Unit(NamedTuple):
    """One record's model and its trained adapter (None: the model alone, or a new ``--lora``)."""

    model: str
    adapter: str | None = None

    @property
    def name(self) -> str:
        return self.model if self.adapter is None else f"{self.adapter} (on {self.model})"

    @property
    def checkpoint(self) -> str:
        """The folder that may hold a Trainer's optimizer state: a LoRA run's checkpoint-N is the adapter."""
        return self.adapter or self.model


@dataclass(frozen=True)
class Plan:
    """What a command-line run does: ``options`` (``resolve_defaults``), the ``units`` in order, the results
    file ``out`` (``jsonl``: one record per line, resumable), the prompt ``pool`` and the ``reward``."""

    options: tuple
    units: tuple[Unit, ...]
    out: Path
    jsonl: bool
    pool: tuple[dict, ...]
    reward: Callable

    def quietened(self) -> "Plan":
        return replace(self, options=self.options._replace(quiet=True))

    def key(self, unit: Unit) -> dict:
        return settings_key(self.options, unit.model, unit.adapter)

    def plot_path(self, index: int) -> Path | None:
        if self.options.plot is None:
            return None
        path = Path(self.options.plot)
        return path.with_name(f"{path.stem}-{index}{path.suffix}") if self.jsonl else path


def _natural_key(path: Path):
    """Sort key that puts checkpoint-9 before checkpoint-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _check_cached(name: str) -> None:
    """A hub name must already be in the local cache: fprobe does not download."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, _MODEL_FILE)
    except ValueError:
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"model {name!r} not found: no such folder, and not a model in the local Hugging Face cache "
            "(fprobe does not download)"
        )


def _run_children(folder: Path, marker: str, option: str) -> list[Path]:
    """The checkpoints of a run folder in natural order: children holding ``marker``, and every
    ``checkpoint-N`` child, which must hold it (ValueError naming the first that does not)."""
    children = [c for c in folder.iterdir() if c.is_dir() and ((c / marker).is_file() or _CHECKPOINT_NAME.fullmatch(c.name))]
    for child in sorted(children, key=_natural_key):
        if not (child / marker).is_file():
            hint = (" (an adapter checkpoint: pass the run with --adapter and its base model with --model)"
                    if marker == _MODEL_FILE and (child / _ADAPTER_FILE).is_file() else "")
            raise ValueError(f"{option} {folder}: {child} holds no {marker}{hint}")
    return sorted(children, key=_natural_key)


def expand_models(specs: list[str]) -> list[str]:
    """Model folders and hub names, a folder of checkpoints replaced by its checkpoints in natural order."""
    models = []
    for spec in specs:
        path = Path(spec)
        if not path.is_dir():
            _check_cached(spec)
            models.append(spec)
        elif (path / _MODEL_FILE).is_file():
            models.append(str(path.resolve()))
        else:
            children = _run_children(path, _MODEL_FILE, "--model")
            if not children:
                raise FileNotFoundError(f"{spec}: neither a model folder (no config.json) nor a folder of checkpoints")
            models += [str(c.resolve()) for c in children]
    return list(dict.fromkeys(models))  # a checkpoint named twice (c1 c1, or run run/checkpoint-2) runs once


def expand_adapters(specs: list[str] | None) -> list[str]:
    """Adapter folders, a LoRA run's folder of checkpoints replaced by its checkpoints in natural order."""
    adapters = []
    for spec in specs or []:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"--adapter {spec}: no such folder")
        children = [path] if (path / _ADAPTER_FILE).is_file() else _run_children(path, _ADAPTER_FILE, "--adapter")
        if not children:
            raise FileNotFoundError(f"--adapter {spec}: neither an adapter folder (no {_ADAPTER_FILE}) nor a run of them")
        adapters += [str(c.resolve()) for c in children]
    return list(dict.fromkeys(adapters))


def pair(models: list[str], adapters: list[str]) -> list[Unit]:
    """Each model alone; or every adapter on the one model; or the adapters paired with the models in order."""
    if not adapters:
        return [Unit(model) for model in models]
    if len(models) == 1:
        return [Unit(models[0], adapter) for adapter in adapters]
    if len(models) == len(adapters):
        return [Unit(model, adapter) for model, adapter in zip(models, adapters)]
    raise ValueError(f"--adapter gives {len(adapters)} adapters for {len(models)} models: give one model "
                     "(every adapter goes on it) or one adapter per model")


def settings_key(options, model: str, adapter: str | None = None) -> dict:
    """The resume key of one record: the model, its adapter and every option that changes the result."""
    settings = {k: v for k, v in options._asdict().items() if k not in EXECUTION_ONLY}
    settings["adapter"] = adapter
    for name in ("prompts", "adapter"):
        if settings[name] is not None and Path(settings[name]).exists():
            settings[name] = str(Path(settings[name]).resolve())
    return {"model": model, **settings}


def _output_file(out: str, n_records: int) -> tuple[Path, bool]:
    """(path, JSONL?): one record per line (resumable) for an explicit .jsonl path or several records
    (then a .json path becomes .jsonl); else a single JSON document."""
    path = Path(out)
    jsonl = path.suffix == ".jsonl" or n_records > 1
    return (path.with_suffix(".jsonl") if jsonl else path), jsonl


def _check_output(given: str, out: Path, jsonl: bool) -> None:
    """The results file can be written (named as given unless it became .jsonl), and resumed from if JSONL."""
    files.check_writable(given if Path(given) == out else out, "--out")
    if jsonl and files.is_stream(out):
        raise ValueError(f"--out {str(out)!r}: JSONL results are read back to resume, so they need a regular file")


def _check_plot_path(path: str) -> None:
    """A plot path matplotlib can write: a supported image suffix, in a writable folder."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        problem = f"'.{suffix}' is not an image type matplotlib writes" if suffix else "no image suffix"
        raise ValueError(f"--plot {path!r}: {problem}; use one of {', '.join('.' + f for f in sorted(formats))}")
    files.check_writable(path, "--plot")


def _check_lr(options) -> None:
    if options.lr == 0 and (options.command == "sweep" or options.plot is not None):
        raise ValueError("--lr 0 takes no step, so there is no sweep or plot to make from it: give --lr > 0"
                         + (" or leave out --plot" if options.command == "probe" else ""))


def optimizer_state_file(spec: str, model: str) -> Path:
    """``spec`` inside the model folder if it is there (each checkpoint its own state), else as given."""
    inside = Path(model) / spec
    path = inside if inside.is_file() else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"optimizer state not found: {spec} (looked in {model} and the working directory)")
    return path


def _check_optimizer_source(options, unit: Unit) -> None:
    """The optimizer state a unit will start from is there: a ``--optimizer-state`` file, or a Trainer
    checkpoint's ``optimizer.pt`` beside a readable ``trainer_state.json`` (``checkpoints.is_trainer_checkpoint``;
    ``optimizer.pt`` itself is read when the unit runs)."""
    if options.optimizer_state is not None:
        optimizer_state_file(options.optimizer_state, unit.model)
    elif checkpoints.is_trainer_checkpoint(unit.checkpoint):
        checkpoints.read_step(Path(unit.checkpoint) / checkpoints.STATE_FILE)


def _read_records(path: Path) -> list[dict]:
    """The records of a results JSONL file (none if it does not exist), read under its lock."""
    records = []
    for where, record in files.read_jsonl_locked(path, "results file"):
        if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
            raise ValueError(f"{where}: not an fprobe record (no 'key' object)")
        records.append(record)
    return records


def finished_keys(out: Path, jsonl: bool) -> set[str]:
    """The resume keys already in a JSONL results file (re-read before each record: another run may be
    appending to the same file)."""
    return {files.canonical(r["key"]) for r in _read_records(out)} if jsonl else set()


def _load_prompt_pool(options) -> tuple[dict, ...]:
    pool = toy.make_prompts(TOY_POOL_SIZE, options.seed) if options.prompts is None else prompts.load_prompts(options.prompts)
    return tuple(pool)


def make_plan(namespace: argparse.Namespace) -> Plan:
    """Every check of the command line, once, in order: options, models and adapters, optimizer states,
    output and plot paths, prompts, reward, and the results file already there."""
    options = resolve_defaults(namespace)
    _check_lr(options)
    units = pair(expand_models(options.model), expand_adapters(options.adapter))
    for unit in units:
        _check_optimizer_source(options, unit)
    out, jsonl = _output_file(options.out, len(units))
    _check_output(options.out, out, jsonl)
    if options.plot is not None:
        _check_plot_path(options.plot)
    pool = _load_prompt_pool(options)
    reward = rewards.resolve_reward(options.reward)
    finished_keys(out, jsonl)  # a malformed results file fails now, not after the first record
    return Plan(options, tuple(units), out, jsonl, pool, reward)
