"""Cost of the exact per-sequence decomposition of δH₁ (``ProbeResult.contributions()``).

The decomposition needs one vjp of Ĥ on E (u = ∇Ĥ) and one jvp of U's token log-probs along
gain ⊙ u, and no per-sample gradient. This script times, on a tiny random GPT-2 in float64:

- the probe's δH₁ pass (one jvp on E along Δθ),
- one vjp on E, one jvp on U,
- ``contributions()`` end to end,
- for contrast, a brute-force loop of B per-sample gradients on U (what the decomposition avoids),

and prints each as a ratio to the δH₁ pass and contributions / (vjp_E + jvp_U), which should be ≈ 1.

    python benchmarks/decompose_cost.py --quick     # < 1 min on a laptop CPU
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config  # noqa: E402

import fprobe  # noqa: E402
from benchmarks import common  # noqa: E402
from fprobe.model import passes  # noqa: E402
from fprobe import tree  # noqa: E402


def make_batch(n, width, vocab, seed, advantages):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, width), generator=g)
    attn = torch.ones(n, width, dtype=torch.long)
    resp = torch.zeros(n, width, dtype=torch.bool)
    prompt = max(2, width // 4)
    for i in range(n):
        length = int(torch.randint(width // 2, width - prompt + 1, (1,), generator=g))
        resp[i, prompt : prompt + length] = True
        attn[i, prompt + length :] = 0
    if not advantages:
        return fprobe.Rollouts(ids, attn, resp)
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    group_ids = torch.arange(n) // 4
    return fprobe.Rollouts(
        ids, attn, resp, rewards=rewards, group_ids=group_ids, advantages=fprobe.group_advantages(rewards, group_ids)
    )


def timed(phases: dict, repeats: int) -> tuple[dict, dict]:
    """Fastest CPU time (``time.process_time``: all threads of this process, unaffected by other processes
    on a shared machine) of each phase over ``repeats`` rounds after one warm-up round, and each phase's
    last result. Rounds interleave the phases, so drifting conditions hit all of them alike."""
    outputs = {name: fn() for name, fn in phases.items()}
    best = {name: float("inf") for name in phases}
    for _ in range(repeats):
        for name, fn in phases.items():
            start = time.process_time()
            outputs[name] = fn()
            best[name] = min(best[name], time.process_time() - start)
    return best, outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and batches, fewer repeats (< 1 min)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then compute, not spinning)")
    parser.add_argument("--no-brute", action="store_true", help="skip the per-sample gradient loop")
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        layers, width_model, vocab, n, width, repeats = 2, 32, 128, 16, 24, 3
    else:
        layers, width_model, vocab, n, width, repeats = 4, 128, 1024, 32, 64, 5
    repeats = args.repeats or repeats
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=4, n_embd=width_model, vocab_size=vocab, n_positions=2 * width, bos_token_id=0, eos_token_id=1)
    policy = fprobe.Policy(AutoModelForCausalLM.from_config(config).double().eval())
    params = policy.params
    E = make_batch(n, width, vocab, 1, advantages=False)
    U = make_batch(n, width, vocab, 2, advantages=True)
    mb = None
    n_params = sum(p.numel() for p in params.values())
    print(f"GPT-2 {layers} layers × {width_model}, vocab {vocab}, {n_params:,} parameters, float64, "
          f"{torch.get_num_threads()} threads; E and U: {n} rows × {width} tokens; fastest of {repeats}")

    opt = fprobe.optim.adamw(lr=1e-4, weight_decay=0.01)
    result = fprobe.probe(policy, E, U, opt, micro_batch=mb, keep_step=True)  # contributions() then replays no step
    ctx = result.context

    functional = passes.linear_functional(ctx.alpha, ctx.beta)
    _, u, _ = passes.gradient(policy, params, E, functional, mb)
    direction = tree.tree_map(lambda x: x * 1e-3, u)
    phases = {
        "δH₁ pass (jvp on E)": lambda: passes.jet(policy, params, result.delta_named, E, 1, mb),
        "vjp on E": lambda: passes.gradient(policy, params, E, functional, mb),
        "jvp on U": lambda: passes.jet(policy, params, direction, U, 1, mb),
        "contributions()": lambda: result.contributions(),
    }
    rows, outputs = timed(phases, repeats)
    contrib = outputs["contributions()"]
    if not args.no_brute:
        weights = fprobe.rl.losses.row_weights(U, result.loss_type)

        def brute():
            out = []
            for j in range(len(U)):
                row = U.select([j])
                value = lambda stats, mb_, r: fprobe.rl.losses.sequence_losses(stats.logp, mb_, weights[j : j + 1], result.clip).sum()
                _, g_j, _ = passes.gradient(policy, params, row, value, None)
                out.append(float(tree.vdot(direction, g_j)))
            return out

        start = time.process_time()
        brute()
        rows[f"per-sample loop ({len(U)} vjps on U, once)"] = time.process_time() - start

    base = rows["δH₁ pass (jvp on E)"]
    name_width = max(len(k) for k in rows)
    print(f"\n{'phase':<{name_width}}  {'CPU s':>9}  {'× δH₁ pass':>10}")
    for name, seconds in rows.items():
        print(f"{name:<{name_width}}  {seconds:>9.4f}  {seconds / base:>10.2f}")
    expected = rows["vjp on E"] + rows["jvp on U"]
    print(f"\ncontributions() / (vjp on E + jvp on U) = {rows['contributions()'] / expected:.2f}")
    print("inside contributions() (last run, wall clock): " + ", ".join(f"{k} {v:.4f}s" for k, v in contrib.timings.items()))
    print(f"sum check: relative residual {contrib.relative_residual:.2e} (δH₁ = {contrib.delta_h1:.6e})")
    common.write_json(args.json, {"cpu_seconds": rows, "relative_residual": contrib.relative_residual})


if __name__ == "__main__":
    main()
