"""GRPO with TRL on fprobe's built-in tiny policy and toy addition task, its own steps probed in place.

    python examples/trl_grpo.py                      # ~1-2 minutes on 2 CPU cores
    python examples/trl_grpo.py --steps 60 --every 2 --out-dir runs/grpo

Every ``--every``-th optimizer step, fprobe.trl measures on a fresh evaluation batch E what TRL's update did
to the policy's entropy (ΔH_true) and what the first-order prediction δH₁ said, and replays the step
with fprobe's own loss to check it (step_rel_error). Writes OUT_DIR/probe.jsonl (one line per probed
step) and OUT_DIR/entropy.png (δH₁ and ΔH_true, and the policy's entropy, against the step, each with its
standard error over E's sequences as an error bar), and prints
the probe's cost as a multiple of the training step it probed, both timed in this run.
"""

import argparse
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import fprobe  # noqa: E402
from fprobe.sampling import toy  # noqa: E402


def addition_reward(prompts, completions, answer, **_):
    """1 for the right sum, else 0 (``fprobe.sampling.toy.verify``)."""
    return [toy.verify(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]


def plot(records: list[dict], path: Path) -> None:
    measured = [r for r in records if r.get("delta_h_true") is not None]
    steps = [r["step"] for r in measured]
    figure, (change, level) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    change.axhline(0, color="0.8", lw=0.8)
    errors = lambda key: [r[f"{key}_se"] or 0.0 for r in measured]  # None where undefined: no bar
    change.errorbar(steps, [r["delta_h_true"] for r in measured], yerr=errors("delta_h_true"), fmt="o-", capsize=3,
                    label="ΔH_true (SNIS on E) ± se")
    change.errorbar(steps, [r["delta_h1"] for r in measured], yerr=errors("delta_h1"), fmt="x--", capsize=3,
                    label="δH₁ (jvp along TRL's Δθ) ± se")
    change.set_ylabel("entropy change per token [nats]")
    change.legend()
    level.errorbar(steps, [r["h_orig"] for r in measured], yerr=errors("h_orig"), fmt="o-", color="C2", capsize=3)
    level.set_ylabel("policy entropy per token on E")
    level.set_xlabel("optimizer step")
    figure.suptitle("What each probed GRPO step did to the entropy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--loss", default="dapo", choices=("dapo", "grpo", "dr_grpo", "bnpo"))
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out-dir", type=Path, default=Path("trl_grpo_out"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
    model = AutoModelForCausalLM.from_pretrained(str(toy.DEFAULT_MODEL_PATH), dtype=torch.float64)
    config = GRPOConfig(
        output_dir=str(args.out_dir / "trainer"), max_steps=args.steps, learning_rate=args.lr, loss_type=args.loss,
        per_device_train_batch_size=16, num_generations=8, max_completion_length=8, temperature=1.0,
        bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=args.every, disable_tqdm=True, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(toy.make_prompts(512, 0)))

    out = args.out_dir / "probe.jsonl"
    out.unlink(missing_ok=True)
    probe = fprobe.trl.attach(trainer, every=args.every, n_eval=args.n_eval, out=out)  # the three lines a
    start = time.perf_counter()                                                         # TRL user needs:
    trainer.train()                                                                     # attach, train, read
    seconds = time.perf_counter() - start

    for r in probe.records:
        se = lambda key: "" if r[f"{key}_se"] is None else f" ± {r[f'{key}_se']:.1e}"
        print(f"step {r['step']:3d}  ΔH_true {r['delta_h_true']:+.3e}{se('delta_h_true')}  δH₁ {r['delta_h1']:+.3e}{se('delta_h1')}  "
              f"ratio {r['ratio']:.3f}{se('ratio')}  "
              f"ESS {r['ess_fraction']:.3f}  step_rel_error {r['step_rel_error']:.1e}  ({r['step_check']})")
    figure = args.out_dir / "entropy.png"
    plot(probe.records, figure)
    probe_time = statistics.median(r["probe_seconds"] for r in probe.records)
    step_time = statistics.median(r["step_seconds"] for r in probe.records)
    print(f"\n{args.steps} steps in {seconds:.1f} s; wrote {out} and {figure}")
    print(f"cost of one probe: {probe_time:.3f} s = {probe_time / step_time:.1f} × the training step it probed "
          f"({step_time:.3f} s; medians over {len(probe.records)} probed steps, |E| = {args.n_eval})")


if __name__ == "__main__":
    main()
