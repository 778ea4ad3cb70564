"""The command line's options, declared once: ``_OPTIONS`` (each with its argparse settings and whether it
changes the result, i.e. belongs to a record's resume key) and the parser built from them.

Adding an option is one entry in ``_OPTIONS``; ``fprobe.cli.plan`` fills the defaults that depend on
other options, and the probe reads the value from the plan's options.
"""

import argparse
import math
import re
from typing import NamedTuple

from fprobe.model import passes
from fprobe.rl.losses import LOSS_TYPES
from fprobe.sampling import toy

DEFAULT_LR = 1e-6
_DEFAULT_N_EVAL = 64
_DEFAULT_N_UPDATE_PROMPTS = 8
_DEFAULT_GROUP_SIZE = 8
_DEFAULT_GENERATION_BATCH = 64
FALLBACK_MAX_NEW_TOKENS = 256
SWEEP_FACTORS = (0.01, 0.1, 1.0, 10.0, 100.0)
EXIT_ERROR = 2
TRACEBACK_ENV = "FPROBE_TRACEBACK"
_COMMANDS = ("probe", "sweep")


def parse_lora(text: str) -> tuple[int, float, list[str]]:
    """``"r,alpha,targets"`` with targets separated by '+' or ':' → (r, alpha, [targets])."""
    try:
        r, alpha, targets = text.split(",")
        return int(r), float(alpha), [t for t in re.split(r"[+:]", targets) if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected r,alpha,targets (e.g. 8,16,q_proj+v_proj), got {text!r}") from None


def _is_learning_rate(value: float) -> bool:
    """Finite and non-negative (0 is allowed: the zero step)."""
    return math.isfinite(value) and value >= 0


def checked(convert, is_valid, expected: str):
    """An argparse type: ``convert(text)`` if that succeeds and passes ``is_valid``, else a usage error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


parse_lr = checked(float, _is_learning_rate, "a finite, non-negative learning rate")
positive_int = checked(int, lambda value: value >= 1, "a positive whole number")
_positive_float = checked(float, lambda value: math.isfinite(value) and value > 0, "a finite number > 0")


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates (e.g. 1e-6,1e-5), got {text!r}") \
            from None
    if not lrs or not all(map(_is_learning_rate, lrs)) or not any(lr > 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"expected finite, non-negative learning rates, at least one > 0, got {text!r}")
    return lrs


class _Option(NamedTuple):
    """One command-line option: its flag, argparse keyword arguments, the commands that take it, and
    whether it changes the result (then it is part of each record's resume key)."""

    flag: str
    settings: dict
    commands: tuple[str, ...] = _COMMANDS
    in_key: bool = True

    @property
    def name(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_OPTIONS = (
    _Option("--model", dict(nargs="+", default=[str(toy.DEFAULT_MODEL_PATH)], metavar="PATH_OR_NAME",
           help="transformers causal LM(s): local folders, cached hub names, or a folder of checkpoints "
           "(one record each); default: the built-in tiny toy policy"), in_key=False),
    _Option("--lora", dict(type=parse_lora, metavar="R,ALPHA,TARGETS",
           help="probe a new LoRA adapter, e.g. 8,16,q_proj+v_proj")),
    _Option("--adapter", dict(nargs="+", metavar="PATH", help="probe trained PEFT adapter(s) on top of the model: "
           "folders, or a LoRA run's folder of checkpoints (one record each); several adapters go on one --model, "
           "or pair one to one with several")),
    _Option("--trust-remote-code", dict(action="store_true", help="allow the model's own code (off unless asked)")),
    _Option("--prompts", dict(metavar="FILE",
           help="JSONL prompt records {'prompt': ..., 'answer': ...}; default: toy addition prompts")),
    _Option("--chat-template", dict(action="store_true", help="wrap each prompt in the tokenizer's chat template")),
    _Option("--reward", dict(metavar="NAME|module:function", help="reward: 'toy', 'numeric', module:function (the "
           "working directory is searched too) or path/to/file.py:function; default: 'toy' for the toy prompts, "
           "else 'numeric'")),
    _Option("--n-eval", dict(type=positive_int, default=_DEFAULT_N_EVAL, help="sequences in the evaluation batch E")),
    _Option("--replace", dict(action="store_true", help="draw E's prompts with replacement")),
    _Option("--eval-group-size", dict(type=positive_int, default=1, help="responses per prompt in E (--n-eval / this "
           "many prompts); E's prompts are then its independent units")),
    _Option("--n-update-prompts", dict(type=positive_int, default=_DEFAULT_N_UPDATE_PROMPTS,
           help="prompts in the update batch U")),
    _Option("--group-size", dict(type=positive_int, default=_DEFAULT_GROUP_SIZE, help="responses per update prompt")),
    _Option("--max-new-tokens", dict(type=positive_int, help="response length cap; default: the model's generation "
           f"config, else {FALLBACK_MAX_NEW_TOKENS}")),
    _Option("--temperature", dict(type=_positive_float, default=1.0,
           help="sampling temperature = the temperature of the measured policy")),
    _Option("--seed", dict(type=int, default=0)),
    _Option("--lr", dict(type=parse_lr, help=f"learning rate of the step (default {DEFAULT_LR:g}, or the optimizer "
           "state's, or a trainer checkpoint's at its step)")),
    _Option("--optimizer-state", dict(metavar="PATH", help="torch.optim AdamW/SGD state_dict (torch.save), looked up "
           "inside each model folder first; parameters in the order of the model's trainable named_parameters")),
    _Option("--loss", dict(choices=LOSS_TYPES, default="dr_grpo")),
    _Option("--predictors", dict(action="store_true", help="also score the published entropy-change predictors "
           "against Δh on U (fprobe.predictors)")),
    _Option("--second-order", dict(action="store_true", help="also compute δH₂ (a second-order Taylor pass)")),
    _Option("--dtype", dict(choices=("bfloat16", "float32", "float64"), help="model dtype; default float64 on CPU, "
           "float32 on GPU")),
    _Option("--eval-dtype", dict(choices=("float32", "float64"), help="dtype fprobe's passes compute in (float64: on a "
           "float64 copy of the weights); default: the model's, float32 for bfloat16")),
    _Option("--device", dict(help="default: cuda if available, else cpu"), in_key=False),
    _Option("--micro-batch", dict(type=positive_int, default=passes.DEFAULT_MICRO_BATCH,
           help="rows per forward/backward pass"), in_key=False),
    _Option("--generation-batch", dict(type=positive_int, default=_DEFAULT_GENERATION_BATCH,
           help="rows per generate call (the samples do not depend on it)"), in_key=False),
    _Option("--quiet", dict(action="store_true", help="no progress bars, no tables"), in_key=False),
    _Option("--timeout", dict(type=_positive_float, default=300.0,
           help="seconds a torchrun rank waits in a collective before failing"), in_key=False),
    _Option("--traceback", dict(action="store_true", help="on an error, the full Python traceback instead of one "
           f"line (also {TRACEBACK_ENV}=1)"), in_key=False),
    _Option("--out", dict(default="results.json", help="JSON, or JSONL (one record per model; resumable) for several "
           "models; default results.json(l)"), commands=("probe",), in_key=False),
    _Option("--plot", dict(metavar="PNG", help="also plot ΔH against η around the step's learning rate"),
           commands=("probe",), in_key=False),
    _Option("--lrs", dict(type=parse_lrs, metavar="LR,LR,...",
           help=f"default: the step's lr × {','.join(f'{f:g}' for f in SWEEP_FACTORS)}"), commands=("sweep",)),
    _Option("--out", dict(default="sweep.json", help="sweep table (JSON or JSONL); default sweep.json(l)"),
           commands=("sweep",), in_key=False),
    _Option("--plot", dict(metavar="PNG", help="default: the --out path with suffix .png"), commands=("sweep",),
           in_key=False),
)

# Options that change how a record is computed, not what it is: left out of the resume key.
EXECUTION_ONLY = tuple(dict.fromkeys(option.name for option in _OPTIONS if not option.in_key))

_HELP = {"probe": "one RL step: ΔH_true, δH₁, ratio, ESS", "sweep": "ΔH_true and δH₁ over learning rates, from one step"}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line too."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fprobe", description="What one RL step does to a language model's entropy.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        sub = commands.add_parser(command, help=_HELP[command])
        for option in _OPTIONS:
            if command in option.commands:
                sub.add_argument(option.flag, **option.settings)
    return parser
