"""δH₁ three ways on the same model, batch and Δθ: forward-mode ``jvp`` (fprobe's default),
reverse-mode gradient then ``vdot`` (fprobe's ``method="grad"``: a forward pass for the estimator's
coefficients, then the gradient of its linear functional), and the double-backward trick
(jvp(f)(v) = d/du ⟨vjp(f)(u), v⟩: a backward pass with ``create_graph`` and a backward of that).

Per model size, response length and full-parameter vs LoRA: wall time (median of interleaved
repeats after warm-up, also as a multiple of one forward pass), peak memory of each method in a fresh
process (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU; both above what was in use
before the method started) and the relative differences of the three δH₁.

    python benchmarks/jvp_vs_grad.py                          # CPU defaults: 1M and 15M, 64 and 256 tokens
    python benchmarks/jvp_vs_grad.py --sizes 60m --lengths 1024 --device cuda
    python benchmarks/jvp_vs_grad.py --profile                # also: top ops of each method (first case)
    python benchmarks/jvp_vs_grad.py --quick                  # smoke test (CI)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from fprobe.entropy import estimators  # noqa: E402
from fprobe.model import passes  # noqa: E402
from fprobe import tree  # noqa: E402
from fprobe.entropy.measure import first_order  # noqa: E402
from fprobe.entropy.settings import Settings  # noqa: E402
from fprobe.model.tokens import TokenStats, token_stats  # noqa: E402

METHODS = ("jvp", "grad", "double_backward")


def make_case(arch, size, length, n, lora, dtype, device, seed=0):
    """(policy, E, Δθ): Δθ is a random direction of relative size ~1e-3 per parameter tensor."""
    policy = common.build_policy(arch, size, common.dtype_of(dtype), device, lora=lora, seed=seed)
    E = common.make_rollouts(n, length, common.VOCAB[size], seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    delta = tree.tree_map(
        lambda p: (1e-3 * (p.detach().float().abs().mean() + 1e-3) * torch.randn(p.shape, generator=g)).to(p.device, p.dtype),
        policy.params,
    )
    return policy, E, delta


def delta_h1_fprobe(policy, E, delta, method, micro_batch):
    """δH₁ exactly as ``fprobe.entropy_change`` computes it with ``method`` ('jvp' or 'grad')."""
    settings = Settings(method=method, micro_batch=micro_batch)
    return first_order(policy, policy.params, delta, E, settings).delta_h1


def delta_h1_double_backward(policy, E, delta, micro_batch):
    """δH₁ from the tangents (ℓ̇, ḣ) = J Δθ obtained as d/du ⟨Jᵀu, Δθ⟩ (two reverse passes, no forward mode)."""
    names = list(policy.params)
    values, tangents = [], []
    for mb in E.micro_batches(micro_batch):
        params = {k: v.detach().requires_grad_() for k, v in policy.params.items()}
        with torch.enable_grad():
            stats = token_stats(policy, params, mb)
            u = [torch.zeros_like(s, requires_grad=True) for s in stats]
            grads = torch.autograd.grad(stats, [params[k] for k in names], grad_outputs=u, create_graph=True)
            dot = sum(torch.vdot(g.flatten().double(), delta[k].flatten().double()) for g, k in zip(grads, names))
            tangent = torch.autograd.grad(dot, u)
        values.append(TokenStats(*(s.detach() for s in stats)))
        tangents.append(TokenStats(*tangent))
        del stats, u, grads, dot
    value = TokenStats(*(torch.cat(x) for x in zip(*values)))
    tangent = TokenStats(*(torch.cat(x) for x in zip(*tangents)))
    alpha, beta = estimators.first_order_coefficients(value, E.response_mask)
    return float(estimators.contract(alpha, beta, tangent))


def forward_only(policy, E, micro_batch):
    return passes.forward(policy, policy.params, E, micro_batch)


def run_method(method, policy, E, delta, micro_batch):
    if method == "forward":
        forward_only(policy, E, micro_batch)
        return None
    if method == "double_backward":
        return delta_h1_double_backward(policy, E, delta, micro_batch)
    return delta_h1_fprobe(policy, E, delta, method, micro_batch)


def memory_worker(case_args, method, micro_batch, device):
    """In a fresh process: build the case, then measure one call of ``method``."""
    policy, E, delta = make_case(*case_args)
    # one call on a 1-row, 8-token batch first: lazy library set-up is not the method's memory
    run_method(method, policy, common.make_rollouts(1, 8, common.VOCAB[case_args[1]], prompt=4, seed=99), delta, None)
    meter = common.MemoryMeter(device).start()
    value = run_method(method, policy, E, delta, micro_batch)
    return {**meter.stop(), "value": value}


def profile_ops(policy, E, delta, micro_batch, rows=15):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if policy.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if policy.device.type == "cuda" else "self_cpu_time_total"
    for method in METHODS:
        run_method(method, policy, E, delta, micro_batch)
        with profile(activities=activities) as prof:
            run_method(method, policy, E, delta, micro_batch)
        print(f"\n### op profile: {method}\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1m,15m", help="comma-separated model sizes among 1m, 15m, 60m")
    p.add_argument("--lengths", default="64,256", help="comma-separated response lengths (tokens)")
    p.add_argument("--modes", default="full,lora", help="full and/or lora")
    p.add_argument("--n", type=int, default=4, help="sequences in E")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per pass (default: all of E)")
    p.add_argument("--profile", action="store_true", help="print the top ops of each method for the first case")
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.sizes, args.lengths, args.n = "1m", "16", 4
    sizes, lengths, modes = args.sizes.split(","), [int(x) for x in args.lengths.split(",")], args.modes.split(",")
    isolated = common.isolated(args)
    print(f"# δH₁ by jvp vs gradient·Δθ vs double backward — {common.environment(args)}, |E| = {args.n}\n")
    rows, records = [], []
    for size in sizes:
        for length in lengths:
            for mode in modes:
                case_args = (args.arch, size, length, args.n, mode == "lora", args.dtype, args.device)
                policy, E, delta = make_case(*case_args)
                if args.profile and not records:
                    profile_ops(policy, E, delta, args.micro_batch)
                # the first round is the warm-up; its results are the values compared
                values = {m: run_method(m, policy, E, delta, args.micro_batch) for m in ("forward",) + METHODS}
                if isolated is not None:
                    isolated.wait()
                fns = {m: (lambda m=m: run_method(m, policy, E, delta, args.micro_batch)) for m in ("forward",) + METHODS}
                times = common.time_interleaved(fns, args.repeats, max(args.warmup - 1, 0), args.device)
                mem = {}
                if isolated is not None:
                    for m in ("forward",) + METHODS:
                        mem[m] = isolated(memory_worker, case_args, m, args.micro_batch, args.device)
                rel = lambda a, b: abs(a - b) / abs(b) if b else float("nan")
                everything, trainable = common.count_params(policy)
                record = dict(
                    size=size, params=everything, trainable=trainable, tokens=length, mode=mode, n=args.n,
                    times=times, memory=mem, values=values,
                    rel_jvp_grad=rel(values["jvp"], values["grad"]), rel_dbl_grad=rel(values["double_backward"], values["grad"]),
                )
                records.append(record)
                fwd = times["forward"]
                mem_of = lambda m: common.mib(mem[m]["extra_bytes"]) if mem else None
                rows.append([
                    size, f"{trainable / 1e6:.3g}M", str(length), mode, f"{fwd:.3f}",
                    f"{times['jvp'] / fwd:.2f}", f"{times['grad'] / fwd:.2f}", f"{times['double_backward'] / fwd:.2f}",
                    f"{times['jvp'] / times['grad']:.2f}",
                    common.fmt(mem_of("jvp"), ".0f"), common.fmt(mem_of("grad"), ".0f"), common.fmt(mem_of("double_backward"), ".0f"),
                    common.fmt(common.ratio(mem_of("jvp"), mem_of("grad")), ".2f"),
                    f"{record['rel_jvp_grad']:.1e}", f"{record['rel_dbl_grad']:.1e}",
                ])
                print(f"  done {size} {length} {mode}: δH₁ jvp {values['jvp']:.6e}, grad {values['grad']:.6e}, "
                      f"double backward {values['double_backward']:.6e}", flush=True)
    headers = ["size", "trained", "tokens", "mode", "fwd [s]", "jvp/fwd", "grad/fwd", "dbl/fwd", "jvp/grad time",
               "jvp MiB", "grad MiB", "dbl MiB", "jvp/grad mem", "rel jvp-grad", "rel dbl-grad"]
    print()
    print(common.table(headers, rows))
    print("\nfwd: one forward pass over E (the time unit); grad = forward for the estimator's coefficients + "
          f"forward/backward; dbl = double backward; MiB: {common.memory_note(args)}; rel: |δH₁ − δH₁(grad)| / |δH₁(grad)|.")
    common.write_json(args.json, {"environment": common.environment(args), "records": records})
    return records


if __name__ == "__main__":
    main()
