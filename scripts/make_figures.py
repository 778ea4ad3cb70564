"""The README's figures, from the built-in policy and toy task (well under a minute on a laptop CPU):

- ``docs/sweep.png``: one AdamW step's entropy change against its learning rate, measured (ΔH_true)
  and predicted (δH₁, δH₁ + δH₂), each with a ±1 standard-error band over E's sequences;
- ``docs/contributions.png``: δH₁ of that step split over the update batch's sequences.

    python scripts/make_figures.py [--out docs]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import fprobe  # noqa: E402
from fprobe.sampling import toy  # noqa: E402

LR = 1e-5
SWEEP_LRS = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]


def probe_builtin_policy(seed: int = 0) -> fprobe.ProbeResult:
    """One AdamW step (η = ``LR``) of the built-in policy, in float64, on 8 prompts × 8 sampled responses,
    measured on 128 other responses, with δH₂."""
    policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    E, U = fprobe.sample(
        policy, tokenizer, toy.make_prompts(512, seed=seed),
        n_eval=128, n_update_prompts=8, group_size=8, reward=toy.verify, max_new_tokens=8, seed=seed,
    )
    return fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=LR, weight_decay=0.01), second_order=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    out = parser.parse_args(argv).out
    result = probe_builtin_policy()
    for name, draw in [
        ("sweep.png", lambda path: result.sweep(SWEEP_LRS).plot(path)),
        ("contributions.png", lambda path: result.contributions().plot(path)),
    ]:
        plt.close(draw(out / name))
        print(out / name)


if __name__ == "__main__":
    main()
