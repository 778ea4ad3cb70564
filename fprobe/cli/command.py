"""The ``fprobe`` command line (also ``python -m fprobe``): ``main`` parses the options
(``fprobe.cli.parse``), checks them once into a frozen plan (``fprobe.cli.plan``) and runs it.

``fprobe probe``: sample E and U from each model at θ₀, take one AdamW step on U, print the result
table and write it as JSON. With no arguments it probes the built-in tiny policy on the toy
addition task. ``fprobe sweep`` also evaluates ΔH_true and δH₁ over a list of learning rates from
that one step, and writes the sweep table (JSON) and its plot (PNG).

Several models (or a folder of checkpoints, or several adapters) write one record each to a JSONL file,
each record appended as one line under a file lock; a rerun, or a concurrent run on the same file, skips
the records already there (key: model, adapter + settings), so an interrupted run resumes and loses
nothing. Every record is written before it is printed or plotted. Errors are one line on stderr,
``fprobe: error: …``, exit code 2 (``--traceback`` or FPROBE_TRACEBACK=1: the full traceback).
"""

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from fprobe import distributed, files
from fprobe.cli.parse import (  # noqa: F401  (parse_lora, parse_lr, parse_lrs: the command line's option types)
    DEFAULT_LR, EXIT_ERROR, FALLBACK_MAX_NEW_TOKENS, SWEEP_FACTORS, TRACEBACK_ENV, build_parser, parse_lora, parse_lr,
    parse_lrs,
)
from fprobe.cli.plan import (  # noqa: F401  (expand_models, resolve_defaults, settings_key, TOY_POOL_SIZE: the plan's parts)
    TOY_POOL_SIZE, Plan, Unit, expand_models, finished_keys, make_plan, optimizer_state_file, resolve_defaults,
    settings_key,
)
from fprobe.entropy.probe import probe
from fprobe.model.policy import Policy
from fprobe.rl import checkpoints, optim
from fprobe.sampling.generate import sample


def _save_record(out: Path, jsonl: bool, record: dict) -> bool:
    """Append the record to a JSONL file unless a concurrent run wrote its key first (returns whether it
    was written), or write it as the JSON file."""
    if jsonl:
        return files.append_json_line(out, record, unique="key")
    files.write_atomic(out, json.dumps(record, indent=2) + "\n")
    return True


def _load_tokenizer(model: str, trust_remote_code: bool):
    """The model folder's (or cached hub model's) tokenizer; ValueError if there is none (transformers
    would build one with an empty vocabulary from the config alone)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {model!r}: {error}") from None
    if not tokenizer.vocab_size:
        raise ValueError(f"{model}: no tokenizer files (tokenizer.json, or a vocabulary with tokenizer_config.json)")
    return tokenizer


def load_policy(options, unit: Unit) -> Policy:
    return Policy.from_pretrained(
        unit.model,
        dtype=getattr(torch, options.dtype),
        device=options.device,
        lora=options.lora,
        adapter=unit.adapter,
        temperature=options.temperature,
        trust_remote_code=options.trust_remote_code,
    )


def max_new_tokens(options, policy: Policy) -> int:
    if options.max_new_tokens is not None:
        return options.max_new_tokens
    return getattr(policy.model.generation_config, "max_new_tokens", None) or FALLBACK_MAX_NEW_TOKENS


def _optimizer_and_state(options, unit: Unit, policy: Policy):
    """AdamW at the default rate with a fresh state; in a transformers/TRL ``checkpoint-N`` folder its saved
    optimizer, moments and the scheduler's rate for update N + 1 (``fprobe.checkpoints``); or a saved torch state's."""
    if options.optimizer_state is None:
        if checkpoints.is_trainer_checkpoint(unit.checkpoint):
            saved = checkpoints.load(unit.checkpoint, policy)
            return saved.optimizer, saved.opt_state
        return optim.adamw(lr=DEFAULT_LR), None
    path = optimizer_state_file(options.optimizer_state, unit.model)
    state_dict = checkpoints.load_optimizer_state(path, policy.device)
    return optim.from_torch(state_dict, list(policy.params), policy.params)


def _sweep_lrs(options, lr0: float) -> list[float]:
    return getattr(options, "lrs", None) or [lr0 * f for f in SWEEP_FACTORS]


def probe_model(options, unit: Unit, pool, reward, key: dict, plot: Path | None):
    """Sample, step and measure one unit: (its record, its sweep or None, its report text)."""
    start = time.perf_counter()
    tokenizer = _load_tokenizer(unit.model, options.trust_remote_code)
    policy = load_policy(options, unit)
    loaded = time.perf_counter()
    length = max_new_tokens(options, policy)
    E, U = sample(
        policy, tokenizer, pool,
        n_eval=options.n_eval, n_update_prompts=options.n_update_prompts, group_size=options.group_size,
        reward=reward, max_new_tokens=length, seed=options.seed, replace=options.replace,
        eval_group_size=options.eval_group_size,
        chat_template=options.chat_template, batch_size=options.generation_batch, quiet=options.quiet,
    )
    sampled = time.perf_counter()
    optimizer, opt_state = _optimizer_and_state(options, unit, policy)
    result = probe(
        policy, E, U, optimizer, opt_state, lr=options.lr, loss=options.loss, second_order=options.second_order,
        micro_batch=options.micro_batch, progress=not options.quiet,
        eval_dtype=options.eval_dtype and getattr(torch, options.eval_dtype),
    )
    record = {
        "key": key,
        "model": unit.model,
        "sampling": {
            "n_eval": len(E), "eval_tokens": E.n_tokens, "n_update": len(U), "update_tokens": U.n_tokens,
            "mean_reward": float(U.rewards.mean()), "max_new_tokens": length,
        },
        "timings": {"load": loaded - start, "sample": sampled - loaded},
        "result": result.to_dict(),
    }
    if options.predictors:
        record["predictors"] = result.predictors().to_dict()
    sweep, wants_sweep = None, options.command == "sweep" or plot is not None
    if wants_sweep and result.lr_used == 0:
        warnings.warn(f"{unit.name}: the step's learning rate is 0 (its optimizer state's), so there is no sweep or plot")
        plot = None
    elif wants_sweep:
        sweep = result.sweep(_sweep_lrs(options, result.lr_used), progress=not options.quiet)
        record["sweep"] = sweep.to_dict()
    if plot is not None:
        record["plot"] = str(plot)
    s, t = record["sampling"], record["timings"]
    report = [
        f"\n{unit.name}\nloaded in {t['load']:.2f} s; sampled E ({s['n_eval']} responses, {s['eval_tokens']} tokens) "
        f"and U ({options.n_update_prompts}×{options.group_size}, {s['update_tokens']} tokens, mean reward "
        f"{s['mean_reward']:.3g}) in {t['sample']:.2f} s",
        str(result),
        *_precision_note(result),
    ]
    return record, sweep, "\n".join(report + ([str(sweep)] if sweep is not None else []))


def _precision_note(result, target: float = 0.1) -> list[str]:
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
def _command_line_output():
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


def run(plan: Plan) -> None:
    """Probe unit after unit (the plan has checked every input), writing each record as soon as it
    exists, before printing or plotting it."""
    options, out, jsonl = plan.options, plan.out, plan.jsonl
    for index, unit in enumerate(plan.units):
        key = plan.key(unit)
        if files.canonical(key) in finished_keys(out, jsonl):
            if not options.quiet:
                say(f"{unit.name}: already in {out}, skipped")
            continue
        plot = plan.plot_path(index)
        try:
            record, sweep, report = probe_model(options, unit, plan.pool, plan.reward, key, plot)
        except Exception as error:
            if unit.model in str(error) or (unit.adapter is not None and unit.adapter in str(error)):
                raise
            raise RuntimeError(f"{unit.name}: {_one_line(error)}") from error
        if not distributed.is_main():
            continue
        written = _save_record(out, jsonl, record)
        if plot is not None and sweep is not None:
            import matplotlib.pyplot as plt

            plt.close(sweep.plot(plot))
        if not options.quiet:
            say(report)
            say(f"wrote {out}" if written else f"{unit.name}: a concurrent run wrote this record to {out} first; kept it")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    try:
        with _command_line_output():
            plan = make_plan(namespace)
            if distributed.init_from_env(plan.options.timeout) and not distributed.is_main():
                plan = plan.quietened()
            run(plan)
    except KeyboardInterrupt:
        say("fprobe: interrupted (the records written so far are complete)", stderr=True)
        return 130
    except Exception as error:  # every failure is reported as one line, without a traceback unless asked
        if namespace.traceback or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        say(f"fprobe: error: {_one_line(error)}", stderr=True)
        return EXIT_ERROR
    return 0
