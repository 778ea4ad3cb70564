"""Worker for tests/test_distributed.py, launched once per rank with RANK/WORLD_SIZE/MASTER_* set.

usage: distributed_probe.py MODEL_DIR OUT_DIR MODE   (MODE: probe | fail)
Each rank probes the same global batches and saves what it computed to OUT_DIR/rank{r}.pt.
"""

import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import fprobe
from helpers import make_batch
from fprobe import distributed

SE = ("h_orig_se", "h_upd_se", "delta_h_true_se", "delta_h1_se", "delta_h2_se", "ratio_se")


def main(model_dir, out_dir, mode):
    distributed.init_from_env(timeout_s=10.0)
    rank, size = distributed.world()
    if mode == "fail" and rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    policy = fprobe.Policy.from_pretrained(model_dir, dtype=torch.float64)
    E = make_batch(n=7, width=12, seed=21, with_advantages=False)
    U = make_batch(n=5, width=12, seed=22)
    opt = fprobe.optim.adamw(lr=1e-3, weight_decay=0.01)
    calls = []
    counting = opt._replace(update=lambda *a, **k: calls.append(1) or opt.update(*a, **k))
    res = fprobe.probe(policy, E, U, counting, lr=1e-3, second_order=True, micro_batch=2, keep_step=True)
    sweep = res.sweep([1e-4, 1e-3])
    g = torch.Generator().manual_seed(5)  # the same Δθ on every rank and in every run: E's statistics bit for bit alike
    along = {name: 1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype) for name, p in policy.params.items()}
    fixed = fprobe.entropy_change(policy, E, along, second_order=True, micro_batch=2)
    parts = res.contributions()
    torch.save(
        dict(
            rank=rank, size=size, updates=len(calls), params=res.step.params, delta=res.delta_named,
            numbers={k: getattr(res, k) for k in ("delta_h_true", "delta_h1", "delta_h2", "ess", "h_orig", "loss", "grad_norm")},
            probe_se={k: getattr(res, k) for k in SE}, fixed_se={k: getattr(fixed, k) for k in SE},
            sweep=sweep.delta_h_true, per_sequence=parts.per_sequence, per_token=parts.per_token,
        ),
        f"{out_dir}/rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
