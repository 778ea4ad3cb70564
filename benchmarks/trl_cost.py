"""The TRL probe's cost per probed step, as a multiple of the training step it probes, at a real shape.

A TRL ``GRPOTrainer`` trains a random Qwen2.5-0.5B-shaped policy (``real_size.SHAPES``; weights from its
configuration, no download) with a LoRA adapter (rank 16 on q/v) on fprobe's toy addition prompts (the toy
tokenizer: ids within the vocabulary; the responses mean nothing, the passes cost what they cost; the reward is
the parity of a completion's token ids, so that advantages are not zero), and
``fprobe.trl.attach`` probes every ``--every``-th step on a fresh E of ``--n-eval`` responses. Each record holds
``probe_seconds`` (fprobe's work for that step: E's sampling, its passes, the replay check) and ``step_seconds``
(the trainer's own step: generation, rewards, forward and backward, the optimizer), both wall time in this run.

    python benchmarks/trl_cost.py                  # 0.5B shape, LoRA, 4 steps probed every 2nd, |E| = 8 (CPU: ~10 min)
    python benchmarks/trl_cost.py --full           # full parameters
    python benchmarks/trl_cost.py --quick          # the tiny shape (smoke test, CI)
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import fprobe.trl  # noqa: E402
from benchmarks import common, real_size  # noqa: E402
from fprobe.sampling import toy  # noqa: E402


def reward(completion_ids, **_):
    """A reward that varies between a random policy's completions (the parity of their token ids' sum), so that
    advantages are non-zero and Δθ is a real update."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def trainer_of(args, out: Path) -> GRPOTrainer:
    tokenizer = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
    config = real_size.config_of(args.shape, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    peft = None if args.full else LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    settings = GRPOConfig(
        output_dir=str(out), max_steps=args.steps, learning_rate=1e-5, per_device_train_batch_size=args.batch,
        num_generations=args.generations, max_completion_length=args.completion, temperature=1.0, bf16=False,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=args.every, disable_tqdm=True, seed=0,
    )
    return GRPOTrainer(model=model, reward_funcs=reward, args=settings, processing_class=tokenizer, peft_config=peft,
                       train_dataset=Dataset.from_list(toy.make_prompts(64 * args.batch, 0)))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="0.5b", choices=list(real_size.SHAPES))
    p.add_argument("--full", action="store_true", help="train every parameter (default: a LoRA adapter)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--completion", type=int, default=16, help="max_completion_length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", "--quick", dest="quick", action="store_true", help="the tiny shape (seconds)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.steps, args.every, args.n_eval, args.completion = "tiny", 2, 1, 4, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_of(args, Path(out))
        probe = fprobe.trl.attach(trainer, every=args.every, n_eval=args.n_eval)
        trainer.train()
    records = [r for r in probe.records if r.get("probe_seconds") is not None]
    rows = [[r["step"], f"{r['step_seconds']:.2f}", f"{r['probe_seconds']:.2f}", f"{r['probe_seconds'] / r['step_seconds']:.2f}"]
            for r in records]
    mode = "full" if args.full else "LoRA"
    print(f"# the TRL probe's cost — shape {args.shape}, {mode}, |E| = {args.n_eval}, {args.batch} completions of ≤ "
          f"{args.completion} tokens per step, {torch.get_num_threads()} thread(s)\n")
    print(common.table(["step", "training step [s]", "probe [s]", "probe / step"], rows, "wall time per probed step"))
    ratio = statistics.median(r["probe_seconds"] / r["step_seconds"] for r in records)
    print(f"\nmedian probe / step: {ratio:.2f}")
    common.write_json(args.json, dict(shape=args.shape, mode=mode, n_eval=args.n_eval, records=records, ratio=ratio))
    return records


if __name__ == "__main__":
    main()
