"""Memory of each pass against the sequence length L at a fixed micro-batch, and the time of each pass
at a short L: fprobe's attention (query blocks in forward and forward-mode passes, SDPA ``is_causal``
in the step's reverse pass) against the whole-matrix attention it replaced (``[B, H, L, L]`` scores
and transformers' ``[B, 1, L, L]`` eager mask in every pass).

Passes: ``forward`` (the statistics at θ, as for ΔH_true), ``jvp`` (δH₁), ``jvp2`` (δH₂, the second-order
Taylor pass), ``step`` (``fprobe.rl_step``: the gradient of the loss on the batch, then AdamW).

    python benchmarks/long_sequences.py          # ~15 min on 2 CPU cores: 1m Qwen2, 2 rows, L = 512…4096
    python benchmarks/long_sequences.py --device cuda --size 15m --lengths 1024,2048,4096,8192
    python benchmarks/long_sequences.py --quick  # smoke test (CI)
"""

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

import fprobe  # noqa: E402
from benchmarks import common  # noqa: E402
from fprobe.model import attention  # noqa: E402
from fprobe.model import passes  # noqa: E402
from fprobe import tree  # noqa: E402
from fprobe.model.jvp_rules import softmax  # noqa: E402

PASSES = ("forward", "jvp", "jvp2", "step")
PROMPT = 16


def whole_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """fprobe's attention before query blocks (kept here as the baseline): the whole [B, H, L, L] scores
    plus transformers' additive [B, 1, L, L] eager mask, in every pass."""
    key = attention.repeat_kv_heads(key, query.shape[1])
    value = attention.repeat_kv_heads(value, query.shape[1])
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(scores.dtype)
    weights = softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@contextlib.contextmanager
def kernel(name: str):
    """Within: fprobe's calls run the ``"blocked"`` attention (fprobe's own) or the ``"whole"`` baseline."""
    if name == "blocked":
        yield
        return
    AttentionInterface.register(attention.NAME, whole_attention)
    AttentionMaskInterface.register(attention.NAME, eager_mask)
    try:
        yield
    finally:
        attention.register()


def make_case(arch, size, length, n, dtype, device, seed=0):
    """(policy, batch with advantages, Δθ): rows of a 16-token prompt and a response filling L."""
    policy = common.build_policy(arch, size, common.dtype_of(dtype), device, seed=seed, max_positions=max(length, 2048))
    batch = common.make_rollouts(n, length - PROMPT, common.VOCAB[size], prompt=PROMPT, seed=seed + 1, group=2)
    g = torch.Generator().manual_seed(seed + 2)
    delta = tree.tree_map(lambda p: (1e-4 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype), policy.params)
    return policy, batch, delta


def run_pass(name, policy, batch, delta, micro_batch):
    params = policy.params
    if name == "forward":
        return passes.forward(policy, params, batch, micro_batch)
    if name in ("jvp", "jvp2"):
        return passes.jet(policy, params, delta, batch, 1 if name == "jvp" else 2, micro_batch)
    opt = fprobe.optim.adamw(lr=1e-5)
    return fprobe.rl_step(policy, params, opt, opt.init(params), batch, micro_batch=micro_batch)


def memory_worker(case_args, name, impl, micro_batch, device):
    policy, batch, delta = make_case(*case_args)
    with kernel(impl):
        run_pass(name, policy, batch.select(slice(0, 1)), delta, micro_batch)  # lazy library set-up, outside the meter
        meter = common.MemoryMeter(device).start()
        run_pass(name, policy, batch, delta, micro_batch)
        return meter.stop()


def entropy_change_of(policy, batch, delta, impl, micro_batch):
    """(ΔH_true, δH₁, δH₂) of ``batch`` along Δθ with the given attention."""
    with kernel(impl):
        res = fprobe.entropy_change(policy, batch, delta, second_order=True, micro_batch=micro_batch)
    return res.delta_h_true, res.delta_h1, res.delta_h2


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="1m", choices=list(common.SIZES))
    p.add_argument("--lengths", default="512,1024,2048,4096", help="sequence lengths L for memory (16 prompt tokens + response)")
    p.add_argument("--whole-lengths", default="512,1024,2048", help="lengths at which the whole-matrix baseline is measured too")
    p.add_argument("--time-length", type=int, default=256, help="L of the time comparison")
    p.add_argument("--n", type=int, default=2, help="rows of the batch = the micro-batch")
    p.set_defaults(repeats=7)
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.size, args.lengths, args.whole_lengths, args.time_length = "1m", "64,128", "64", 64
    lengths = [int(x) for x in args.lengths.split(",")]
    whole_lengths = [int(x) for x in args.whole_lengths.split(",") if x]
    isolated = common.isolated(args)
    print(f"# Passes against sequence length — {common.environment(args)}, size {args.size}, "
          f"{args.n} rows, micro-batch {args.n}\n")

    # 1. the same numbers either way
    policy, batch, delta = make_case(args.arch, args.size, args.time_length, args.n, args.dtype, args.device)
    values = {impl: entropy_change_of(policy, batch, delta, impl, args.n) for impl in ("blocked", "whole")}
    rel = [abs(a - b) / abs(b) for a, b in zip(values["blocked"], values["whole"])]
    print(f"L = {args.time_length}: (ΔH_true, δH₁, δH₂) blocked {values['blocked']}, whole {values['whole']}; "
          f"relative differences {[f'{r:.1e}' for r in rel]}\n")

    # 2. time at a short length, both attentions side by side
    if isolated is not None:
        isolated.wait()
    fns = {f"{name}:{impl}": (lambda name=name, impl=impl: kernel_run(name, impl, policy, batch, delta, args.n))
           for name in PASSES for impl in ("blocked", "whole")}
    cpu = torch.device(args.device).type == "cpu"
    times = common.time_interleaved(fns, args.repeats, args.warmup, args.device, time.process_time if cpu else time.perf_counter)
    time_rows = [[name, f"{times[name + ':whole']:.3f}", f"{times[name + ':blocked']:.3f}",
                  f"{times[name + ':blocked'] / times[name + ':whole']:.2f}"] for name in PASSES]
    print(common.table(["pass", "whole [s]", "blocked [s]", "blocked / whole"], time_rows,
                       f"Time at L = {args.time_length} ({'CPU' if cpu else 'wall'} time, median of {args.repeats} interleaved rounds)"))

    # 3. peak memory against L
    memory = {}
    if isolated is not None:
        for length in lengths:
            case_args = (args.arch, args.size, length, args.n, args.dtype, args.device)
            for name in PASSES:
                for impl in ("blocked", "whole") if length in whole_lengths else ("blocked",):
                    memory[(name, impl, length)] = common.mib(isolated(memory_worker, case_args, name, impl, args.n, args.device)["extra_bytes"])
                    print(f"  {name} {impl} L={length}: {memory[(name, impl, length)]:.0f} MiB", flush=True)
        first = lengths[0]
        headers = ["pass", "attention"] + [f"L={n} MiB" for n in lengths] + [f"peak({lengths[-1]}) / peak({first})", "L ratio"]
        mem_rows = []
        for name in PASSES:
            for impl in ("blocked", "whole"):
                cells = [memory.get((name, impl, n)) for n in lengths]
                last = cells[-1]
                mem_rows.append([name, impl] + [common.fmt(c, ".0f") for c in cells]
                                + [common.fmt(common.ratio(last, cells[0]), ".2f"), f"{lengths[-1] / first:g}"])
        print()
        print(common.table(headers, mem_rows, f"Peak memory above the set-up ({common.memory_note(args)})"))
    common.write_json(args.json, {
        "environment": common.environment(args), "values": values, "rel_blocked_whole": rel,
        "times": times, "memory": [dict(pass_=k[0], attention=k[1], length=k[2], mib=v) for k, v in memory.items()],
    })
    return values, times, memory


def kernel_run(name, impl, policy, batch, delta, micro_batch):
    with kernel(impl):
        return run_pass(name, policy, batch, delta, micro_batch)


if __name__ == "__main__":
    main()
