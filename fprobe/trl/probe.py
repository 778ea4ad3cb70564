"""Probe a TRL ``GRPOTrainer``'s own optimizer steps in place, without changing the run.

    probe = fprobe.trl.attach(trainer, every=10)
    trainer.train()
    probe.records          # one dict per probed step
    probe.eval_batches     # {step: the evaluation batch E used there (fprobe.Rollouts)}

The probe is capture + measure + sink. ``fprobe.trl.capture.StepCapture`` hands over each probed step as a
``CapturedStep`` (θ_k, Δθ = θ_{k+1} − θ_k exactly as TRL applied it, the micro-batches with TRL's normalisers,
the optimizer state before the update); E is drawn from π_θk just before the update; after it,
``fprobe.entropy_change`` evaluates ΔH_true, δH₁ (and δH₂) at θ_k along Δθ with ``functional_call`` while the
trainer's model holds θ_{k+1}. A step with other than exactly one optimizer update gives no numbers, and says why.

The step cross-check replays the step with ``fprobe.rl_step`` from θ_k on the captured micro-batches with the
torch optimizer's state before the update, the scheduler's learning rate, the trainer's ``max_grad_norm`` and
TRL's normalisers as per-row weights; ``step_rel_error`` = ‖Δθ_fprobe − Δθ_TRL‖ / ‖Δθ_TRL‖. Runs that use what
fprobe does not model still get their entropy numbers; the record's ``step_check`` says why the cross-check was
skipped.

Nothing about the run changes: fprobe draws only from its own random generators; its passes run the model in
eval mode (no dropout, no gradient checkpointing) with fprobe's attention inside its own calls, and every
module's mode is put back. Each record is appended to ``out`` (JSONL, atomically) first, then logged with
``trainer.log`` (``entropy_probe/...``), from the main process only.
"""

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import Trainer

from fprobe import checks, distributed, files, tree
from fprobe.entropy import decompose
from fprobe.entropy import estimators
from fprobe.entropy.measure import measure
from fprobe.entropy.settings import Settings
from fprobe.model import passes
from fprobe.model.policy import Policy, active_dropout, modes_kept
from fprobe.rl import losses
from fprobe.rl.capture import CapturedStep
from fprobe.rl.step import by_parameter, rl_step
from fprobe.rollouts import Rollouts
from fprobe.sampling import generate
from fprobe.trl.capture import StepCapture, TrainerFacts, trainer_facts
from fprobe.trl.prompts import TrainerChatTemplate, dataset_prompts
from fprobe.warnings import ImpreciseWarning, ShardingWarning, warn

if TYPE_CHECKING:
    from fprobe.trl.sharded import ShardedTrlProbe

_PREFIX = "entropy_probe/"
SE = ("h_orig_se", "h_upd_se", "delta_h_true_se", "delta_h1_se", "delta_h2_se", "ratio_se")
LOGGED = ("h_orig", "delta_h_true", "delta_h1", "delta_h2", "ratio", "ess_fraction", "rounding_floor", "delta_l2", "lr",
          "step_rel_error", "h_orig_se", "delta_h_true_se", "delta_h1_se", "delta_h2_se", "ratio_se")
_IMPRECISE_RECORDS = 3  # consecutive records above the threshold before ImpreciseWarning


@dataclass(frozen=True)
class ProbeSettings:
    every: int
    n_eval: int
    eval_group_size: int
    rel_se_warning: float | None
    resample: bool
    seed: int
    out: Path | None
    second_order: bool
    contributions: bool
    check_step: bool
    estimate: Settings


class _EvalBatch(NamedTuple):
    """E, the sequence log-probs S^q of the policy q that sampled it (float64; None until measured: it is
    S(θ_k) of the step that sampled E, which that step's measurement computes), and q's step."""

    rollouts: Rollouts
    logp_sampler: torch.Tensor | None
    sampled_at: int


# ---------------------------------------------------------------------------------------------
# checks at attach


def _check_trainer(trainer) -> bool:
    """Whether the trainer's parameters are (or, with accelerate's FSDP2, will be at ``train()``) sharded by FSDP2:
    fprobe's sharded mode (``fprobe.trl.sharded``). TypeError unless ``trainer`` is a TRL GRPOTrainer; ValueError
    for accelerate's FSDP1 (flat parameters) and DeepSpeed (ZeRO's partitioned parameters and its own optimizer);
    a ``ShardingWarning`` where FSDP was asked for but accelerate trains data-parallel (it drops FSDP on CPU)."""
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"fprobe.trl.attach needs a trl.GRPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer, "is_fsdp_enabled", False):
        version = getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            raise ValueError(
                f"fprobe.trl: FSDP shards the parameters, here as FSDP{version}'s flat parameters, which fprobe does not "
                "read; use FSDP2 (fsdp_version: 2 in accelerate's FSDP config), whose DTensor parameters fprobe's "
                "sharded mode measures"
            )
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        stage = getattr(plugin, "zero_stage", None)
        raise ValueError(
            f"fprobe.trl: DeepSpeed (ZeRO stage {stage}) shards the parameters or the optimizer state; "
            "the probe needs whole parameters and a torch optimizer (not gathered by fprobe); "
            "for sharded training use FSDP2, which fprobe's sharded mode measures"
        )
    if distributed.is_sharded(trainer.model):
        return True
    if trainer.args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        warn("FSDP was asked for (fsdp in the training arguments or accelerate's config), but accelerate did not "
             "enable it (it drops FSDP on CPU) and trains the model data-parallel, each process holding all the "
             "parameters: fprobe probes it so", ShardingWarning)
    return False


def check_eval_batch(E, model) -> None:
    """TypeError/ValueError unless E is a Rollouts of token ids within the model's vocabulary."""
    if not isinstance(E, Rollouts):
        raise TypeError(f"E must be an fprobe.Rollouts, got {type(E).__name__}")
    vocabulary = model.get_input_embeddings().num_embeddings
    largest = int(E.input_ids.max())
    if int(E.input_ids.min()) < 0 or largest >= vocabulary:
        raise ValueError(
            f"E's token ids run up to {largest}, but the trainer's model has a vocabulary of {vocabulary}: "
            "E was tokenized for another model"
        )


def _open_records_file(out: Path, output_dir: str) -> None:
    """Open ``out`` for appending now (created, with its folders, if absent), so that a place that cannot take
    the records fails at attach and not at the first probed step: OSError where it cannot be opened,
    ValueError where it holds lines that are not JSON. Warns when it already holds records of this
    ``output_dir`` (a rerun): a step already there is not written again."""
    try:
        with files.locked_jsonl(out):
            existing = [line for _, line in files.read_json_lines(out, "probe records")]
    except OSError as error:
        raise type(error)(f"out {str(out)!r} cannot be opened for appending: {error}") from error
    run = str(Path(output_dir).resolve())
    steps = sorted(line["key"]["step"] for line in existing
                   if isinstance(line, dict) and isinstance(line.get("key"), dict) and line["key"].get("output_dir") == run)
    if steps:
        warn(f"out {str(out)!r} already holds {len(steps)} probe record(s) of {run} (steps {steps[0]} to "
             f"{steps[-1]}): those steps are not written again; remove the file for a fresh run")


def _relative_error(delta: tree.Params, reference: tree.Params) -> float | None:
    """‖delta − reference‖ / ‖reference‖ (float64); None when the reference is 0."""
    size = float(tree.norm(reference))
    return float(tree.norm(tree.sub(delta, reference))) / size if size else None


def _worst_parameter(delta: tree.Params, reference: tree.Params) -> str:
    """The name with the largest ‖delta − reference‖."""
    return tree.top_k(tree.sub(delta, reference), 1)[0][0]


def _sequence_logp(policy, params, E: Rollouts, micro_batch) -> torch.Tensor:
    """S_i = Σ_k ℓ_ik at ``params`` (float64)."""
    return passes.forward(policy, params, E, micro_batch).logp.sum(-1)


# ---------------------------------------------------------------------------------------------
# the probe


class TrlProbe:
    """What ``attach`` returns; ``records`` and ``eval_batches`` fill as the trainer trains; ``capture`` is the
    callback on the trainer.

    A record: ``step``, ``updates`` (optimizer updates counted in the step), ``lr``, ``n_eval``,
    ``eval_sampled_at`` (the step whose policy sampled E) and ``sampler_ess_fraction`` (of the weights from
    that policy to π_θk; 1 for a fresh E); then ``h_orig``, ``h_upd``, ``delta_h_true``, ``delta_h1``,
    ``delta_h2`` (None unless asked), ``ratio``, ``ess_fraction`` (at θ_{k+1}), ``ess_low``, ``delta_l2``, their
    standard errors ``h_orig_se`` … ``ratio_se`` (None where undefined), ``se_units`` (E's independent units) and
    ``n_eval_for`` (the |E| for ``rel_se_warning``);
    ``step_check`` ("ok", or why the replay was skipped), ``step_rel_error`` and ``step_rel_error_worst`` (the
    parameter where the replay differs most); ``contributions`` when asked; ``probe_seconds`` and ``step_seconds``
    (the trainer's own time for the step). A step without
    exactly one update has no numbers and says why in ``skipped``."""

    def __init__(self, trainer, facts: TrainerFacts, settings: ProbeSettings, prompts: list[dict], chat_template: bool,
                 policy: Policy, E: _EvalBatch | None):
        self.trainer = trainer
        self.facts = facts
        self.settings = settings
        self.prompts = prompts
        self.chat_template = chat_template
        self.policy = policy
        self.records: list[dict] = []
        self.eval_batches: dict[int, Rollouts] = {}
        self._warned_imprecise = False
        self._fixed = E
        self._reuse = E is not None or not settings.resample
        self.capture = StepCapture(
            trainer, facts, lambda: policy.params, lambda step: step % settings.every == 0, self._before_update,
            self._after_update, replay=settings.check_step,
        )

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    # -- E at θ_k, before the update

    def _before_update(self, step: int, params: tree.Params) -> tuple:
        """(E, the ESS fraction of the weights from E's sampler to π_θk, the dropout active in the step, seconds)."""
        start = time.perf_counter()
        dropout = active_dropout(self.model)
        with modes_kept(self.model):
            eval_batch, sampler_ess = self._eval_batch(params, step)
        self.eval_batches[step] = eval_batch.rollouts
        return eval_batch, sampler_ess, dropout, time.perf_counter() - start

    def _sample(self, step: int) -> Rollouts:
        """A fresh E from π_θk: the run's prompts, the trainer's temperature, fprobe's own per-row streams."""
        tokenizer = TrainerChatTemplate(self.trainer) if self.chat_template else self.trainer.processing_class
        E, _ = generate.sample(
            self.policy, tokenizer, self.prompts,
            n_eval=self.settings.n_eval, eval_group_size=self.settings.eval_group_size, n_update_prompts=1, group_size=1,
            reward=lambda *_: 0.0,
            max_new_tokens=self.facts.max_completion_length, seed=generate.stream_seed(self.settings.seed, "trl", step),
            replace=self.settings.n_eval // self.settings.eval_group_size > len(self.prompts), chat_template=self.chat_template,
        )  # fprobe.sample also draws one update row, unused here
        return E

    def _eval_batch(self, params, step: int) -> tuple[_EvalBatch, float]:
        """A fresh E each step (``resample``), else the fixed one while the ESS fraction of the weights from its
        sampler to π_θk stays at or above the threshold, then a fresh one. Only a reused E needs S(θ_k) here."""
        fixed = self._fixed
        if fixed is not None and self._reuse:
            logp = _sequence_logp(self.policy, params, fixed.rollouts, self.settings.estimate.micro_batch)
            ess = float(estimators.effective_sample_size(estimators.log_weights(logp, fixed.logp_sampler.to(logp.device))))
            if ess / len(logp) >= self.settings.estimate.ess_threshold:
                return fixed, ess / len(logp)
        return _EvalBatch(self._sample(step), None, step), 1.0

    # -- after the update: measure, cross-check, sink

    def _after_update(self, captured: CapturedStep, context: tuple, control) -> None:
        eval_batch, sampler_ess, dropout, seconds = context
        start = time.perf_counter()
        with self.capture.cleaned_up_on_error(), modes_kept(self.model):
            record = self._measure(captured, eval_batch, sampler_ess, dropout)
        record["probe_seconds"] = seconds + time.perf_counter() - start
        record["step_seconds"] = captured.step_seconds
        self._sink(record, control)

    def _measure(self, captured: CapturedStep, eval_batch: _EvalBatch, sampler_ess: float, dropout: list[str]) -> dict:
        record = {"step": captured.step, "updates": captured.updates, "lr": captured.lr, "n_eval": len(eval_batch.rollouts),
                  "eval_sampled_at": eval_batch.sampled_at, "sampler_ess_fraction": sampler_ess}
        if captured.updates != 1:
            reason = f"{captured.updates} optimizer updates in this step (exactly one expected): no numbers"
            return {**record, "skipped": reason, "step_check": reason, "step_rel_error": None}
        settings = self.settings
        change = measure(self.policy, eval_batch.rollouts, captured.delta, captured.params, captured.new_params, captured.lr,
                         settings.estimate, logp_sampler=eval_batch.logp_sampler, second_order=settings.second_order)
        if self._reuse and eval_batch.logp_sampler is None:
            self._fixed = _EvalBatch(eval_batch.rollouts, change.context.rows0.logp, eval_batch.sampled_at)
        measured = ("h_orig", "h_upd", "delta_h_true", "delta_h1", "delta_h2", "ess_fraction", "ess_low", "eval_dtype",
                    "rounding_floor", "rounding_floor_h1", "precision_low", *SE)
        record.update({key: getattr(change, key) for key in measured},
                      ratio=change.ratio if change.delta_h1 else None, delta_l2=change.delta_l2, se_units=change.se_units,
                      n_eval_for=None if settings.rel_se_warning is None else change.n_eval_for(settings.rel_se_warning))
        return {**record, **self._replay(captured, change, dropout)}

    def _replay(self, captured: CapturedStep, change, dropout: list[str]) -> dict:
        """fprobe's own step from θ_k on the captured micro-batches against TRL's Δθ (and the per-sequence parts
        of its δH₁ when asked, from the measurement's θ_k statistics on E: no further pass on E)."""
        replay = captured.replay
        reason = captured.skip_reason or (f"dropout was active in the trainer's step ({dropout[0]!r} and others)" if dropout else None)
        if replay is None or reason is not None:
            return {"step_check": f"skipped: {reason}", "step_rel_error": None, "step_rel_error_worst": None}
        loss = losses.RowWeights(replay.row_weights)
        step = rl_step(self.policy, captured.params, replay.optimizer, replay.opt_state, replay.U, loss=loss,
                       max_grad_norm=replay.max_grad_norm, micro_batch=self.settings.estimate.micro_batch)
        error = _relative_error(step.delta, captured.delta)
        check = "ok" if not self.facts.low_precision else (
            f"ok (the trainer's forward ran under bf16/fp16 autocast, fprobe's replay in {str(self.policy.dtype).removeprefix('torch.')}: "
            "expect step_rel_error of that precision)")
        if error is None:
            check = f"no relative error: TRL's update is 0 (fprobe's replay: ‖Δθ‖ = {float(tree.norm(step.delta)):.3g})"
        out = {"step_check": check, "step_rel_error": error,
               "step_rel_error_worst": None if error is None else _worst_parameter(step.delta, captured.delta)}
        if self.settings.contributions:
            # on policy (ratio 1) the clip range changes neither the loss nor its derivative
            parts = decompose.decompose(change.context, lambda order: by_parameter(step, replay.opt_state, order), replay.U,
                                        replay.optimizer, None, loss, 0.2,
                                        micro_batch=self.settings.estimate.micro_batch)
            out["contributions"] = {"delta_h1": parts.delta_h1, "momentum": parts.momentum, "decay": parts.decay,
                                    "per_sequence": parts.per_sequence.tolist()}
        return out

    def _sink(self, record: dict, control) -> None:
        sink(self.trainer, self.settings.out, self.records, record, control)
        self._warn_if_imprecise()

    def _warn_if_imprecise(self) -> None:
        """Once per probe: an ``ImpreciseWarning`` when the last ``_IMPRECISE_RECORDS`` records' se of ΔH_true all
        exceed ``rel_se_warning`` of |ΔH_true|, with the |E| that would reach it (the largest of their
        ``n_eval_for``)."""
        threshold, recent = self.settings.rel_se_warning, self.records[-_IMPRECISE_RECORDS:]
        if threshold is None or self._warned_imprecise or len(recent) < _IMPRECISE_RECORDS:
            return
        relative = [r["delta_h_true_se"] / abs(r["delta_h_true"]) if r.get("delta_h_true_se") and r["delta_h_true"] else None
                    for r in recent]
        if any(x is None or x <= threshold for x in relative):
            return
        self._warned_imprecise = True
        needed = max(r["n_eval_for"] for r in recent)
        warn(
            f"the standard error of ΔH_true has stayed above {threshold:.0%} of |ΔH_true| for {_IMPRECISE_RECORDS} probed "
            f"steps (latest {relative[-1]:.0%} with |E| = {recent[-1]['n_eval']}): these entropy changes are mostly "
            f"sampling noise; |E| ≈ {needed} would reach {threshold:.0%} (attach(..., n_eval={needed}))",
            ImpreciseWarning,
        )


def sink(trainer, out: Path | None, records: list[dict], record: dict, control) -> None:
    """The record to ``records``, then (main process) to ``out`` — before ``trainer.log``, whose other callbacks
    may raise — then to the trainer's log."""
    records.append(record)
    if not distributed.is_main():
        return
    if out is not None:
        key = {"output_dir": str(Path(trainer.args.output_dir).resolve()), "step": record["step"]}
        files.append_json_line(out, {"key": key, **record}, "key", "probe records")
    _log_to_trainer(trainer, control, {_PREFIX + key: record[key] for key in LOGGED if record.get(key) is not None})


def _log_to_trainer(trainer, control, logs: dict) -> None:
    """``transformers.Trainer.log``: the log history and every reporting callback get ``logs`` at this step.
    Not TRL's own ``log``, which would take and clear the metrics TRL is collecting for its next log; and
    the trainer's pending ``should_log`` (which ``on_log`` clears) is kept, so its own log still happens."""
    should_log = control.should_log
    Trainer.log(trainer, logs)
    control.should_log = trainer.control.should_log = should_log


def attach(
    trainer,
    every: int = 10,
    E: Rollouts | None = None,
    n_eval: int = 64,
    resample: bool = True,
    seed: int = 0,
    out: str | Path | None = None,
    second_order: bool = False,
    contributions: bool = False,
    check_step: bool = True,
    *,
    prompts: Sequence[str] | None = None,
    eval_group_size: int = 1,
    rel_se_warning: float | None = 0.25,
    ess_threshold: float = Settings.ess_threshold,
    micro_batch: int | None = Settings.micro_batch,
    gather: bool = False,
    eval_dtype: torch.dtype | None = Settings.eval_dtype,
) -> "TrlProbe | ShardedTrlProbe":
    """Probe every ``every``-th optimizer step of a TRL ``GRPOTrainer`` (see the module docstring); returns
    the probe, whose ``records`` and ``eval_batches`` fill during ``trainer.train()``.

    E: by default a fresh sample of n_eval responses from π_θk at each probed step, prompts drawn from
    ``prompts`` or the trainer's dataset, at the trainer's temperature and ``max_completion_length``, from
    fprobe's own random streams (``seed``). A given ``E`` (taken as a sample of the model as it is now),
    or ``resample=False`` (the first probed step's sample), is reused: every estimate then
    importance-weights from the policy that sampled it, and a fresh E is drawn from π_θk once the ESS
    fraction of those weights falls below ``ess_threshold``. ``eval_group_size``: responses per prompt in a
    fresh E (n_eval / eval_group_size prompts). Each record carries the standard errors over E's sequences
    (``*_se``, logged as ``entropy_probe/..._se``) and ``n_eval_for``, the |E| at which ΔH_true's se would be
    ``rel_se_warning`` of |ΔH_true|; an ``ImpreciseWarning`` (once) says so when 3 records in a row stay above
    it (None: no warning). ``contributions`` adds the per-sequence parts
    of δH₁ (of fprobe's replayed step; needs a fresh E and the cross-check). ``out``: JSONL, one line
    per probed step, opened (created if absent) here. ``eval_dtype``: the dtype fprobe's passes compute in
    (``torch.float64``: on a float64 copy of the weights inside its calls; default: float32 for a bf16/fp16
    model); each record carries its ``rounding_floor`` and ``precision_low``. Every input is checked here,
    before training starts.
    A trainer whose parameters FSDP2 shards is probed in the sharded mode (``fprobe.trl.sharded``); ``gather``
    (sharded mode only) adds what needs whole parameters, gathered on rank 0 (δH₁ by jvp, δH₂).
    """
    from fprobe.trl import sharded

    sharded_mode = _check_trainer(trainer)
    if any(isinstance(c, StepCapture) for c in trainer.callback_handler.callbacks):
        raise ValueError("an fprobe probe is already attached to this trainer")
    checks.positive_int(every, "every", "steps")
    checks.positive_int(n_eval, "n_eval", "sequences")
    checks.positive_int(eval_group_size, "eval_group_size", "responses per prompt")
    if n_eval % eval_group_size:
        raise ValueError(f"n_eval={n_eval} is not a whole number of groups of eval_group_size={eval_group_size}")
    if rel_se_warning is not None and not (isinstance(rel_se_warning, (int, float)) and rel_se_warning > 0):
        raise ValueError(f"rel_se_warning must be a positive fraction of |ΔH_true| or None, got {rel_se_warning!r}")
    estimate = Settings(ess_threshold=ess_threshold, micro_batch=micro_batch, eval_dtype=eval_dtype)
    if contributions and (E is not None or not resample or not check_step):
        raise ValueError("contributions need a fresh E at each step (resample=True, no E) and the step cross-check (check_step=True)")
    if out is not None:
        files.check_appendable(out, "out")
    if prompts is not None and (isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts)):
        raise TypeError("prompts must be a list of non-empty texts (one text would be read as its characters)")
    model = trainer.model
    records = [{"prompt": p} for p in prompts] if prompts is not None else None
    chat_template = False
    if records is None:
        records, chat_template = dataset_prompts(trainer)
    if not records:
        raise ValueError("no prompts to sample E from")
    settings = ProbeSettings(every, n_eval, eval_group_size, rel_se_warning, resample, seed, None if out is None else Path(out),
                             second_order, contributions, check_step, estimate)
    facts = trainer_facts(trainer)
    if gather and not sharded_mode:
        raise ValueError("gather=True gathers sharded (FSDP2) parameters, but this trainer's are whole on every process")
    if sharded_mode:
        sharded.check_settings(E, resample, second_order, contributions, gather)
        sharded.check_model(model)
        if out is not None and distributed.is_main():
            _open_records_file(Path(out), trainer.args.output_dir)
        probe = sharded.ShardedTrlProbe(trainer, facts, settings, records, chat_template, gather)
        trainer.add_callback(probe.capture)
        return probe
    fixed = None
    with modes_kept(model):
        policy = Policy(model, temperature=facts.temperature, eval_dtype=eval_dtype)
        if E is not None:
            check_eval_batch(E, model)
            fixed = _EvalBatch(E, _sequence_logp(policy, policy.params, E, micro_batch), trainer.state.global_step)
    if out is not None and distributed.is_main():
        _open_records_file(Path(out), trainer.args.output_dir)
    probe = TrlProbe(trainer, facts, settings, records, chat_template, policy, fixed)
    trainer.add_callback(probe.capture)
    return probe
