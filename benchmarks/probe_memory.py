"""Peak memory of ``fprobe.probe`` against the bare torch training step it observes: forward and backward
over U's micro-batches and ``torch.optim.AdamW.step`` in place, as a trainer runs it on the model's own
(SDPA) attention with log-probs in float32, plus one parameter-sized tree (the θ_k a probe of a
trainer's step must keep). Full parameters and LoRA; each measured in a fresh process.

    python benchmarks/probe_memory.py            # ~3 min on 2 CPU cores: 15m Qwen2, |U| = |E| = 16, 256 tokens
    python benchmarks/probe_memory.py --device cuda --size 60m --length 1024
    python benchmarks/probe_memory.py --quick    # smoke test (CI)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fprobe  # noqa: E402
from benchmarks import common  # noqa: E402

LR = 1e-5


def make_setup(arch, size, lora, dtype, device, n, length, seed=0):
    """(policy, U, E): rows of a prompt of up to 16 tokens and a response of up to ``length`` tokens."""
    policy = common.build_policy(arch, size, common.dtype_of(dtype), device, lora=lora, seed=seed)
    vocab = common.VOCAB[size]
    return policy, common.make_rollouts(n, length, vocab, seed=seed + 1), common.make_rollouts(n, length, vocab, seed=seed + 2)


def memory_worker(setup_args, method, micro_batch, device):
    policy, U, E = make_setup(*setup_args)
    one_row = U.select(slice(0, 1))
    opt = fprobe.optim.adamw(lr=LR, weight_decay=0.01)
    with torch.no_grad():  # lazy library set-up of both kinds of call, outside the meter
        policy.model(one_row.input_ids.to(device), use_cache=False)
        fprobe.token_stats(policy, policy.params, one_row)
    meter = common.MemoryMeter(device).start()
    if method == "bare step":
        kept = common.bare_step(policy.model, U, micro_batch, LR)
    else:
        kept = fprobe.probe(policy, E, U, opt, micro_batch=micro_batch, method="grad" if method == "probe (grad)" else "jvp")
    result = meter.stop()
    del kept
    return result


def param_bytes(policy) -> int:
    return sum(p.numel() * p.element_size() for p in policy.params.values())


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="15m", choices=list(common.SIZES))
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--n", type=int, default=16, help="sequences in U and in E")
    p.add_argument("--length", type=int, default=256, help="response tokens (up to)")
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.size, args.n, args.length, args.micro_batch = "1m", 4, 16, 2
    if args.no_memory:
        raise SystemExit("this benchmark measures memory only: drop --no-memory")
    isolated = common.isolated(args)
    print(f"# fprobe.probe vs a bare training step — {common.environment(args)}, size {args.size}, "
          f"|U| = |E| = {args.n}, {args.length} tokens, micro-batch {args.micro_batch}\n")
    rows, records = [], []
    for mode in args.modes.split(","):
        setup_args = (args.arch, args.size, mode == "lora", args.dtype, args.device, args.n, args.length)
        tree_mib = common.mib(param_bytes(make_setup(*setup_args)[0]))
        mem = {m: common.mib(isolated(memory_worker, setup_args, m, args.micro_batch, args.device)["extra_bytes"])
               for m in ("bare step", "probe", "probe (grad)")}
        budget = mem["bare step"] + tree_mib
        for m in ("probe", "probe (grad)"):
            rows.append([mode, m, f"{mem['bare step']:.0f}", f"{tree_mib:.1f}", f"{mem[m]:.0f}",
                         common.fmt(common.ratio(mem[m], budget), ".2f")])
        records.append(dict(mode=mode, param_tree_mib=tree_mib, memory_mib=mem))
        print(f"  done {mode}: {mem}", flush=True)
    print()
    print(common.table(["mode", "probe", "bare step MiB", "θ tree MiB", "probe MiB", "probe / (step + tree)"], rows))
    print(f"\nMiB: {common.memory_note(args)}.")
    common.write_json(args.json, {"environment": common.environment(args), "records": records})
    return records


if __name__ == "__main__":
    main()
