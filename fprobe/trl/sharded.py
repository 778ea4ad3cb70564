"""Probing a TRL ``GRPOTrainer`` whose parameters are sharded by FSDP2 (transformers' native
``DistributedConfig(fsdp_size=...)`` or accelerate's FSDP2): ``fprobe.trl.attach`` routes such a trainer here.

Step k is probed as in ``fprobe.trl.probe``, through the engine (``fprobe.entropy.sharded``): just before
the optimizer update every rank draws the same E from π_θk (fprobe's own per-row streams, generated in
lockstep), forwards it, and takes ∇Ĥ(θ_k) by FSDP2's backward with the trainer's gradients set aside and
put back; after the update a forward at θ_{k+1} gives ΔH_true, and δH₁ = ⟨∇Ĥ(θ_k), Δθ⟩ is the all-reduced
sum of the local dots of the shards. Memory beyond the trainer's: the capture's copies of θ_k, θ_{k+1} and
Δθ and the gradient, each one rank's shard of the trainable parameters (4× that shard), and E's statistics.

What needs whole parameters runs only with ``gather=True``: then at θ_k and θ_{k+1} torch's
``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` gathers them on rank 0's CPU, where fprobe's
single-process path on an unsharded replica gives δH₁ by jvp (``delta_h1_jvp``, a cross-check of the gradient
path) and δH₂ (``second_order``), broadcast to every rank; rank 0's CPU then holds the whole model three times.
Without it ``second_order`` is refused at attach. The per-sequence contributions and the step replay need the
whole optimizer state, which fprobe does not gather: ``contributions`` is refused, and each record's
``step_check`` says that the replay was skipped. Records carry ``mode: "sharded"`` and ``quantities`` (the numbers they hold).
"""

import time

import torch

from fprobe import distributed, tree
from fprobe.entropy.measure import measure
from fprobe.entropy import sharded, uncertainty
from fprobe.model.policy import Policy, modes_kept
from fprobe.rl.capture import CapturedStep
from fprobe.rollouts import Rollouts
from fprobe.sampling import generate
from fprobe.trl import probe
from fprobe.trl.capture import StepCapture, TrainerFacts
from fprobe.trl.prompts import TrainerChatTemplate

_QUANTITIES = ("h_orig", "h_upd", "delta_h_true", "delta_h1", "ratio", "ess_fraction", "delta_l2")
_NOT_SHARDED = "skipped: the replay needs whole parameters, and this run's are sharded (FSDP2)"


def check_settings(E, resample: bool, second_order: bool, contributions: bool, gather: bool) -> None:
    """ValueError for what the sharded mode does not measure, before training starts."""
    if second_order and not gather:
        raise ValueError(
            "fprobe.trl: second_order (δH₂ by forward over forward) needs whole parameters, but this trainer's are sharded "
            "(FSDP2): functional_call and forward-mode AD do not pass FSDP2's all-gathers; pass gather=True to gather "
            "them on rank 0 (its CPU then holds the whole model three times: θ_k, θ_{k+1} and a replica)"
        )
    if contributions:
        raise ValueError(
            "fprobe.trl: contributions (per-sequence parts of the replayed step) need the step replay, which needs whole "
            "parameters and the whole optimizer state; this trainer's are sharded (FSDP2) and fprobe does not gather "
            "the optimizer state"
        )
    if E is not None or not resample:
        raise ValueError(
            "fprobe.trl: with sharded parameters (FSDP2) the probe draws a fresh E at each probed step; a reused E "
            "(E=..., resample=False) is not supported there"
        )


def check_model(model: torch.nn.Module) -> None:
    """ValueError for what the sharded mode cannot measure in a model that is sharded already (accelerate shards at
    ``train()``, which checks then): tied embeddings under native FSDP2, sharding other than FSDP2 over every rank."""
    _check_tied_embeddings(model)
    if distributed.is_sharded(model):
        sharded.check_sharded(model)


def _check_tied_embeddings(model: torch.nn.Module) -> None:
    """ValueError for tied input and output embeddings in a model sharded by transformers' native FSDP2: after one
    optimizer step its logits are far (≈25 on a tiny Qwen2) from an unsharded replica with the same named parameters."""
    output = model.get_output_embeddings()
    tied = output is not None and getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and getattr(model, "_is_fsdp_managed_module", False):
        raise ValueError(
            "fprobe.trl: this model ties its input and output embeddings and is sharded by transformers' native FSDP2 "
            "(DistributedConfig), where the tied lm_head does not follow the trained embedding (upstream: the model's "
            "logits leave those of its own named parameters after one step); untie them (tie_word_embeddings=False) "
            "or shard with accelerate's FSDP2"
        )


class ShardedTrlProbe:
    """What ``attach`` returns for a trainer with sharded parameters; ``records`` and ``eval_batches`` fill as it
    trains; ``capture`` is the callback on the trainer (``fprobe.trl.capture.StepCapture`` on this rank's shards:
    its θ_k, θ_{k+1} and Δθ are local). A record: ``step``, ``mode`` ("sharded"), ``quantities``, ``updates``,
    ``lr``, ``n_eval``, ``h_orig``, ``h_upd``, ``delta_h_true``, ``delta_h1`` (gradient path), ``delta_h2`` (None),
    ``ratio``, ``ess_fraction``, ``delta_l2``, ``eval_dtype`` (what the passes computed in), the standard errors
    ``h_orig_se`` … ``ratio_se`` with ``se_units``, ``se_undefined`` (why one is None: δH₁'s and the ratio's without
    ``gather``) and ``n_eval_for``, ``step_check`` (why the replay was skipped), ``probe_seconds``, ``step_seconds``;
    with ``gather``, ``delta_h1_jvp``, ``delta_h2`` (when asked) and the jvp path's ``delta_h1_se``, ``ratio_se``
    (and ``delta_h2_se``). A step without exactly one
    optimizer update has no numbers and says why in ``skipped``."""

    def __init__(self, trainer, facts: TrainerFacts, settings: probe.ProbeSettings, prompts: list[dict], chat_template: bool,
                 gather: bool):
        self.trainer = trainer
        self.facts = facts
        self.settings = settings
        self.prompts = prompts
        self.chat_template = chat_template
        self.records: list[dict] = []
        self.eval_batches: dict[int, Rollouts] = {}
        self.gather = gather
        self._replica = None  # rank 0's unsharded copy, made at the first gathered step
        self.capture = StepCapture(
            trainer, facts, self._local_shards, lambda step: step % settings.every == 0, self._before_update,
            self._after_update, replay=False,
        )

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def _policy(self) -> sharded.ShardedPolicy:
        return sharded.ShardedPolicy(self.model, temperature=self.facts.temperature, eval_dtype=self.settings.estimate.eval_dtype)

    def _local_shards(self) -> dict:
        """This rank's shards of the trainable parameters (views), by name."""
        return {name: distributed.local_part(p.detach()) for name, p in sharded.trainable(self.model).items()}

    def _before_update(self, step: int, params) -> tuple:
        """At θ_k: (E, what the measurement keeps from θ_k, seconds)."""
        started = time.perf_counter()
        with modes_kept(self.model):
            policy = self._policy()
            E = self._sample(policy, step)
            start = sharded.at_start(policy, E, self.settings.estimate.micro_batch)
        state = sharded.gathered_state(self.model) if self.gather else None
        self.eval_batches[step] = E
        return E, start, state, time.perf_counter() - started

    def _sample(self, policy: sharded.ShardedPolicy, step: int) -> Rollouts:
        """A fresh E from π_θk, the same on every rank (as ``fprobe.trl.probe`` draws it)."""
        tokenizer = TrainerChatTemplate(self.trainer) if self.chat_template else self.trainer.processing_class
        try:
            E, _ = generate.sample(
                policy, tokenizer, self.prompts,
                n_eval=self.settings.n_eval, eval_group_size=self.settings.eval_group_size, n_update_prompts=1, group_size=1,
                reward=lambda *_: 0.0, max_new_tokens=self.facts.max_completion_length,
                seed=generate.stream_seed(self.settings.seed, "trl", step),
                replace=self.settings.n_eval // self.settings.eval_group_size > len(self.prompts), chat_template=self.chat_template,
            )
        finally:
            sharded.reshard(self.model)
        return E

    def _after_update(self, captured: CapturedStep, context: tuple, control) -> None:
        E, start, state, seconds = context
        started = time.perf_counter()
        record = {"step": captured.step, "mode": "sharded", "quantities": list(_QUANTITIES), "updates": captured.updates,
                  "lr": captured.lr, "n_eval": len(E), "eval_sampled_at": captured.step, "sampler_ess_fraction": 1.0}
        if captured.updates != 1:
            reason = f"{captured.updates} optimizer updates in this step (exactly one expected): no numbers"
            record.update(quantities=[], skipped=reason, step_check=reason, step_rel_error=None)
        else:
            with self.capture.cleaned_up_on_error(), modes_kept(self.model):
                change = sharded.after_update(self._policy(), E, start, captured.delta, self.settings.estimate.micro_batch)
            rel_se = self.settings.rel_se_warning
            record.update(change._asdict(), delta_h2=None, ratio=change.delta_h_true / change.delta_h1 if change.delta_h1 else None,
                          step_check=_NOT_SHARDED, step_rel_error=None,
                          n_eval_for=None if rel_se is None else uncertainty.rows_for(rel_se, change.delta_h_true, change.delta_h_true_se, len(E)))
            if self.gather:
                with self.capture.cleaned_up_on_error():
                    record.update(self._gathered_numbers(E, state))
                record["se_undefined"] = {k: v for k, v in record["se_undefined"].items() if record[f"{k}_se"] is None}
                record["quantities"] += [key for key in ("delta_h1_jvp", "delta_h2") if record[key] is not None]
            record["quantities"] += [key for key in probe.SE if record[key] is not None]
        record["probe_seconds"] = seconds + time.perf_counter() - started
        record["step_seconds"] = captured.step_seconds
        probe.sink(self.trainer, self.settings.out, self.records, record, control)

    def _gathered_numbers(self, E: Rollouts, state_k: dict | None) -> dict:
        """δH₁ by jvp (``delta_h1_jvp``), δH₂ (when asked) and their and the ratio's standard errors from the whole θ_k
        and θ_{k+1}, by fprobe's single-process measurement (``fprobe.entropy.measure``) on rank 0's unsharded replica,
        broadcast to every rank."""
        state_k1 = sharded.gathered_state(self.model)
        numbers = None
        if distributed.is_main():
            if self._replica is None:
                self._replica = sharded.replica(self.model, state_k)
            theta_k, theta_k1 = sharded.whole_trainable(self.model, state_k), sharded.whole_trainable(self.model, state_k1)
            with distributed.alone():
                change = measure(Policy(self._replica, temperature=self.facts.temperature), E, tree.sub(theta_k1, theta_k),
                                 theta_k, theta_k1, None, self.settings.estimate, second_order=self.settings.second_order)
            numbers = {"delta_h1_jvp": change.delta_h1, "delta_h2": change.delta_h2, "delta_h1_se": change.delta_h1_se,
                       "delta_h2_se": change.delta_h2_se, "ratio_se": change.ratio_se}
        return distributed.broadcast_from_main(numbers)
