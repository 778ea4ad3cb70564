"""How ``fprobe.probe`` scales, and what it costs beyond its unavoidable passes.

1. |E| from 64 to 1024 sequences at a fixed micro-batch: probe time (should grow linearly: a
   straight-line fit t = a + b·|E| and its largest relative residual) and peak memory, each |E| in a
   fresh process (should stay flat).
2. A K-point learning-rate sweep (one probe, then ``res.sweep(lrs)``: one forward pass on E per
   learning rate other than the probe's own) against K separate probes at the same learning rates.
3. The probe's time over the sum of its unavoidable passes, each measured alone: one
   forward+backward on U, one jvp on E, one forward on E at θ₀+Δθ. The rest — optimizer update,
   tree arithmetic, checks, estimator algebra — is the overhead.

    python benchmarks/scaling.py                       # CPU defaults
    python benchmarks/scaling.py --size 15m --length 128 --device cuda
    python benchmarks/scaling.py --quick
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import fprobe  # noqa: E402
from benchmarks import common  # noqa: E402
from fprobe.model import passes  # noqa: E402
from fprobe.rl import step  # noqa: E402
from fprobe import tree  # noqa: E402


def make_setup(arch, size, lora, dtype, device, n_u, n_e, length, lr, seed=0):
    policy = common.build_policy(arch, size, common.dtype_of(dtype), device, lora=lora, seed=seed)
    vocab = common.VOCAB[size]
    U = common.make_rollouts(n_u, length, vocab, prompt=8, seed=seed + 1)
    E = common.make_rollouts(n_e, length, vocab, prompt=8, seed=seed + 2)
    opt = fprobe.optim.adamw(lr=lr)
    return policy, opt, opt.init(policy.params), U, E


def probe(setup, micro_batch, lr=None):
    policy, opt, state, U, E = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fprobe.LowESSWarning)
        return fprobe.probe(policy, E, U, opt, state, lr=lr, micro_batch=micro_batch)


def memory_worker(setup_args, micro_batch, device):
    setup = make_setup(*setup_args)
    # one probe on 1-row, 8-token batches first: lazy library set-up is not the probe's memory
    policy, opt, state, U, E = setup
    tiny = lambda seed: common.make_rollouts(1, 8, common.VOCAB[setup_args[1]], prompt=4, seed=seed)
    probe((policy, opt, state, tiny(98), tiny(99)), None)
    meter = common.MemoryMeter(device).start()
    res = probe(setup, micro_batch)
    return {**meter.stop(), "delta_h_true": res.delta_h_true}


def linear_fit(x, y):
    """(intercept, slope, largest |residual| / y) of the least-squares line y = a + b x."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sum((xi - mx) ** 2 for xi in x)
    a = my - b * mx
    return a, b, max(abs(yi - (a + b * xi)) / yi for xi, yi in zip(x, y))


def e_scaling(args, isolated):
    sizes = [int(v) for v in args.e_sizes.split(",")]
    setups = {n: make_setup(args.arch, args.size, args.lora, args.dtype, args.device, args.n_u, n, args.length, args.lr) for n in sizes}
    for n in sizes:  # warm-up (untimed)
        probe(setups[n], args.micro_batch)
    fns = {n: (lambda n=n: probe(setups[n], args.micro_batch)) for n in sizes}
    times = common.time_interleaved(fns, args.repeats, 0, args.device)
    mem = {}
    if isolated is not None:
        for n in sizes:
            setup_args = (args.arch, args.size, args.lora, args.dtype, args.device, args.n_u, n, args.length, args.lr)
            mem[n] = isolated(memory_worker, setup_args, args.micro_batch, args.device)
    a, b, worst = linear_fit(sizes, [times[n] for n in sizes])
    rows = []
    for n in sizes:
        extra = common.mib(mem[n]["extra_bytes"]) if mem else None
        peak = common.mib(mem[n]["peak_bytes"]) if mem else None
        rows.append([str(n), f"{times[n]:.3f}", f"{1e3 * times[n] / n:.2f}", f"{times[n] / times[sizes[0]]:.2f}",
                     f"{(a + b * n):.3f}", common.fmt(extra, ".0f"), common.fmt(peak, ".0f"),
                     common.fmt(common.ratio(extra, common.mib(mem[sizes[0]]["extra_bytes"]) if mem else None), ".2f")])
    print(common.table(["|E|", "probe [s]", "ms / sequence", f"time / time({sizes[0]})", "linear fit [s]",
                        "peak MiB (above set-up)", "peak RSS MiB (process)", f"peak / peak({sizes[0]})"],
                       rows, f"1. Probe time and peak memory against |E| (micro-batch {args.micro_batch}, |U| = {args.n_u})"))
    print(f"\nlinear fit t = {a:.3f} s + {1e3 * b:.2f} ms·|E|; largest relative residual {worst:.1%}")
    if mem:
        growth = common.ratio(mem[sizes[-1]]["extra_bytes"], mem[sizes[0]]["extra_bytes"])
        growth_total = common.ratio(mem[sizes[-1]]["peak_bytes"], mem[sizes[0]]["peak_bytes"])
        fmt = lambda r: "—" if r is None else f"{r - 1:+.1%}"
        print(f"peak memory growth |E| {sizes[0]} → {sizes[-1]}: {fmt(growth)} above set-up, {fmt(growth_total)} of the whole process")
    return {"sizes": sizes, "times": times, "memory": mem, "fit": (a, b, worst)}


def sweep_cost(args):
    setup = make_setup(args.arch, args.size, args.lora, args.dtype, args.device, args.n_u, args.n_e, args.length, args.lr)
    k = args.k
    lrs = [args.lr * 2.0 ** (i - k // 2) for i in range(k)]  # includes the probe's own learning rate

    def swept():
        res = probe(setup, args.micro_batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fprobe.LowESSWarning)
            return res.sweep(lrs)

    def separate():
        return [probe(setup, args.micro_batch, lr=lr) for lr in lrs]

    swept_result, separate_results = swept(), separate()  # warm-up, and the numbers compared
    worst = max(abs(a - r.delta_h_true) / abs(r.delta_h_true) for a, r in zip(swept_result.delta_h_true, separate_results))
    times = common.time_interleaved({"sweep": swept, "separate": separate}, args.repeats, 0, args.device)
    print(common.table(["method", "time [s]", "ratio"], [
        [f"probe + sweep({k} lrs)", f"{times['sweep']:.3f}", f"{times['sweep'] / times['separate']:.3f}"],
        [f"{k} separate probes", f"{times['separate']:.3f}", "1.000"],
    ], f"2. {k}-point learning-rate sweep vs {k} probes (|E| = {args.n_e}, |U| = {args.n_u})"))
    print(f"\nlargest relative difference of ΔH_true, sweep vs separate probes: {worst:.1e} (Δθ(η) = (η/η₀)·Δθ(η₀) "
          "holds to rounding; with float32 parameters the applied step fl(θ + u) − θ is rounded to ulp(θ), "
          "which is a sizeable part of a small Δθ — use --dtype float64 to see ~1e-12)")
    return {"times": times, "max_rel_diff": worst, "lrs": lrs}


def overhead(args):
    setup = make_setup(args.arch, args.size, args.lora, args.dtype, args.device, args.n_u, args.n_e, args.length, args.lr)
    policy, opt, state, U, E = setup
    params = policy.params
    res = probe(setup, args.micro_batch)
    delta, moved = res.delta_named, tree.add(params, res.delta_named)
    mb = args.micro_batch
    fns = {
        "probe": lambda: probe(setup, mb),
        "U: forward+backward": lambda: step.loss_and_grad(policy, params, U, "dr_grpo", mb),
        "E: jvp": lambda: passes.jet(policy, params, delta, E, 1, mb),
        "E: forward at θ₀+Δθ": lambda: passes.forward(policy, moved, E, mb),
    }
    for fn in fns.values():
        fn()
    times = common.time_interleaved(fns, args.repeats, 0, args.device)
    passes_sum = sum(t for name, t in times.items() if name != "probe")
    rows = [[name, f"{t:.3f}", f"{t / passes_sum:.3f}"] for name, t in times.items() if name != "probe"]
    rows += [["sum of the passes", f"{passes_sum:.3f}", "1.000"], ["fprobe.probe", f"{times['probe']:.3f}", f"{times['probe'] / passes_sum:.3f}"]]
    print(common.table(["part", "time [s]", "/ sum of passes"], rows,
                       f"3. The probe against its unavoidable passes, each alone (|E| = {args.n_e}, |U| = {args.n_u})"))
    print("\nprobe phases (one run, from ProbeResult.timings): "
          + ", ".join(f"{k} {v:.3f} s" for k, v in res.timings.items()))
    return {"times": times, "ratio": times["probe"] / passes_sum}


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="1m", choices=sorted(common.VOCAB))
    p.add_argument("--lora", action="store_true")
    p.add_argument("--e-sizes", default="64,128,256,512,1024", help="|E| values for part 1")
    p.add_argument("--n-u", type=int, default=16, help="sequences in U")
    p.add_argument("--n-e", type=int, default=64, help="sequences in E for parts 2 and 3")
    p.add_argument("--length", type=int, default=16, help="response length (tokens; prompts are 8)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--k", type=int, default=8, help="learning rates in the sweep")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--parts", default="1,2,3", help="which parts to run")
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.e_sizes, args.n_u, args.n_e, args.length, args.micro_batch, args.k = "8,16,32", 4, 8, 8, 8, 3
    isolated = common.isolated(args) if "1" in args.parts else None
    print(f"# fprobe.probe scaling — {common.environment(args)}, model {args.size}"
          f"{' LoRA' if args.lora else ''}, response length {args.length}\n")
    out = {}
    if "1" in args.parts:
        if isolated is not None:
            isolated.wait()
        out["e_scaling"] = e_scaling(args, isolated)
        print()
    if "2" in args.parts:
        out["sweep"] = sweep_cost(args)
        print()
    if "3" in args.parts:
        out["overhead"] = overhead(args)
    common.write_json(args.json, {"environment": common.environment(args), "args": vars(args), **out})
    return out


if __name__ == "__main__":
    main()
