"""Probe a TRL ``GRPOTrainer``'s own optimizer steps in place, without changing the run.

    probe = fprobe.trl.attach(trainer, every=10)
    trainer.train()
    probe.records          # one dict per probed step
    probe.eval_batches     # {step: the evaluation batch E used there (fprobe.Rollouts)}

Step k is the update that makes the trainer's ``global_step`` k; it is probed when k % every == 0.
Just before its optimizer update (``on_pre_optimizer_step``) fprobe keeps θ_k, the trainable
parameters (copied), and draws E from π_θk; after it (``on_step_end``) Δθ = θ_{k+1} − θ_k is exactly
what TRL applied, and ``fprobe.entropy_change`` evaluates ΔH_true, δH₁ (and δH₂) at θ_k along it
with ``functional_call`` while the trainer's model holds θ_{k+1}. A post-step hook on the torch
optimizer counts its updates: a step with other than exactly one update gives no numbers, and says why.

The step cross-check replays the step with ``fprobe.rl_step`` on the micro-batches that TRL's
``compute_loss`` saw, from θ_k with the torch optimizer's state as it was before the update, the
scheduler's learning rate, the trainer's ``max_grad_norm`` and TRL's normalisers as per-row weights
(``trl_row_weights``); ``step_rel_error`` = ‖Δθ_fprobe − Δθ_TRL‖ / ‖Δθ_TRL‖. Runs that use what fprobe
does not model still get their entropy numbers; the record's ``step_check`` says why the
cross-check was skipped.

Nothing about the run changes: fprobe draws only from its own random generators; its passes run the
model in eval mode (no dropout, no gradient checkpointing) with fprobe's attention inside its own calls,
and every module's mode is put back; the optimizer hook and the ``compute_loss`` wrapper exist only
while ``train()`` runs. Records go to ``trainer.log`` (``entropy_probe/...``) and to ``out`` (JSONL,
each line appended atomically) from the main process only.
"""

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import Trainer, TrainerCallback

from fprobe import distributed
from fprobe.entropy import estimators
from fprobe.rl import losses
from fprobe.rl import optim
from fprobe.model import passes
from fprobe import files
from fprobe.sampling import generate as sampling
from fprobe import tree
from fprobe.model.policy import Policy, active_dropout
from fprobe.entropy.probe import entropy_change, probe
from fprobe.rollouts import Rollouts
from fprobe.rl.step import rl_step
from fprobe.warnings import ShardingWarning, warn

PREFIX = "entropy_probe/"
TRL_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
LOGGED = ("h_orig", "delta_h_true", "delta_h1", "delta_h2", "ratio", "ess_fraction", "delta_l2", "lr", "step_rel_error")
NOT_MODELLED_INPUTS = {
    "old_per_token_logps": "TRL kept old log-probs (num_iterations > 1, or steps_per_generation does not divide "
    "gradient_accumulation_steps): importance ratios other than 1 are not modelled",
    "ref_per_token_logps": "a KL term (beta > 0) is not modelled",
    "importance_sampling_ratio": "vLLM importance-sampling corrections are not modelled",
    "tool_mask": "tool-call masks (multi-turn) are not modelled",
    "pixel_values": "multimodal inputs are not modelled",
}


@dataclass(frozen=True)
class ProbeSettings:
    every: int
    n_eval: int
    resample: bool
    seed: int
    out: Path | None
    second_order: bool
    contributions: bool
    check_step: bool
    ess_threshold: float
    micro_batch: int | None


class MicroBatch(NamedTuple):
    """One micro-batch as TRL's ``compute_loss`` saw it (CPU copies), with the accumulation steps then in force."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    num_items: float
    accumulation_steps: int


class EvalBatch(NamedTuple):
    """E and S_i^q, the sequence log-probs of the policy q that sampled it (float64), and q's step."""

    rollouts: Rollouts
    logp_sampler: torch.Tensor
    sampled_at: int


class Replay(NamedTuple):
    """fprobe's own step from θ_k on the trainer's micro-batches (``delta`` None when skipped, ``check``
    says why), and the per-sequence parts of its δH₁ when asked."""

    delta: tree.Params | None
    check: str
    contributions: dict | None = None


class Before(NamedTuple):
    """What is kept at θ_k, before the optimizer update of probed step ``step``."""

    step: int
    params: tree.Params
    lr: float
    eval_batch: EvalBatch
    sampler_ess_fraction: float
    replay: Replay
    seconds: float


# ---------------------------------------------------------------------------------------------
# checks at attach


def check_trainer(trainer) -> bool:
    """Whether the trainer's parameters are (or, with accelerate's FSDP2, will be at ``train()``) sharded by FSDP2:
    fprobe's sharded mode. TypeError unless ``trainer`` is a TRL GRPOTrainer; ValueError for accelerate's FSDP1
    (flat parameters) and DeepSpeed (ZeRO's partitioned parameters and its own optimizer); a ``ShardingWarning``
    where FSDP was asked for but accelerate trains data-parallel (it drops FSDP on CPU)."""
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


def static_skip_reason(trainer) -> str | None:
    """Why the step cross-check cannot model this run's loss, from its configuration (None if it can)."""
    args = trainer.args
    reasons = [
        (trainer.loss_type not in TRL_LOSSES, f"loss_type {trainer.loss_type!r} is not one of {TRL_LOSSES}"),
        (trainer.beta != 0.0, f"beta = {trainer.beta}: a KL term is not modelled"),
        (trainer.num_iterations > 1, f"num_iterations = {trainer.num_iterations}: ratios other than 1 are not modelled"),
        (trainer.use_vllm, "vLLM generation and its importance-sampling corrections are not modelled"),
        (trainer._entropy_bonus_enabled, "an entropy bonus (entropy_coef) is not modelled"),
        (trainer.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 is not modelled"),
        (trainer.importance_sampling_level != "token", "sequence-level importance sampling is not modelled"),
        (trainer.off_policy_mask_threshold is not None, "off_policy_mask_threshold is not modelled"),
        (args.delta is not None, "two-sided clipping (delta) is not modelled"),
        (trainer.aux_loss_enabled, "a router auxiliary loss is not modelled"),
    ]
    return next((why for bad, why in reasons if bad), None)


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


def open_records_file(out: Path, output_dir: str) -> None:
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
        warnings.warn(f"out {str(out)!r} already holds {len(steps)} probe record(s) of {run} (steps {steps[0]} to "
                      f"{steps[-1]}): those steps are not written again; remove the file for a fresh run", stacklevel=3)


def is_single_user_turn(prompt) -> bool:
    """A conversational prompt that is one user message with text content."""
    return isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user" and isinstance(prompt[0].get("content"), str)


class TrainerChatTemplate:
    """The trainer's tokenizer, whose ``apply_chat_template`` renders as TRL's ``GRPOTrainer`` does: with the
    trainer's own template (if it set one), its tools and its ``chat_template_kwargs``. Anything else is the
    tokenizer's."""

    def __init__(self, trainer):
        self._tokenizer = trainer.processing_class
        self._template = getattr(trainer, "chat_template", None)
        self._tools = getattr(trainer, "tools", None) or None
        self._kwargs = dict(getattr(trainer, "chat_template_kwargs", None) or {})

    @property
    def chat_template(self):
        return self._template or self._tokenizer.chat_template

    def apply_chat_template(self, conversation, **kwargs):
        return self._tokenizer.apply_chat_template(
            conversation, chat_template=self._template, tools=self._tools, **{**self._kwargs, **kwargs})

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def dataset_prompts(trainer) -> tuple[list[dict], bool]:
    """(prompt records, chat template?) from the trainer's dataset: plain prompts as they are, conversational
    ones that are a single user turn through the tokenizer's chat template; anything else needs ``prompts=``."""
    dataset = trainer.train_dataset
    if dataset is None or "prompt" not in getattr(dataset, "column_names", ()):
        raise ValueError("the trainer's dataset has no 'prompt' column: pass prompts= to fprobe.trl.attach")
    prompts = list(dataset["prompt"])
    if all(isinstance(p, str) for p in prompts):
        return [{"prompt": p} for p in prompts], False
    if all(is_single_user_turn(p) for p in prompts):
        return [{"prompt": p[0]["content"]} for p in prompts], True
    raise ValueError(
        "the trainer's prompts are conversations that fprobe cannot re-render (more than one turn, or "
        "structured content): pass prompts= (texts) to fprobe.trl.attach"
    )


# ---------------------------------------------------------------------------------------------
# the trainer's micro-batches and TRL's normalisers


def micro_batch_from_inputs(inputs: dict, accumulation_steps: int) -> MicroBatch:
    """CPU copies of what TRL's ``compute_loss`` gets (``_generate_and_score_completions``' output slice)."""
    cpu = lambda key: inputs[key].detach().to("cpu", copy=True)
    return MicroBatch(
        cpu("prompt_ids"), cpu("prompt_mask"), cpu("completion_ids"), cpu("completion_mask"),
        inputs["advantages"].detach().to("cpu", torch.float64, copy=True), float(inputs["num_items_in_batch"]),
        int(accumulation_steps),
    )


def input_skip_reason(inputs: dict) -> str | None:
    """Why a micro-batch's loss is not one fprobe models (None if it is)."""
    present = [why for key, why in NOT_MODELLED_INPUTS.items() if inputs.get(key) is not None]
    if present:
        return present[0]
    if inputs["advantages"].dim() != 1:
        return "per-token advantages are not modelled"
    if bool((inputs["completion_mask"].sum(-1) == 0).any()):
        return "rows without completion tokens (mask_truncated_completions) are not modelled"
    return None


def _padded(x: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def update_batch(micro_batches: Sequence[MicroBatch], max_completion_length: int) -> Rollouts:
    """U: every micro-batch's rows in order, as [left padding, prompt, completion, right padding]; the
    response mask is the completion mask. Added padding holds token 0 (masked out, any id would do)."""
    prompt_width = max(mb.prompt_ids.shape[1] for mb in micro_batches)
    completion_width = max(mb.completion_ids.shape[1] for mb in micro_batches)
    join = lambda name, left, width, value: torch.cat([_padded(getattr(mb, name), width, left, value) for mb in micro_batches])
    prompt_mask = join("prompt_mask", True, prompt_width, 0)
    completion_mask = join("completion_mask", False, completion_width, 0)
    return Rollouts(
        torch.cat([join("prompt_ids", True, prompt_width, 0), join("completion_ids", False, completion_width, 0)], 1),
        torch.cat([prompt_mask, completion_mask], 1),
        torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1),
        advantages=torch.cat([mb.advantages for mb in micro_batches]),
        max_response_length=max_completion_length,
    )


def trl_row_weights(
    micro_batches: Sequence[MicroBatch], loss_type: str, n_processes: int, steps_per_generation: int, max_completion_length: int
) -> torch.Tensor:
    """c_i of TRL's ``_compute_loss`` for every row of the step's micro-batches (all processes, in order).

    Per micro-batch of G = ``accumulation_steps``, on one process: ``grpo`` mean_i(Σ_k A ℓ / T_i) / G;
    ``bnpo`` Σ A ℓ / Σ T (that micro-batch's tokens) / G; ``dr_grpo`` Σ A ℓ / (B_mb · L_max) / G; ``dapo``
    Σ A ℓ / (N / P · G / steps_per_generation), N = ``num_items_in_batch``. Gradients add over micro-batches
    and are averaged over the P processes (DDP), hence a further 1/P."""
    named = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "dr_grpo"}
    parts = []
    for mb in micro_batches:
        rows = update_batch([mb], max_completion_length)
        if loss_type == "dapo":
            local = losses.row_weights(rows, losses.Dapo(mb.num_items / n_processes * mb.accumulation_steps / steps_per_generation))
        else:
            local = losses.row_weights(rows, named[loss_type]) / mb.accumulation_steps
        parts.append(local / n_processes)
    return torch.cat(parts)


def relative_error(delta: tree.Params, reference: tree.Params) -> float | None:
    """‖delta − reference‖ / ‖reference‖ (float64); None when the reference is 0."""
    size = float(tree.norm(reference))
    return float(tree.norm(tree.sub(delta, reference))) / size if size else None


def worst_parameter(delta: tree.Params, reference: tree.Params) -> str:
    """The name with the largest ‖delta − reference‖."""
    return tree.top_k(tree.sub(delta, reference), 1)[0][0]


# ---------------------------------------------------------------------------------------------
# the model in fprobe's hands


INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")  # transformers', PEFT's


@contextlib.contextmanager
def modes_kept(model: torch.nn.Module):
    """Within: the model in eval mode (no dropout, no gradient checkpointing) and without transformers' or
    PEFT's input-require-grads forward hooks (they call ``requires_grad_`` inside forward, which breaks
    ``jvp``; with gradient checkpointing every generation adds one more, and only the last is on record
    in ``_require_grads_hooks``); on exit every module's ``training`` flag and forward hooks, in their
    order, are put back as they were."""
    modes = [(module, module.training) for module in model.modules()]
    hooks = [(module._forward_hooks, list(module._forward_hooks.items())) for module in model.modules()]
    for table, items in hooks:
        for key, hook in items:
            if getattr(hook, "__name__", None) in INPUT_GRAD_HOOKS:
                del table[key]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for table, items in hooks:
            table.clear()
            table.update(items)


def sequence_logp(policy, params, E: Rollouts, micro_batch) -> torch.Tensor:
    """S_i = Σ_k ℓ_ik at ``params`` (float64)."""
    return passes.forward(policy, params, E, micro_batch).logp.sum(-1)


class Reweighted(NamedTuple):
    h_orig: float
    h_upd: float
    delta_h_true: float
    delta_h1: float
    delta_h2: float | None
    ess_fraction: float


def reweighted_change(policy, eval_batch: EvalBatch, params, delta, new_params, second_order: bool, micro_batch) -> Reweighted:
    """Ĥ(θ) = Σ_i w_i H_i(θ) / Σ_i w_i T_i with log w_i = S_i(θ) − S_i^q: SNIS from the policy q that sampled
    a reused E. ΔH_true = Ĥ(θ_k + Δθ) − Ĥ(θ_k); δH₁, δH₂ = the first and half the second ε-derivative of
    Ĥ(θ_k + εΔθ), by forward-mode AD of Ĥ along the Taylor path of the per-row statistics (one jvp pass on
    E, or jvp of jvp). With S^q = S(θ_k) this is ``entropy_change``'s estimator."""
    E, logq = eval_batch.rollouts, eval_batch.logp_sampler
    jet = passes.jet(policy, params, delta, E, 2 if second_order else 1, micro_batch)
    r0 = estimators.rows(jet.value)
    denom = estimators.denominators(E.response_mask, "token").to(r0.logp.device)
    logq = logq.to(r0.logp.device)
    r2 = estimators.rows(jet.second) if second_order else None
    delta_h1, delta_h2 = estimators.taylor_derivatives(r0, estimators.rows(jet.tangent), r2, logq, denom)
    h0 = float(estimators.snis_value(r0.logp, r0.entropy, logq, denom))
    new = estimators.snis(estimators.rows(passes.forward(policy, new_params, E, micro_batch)), logq, denom)
    return Reweighted(h0, float(new.value), float(new.value) - h0, float(delta_h1),
                      None if delta_h2 is None else float(delta_h2), float(new.ess_fraction))


def log_to_trainer(trainer, control, logs: dict) -> None:
    """``transformers.Trainer.log``: the log history and every reporting callback get ``logs`` at this step.
    Not TRL's own ``log``, which would take and clear the metrics TRL is collecting for its next log; and
    the trainer's pending ``should_log`` (which ``on_log`` clears) is kept, so its own log still happens."""
    should_log = control.should_log
    Trainer.log(trainer, logs)
    control.should_log = trainer.control.should_log = should_log


# ---------------------------------------------------------------------------------------------
# the probe


class TrlProbe(TrainerCallback):
    """The callback ``attach`` adds to the trainer; ``records`` and ``eval_batches`` fill as it trains.

    A record: ``step``, ``updates`` (optimizer updates counted in the step), ``lr``, ``n_eval``,
    ``eval_sampled_at`` (the step whose policy sampled E) and ``sampler_ess_fraction`` (of the weights from
    that policy to π_θk; 1 for a fresh E); then ``h_orig``, ``h_upd``, ``delta_h_true``, ``delta_h1``,
    ``delta_h2`` (None unless asked), ``ratio``, ``ess_fraction`` (at θ_{k+1}), ``delta_l2``; ``step_check``
    ("ok", or why the replay was skipped), ``step_rel_error`` and ``step_rel_error_worst`` (the parameter
    where the replay differs most); ``contributions`` when asked; ``probe_seconds`` and ``step_seconds``
    (the trainer's own time for the step). A step without exactly one update has no numbers and says why
    in ``skipped``."""

    def __init__(self, trainer, settings: ProbeSettings, prompts: list[dict], chat_template: bool, E: EvalBatch | None):
        self.trainer = trainer
        self.settings = settings
        self.prompts = prompts
        self.chat_template = chat_template
        self.records: list[dict] = []
        self.eval_batches: dict[int, Rollouts] = {}
        self._fixed = E
        self._reuse = E is not None or not settings.resample
        self._capturing = False
        self._static_reason = static_skip_reason(trainer) if settings.check_step else "check_step=False"
        self._updates = 0
        self._micro: list[MicroBatch] = []
        self._input_reason: str | None = None
        self._before: Before | None = None
        self._hook = None
        self._wrapper = None  # the compute_loss wrapper while installed
        self._own_compute_loss = None  # an instance attribute compute_loss the trainer had before train()
        self._step_started = 0.0

    # -- plumbing: hooks live only while train() runs

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def _torch_optimizer(self, optimizer) -> torch.optim.Optimizer:
        return getattr(optimizer, "optimizer", optimizer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._uninstall()  # what a train() that raised (Ctrl-C, an error) left, which would count and capture twice
        self._hook = self._torch_optimizer(optimizer).register_step_post_hook(self._count_update)
        trainer, compute_loss = self.trainer, self.trainer.compute_loss
        self._own_compute_loss = vars(trainer).get("compute_loss")

        def capturing_compute_loss(model, inputs, *rest, **kw):
            if self._capturing:
                self._capture(inputs)
            return compute_loss(model, inputs, *rest, **kw)

        trainer.compute_loss = self._wrapper = capturing_compute_loss
        self._capturing = False
        self._before = None

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()

    def _uninstall(self) -> None:
        """Remove the update counter and the ``compute_loss`` wrapper, if installed (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._wrapper is not None:
            if vars(self.trainer).get("compute_loss") is self._wrapper:
                if self._own_compute_loss is None:
                    del self.trainer.compute_loss
                else:
                    self.trainer.compute_loss = self._own_compute_loss
            self._wrapper = self._own_compute_loss = None
        self._capturing = False

    @contextlib.contextmanager
    def _cleaned_up_on_error(self):
        """An exception (or Ctrl-C) inside the probe ends train(): take the probe's hooks off the trainer then."""
        try:
            yield
        except BaseException:
            self._uninstall()
            self._before = None
            raise

    def _count_update(self, optimizer, args, kwargs):
        self._updates += 1

    def _capture(self, inputs: dict) -> None:
        reason = input_skip_reason(inputs)
        self._input_reason = self._input_reason or reason
        if reason is None and self._static_reason is None:
            self._micro.append(micro_batch_from_inputs(inputs, self.trainer.current_gradient_accumulation_steps))

    def _probed(self, step: int) -> bool:
        return step % self.settings.every == 0

    # -- the step

    def on_step_begin(self, args, state, control, **kwargs):
        self._capturing = self._probed(state.global_step + 1)
        self._updates, self._micro, self._input_reason, self._before = 0, [], None, None
        self._step_started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._capturing:
            return
        self._capturing = False
        start = time.perf_counter()
        step = state.global_step + 1
        torch_optimizer = self._torch_optimizer(optimizer)
        dropout = active_dropout(self.model)
        with self._cleaned_up_on_error(), modes_kept(self.model):
            policy = Policy(self.model, temperature=self.trainer.temperature)
            params = tree.tree_map(lambda p: p.detach().clone(), policy.params)
            eval_batch, sampler_ess = self._eval_batch(policy, params, step)
            replay = self._replay(policy, params, torch_optimizer, eval_batch, dropout)
        lr = float(torch_optimizer.param_groups[0]["lr"])
        self._before = Before(step, params, lr, eval_batch, sampler_ess, replay, time.perf_counter() - start)
        self.eval_batches[step] = eval_batch.rollouts

    def on_step_end(self, args, state, control, **kwargs):
        before, self._before = self._before, None
        if before is None:
            return
        start = time.perf_counter()
        step_seconds = start - self._step_started - before.seconds
        with self._cleaned_up_on_error(), modes_kept(self.model):
            record = self._measure(state.global_step, before)
        record["probe_seconds"] = before.seconds + time.perf_counter() - start
        record["step_seconds"] = step_seconds
        self.records.append(record)
        if distributed.is_main():
            log_to_trainer(self.trainer, control, {PREFIX + key: record[key] for key in LOGGED if record.get(key) is not None})
            if self.settings.out is not None:
                key = {"output_dir": str(Path(args.output_dir).resolve()), "step": record["step"]}
                files.append_json_line(self.settings.out, {"key": key, **record}, "key", "probe records")

    # -- E at θ_k

    def _sample(self, policy, step: int) -> Rollouts:
        """A fresh E from π_θk: the run's prompts, the trainer's temperature, fprobe's own per-row streams."""
        tokenizer = TrainerChatTemplate(self.trainer) if self.chat_template else self.trainer.processing_class
        E, _ = sampling.sample(
            policy, tokenizer, self.prompts,
            n_eval=self.settings.n_eval, n_update_prompts=1, group_size=1, reward=lambda *_: 0.0,
            max_new_tokens=self.trainer.max_completion_length, seed=sampling.stream_seed(self.settings.seed, "trl", step),
            replace=self.settings.n_eval > len(self.prompts), chat_template=self.chat_template,
        )  # fprobe.sample also draws one update row, unused here
        return E

    def _eval_batch(self, policy, params, step: int) -> tuple[EvalBatch, float]:
        """(E, the ESS fraction of the weights from E's sampler to π_θk). A fresh E each step
        (``resample``), else the fixed one while that ESS stays above the threshold, then a fresh one."""
        micro_batch = self.settings.micro_batch
        if self._fixed is not None and self._reuse:
            logp = sequence_logp(policy, params, self._fixed.rollouts, micro_batch)
            log_weights = estimators.log_weights(logp, self._fixed.logp_sampler.to(logp.device))
            ess = float(estimators.effective_sample_size(log_weights)) / len(log_weights)
            if ess >= self.settings.ess_threshold:
                return self._fixed, ess
        E = self._sample(policy, step)
        fresh = EvalBatch(E, sequence_logp(policy, params, E, micro_batch), step)
        if self._reuse:
            self._fixed = fresh
        return fresh, 1.0

    # -- the cross-check, taken before the update (the model still holds θ_k)

    def _replay(self, policy, params, torch_optimizer, eval_batch: EvalBatch, dropout: list[str]) -> Replay:
        dropout_reason = f"dropout was active in the trainer's step ({dropout[0]!r} and others)" if dropout else None
        local = self._static_reason or self._input_reason or dropout_reason
        reason = next((r for r in distributed.gather_lists([local]) if r is not None), None)
        if reason is not None:
            return Replay(None, f"skipped: {reason}")
        micro = distributed.gather_lists(self._micro)
        trainer, args = self.trainer, self.trainer.args
        U = update_batch(micro, trainer.max_completion_length)
        weights = trl_row_weights(micro, trainer.loss_type, distributed.world()[1], args.steps_per_generation,
                                  trainer.max_completion_length)
        try:
            optimizer, opt_state = optim.from_torch_optimizer(torch_optimizer, self.model.named_parameters(), params)
        except ValueError as error:
            return Replay(None, f"skipped: {error}")
        max_grad_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        common = dict(loss=losses.RowWeights(weights), max_grad_norm=max_grad_norm, micro_batch=self.settings.micro_batch)
        check = "ok" if not (args.bf16 or args.fp16) else (
            "ok (the trainer's forward ran under bf16/fp16 autocast, fprobe's replay in the model's dtype: "
            "expect step_rel_error of that precision)")
        if not self.settings.contributions:
            return Replay(rl_step(policy, params, optimizer, opt_state, U, **common).delta, check)
        result = probe(policy, eval_batch.rollouts, U, optimizer, opt_state, keep_step=True, **common)
        # now, while the model still holds θ_k: the result refers to the model's parameters
        parts = result.contributions(micro_batch=self.settings.micro_batch)
        return Replay(result.delta_named, check, {
            "delta_h1": parts.delta_h1, "momentum": parts.momentum, "decay": parts.decay, "per_sequence": parts.per_sequence.tolist(),
        })

    # -- after the update

    def _measure(self, step: int, before: Before) -> dict:
        record = {"step": step, "updates": self._updates, "lr": before.lr, "n_eval": len(before.eval_batch.rollouts),
                  "eval_sampled_at": before.eval_batch.sampled_at, "sampler_ess_fraction": before.sampler_ess_fraction}
        if self._updates != 1:
            reason = f"{self._updates} optimizer updates in this step (exactly one expected): no numbers"
            return {**record, "skipped": reason, "step_check": reason, "step_rel_error": None}
        policy = Policy(self.model, temperature=self.trainer.temperature)
        new_params = tree.tree_map(lambda p: p.detach().clone(), policy.params)
        delta = tree.sub(new_params, before.params)
        numbers = self._entropy_numbers(policy, before, delta, new_params)
        replay = before.replay
        error = None if replay.delta is None else relative_error(replay.delta, delta)
        check = replay.check
        if replay.delta is not None and error is None:
            check = f"no relative error: TRL's update is 0 (fprobe's replay: ‖Δθ‖ = {float(tree.norm(replay.delta)):.3g})"
        record.update(numbers, delta_l2=float(tree.norm(delta)), step_check=check, step_rel_error=error,
                      step_rel_error_worst=None if error is None else worst_parameter(replay.delta, delta))
        if replay.contributions is not None:
            record["contributions"] = replay.contributions
        return record

    def _entropy_numbers(self, policy, before: Before, delta, new_params) -> dict:
        eval_batch = before.eval_batch
        if eval_batch.sampled_at == before.step:
            change = entropy_change(
                policy, eval_batch.rollouts, delta, params=before.params, new_params=new_params, lr=before.lr,
                second_order=self.settings.second_order, micro_batch=self.settings.micro_batch,
                ess_threshold=self.settings.ess_threshold,
            )
            numbers = {key: getattr(change, key) for key in ("h_orig", "h_upd", "delta_h_true", "delta_h1", "delta_h2", "ess_fraction")}
        else:
            numbers = reweighted_change(
                policy, eval_batch, before.params, delta, new_params, self.settings.second_order, self.settings.micro_batch
            )._asdict()
        h1 = numbers["delta_h1"]
        return {**numbers, "ratio": numbers["delta_h_true"] / h1 if h1 else None}


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
    ess_threshold: float = 0.5,
    micro_batch: int | None = passes.DEFAULT_MICRO_BATCH,
) -> TrlProbe:
    """Probe every ``every``-th optimizer step of a TRL ``GRPOTrainer`` (see the module docstring); returns
    the probe, whose ``records`` and ``eval_batches`` fill during ``trainer.train()``.

    E: by default a fresh sample of n_eval responses from π_θk at each probed step, prompts drawn from
    ``prompts`` or the trainer's dataset, at the trainer's temperature and ``max_completion_length``, from
    fprobe's own random streams (``seed``). A given ``E`` (taken as a sample of the model as it is now),
    or ``resample=False`` (the first probed step's sample), is reused: every estimate then
    importance-weights from the policy that sampled it, and a fresh E is drawn from π_θk once the ESS
    fraction of those weights falls below ``ess_threshold``. ``contributions`` adds the per-sequence parts
    of δH₁ (of fprobe's replayed step; needs a fresh E and the cross-check). ``out``: JSONL, one line
    per probed step, opened (created if absent) here. Every input is checked here, before training starts.
    """
    from fprobe.trl import sharded

    sharded_mode = check_trainer(trainer)
    if any(isinstance(c, (TrlProbe, sharded.ShardedTrlProbe)) for c in trainer.callback_handler.callbacks):
        raise ValueError("an fprobe probe is already attached to this trainer")
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every must be a positive number of steps, got {every!r}")
    if not (isinstance(n_eval, int) and n_eval >= 1):
        raise ValueError(f"n_eval must be a positive number of sequences, got {n_eval!r}")
    if not 0 < ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be in (0, 1], got {ess_threshold}")
    if contributions and (E is not None or not resample or not check_step):
        raise ValueError("contributions need a fresh E at each step (resample=True, no E) and the step cross-check (check_step=True)")
    if out is not None:
        files.check_writable(out, "out")
    if prompts is not None and (isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts)):
        raise TypeError("prompts must be a list of non-empty texts (one text would be read as its characters)")
    model = trainer.model
    records = [{"prompt": p} for p in prompts] if prompts is not None else None
    chat_template = False
    if records is None:
        records, chat_template = dataset_prompts(trainer)
    if not records:
        raise ValueError("no prompts to sample E from")
    settings = ProbeSettings(every, n_eval, resample, seed, None if out is None else Path(out), second_order, contributions,
                             check_step, ess_threshold, micro_batch)
    if sharded_mode:
        sharded.check_settings(E, resample, second_order, contributions)
        sharded.check_model(model)
        if out is not None and distributed.is_main():
            open_records_file(Path(out), trainer.args.output_dir)
        probe_callback = sharded.ShardedTrlProbe(trainer, settings, records, chat_template)
        trainer.add_callback(probe_callback)
        return probe_callback
    fixed = None
    with modes_kept(model):
        policy = Policy(model, temperature=trainer.temperature)
        if E is not None:
            check_eval_batch(E, model)
            fixed = EvalBatch(E, sequence_logp(policy, policy.params, E, micro_batch), trainer.state.global_step)
    if out is not None and distributed.is_main():
        open_records_file(Path(out), trainer.args.output_dir)
    probe_callback = TrlProbe(trainer, settings, records, chat_template, fixed)
    trainer.add_callback(probe_callback)
    return probe_callback
