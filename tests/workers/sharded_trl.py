"""Part of the worker for tests/test_sharded.py (run by sharded_probe.py): one rank of a 2-process gloo GRPO run of the built-in tiny policy sharded by
transformers' native FSDP2 (float64), probed by ``fprobe.trl.attach`` in its sharded mode.

``run(UNTIED_MODEL_DIR, TIED_MODEL_DIR, OUT_DIR)``: rank r saves OUT_DIR/rank{r}.pt: the probe's records and evaluation batches, the whole θ_k and θ_{k+1} of each
step (rank 0, ``get_model_state_dict``, kept by a separate callback), and the final shards, losses and optimizer
state of the probed run, of the same run without the probe, and of one probed with ``gather=True, second_order=True``; then the error of attaching to the tied model, and
the probe class and ShardingWarnings of attaching to a trainer that asks accelerate for FSDP2 on CPU.
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.distributed import DistributedConfig
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fprobe.trl  # noqa: E402
from fprobe.sampling import toy  # noqa: E402


class WholeParameters(TrainerCallback):
    """θ_k before each optimizer update and θ_{k+1} after it, whole, on rank 0."""

    def __init__(self, trainer):
        self.trainer, self.before, self.after = trainer, [], []

    def _whole(self) -> dict:
        state = get_model_state_dict(self.trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: state[n].clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad} if dist.get_rank() == 0 else {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before.append(self._whole())

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(self._whole())


def make_trainer(model_dir: str, out: Path, **config) -> GRPOTrainer:
    """Sharded by transformers' native FSDP2 unless ``config`` asks accelerate for FSDP (which it drops on CPU)."""
    torch.manual_seed(0)
    sharding = {} if config else dict(distributed_config=DistributedConfig(fsdp_size=2))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **sharding)
    args = GRPOConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=4, num_generations=4, temperature=1.5, max_completion_length=6,
        max_steps=2, learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.2, loss_type="dapo", bf16=False, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, **config,
    )
    reward = lambda prompts, completions, answer, **_: [toy.verify(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]
    return GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(toy.make_prompts(64, 0)),
                       processing_class=AutoTokenizer.from_pretrained(model_dir))


def final_state(trainer) -> dict:
    optimizer = trainer.optimizer
    params = dict(trainer.model.named_parameters())
    return {
        "shards": {n: p.to_local().clone() for n, p in params.items()},
        "optimizer": {n: {k: v.to_local().clone() if hasattr(v, "to_local") else v for k, v in optimizer.state[p].items()} for n, p in params.items()},
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }


def run(untied: str, tied: str, out: Path) -> None:
    probed = make_trainer(untied, out)
    probe = fprobe.trl.attach(probed, every=1, n_eval=4, out=out / "probe.jsonl", micro_batch=2)
    whole = WholeParameters(probed)
    probed.add_callback(whole)
    probed.train()
    plain = make_trainer(untied, out)
    plain.train()
    gathered = make_trainer(untied, out)
    gathered_probe = fprobe.trl.attach(gathered, every=1, n_eval=5, micro_batch=2, gather=True, second_order=True)
    gathered.train()
    try:
        fprobe.trl.attach(make_trainer(tied, out))
        tied_error = None
    except ValueError as error:
        tied_error = str(error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_fsdp = type(fprobe.trl.attach(make_trainer(untied, out, fsdp=True, fsdp_config={"fsdp_version": 2}))).__name__
    cpu_warnings = [str(w.message) for w in caught if issubclass(w.category, fprobe.ShardingWarning)]
    rank = dist.get_rank()
    torch.save({"cpu_fsdp": (cpu_fsdp, cpu_warnings), "records": probe.records, "E": probe.eval_batches, "before": whole.before, "after": whole.after,
                "probed": final_state(probed), "plain": final_state(plain), "tied_error": tied_error,
                "gathered": {"records": gathered_probe.records, "E": gathered_probe.eval_batches, **final_state(gathered)}}, out / f"rank{rank}.pt")
