"""GRPO with TRL on fprobe's built-in tiny policy, its parameters sharded by transformers' native FSDP2 over two
CPU processes (gloo), its own steps probed in place by fprobe's sharded mode.

    torchrun --nproc_per_node=2 examples/trl_grpo_fsdp.py            # ~1 minute on 2 CPU cores
    torchrun --nproc_per_node=2 examples/trl_grpo_fsdp.py --steps 20 --every 2 --out-dir runs/grpo-fsdp

The built-in policy ties its embeddings, which transformers' native FSDP2 does not train correctly: the example
first saves an untied copy (its lm_head a copy of the embedding: the same logits). Each rank then loads it with
``DistributedConfig(fsdp_size=2)`` and holds half of every parameter. Every ``--every``-th optimizer step
``fprobe.trl.attach`` draws a fresh E (the same on both ranks), measures ΔH_true from the module's own
forwards at θ_k and θ_{k+1}, and δH₁ from FSDP2's backward dotted with the shards of TRL's Δθ. Rank 0 writes
OUT_DIR/probe.jsonl and prints one line per probed step.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig
from trl import GRPOConfig, GRPOTrainer

import fprobe.trl
from fprobe import distributed
from fprobe.sampling import toy


def addition_reward(prompts, completions, answer, **_):
    """1 for the right sum, else 0 (``fprobe.sampling.toy.verify``)."""
    return [toy.verify(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]


def save_untied(source: Path, target: Path) -> None:
    """``source`` with ``tie_word_embeddings=False`` and its lm_head a copy of the input embedding."""
    model = AutoModelForCausalLM.from_pretrained(str(source))
    config = model.config
    config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(config)
    untied.load_state_dict({**model.state_dict(), "lm_head.weight": model.get_input_embeddings().weight.detach().clone()})
    untied.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/trl_grpo_fsdp"))
    args = parser.parse_args(argv)

    distributed.init_from_env()
    model_dir = args.out_dir / "untied-policy"
    if distributed.is_main():
        save_untied(toy.DEFAULT_MODEL_PATH, model_dir)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float64, distributed_config=DistributedConfig(fsdp_size=dist.get_world_size())
    )
    config = GRPOConfig(
        output_dir=str(args.out_dir / "run"), per_device_train_batch_size=8, num_generations=4, temperature=1.0,
        max_completion_length=6, max_steps=args.steps, learning_rate=args.lr, loss_type="dapo", bf16=False, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=config, processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
                          train_dataset=Dataset.from_list(toy.make_prompts(256, 0)))
    probe = fprobe.trl.attach(trainer, every=args.every, n_eval=args.n_eval, out=args.out_dir / "probe.jsonl")
    trainer.train()
    if distributed.is_main():
        for r in probe.records:
            print(f"step {r['step']:3d} [{r['mode']}]  h = {r['h_orig']:.4f}  ΔH_true = {r['delta_h_true']:+.3e}  "
                  f"δH₁ = {r['delta_h1']:+.3e}  ratio = {r['ratio']:.3f}  probe {r['probe_seconds']:.2f} s / step {r['step_seconds']:.2f} s")
        print(f"records: {args.out_dir / 'probe.jsonl'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
