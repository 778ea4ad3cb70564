"""Probing a TRL ``GRPOTrainer`` whose parameters are sharded by FSDP2 (transformers' native
``DistributedConfig(fsdp_size=...)`` or accelerate's FSDP2): ``fprobe.trl.attach`` routes such a trainer here.

Step k is probed as in ``fprobe.trl.probe``, through the engine (``fprobe.entropy.sharded``): just before
the optimizer update every rank draws the same E from π_θk (fprobe's own per-row streams, generated in
lockstep), forwards it, and takes ∇Ĥ(θ_k) by FSDP2's backward with the trainer's gradients set aside and
put back; after the update a forward at θ_{k+1} gives ΔH_true, and δH₁ = ⟨∇Ĥ(θ_k), Δθ⟩ is the all-reduced
sum of the local dots of the shards. Memory beyond the trainer's: θ_k's and the gradient's shards (2× one
rank's shard of the trainable parameters) and E's statistics.

What needs whole parameters — δH₁ by jvp, δH₂, the per-sequence contributions, the step replay — does not
run here: ``second_order`` and ``contributions`` are refused at attach, and each record's ``step_check`` says
that the replay was skipped. Records carry ``mode: "sharded"`` and ``quantities`` (the numbers they hold).
"""

import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from fprobe import distributed
from fprobe import files
from fprobe.entropy import sharded
from fprobe.rollouts import Rollouts
from fprobe.sampling import generate as sampling
from fprobe.trl import probe

QUANTITIES = ("h_orig", "h_upd", "delta_h_true", "delta_h1", "ratio", "ess_fraction", "delta_l2")
NOT_SHARDED = "skipped: the replay needs whole parameters, and this run's are sharded (FSDP2)"


def check_settings(E, resample: bool, second_order: bool, contributions: bool) -> None:
    """ValueError for what the sharded mode does not measure, before training starts."""
    if second_order or contributions:
        asked = "second_order (δH₂ by forward over forward)" if second_order else "contributions (per-sequence parts of the replayed step)"
        raise ValueError(
            f"fprobe.trl: {asked} needs whole parameters, but this trainer's are sharded (FSDP2): functional_call and "
            "forward-mode AD do not pass FSDP2's all-gathers; the sharded mode gives ΔH_true and δH₁ (by the gradient path)"
        )
    if E is not None or not resample:
        raise ValueError(
            "fprobe.trl: with sharded parameters (FSDP2) the probe draws a fresh E at each probed step; a reused E "
            "(E=..., resample=False) is not supported there"
        )


def check_model(model: torch.nn.Module) -> None:
    """ValueError for what the sharded mode cannot measure in a model that is sharded already (accelerate shards at
    ``train()``, which checks then): tied embeddings under native FSDP2, sharding other than FSDP2 over every rank."""
    check_tied_embeddings(model)
    if distributed.is_sharded(model):
        sharded.check_sharded(model)


def check_tied_embeddings(model: torch.nn.Module) -> None:
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


class ShardedTrlProbe(TrainerCallback):
    """The callback ``attach`` adds to a trainer with sharded parameters; ``records`` and ``eval_batches`` fill as it
    trains. A record: ``step``, ``mode`` ("sharded"), ``quantities``, ``updates``, ``lr``, ``n_eval``, ``h_orig``,
    ``h_upd``, ``delta_h_true``, ``delta_h1`` (gradient path), ``delta_h2`` (None), ``ratio``, ``ess_fraction``,
    ``delta_l2``, ``step_check`` (why the replay was skipped), ``probe_seconds``, ``step_seconds``. A step without
    exactly one optimizer update has no numbers and says why in ``skipped``."""

    def __init__(self, trainer, settings: probe.ProbeSettings, prompts: list[dict], chat_template: bool):
        self.trainer = trainer
        self.settings = settings
        self.prompts = prompts
        self.chat_template = chat_template
        self.records: list[dict] = []
        self.eval_batches: dict[int, Rollouts] = {}
        self._hook = None
        self._updates = 0
        self._probing = False
        self._start = None
        self._step_started = 0.0

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._uninstall()
        sharded.check_sharded(self.model)
        self._hook = getattr(optimizer, "optimizer", optimizer).register_step_post_hook(self._count_update)

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()

    def _uninstall(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._start = None

    def _count_update(self, optimizer, args, kwargs):
        self._updates += 1

    def on_step_begin(self, args, state, control, **kwargs):
        self._probing = (state.global_step + 1) % self.settings.every == 0
        self._updates, self._start = 0, None
        self._step_started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._probing:
            return
        self._probing = False
        started = time.perf_counter()
        step = state.global_step + 1
        try:
            with probe.modes_kept(self.model):
                policy = sharded.ShardedPolicy(self.model, temperature=self.trainer.temperature)
                E = self._sample(policy, step)
                start = sharded.at_start(policy, E, self.settings.micro_batch)
        except BaseException:
            self._uninstall()
            raise
        lr = float(getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"])
        self._start = (step, E, start, lr, time.perf_counter() - started)
        self.eval_batches[step] = E

    def _sample(self, policy: sharded.ShardedPolicy, step: int) -> Rollouts:
        """A fresh E from π_θk, the same on every rank (see ``fprobe.trl.probe``'s ``_sample``)."""
        tokenizer = probe.TrainerChatTemplate(self.trainer) if self.chat_template else self.trainer.processing_class
        try:
            E, _ = sampling.sample(
                policy, tokenizer, self.prompts,
                n_eval=self.settings.n_eval, n_update_prompts=1, group_size=1, reward=lambda *_: 0.0,
                max_new_tokens=self.trainer.max_completion_length, seed=sampling.stream_seed(self.settings.seed, "trl", step),
                replace=self.settings.n_eval > len(self.prompts), chat_template=self.chat_template,
            )
        finally:
            sharded.reshard(self.model)
        return E

    def on_step_end(self, args, state, control, **kwargs):
        kept, self._start = self._start, None
        if kept is None:
            return
        step, E, start, lr, seconds_before = kept
        started = time.perf_counter()
        record = {"step": state.global_step, "mode": "sharded", "quantities": list(QUANTITIES), "updates": self._updates,
                  "lr": lr, "n_eval": len(E), "eval_sampled_at": step, "sampler_ess_fraction": 1.0}
        if self._updates != 1:
            reason = f"{self._updates} optimizer updates in this step (exactly one expected): no numbers"
            record.update(quantities=[], skipped=reason, step_check=reason, step_rel_error=None)
        else:
            try:
                with probe.modes_kept(self.model):
                    change = sharded.after_update(sharded.ShardedPolicy(self.model, temperature=self.trainer.temperature), E,
                                                  start, self.settings.micro_batch)
            except BaseException:
                self._uninstall()
                raise
            record.update(change._asdict(), delta_h2=None, ratio=change.delta_h_true / change.delta_h1 if change.delta_h1 else None,
                          step_check=NOT_SHARDED, step_rel_error=None)
        record["probe_seconds"] = seconds_before + time.perf_counter() - started
        record["step_seconds"] = started - self._step_started - seconds_before
        self.records.append(record)
        if distributed.is_main():
            probe.log_to_trainer(self.trainer, control, {probe.PREFIX + key: record[key] for key in probe.LOGGED if record.get(key) is not None})
            if self.settings.out is not None:
                key = {"output_dir": str(Path(args.output_dir).resolve()), "step": record["step"]}
                files.append_json_line(self.settings.out, {"key": key, **record}, "key", "probe records")
