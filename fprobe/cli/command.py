"""The ``fprobe`` command line (also ``python -m fprobe``).

``fprobe probe``: sample E and U from each model at θ₀, take one AdamW step on U, print the result
table and write it as JSON. With no arguments it probes the built-in tiny policy on the toy
addition task. ``fprobe sweep`` also evaluates ΔH_true and δH₁ over a list of learning rates from
that one step, and writes the sweep table (JSON) and its plot (PNG).

Several models (or a folder of checkpoints) write one record per model to a JSONL file, each record
appended as one line under a file lock; a rerun, or a concurrent run on the same file, skips the
records already there (key: model + settings), so an interrupted run resumes and loses nothing. Every
record is written before it is printed or plotted. Errors are one line on stderr, ``fprobe: error: …``,
exit code 2 (``--traceback`` or FPROBE_TRACEBACK=1: the full traceback).
"""

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from fprobe.rl import checkpoints
from fprobe import distributed
from fprobe.rl import optim
from fprobe.model import passes
from fprobe.sampling import prompts
from fprobe import files
from fprobe.sampling import rewards
from fprobe.sampling import toy
from fprobe.rl.losses import LOSS_TYPES
from fprobe.model.policy import Policy
from fprobe.entropy.probe import probe
from fprobe.sampling.generate import sample

DEFAULT_LR = 1e-6
DEFAULT_N_EVAL = 64
DEFAULT_N_UPDATE_PROMPTS = 8
DEFAULT_GROUP_SIZE = 8
DEFAULT_GENERATION_BATCH = 64
TOY_POOL_SIZE = 512
FALLBACK_MAX_NEW_TOKENS = 256
SWEEP_FACTORS = (0.01, 0.1, 1.0, 10.0, 100.0)
EXIT_ERROR = 2
TRACEBACK_ENV = "FPROBE_TRACEBACK"

# Options that change how a record is computed, not what it is: left out of the resume key.
EXECUTION_ONLY = (
    "model", "out", "plot", "quiet", "device", "micro_batch", "generation_batch", "timeout", "traceback",
)


def parse_lora(text: str) -> tuple[int, float, list[str]]:
    """``"r,alpha,targets"`` with targets separated by '+' or ':' → (r, alpha, [targets])."""
    try:
        r, alpha, targets = text.split(",")
        return int(r), float(alpha), [t for t in re.split(r"[+:]", targets) if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected r,alpha,targets (e.g. 8,16,q_proj+v_proj), got {text!r}") from None


def is_learning_rate(value: float) -> bool:
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


parse_lr = checked(float, is_learning_rate, "a finite, non-negative learning rate")
positive_int = checked(int, lambda value: value >= 1, "a positive whole number")
positive_float = checked(float, lambda value: math.isfinite(value) and value > 0, "a finite number > 0")


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates (e.g. 1e-6,1e-5), got {text!r}") \
            from None
    if not lrs or not all(map(is_learning_rate, lrs)) or not any(lr > 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"expected finite, non-negative learning rates, at least one > 0, got {text!r}")
    return lrs


def common_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", nargs="+", default=[str(toy.DEFAULT_MODEL_PATH)], metavar="PATH_OR_NAME",
        help="transformers causal LM(s): local folders, cached hub names, or a folder of checkpoints "
        "(one record each); default: the built-in tiny toy policy")
    add("--lora", type=parse_lora, metavar="R,ALPHA,TARGETS", help="probe a new LoRA adapter, e.g. 8,16,q_proj+v_proj")
    add("--adapter", metavar="PATH", help="probe a trained PEFT adapter on top of the model")
    add("--trust-remote-code", action="store_true", help="allow the model's own code (off unless asked)")
    add("--prompts", metavar="FILE",
        help="JSONL prompt records {'prompt': ..., 'answer': ...}; default: toy addition prompts")
    add("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    add("--reward", metavar="NAME|module:function", help="reward: 'toy', 'numeric', module:function (the working "
        "directory is searched too) or path/to/file.py:function; default: 'toy' for the toy prompts, else 'numeric'")
    add("--n-eval", type=positive_int, default=DEFAULT_N_EVAL, help="sequences in the evaluation batch E")
    add("--replace", action="store_true", help="draw E's prompts with replacement")
    add("--eval-group-size", type=positive_int, default=1,
        help="responses per prompt in E (--n-eval / this many prompts); E's prompts are then its independent units")
    add("--n-update-prompts", type=positive_int, default=DEFAULT_N_UPDATE_PROMPTS, help="prompts in the update batch U")
    add("--group-size", type=positive_int, default=DEFAULT_GROUP_SIZE, help="responses per update prompt")
    add("--max-new-tokens", type=positive_int, help=f"response length cap; default: the model's generation config, "
        f"else {FALLBACK_MAX_NEW_TOKENS}")
    add("--temperature", type=positive_float, default=1.0, help="sampling temperature = the temperature of the measured policy")
    add("--seed", type=int, default=0)
    add("--lr", type=parse_lr, help=f"learning rate of the step (default {DEFAULT_LR:g}, or the optimizer state's, "
        "or a trainer checkpoint's at its step)")
    add("--optimizer-state", metavar="PATH", help="torch.optim AdamW/SGD state_dict (torch.save), looked up "
        "inside each model folder first; parameters in the order of the model's trainable named_parameters")
    add("--loss", choices=LOSS_TYPES, default="dr_grpo")
    add("--predictors", action="store_true",
        help="also score the published entropy-change predictors against Δh on U (fprobe.predictors)")
    add("--second-order", action="store_true", help="also compute δH₂ (forward over forward)")
    add("--dtype", choices=("float32", "float64"), help="model dtype; default float64 on CPU, float32 on GPU")
    add("--device", help="default: cuda if available, else cpu")
    add("--micro-batch", type=positive_int, default=passes.DEFAULT_MICRO_BATCH, help="rows per forward/backward pass")
    add("--generation-batch", type=positive_int, default=DEFAULT_GENERATION_BATCH,
        help="rows per generate call (the samples do not depend on it)")
    add("--quiet", action="store_true", help="no progress bars, no tables")
    add("--timeout", type=positive_float, default=300.0, help="seconds a torchrun rank waits in a collective before failing")
    add("--traceback", action="store_true", help=f"on an error, the full Python traceback instead of one line "
        f"(also {TRACEBACK_ENV}=1)")


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line too."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fprobe", description="What one RL step does to a language model's entropy.")
    commands = parser.add_subparsers(dest="command", required=True)
    probe_cmd = commands.add_parser("probe", help="one RL step: ΔH_true, δH₁, ratio, ESS")
    common_options(probe_cmd)
    probe_cmd.add_argument("--out", default="results.json", help="JSON, or JSONL (one record per model; "
                           "resumable) for several models; default results.json(l)")
    probe_cmd.add_argument("--plot", metavar="PNG", help="also plot ΔH against η around the step's learning rate")
    sweep_cmd = commands.add_parser("sweep", help="ΔH_true and δH₁ over learning rates, from one step")
    common_options(sweep_cmd)
    factors = ",".join(f"{f:g}" for f in SWEEP_FACTORS)
    sweep_cmd.add_argument("--lrs", type=parse_lrs, metavar="LR,LR,...", help=f"default: the step's lr × {factors}")
    sweep_cmd.add_argument("--out", default="sweep.json", help="sweep table (JSON or JSONL); default sweep.json(l)")
    sweep_cmd.add_argument("--plot", metavar="PNG", help="default: the --out path with suffix .png")
    return parser


def device_type(name: str) -> str:
    try:
        return torch.device(name).type
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device: {error}") from None


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other options (device → dtype, prompts → reward)."""
    if args.n_eval % args.eval_group_size:
        raise ValueError(f"--n-eval {args.n_eval} is not a whole number of groups of --eval-group-size {args.eval_group_size}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float64" if device_type(args.device) == "cpu" else "float32")
    files.check_writable(args.out, "--out")
    args.reward = args.reward or ("toy" if args.prompts is None else "numeric")
    if args.command == "sweep" and args.plot is None:
        args.plot = str(Path(args.out).with_suffix(".png"))
    if args.lr == 0 and (args.command == "sweep" or args.plot is not None):
        raise ValueError("--lr 0 takes no step, so there is no sweep or plot to make from it: give --lr > 0"
                         + (" or leave out --plot" if args.command == "probe" else ""))
    return args


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def natural_key(path: Path):
    """Sort key that puts checkpoint-9 before checkpoint-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def check_cached(name: str) -> None:
    """A hub name must already be in the local cache: fprobe does not download."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"model {name!r} not found: no such folder, and not a model in the local Hugging Face cache "
            "(fprobe does not download)"
        )


def expand_models(specs: list[str]) -> list[str]:
    """Model folders and hub names, a folder of checkpoints replaced by its checkpoints in natural order."""
    models = []
    for spec in specs:
        path = Path(spec)
        if not path.is_dir():
            check_cached(spec)
            models.append(spec)
        elif is_model_folder(path):
            models.append(str(path.resolve()))
        else:
            children = sorted((c for c in path.iterdir() if c.is_dir() and is_model_folder(c)), key=natural_key)
            if not children:
                raise FileNotFoundError(f"{spec}: neither a model folder (no config.json) nor a folder of checkpoints")
            models += [str(c.resolve()) for c in children]
    return list(dict.fromkeys(models))  # a checkpoint named twice (c1 c1, or run run/checkpoint-2) runs once


def settings_key(args: argparse.Namespace, model: str) -> dict:
    """The resume key of one record: the model and every option that changes the result."""
    settings = {k: v for k, v in vars(args).items() if k not in EXECUTION_ONLY}
    for name in ("prompts", "adapter"):
        if settings[name] is not None and Path(settings[name]).exists():
            settings[name] = str(Path(settings[name]).resolve())
    return {"model": model, **settings}


def read_records(path: Path) -> list[dict]:
    """The records of a results JSONL file (none if it does not exist), read under its lock."""
    records = []
    for where, record in files.read_jsonl_locked(path, "results file"):
        if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
            raise ValueError(f"{where}: not an fprobe record (no 'key' object)")
        records.append(record)
    return records


def finished_keys(out: Path, jsonl: bool) -> set[str]:
    """The resume keys already in a JSONL results file (re-read before each model: another run may be
    appending to the same file)."""
    return {files.canonical(r["key"]) for r in read_records(out)} if jsonl else set()


def save_record(out: Path, jsonl: bool, record: dict) -> bool:
    """Append the record to a JSONL file unless a concurrent run wrote its key first (returns whether it
    was written), or write it as the JSON file."""
    if jsonl:
        return files.append_json_line(out, record, unique="key")
    files.write_atomic(out, json.dumps(record, indent=2) + "\n")
    return True


def output_file(out: str, n_models: int) -> tuple[Path, bool]:
    """(path, JSONL?): one record per line (resumable) for an explicit .jsonl path or several models
    (then a .json path becomes .jsonl); else a single JSON document."""
    path = Path(out)
    jsonl = path.suffix == ".jsonl" or n_models > 1
    return (path.with_suffix(".jsonl") if jsonl else path), jsonl


def load_prompt_pool(args: argparse.Namespace) -> list[dict]:
    return toy.make_prompts(TOY_POOL_SIZE, args.seed) if args.prompts is None else prompts.load_prompts(args.prompts)


def load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {model!r}: {error}") from None


def load_policy(args: argparse.Namespace, model: str) -> Policy:
    return Policy.from_pretrained(
        model,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        lora=args.lora,
        adapter=args.adapter,
        temperature=args.temperature,
        trust_remote_code=args.trust_remote_code,
    )


def max_new_tokens(args: argparse.Namespace, policy: Policy) -> int:
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return getattr(policy.model.generation_config, "max_new_tokens", None) or FALLBACK_MAX_NEW_TOKENS


def optimizer_state_file(spec: str, model: str) -> Path:
    """``spec`` inside the model folder if it is there (each checkpoint its own state), else as given."""
    inside = Path(model) / spec
    path = inside if inside.is_file() else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"optimizer state not found: {spec} (looked in {model} and the working directory)")
    return path


def optimizer_and_state(args: argparse.Namespace, model: str, policy: Policy):
    """AdamW at the default rate with a fresh state; in a transformers/TRL ``checkpoint-N`` folder its saved
    optimizer, moments and the scheduler's rate for update N + 1 (``fprobe.checkpoints``); or a saved torch state's."""
    if args.optimizer_state is None:
        folder = args.adapter or model  # a LoRA run's checkpoint-N is the adapter folder
        if checkpoints.is_trainer_checkpoint(folder):
            saved = checkpoints.load(folder, policy)
            return saved.optimizer, saved.opt_state
        return optim.adamw(lr=DEFAULT_LR), None
    path = optimizer_state_file(args.optimizer_state, model)
    state_dict = torch.load(path, map_location=policy.device, weights_only=True)
    return optim.from_torch(state_dict, list(policy.params), policy.params)


def check_plot_path(path: str) -> None:
    """A plot path matplotlib can write: a supported image suffix, in a writable folder."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        problem = f"'.{suffix}' is not an image type matplotlib writes" if suffix else "no image suffix"
        raise ValueError(f"--plot {path!r}: {problem}; use one of {', '.join('.' + f for f in sorted(formats))}")
    files.check_writable(path, "--plot")


def plot_path(args: argparse.Namespace, index: int, jsonl: bool) -> Path | None:
    if args.plot is None:
        return None
    path = Path(args.plot)
    return path.with_name(f"{path.stem}-{index}{path.suffix}") if jsonl else path


def sweep_lrs(args: argparse.Namespace, lr0: float) -> list[float]:
    return getattr(args, "lrs", None) or [lr0 * f for f in SWEEP_FACTORS]


def probe_model(args, model: str, pool: list[dict], reward, key: dict, plot: Path | None):
    """Sample, step and measure one model: (its record, its sweep or None, its report text)."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(model, args.trust_remote_code)
    policy = load_policy(args, model)
    loaded = time.perf_counter()
    length = max_new_tokens(args, policy)
    E, U = sample(
        policy, tokenizer, pool,
        n_eval=args.n_eval, n_update_prompts=args.n_update_prompts, group_size=args.group_size, reward=reward,
        max_new_tokens=length, seed=args.seed, replace=args.replace, eval_group_size=args.eval_group_size,
        chat_template=args.chat_template, batch_size=args.generation_batch, quiet=args.quiet,
    )
    sampled = time.perf_counter()
    optimizer, opt_state = optimizer_and_state(args, model, policy)
    result = probe(
        policy, E, U, optimizer, opt_state, lr=args.lr, loss=args.loss, second_order=args.second_order,
        micro_batch=args.micro_batch, progress=not args.quiet,
    )
    record = {
        "key": key,
        "model": model,
        "sampling": {
            "n_eval": len(E), "eval_tokens": E.n_tokens, "n_update": len(U), "update_tokens": U.n_tokens,
            "mean_reward": float(U.rewards.mean()), "max_new_tokens": length,
        },
        "timings": {"load": loaded - start, "sample": sampled - loaded},
        "result": result.to_dict(),
    }
    if args.predictors:
        record["predictors"] = result.predictors().to_dict()
    sweep = None
    if (args.command == "sweep" or plot is not None) and result.lr_used == 0:
        warnings.warn(f"{model}: the step's learning rate is 0 (its optimizer state's), so there is no sweep or plot")
        plot = None
    elif args.command == "sweep" or plot is not None:
        sweep = result.sweep(sweep_lrs(args, result.lr_used), progress=not args.quiet)
        record["sweep"] = sweep.to_dict()
    if plot is not None:
        record["plot"] = str(plot)
    s, t = record["sampling"], record["timings"]
    report = [
        f"\n{model}\nloaded in {t['load']:.2f} s; sampled E ({s['n_eval']} responses, {s['eval_tokens']} tokens) "
        f"and U ({args.n_update_prompts}×{args.group_size}, {s['update_tokens']} tokens, mean reward "
        f"{s['mean_reward']:.3g}) in {t['sample']:.2f} s",
        str(result),
        *precision_note(result),
    ]
    return record, sweep, "\n".join(report + ([str(sweep)] if sweep is not None else []))


def precision_note(result, target: float = 0.1) -> list[str]:
    """A line with the |E| for a ``target`` relative error when ΔH_true's standard error exceeds a quarter of |ΔH_true|."""
    se, value = result.delta_h_true_se, result.delta_h_true
    if se is None or not value or se <= abs(value) / 4:
        return []
    return [f"ΔH_true's standard error is {se / abs(value):.0%} of |ΔH_true| with |E| = {result.n_eval}: |E| ≈ "
            f"{result.n_eval_for(target)} (--n-eval) would bring it to {target:.0%}"]


def say(text: str, stderr: bool = False) -> None:
    """Print to stdout (or stderr); if its reader went away (``fprobe … 2>&1 | head``), the rest of that
    stream's output is dropped and the run goes on: the records are in the results file."""
    stream = sys.stderr if stderr else sys.stdout
    if stream is None:  # started with the stream closed (2>&-)
        return
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


@contextlib.contextmanager
def command_line_output():
    """Warnings as one ``fprobe: warning:`` line each (libraries' deprecation notices dropped);
    transformers' own logs and loading bars silenced."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.showwarning = lambda message, *_, **__: say(f"fprobe: warning: {message}", stderr=True)
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def run(args: argparse.Namespace) -> None:
    """Validate every input first (output and plot paths included), then probe model after model,
    writing each record as soon as it exists, before printing or plotting it."""
    models = expand_models(args.model)
    out, jsonl = output_file(args.out, len(models))
    files.check_writable(out, "--out")
    if jsonl and files.is_stream(out):
        raise ValueError(f"--out {str(out)!r}: JSONL results are read back to resume, so they need a regular file")
    if args.plot is not None:
        check_plot_path(args.plot)
    pool = load_prompt_pool(args)
    reward = rewards.resolve_reward(args.reward)
    finished_keys(out, jsonl)  # a malformed results file fails now, not after the first model
    for index, model in enumerate(models):
        key = settings_key(args, model)
        if files.canonical(key) in finished_keys(out, jsonl):
            if not args.quiet:
                say(f"{model}: already in {out}, skipped")
            continue
        plot = plot_path(args, index, jsonl)
        try:
            record, sweep, report = probe_model(args, model, pool, reward, key, plot)
        except Exception as error:
            if model in str(error):
                raise
            raise RuntimeError(f"{model}: {one_line(error)}") from error
        if not distributed.is_main():
            continue
        written = save_record(out, jsonl, record)
        if plot is not None and sweep is not None:
            import matplotlib.pyplot as plt

            plt.close(sweep.plot(plot))
        if not args.quiet:
            say(report)
            say(f"wrote {out}" if written else f"{model}: a concurrent run wrote this record to {out} first; kept it")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolve_defaults(args)
        if distributed.init_from_env(args.timeout) and not distributed.is_main():
            args.quiet = True
        with command_line_output():
            run(args)
    except KeyboardInterrupt:
        say("fprobe: interrupted (the records written so far are complete)", stderr=True)
        return 130
    except Exception as error:  # every failure is reported as one line, without a traceback unless asked
        if args.traceback or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        say(f"fprobe: error: {one_line(error)}", stderr=True)
        return EXIT_ERROR
    return 0
