"""Worker for tests/test_trl.py's two-process test, launched by ``accelerate launch --multi_gpu --num_processes 2``
on a machine without GPUs (two CPU processes over gloo).

usage: trl_two_process.py OUT_DIR
Each rank trains the same GRPO run (SGD, float64) with the probe attached and saves its records, its
evaluation batches and its probe log entries to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fprobe.trl
from test_trl import make_trainer, trainable


def main(out_dir: str) -> None:
    out = Path(out_dir)
    trainer, _ = make_trainer(out, "dapo", steps=2, per_device_train_batch_size=4, optim="sgd")
    probe = fprobe.trl.attach(trainer, every=1, n_eval=6, out=out / "probe.jsonl")
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        dict(
            rank=rank, world=trainer.accelerator.num_processes, records=probe.records,
            eval_ids={step: E.input_ids for step, E in probe.eval_batches.items()},
            logged=[e for e in trainer.state.log_history if any(k.startswith("entropy_probe/") for k in e)],
            params=trainable(trainer.model),
        ),
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
