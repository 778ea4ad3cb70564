"""Checkpoints of transformers/TRL trainers (``checkpoint-N/``): the saved optimizer state keyed back to
parameter names, and the learning rate of the next update, N + 1 — the step a probe of θ_N takes.

``optimizer.pt`` is the ``state_dict`` of the Trainer's torch optimizer, whose parameters are numbered
0, 1, … in the order of its param groups. ``Trainer.create_optimizer`` builds two groups over the
trainable parameters in ``named_parameters()`` order: those that get weight decay
(``Trainer.get_decay_parameter_names``: outside LayerNorm modules, no "bias" or norm in the name), then
the others. The Trainer saves after its scheduler has stepped, so the param groups' rates are those of
update N + 1 (``trainer_state.json``'s ``learning_rate`` at step N is the rate of update N, the one that
*made* θ_N; it is not used). ``trainer_state.json`` gives N. The state is loaded with
``torch.load(..., weights_only=True)``; ``training_args.bin`` (a pickle) is never read.
"""

import json
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import torch

from fprobe.rl import optim

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


class _TrainerCheckpoint(NamedTuple):
    """The optimizer and state of ``checkpoint-N`` (N = ``step``), with the rate ``lr`` of update N + 1."""

    optimizer: optim.Optimizer
    opt_state: object
    lr: float
    step: int


def is_trainer_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a Trainer's ``optimizer.pt`` and ``trainer_state.json`` (False if it holds
    neither: a plain model folder). ValueError naming the file if it holds one without the other, or one
    that is not a regular file: probing it with a fresh optimizer would silently measure another step."""
    files = {name: Path(folder) / name for name in (OPTIMIZER_FILE, STATE_FILE)}
    present = {name: path for name, path in files.items() if path.exists() or path.is_symlink()}
    if not present:
        return False
    for name, path in files.items():
        if name not in present:
            other = next(iter(present))
            raise ValueError(f"{path}: missing beside {other}, so the checkpoint's step and learning rate are unknown")
        if not path.is_file():
            raise ValueError(f"{path}: not a regular file")
    return True


def read_step(path: Path) -> int:
    """``global_step`` of a ``trainer_state.json``: a whole number ≥ 0; ValueError naming the file otherwise."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object with 'global_step', got a {type(state).__name__}")
    if "global_step" not in state:
        raise ValueError(f"{path}: no 'global_step' (not a Trainer's state)")
    step = state["global_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: 'global_step' must be a whole number >= 0, got {step!r}")
    return step


def load_optimizer_state(path: str | Path, device) -> dict:
    """A torch optimizer ``state_dict`` saved with ``torch.save``, loaded with ``weights_only=True`` (no
    pickle is executed); ValueError naming the file when it is empty, not a torch file, holds other
    objects than tensors and numbers, or is not an optimizer's state_dict."""
    path = Path(path)
    try:
        state_dict = torch.load(path, map_location=device, weights_only=True)
    except EOFError:
        raise ValueError(f"{path}: empty or truncated, not a torch.save file") from None
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is None:
            raise ValueError(f"{path}: not a torch.save file (unreadable as one)") from None
        raise ValueError(f"{path}: holds a Python object ({found.group(1)}) that weights_only loading refuses; "
                         "fprobe does not unpickle") from None
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a torch.save file ({first})") from None
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list)
            and isinstance(state_dict.get("state"), dict)):
        raise ValueError(f"{path}: not an optimizer state_dict (no 'state' and 'param_groups')")
    return state_dict


def trainer_parameter_groups(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without), trainable only, as ``Trainer.create_optimizer`` groups them."""
    from transformers import Trainer  # here: importing the Trainer takes seconds, which the command line need not pay

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no trainer state: the model alone decides
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return [n for n in trainable if n in decay], [n for n in trainable if n not in decay]


def _parameter_order(state_dict: dict, model: torch.nn.Module) -> list[str]:
    """Names of the optimizer's parameter indices 0, 1, …; ValueError if its groups are not the Trainer's split."""
    groups = trainer_parameter_groups(model)
    saved = [len(group["params"]) for group in state_dict["param_groups"]]
    if saved != [len(names) for names in groups]:
        raise ValueError(
            f"the saved optimizer's param groups hold {saved} parameters, but the Trainer's split of this model's "
            f"trainable parameters (with / without weight decay) holds {[len(n) for n in groups]}: "
            "a custom optimizer, or another model; pass --optimizer-state with parameters in named_parameters() order"
        )
    return [name for names in groups for name in names]


def _check_shapes(state_dict: dict, names: list[str], params: dict) -> None:
    for index, state in state_dict["state"].items():
        name = names[index]
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"optimizer state {key!r} of parameter {index} has shape {tuple(value.shape)}, but {name!r} "
                    f"has {tuple(params[name].shape)}: the checkpoint's optimizer does not belong to this model"
                )


def load(folder: str | Path, policy) -> _TrainerCheckpoint:
    """The optimizer state of ``folder`` (a ``checkpoint-N``) for ``policy`` (the model loaded from it), with
    the saved param groups' rates: the scheduler's rates for update N + 1."""
    folder = Path(folder)
    step = read_step(folder / STATE_FILE)
    state_dict = load_optimizer_state(folder / OPTIMIZER_FILE, policy.device)
    names = _parameter_order(state_dict, policy.model)
    params = policy.params
    _check_shapes(state_dict, names, params)
    optimizer, opt_state = optim.from_torch(state_dict, names, params)
    return _TrainerCheckpoint(optimizer, opt_state, optimizer.lr, step)
