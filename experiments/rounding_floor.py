"""Does the rounding floor bound the rounding error? On the built-in policy (fprobe/assets/tiny-adder) held in float32 and
in bf16 (passes in float32), for a few seeds and SGD learning rates: ΔH_true and δH₁ of one step, their rounding floors,
and their errors against the same weights evaluated in float64 (``eval_dtype=torch.float64``). Prints one row per case
and the largest error / floor.

    python experiments/rounding_floor.py            # ~1 min on 2 CPU cores
"""

import warnings

import torch
from transformers import AutoTokenizer

import fprobe
from fprobe.sampling import toy

LRS = {torch.float32: (1e-7, 1e-6, 1e-5, 1e-4, 1e-3), torch.bfloat16: (1e-3, 1e-2, 1e-1)}
SEEDS = (0, 1)


def cases():
    tokenizer = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
    for dtype, lrs in LRS.items():
        policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=dtype, temperature=1.5)
        for seed in SEEDS:
            E, U = fprobe.sample(policy, tokenizer, toy.make_prompts(64, seed), n_eval=16, n_update_prompts=4, group_size=4,
                                 reward=toy.verify, max_new_tokens=6, seed=seed)
            for lr in lrs:
                optimizer = fprobe.optim.sgd(lr=lr)
                step = fprobe.rl_step(policy, policy.params, optimizer, optimizer.init(policy.params), U)
                measured = fprobe.entropy_change(policy, E, step.delta, new_params=step.params, lr=lr)
                exact = fprobe.entropy_change(policy, E, step.delta, new_params=step.params, lr=lr, eval_dtype=torch.float64)
                yield str(dtype).removeprefix("torch."), seed, lr, measured, exact


def main():
    warnings.simplefilter("ignore")
    worst, worst_h1 = 0.0, 0.0
    print(f"{'dtype':>8} {'seed':>4} {'lr':>6} {'ΔH_true (f64)':>14} {'error':>9} {'floor':>9} {'ratio':>6}  "
          f"{'δH₁ (f64)':>10} {'error':>9} {'floor':>9} {'ratio':>6}  flagged")
    for dtype, seed, lr, measured, exact in cases():
        error, error_h1 = abs(measured.delta_h_true - exact.delta_h_true), abs(measured.delta_h1 - exact.delta_h1)
        ratio = error / measured.rounding_floor if measured.rounding_floor else float("nan")
        ratio_h1 = error_h1 / measured.rounding_floor_h1 if measured.rounding_floor_h1 else float("nan")
        worst, worst_h1 = max(worst, ratio), max(worst_h1, ratio_h1)
        print(f"{dtype:>8} {seed:>4} {lr:>6.0e} {exact.delta_h_true:>14.4e} {error:>9.2e} {measured.rounding_floor:>9.2e} "
              f"{ratio:>6.2f}  {exact.delta_h1:>10.3e} {error_h1:>9.2e} {measured.rounding_floor_h1:>9.2e} {ratio_h1:>6.2f}  "
              f"{measured.precision_low}")
    print(f"largest error / floor: ΔH_true {worst:.2f}, δH₁ {worst_h1:.2f}")


if __name__ == "__main__":
    main()
