"""Which published predictor of the entropy change is right? fprobe as the referee.

On the built-in policy (fprobe/assets/tiny-adder, float64) and the toy addition task: for each seed,
sample E and U, take one step with SGD and one with AdamW at η₀, and for every learning rate η of the
sweep (Δθ(η) = (η/η₀) Δθ(η₀), exact for both optimizers) compare each predictor of
``fprobe.predictors`` with the true per-token change Δh_ik on U's states. Writes experiments/README.md
(tables averaged over seeds), experiments/predictors.json (every record) and a plot.

    python experiments/predictors.py            # ~2 min on 2 CPU cores
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import fprobe
from fprobe import files
from fprobe.entropy import predictors
from fprobe.sampling import toy
from fprobe import tree
from fprobe.records import format_number

HERE = Path(__file__).parent
STATS = predictors.Score._fields
OPTIMIZERS = {"SGD": lambda lr: fprobe.optim.sgd(lr=lr), "AdamW": lambda lr: fprobe.optim.adamw(lr=lr, weight_decay=0.01)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--lrs", default="1e-7,1e-6,1e-5,1e-4", help="learning rates of the sweep (comma-separated)")
    add("--lr0", type=float, default=1e-5, help="learning rate of the step itself; the sweep rescales its Δθ")
    add("--seeds", type=int, default=8, help="independent E/U samples (and steps) per optimizer")
    add("--n-eval", type=int, default=64)
    add("--n-update-prompts", type=int, default=16)
    add("--group-size", type=int, default=8)
    add("--max-new-tokens", type=int, default=8)
    add("--trl-steps", type=int, default=10, help="steps of the TRL GRPO run (0: none)")
    add("--micro-batches", default="8,32", help="verl micro-batch sizes (rows of U) for Cui et al.'s centring")
    add("--out", default=str(HERE / "README.md"))
    add("--json", default=str(HERE / "predictors.json"), help="every record, one per seed, optimizer and rate")
    add("--plot", default=str(HERE / "predictors.png"), help="predicted vs true Δh for AdamW at lr0, first seed")
    args = parser.parse_args(argv)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.micro_batches = [int(x) for x in args.micro_batches.split(",")]
    return args


def one_step(policy, E, U, name: str, lr0: float, lrs: list[float]) -> list[predictors.PredictorComparison]:
    """The comparison at each η of the sweep, from one step at lr0."""
    result = fprobe.probe(policy, E, U, OPTIMIZERS[name](lr0))
    on_e = {r["lr"]: r for r in result.sweep(lrs).records()}
    params, delta = result.context.params, result.delta_named
    return [
        predictors.compare(
            policy, params, tree.scale(delta, lr / lr0), U, lr,
            delta_h_true=on_e[lr]["delta_h_true"], delta_h1=on_e[lr]["delta_h1"],
        )
        for lr in lrs
    ]


def run(args) -> tuple[list[dict], predictors.PredictorComparison]:
    policy = fprobe.Policy.from_pretrained(str(toy.DEFAULT_MODEL_PATH), dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
    records, shown = [], None
    for seed in range(args.seeds):
        E, U = fprobe.sample(
            policy, tokenizer, toy.make_prompts(256, seed), n_eval=args.n_eval, n_update_prompts=args.n_update_prompts,
            group_size=args.group_size, reward="toy", max_new_tokens=args.max_new_tokens, seed=seed,
        )
        zero_advantage = float((U.advantages[:, None].expand(U.response_mask.shape)[U.response_mask] == 0).double().mean())
        for name in OPTIMIZERS:
            for comparison in one_step(policy, E, U, name, args.lr0, args.lrs):
                extra = referee_extras(policy, U, comparison, args.micro_batches) if comparison.lr == args.lr0 else {}
                records.append({"seed": seed, "optimizer": name, "zero_advantage_tokens": zero_advantage,
                                **comparison.to_dict(), **extra})
                if (seed, name, comparison.lr) == (0, "AdamW", args.lr0):
                    shown = comparison
    return records, shown


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: how far a per-token prediction moves, in units of its largest value."""
    return float((a - b).abs().max() / b.abs().max())


def referee_extras(policy, U, comparison, micro_batches: list[int]) -> dict:
    """At the step's own rate: Cui et al.'s products centred per verl micro-batch against all of U (each
    micro-batch size: the gap to the whole-U values and the scores against Δh), and Wang et al.'s two
    forms (Theorem 3.2 −ηA·S against Theorem 3.3 / Clip_V ηA(N − S)): the largest |ηA·N| over the largest
    |ηA·S|, and the Pearson correlation between the forms."""
    with torch.no_grad():
        stats = fprobe.token_stats(policy, policy.params, U)
    whole = predictors.token_inputs(stats.logp, stats.entropy, U)
    centring = {}
    for rows in micro_batches:
        x = predictors.token_inputs(stats.logp, stats.entropy, U, cov_micro_batch=rows)
        for name, tokens in (("cui_pg", predictors.cui_pg_tokens), ("cui_npg", predictors.cui_npg_tokens)):
            split = tokens(x.logp, x.advantages, comparison.lr, groups=x.groups)
            centring[f"{name}@{rows}"] = {
                "gap": relative_gap(split, tokens(whole.logp, whole.advantages, comparison.lr)),
                **predictors.score(split, comparison.truth)._asdict(),
            }
    s_term = comparison.predicted["wang"]
    n_term = comparison.predicted["wang_grpo"] + s_term  # ηA·N
    return {"micro_batch_centring": centring, "wang_forms": {
        "n_over_s": float(n_term.abs().max() / s_term.abs().max()),
        "pearson": predictors.pearson(s_term, comparison.predicted["wang_grpo"]),
    }}


def mean(values):
    finite = [v for v in values if v is not None]
    return statistics.fmean(finite) if finite else None


def summary_rows(records: list[dict], optimizer: str, lr: float) -> list[str]:
    """Markdown rows for one optimizer and rate: each statistic averaged over seeds."""
    group = [r for r in records if r["optimizer"] == optimizer and r["lr"] == lr]
    rows = []
    for name in group[0]["scores"]:
        cells = [mean([r["scores"][name][s] for r in group]) for s in STATS]
        rows.append(f"| {optimizer} | {lr:g} | {name} | " + " | ".join(format_number(c) for c in cells) + " |")
    return rows


def truth_rows(records: list[dict], optimizer: str, lr: float) -> str:
    group = [r for r in records if r["optimizer"] == optimizer and r["lr"] == lr]
    cells = [mean([r[k] for r in group]) for k in ("delta_h_tokens", "delta_h_true", "delta_h1")]
    return f"| {optimizer} | {lr:g} | " + " | ".join(format_number(c) for c in cells) + " |"


def same_sign(record: dict, name: str) -> bool:
    return (record["scores"][name]["aggregate"] > 0) == (record["delta_h_tokens"] > 0)


def headline(records: list[dict], lr: float) -> list[str]:
    """Per optimizer at the step's own rate: the best published predictor by Pearson, and the reference."""
    lines = []
    for optimizer in OPTIMIZERS:
        group = [r for r in records if r["optimizer"] == optimizer and r["lr"] == lr]
        stat = lambda name, s: mean([r["scores"][name][s] for r in group])
        published = [p.name for p in predictors.PREDICTORS]
        best = max(published, key=lambda name: stat(name, "pearson"))
        ranges = {s: (min(stat(n, s) for n in published), max(stat(n, s) for n in published)) for s in ("pearson", "spearman")}
        lines.append(
            f"- {optimizer}, η = {lr:g}: the published predictors reach Pearson {ranges['pearson'][0]:.2f}–{ranges['pearson'][1]:.2f} "
            f"and Spearman {ranges['spearman'][0]:.2f}–{ranges['spearman'][1]:.2f} with Δh_ik (best by Pearson: `{best}`); "
            f"fprobe's ḣ_ik: Pearson {stat(predictors.REFERENCE, 'pearson'):.4f}, Spearman "
            f"{stat(predictors.REFERENCE, 'spearman'):.4f}, scale {stat(predictors.REFERENCE, 'scale'):.3f}. "
            "The sign of the aggregate matches that of the mean Δh on U in "
            + ", ".join(f"{sum(same_sign(r, n) for r in group)}/{len(group)} seeds for `{n}`" for n in published) + "."
        )
    return lines


# --- the steps of a short TRL GRPO run ---


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("fprobe.trl") is not None


def trl_run(args) -> list[dict]:
    """A short GRPO run of TRL's GRPOTrainer on the built-in policy (float64, AdamW, constant rate lr0):
    ``fprobe.trl.attach`` measures ΔH_true and δH₁ on E at every step; a second capture of the same steps
    (``fprobe.trl.capture.capture_steps``) hands over U (the micro-batches TRL's ``compute_loss`` saw), θ_k and
    Δθ = θ_{k+1} − θ_k, and the predictors are compared on them."""
    import fprobe.trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from fprobe.trl.capture import capture_steps
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(toy.DEFAULT_MODEL_PATH), dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))

    def reward(prompts, completions, answer, **_):
        return [toy.verify(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]

    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=args.n_update_prompts * args.group_size,
            num_generations=args.group_size, max_completion_length=args.max_new_tokens, max_steps=args.trl_steps,
            learning_rate=args.lr0, lr_scheduler_type="constant", loss_type="dr_grpo", report_to=[], use_cpu=True,
            save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(toy.make_prompts(1024, 0)))
        probe = fprobe.trl.attach(trainer, every=1, n_eval=args.n_eval)
        policy, comparisons = fprobe.Policy(trainer.model), {}

        def compare(captured, context, control):
            comparisons[captured.step] = predictors.compare(policy, captured.params, captured.delta, captured.replay.U,
                                                            captured.lr, new_params=captured.new_params)

        capture_steps(trainer, compare)
        trainer.train()
    on_e = {r["step"]: r for r in probe.records}
    return [
        {"step": step, **c.to_dict(), "delta_h_true": on_e[step].get("delta_h_true"), "delta_h1": on_e[step].get("delta_h1")}
        for step, c in sorted(comparisons.items())
    ]


def trl_section(args, steps: list[dict] | None) -> list[str]:
    if steps is None:
        return ["**TRL GRPO run: not included.** `fprobe.trl` (the trainer hook `fprobe.trl.attach`) or `trl` was not "
                "importable in this checkout when the experiment was run, so no TRL steps were observed.", ""]
    names = list(steps[0]["scores"])
    lines = [
        "## The steps of a short TRL GRPO run",
        "",
        f"TRL's `GRPOTrainer` on the same policy and task: {len(steps)} steps, {args.n_update_prompts} prompts × "
        f"{args.group_size} completions per step, `dr_grpo`, AdamW at a constant {args.lr0:g}, float64. "
        "`fprobe.trl.attach` measures ΔH_true and δH₁ on a fresh E at every step; a second capture "
        "(`fprobe.trl.capture.capture_steps`) hands over U as TRL's `compute_loss` saw it and Δθ = θ_{k+1} − θ_k exactly as TRL applied it. Pearson with Δh_ik on U per step:",
        "",
        "| step | U tokens | mean Δh on U | ΔH_true on E | δH₁ on E | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in steps:
        cells = [r["n_tokens"], r["delta_h_tokens"], r["delta_h_true"], r["delta_h1"], *(r["scores"][n]["pearson"] for n in names)]
        lines.append(f"| {r['step']} | " + " | ".join(format_number(c) for c in cells) + " |")
    lines += ["", "Means over the steps:", "", "| predictor | " + " | ".join(STATS[1:]) + " |", "|---|" + "---|" * (len(STATS) - 1)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(format_number(mean([r["scores"][n][s] for r in steps])) for s in STATS[1:]) + " |")
    return lines + [""]


def referee_section(records: list[dict], args) -> list[str]:
    """Wang et al.'s two forms and Cui et al.'s micro-batch centring, at the step's own rate, means over seeds."""
    lines = [
        "## Wang et al.'s two forms, and Cui et al. centred per micro-batch (η = η₀)",
        "",
        "`wang` is Theorem 3.2 mapped to a step (−ηA·S, S = p(H + log p)); `wang_grpo` is Theorem 3.3 as the authors' "
        "Clip_V computes it (Trinity-RFT `trinity/algorithm/advantage_fn/clipv_advantage.py`: xD = N − S, with "
        "N = H Σ_v π_v² + Σ_v π_v² log π_v from `compute_N_from_logits` in `examples/entropy/clipv_dp_actor.py`), "
        "ηA(N − S), the exact first order of the sampled token's score step Δz = ηA(e_k − π) on a softmax "
        "(tests/test_predictors.py). Means over seeds of the "
        "largest |ηA·N| over the largest |ηA·S| on U, and of the Pearson correlation between the two forms:",
        "",
        "| optimizer | max abs(ηA·N) / max abs(ηA·S) | Pearson(wang, wang_grpo) |",
        "|---|---|---|",
    ]
    for optimizer in OPTIMIZERS:
        group = [r for r in records if r["optimizer"] == optimizer and r["lr"] == args.lr0]
        cells = [mean([r["wang_forms"][k] for r in group]) for k in ("n_over_s", "pearson")]
        lines.append(f"| {optimizer} | " + " | ".join(format_number(c) for c in cells) + " |")
    lines += [
        "",
        "Cui et al.'s products centred within consecutive micro-batches of n rows of U, as verl's Clip-Cov/KL-Cov "
        "compute them (`compare(..., cov_micro_batch=n)`; verl splits each mini-batch into "
        "`ppo_micro_batch_size_per_gpu` rows and centres over each micro-batch's response tokens), against the "
        "whole-U centring above. `gap`: max |p_n − p_U| / max |p_U| per step; the other columns against Δh_ik. "
        "The predictions themselves depend on U and η only, not on the optimizer (so do the gaps and the "
        "table above); their scores against Δh_ik do:",
        "",
        "| optimizer | predictor@n | gap | " + " | ".join(STATS) + " |",
        "|---|---|---|" + "---|" * len(STATS),
    ]
    for optimizer in OPTIMIZERS:
        group = [r for r in records if r["optimizer"] == optimizer and r["lr"] == args.lr0]
        for name in group[0]["micro_batch_centring"]:
            cells = [mean([r["micro_batch_centring"][name][k] for r in group]) for k in ("gap", *STATS)]
            lines.append(f"| {optimizer} | {name} | " + " | ".join(format_number(c) for c in cells) + " |")
    return lines + [""]


def readme(args, records, trl_steps, seconds: float, cpu_seconds: float, command: str) -> str:
    tokens = [r["n_tokens"] for r in records]
    zero = mean([r["zero_advantage_tokens"] for r in records])
    lines = [
        "# Which published predictor of entropy change is right?",
        "",
        "Made by (written by the script itself, in "
        f"{seconds:.0f} s, {cpu_seconds:.0f} s of CPU time, on {os.cpu_count()} CPU cores shared at a load "
        f"average of {os.getloadavg()[0]:.1f}):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Built-in policy `fprobe/assets/tiny-adder` in float64, toy addition task; {args.seeds} seeds, each sampling "
        f"E ({args.n_eval} responses) and U ({args.n_update_prompts} prompts × {args.group_size}, "
        f"{min(tokens)}–{max(tokens)} response tokens) and taking one step per optimizer at η₀ = {args.lr0:g} "
        "(`dr_grpo` loss, SGD without momentum, AdamW with weight decay 0.01, fresh state); each learning rate η "
        "rescales that step, Δθ(η) = (η/η₀) Δθ(η₀), exact for both. Numbers are means over the seeds.",
        "",
        "The truth is Δh_ik = h_ik(θ₀+Δθ) − h_ik(θ₀) on U's own (teacher-forced) states. Per predictor: "
        "`aggregate` (its batch-level prediction, token mean of the per-token values; for Cui et al. the batch "
        "covariance), `scale` (least-squares c in Δh ≈ c·prediction: the logit-space predictors are not in "
        "parameter-step units), Pearson and Spearman correlation with Δh_ik over U's response tokens, and the "
        "fraction of tokens whose predicted sign is right (`sign_agreement`: a zero prediction counts as wrong; "
        "`sign_agreement_nonzero`: over the tokens where the predictor predicts a change). "
        "`fprobe_first_order` is fprobe's exact ḣ_ik (one jvp along Δθ), the reference row. Formulas, citations "
        "and sources: the docstring of `fprobe/entropy/predictors.py`.",
        "",
        f"{100 * zero:.0f}% of U's response tokens (mean over seeds) sit in groups whose rewards are all equal, so "
        "their advantage is 0: Wang et al.'s (both forms) and STEER's per-token values are 0 there (no change predicted), while "
        "the shared parameters do change those tokens' entropy; Cui et al.'s centred products are not, through the "
        "batch means.",
        "",
        "## Headline (means over seeds)",
        "",
        *headline(records, args.lr0),
        "",
        "## Truth per learning rate",
        "",
        "| optimizer | lr | mean Δh on U | ΔH_true on E | δH₁ on E |",
        "|---|---|---|---|---|",
    ]
    for optimizer in OPTIMIZERS:
        lines += [truth_rows(records, optimizer, lr) for lr in args.lrs]
    lines += ["", "## Predictors against Δh_ik on U", "", "| optimizer | lr | predictor | " + " | ".join(STATS) + " |",
              "|---|---|---|" + "---|" * len(STATS)]
    for optimizer in OPTIMIZERS:
        for lr in args.lrs:
            lines += summary_rows(records, optimizer, lr)
    lines += ["", f"![predicted vs true Δh, AdamW at η₀, seed 0]({Path(args.plot).name})", "",
              *referee_section(records, args), *trl_section(args, trl_steps)]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    records, shown = run(args)
    trl_steps = trl_run(args) if args.trl_steps and trl_available() else None
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if shown is not None:
        import matplotlib

        matplotlib.use("Agg")
        shown.plot(args.plot)
    command = " ".join(["python experiments/predictors.py", *argv])
    files.write_atomic(args.json, json.dumps({"sweep": records, "trl": trl_steps}, indent=1))
    files.write_atomic(args.out, readme(args, records, trl_steps, seconds, cpu_seconds, command))
    print(f"wrote {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
