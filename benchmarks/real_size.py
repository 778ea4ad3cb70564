"""The probe at a real size, against the passes it cannot avoid: a Qwen2.5-0.5B-shaped model built from
its configuration (random weights, no download: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
vocabulary 151936, tied embeddings), float32, full parameters and LoRA (rank 16 on q/v).

Timed side by side in one run (``common.time_interleaved``: rounds in rotated order, medians; on a CPU each ratio is
the median of the rounds' own ratios of CPU time, printed with their range, and "best" the ratio of the fastest calls):
- ``rl_step`` against a bare torch step — forward+backward of U on the model's own SDPA attention, the LM head on the
  response positions alone (``logits_to_keep``, as TRL's trainer; log-probs in float32), plus
  ``torch.optim.AdamW.step`` in place (torch's default implementation, which fprobe's optimizer then follows:
  single-tensor on CPU, foreach on CUDA);
- δH₁'s jvp on E and δH₂'s second-order pass (``passes.jet(order=2)``) against a bare forward of E (the model's logits
  at the response positions, as a trainer's; no grad);
- fprobe's forward (ΔH_true's pass) against the same bare forward;
- the jvp also against a "whole bare forward", ``model(ids).logits`` at every position (the yardstick the issue's
  targets were first measured against: it runs the LM head on the prompts too).
Peak memory, each in a fresh process: the bare step, ``rl_step``, ``fprobe.probe`` and its
``contributions()``, against a bare step plus one parameter tree (the Δθ a probe must hold).

    python benchmarks/real_size.py                             # CPU, 0.5B shape, |E| = |U| = 4 × (32 + 96) tokens
    python benchmarks/real_size.py --device cuda --n-eval 2048 --n-update 64 --prompt 128 --response 128 --micro-batch 32
    python benchmarks/real_size.py --shape 50m                 # the same structure at 50M (iterating)
    python benchmarks/real_size.py --fprobe-root DIR           # another checkout of fprobe (before/after)
    python benchmarks/real_size.py --methods "bare step,rl_step" --no-memory   # a subset of the timed passes
    python benchmarks/real_size.py --thp                        # CPU memory on huge pages: few page faults, steadier times
    python benchmarks/real_size.py --malloc-cache               # freed CPU memory kept in the process (no page faults)
    python benchmarks/real_size.py --quick                     # a tiny shape (smoke test, CI)
"""

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import benchmarks  # noqa: E402  this script's helpers (benchmarks.common), also where the checkout below has its own
if "--fprobe-root" in sys.argv:  # measure another checkout's fprobe with this script
    sys.path.insert(0, sys.argv[sys.argv.index("--fprobe-root") + 1])
if "--thp" in sys.argv:  # torch's CPU allocator reads this once, at its first allocation
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
if "--malloc-cache" in sys.argv and __name__ == "__main__":  # glibc reads its tunables at start: this script starts
    # again with them (not where a memory run's process imports it again, as __mp_main__ with the same argv)
    from benchmarks import common

    common.restart_with_caching_malloc()

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

import fprobe  # noqa: E402
from benchmarks import common  # noqa: E402
from fprobe.model import passes  # noqa: E402

SHAPES = {  # hidden, layers, heads, KV heads, MLP, vocabulary
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "50m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=2048, vocab_size=32768),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}
LR = 1e-5
SWEEP = (0.25 * LR, 0.5 * LR, 2 * LR, 4 * LR)  # the memory run's sweep
TIMED_METHODS = ("bare step", "rl_step", "bare forward", "whole bare forward", "forward", "jvp", "jvp2")
MEMORY_METHODS = ("bare step", "rl_step", "probe", "second_order", "sweep", "contributions")


def config_of(shape: str, bos: int = 0, eos: int = 1, pad: int | None = None) -> Qwen2Config:
    """A Qwen2 configuration of ``shape`` (Qwen2.5's tied embeddings and rotary base) with these special tokens."""
    return Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def build(shape: str, device, lora: bool, rank: int = 16):
    """A random Qwen2 of ``shape`` on ``device`` (SDPA attention, as a trainer holds it), optionally with LoRA on q/v."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config_of(shape), dtype=torch.float32, attn_implementation="sdpa").eval()
    if lora:
        config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = get_peft_model(model, config).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA's B starts at zero: make the adapter a non-zero function
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return fprobe.Policy(model)


def adamw():
    """fprobe's AdamW on torch's default implementation (``foreach=None``) where this fprobe has the option."""
    extra = dict(foreach=None) if "foreach" in inspect.signature(fprobe.optim.adamw).parameters else {}
    return fprobe.optim.adamw(lr=LR, weight_decay=0.01, **extra)


def bare_forward(model, E, micro_batch, whole: bool = False):
    """The model's logits over E at the kept positions, no graph (a trainer's forward: ``common.trainer_logits``); with
    ``whole`` at every position (``model(ids).logits``: the yardstick the issue first measured against)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for mb in E.micro_batches(micro_batch):
            common.trainer_logits(model, mb, device, whole)


def setup_of(args, lora):
    policy = build(args.shape, args.device, lora)
    vocab = SHAPES[args.shape]["vocab_size"]
    E = common.make_rollouts(args.n_eval, args.response, vocab, prompt=args.prompt, seed=1, ragged=False)
    U = common.make_rollouts(args.n_update, args.response, vocab, prompt=args.prompt, seed=2)
    return policy, E, U


def delta_of(policy, U, micro_batch):
    opt = adamw()
    return fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U, micro_batch=micro_batch).delta


def time_mode(args, lora):
    """Medians of every pass (side by side) and their ratios to the bare passes."""
    policy, E, U = setup_of(args, lora)
    mb = args.micro_batch
    delta = delta_of(policy, U, mb)
    opt = adamw()
    methods = {
        "bare step": lambda: common.bare_step(policy.model, U, mb, LR),
        "rl_step": lambda: fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U, micro_batch=mb),
        "bare forward": lambda: bare_forward(policy.model, E, mb),
        "whole bare forward": lambda: bare_forward(policy.model, E, mb, whole=True),
        "forward": lambda: passes.forward(policy, policy.params, E, mb),
        "jvp": lambda: passes.jet(policy, policy.params, delta, E, 1, mb),
    }
    if not args.no_second_order:
        methods["jvp2"] = lambda: passes.jet(policy, policy.params, delta, E, 2, mb)
    if args.methods:
        methods = {name: methods[name] for name in args.methods.split(",")}
    cpu = torch.device(args.device).type == "cpu"  # one thread: its CPU time is steadier than wall time on a busy machine
    if cpu:  # each call's CPU time split into the arithmetic's (user) and the kernel's (system: page faults of fresh memory)
        methods, split = _recording_cpu_split(methods)
    times = common.time_interleaved(methods, args.repeats, args.warmup, args.device, time.process_time if cpu else time.perf_counter)
    pairs = [(a, b) for a, b in (("rl_step", "bare step"), ("forward", "bare forward"), ("jvp", "bare forward"),
                                 ("jvp", "whole bare forward"), ("jvp2", "jvp")) if a in times and b in times]
    ratios = {} if cpu else {f"{a} / {b}": times[a] / times[b] for a, b in pairs}
    spread = {}
    if cpu:  # each ratio the median of the rounds' own ratios: a round's calls run back to back, so drift cancels
        rounds = {name: calls[-args.repeats:] for name, calls in split.items()}
        per_round = lambda a, b, part: [part(x) / part(y) for x, y in zip(rounds[a], rounds[b]) if part(y)]
        total, user = (lambda call: call.total), (lambda call: call.user)
        for label, part in (("", total), (" (user)", user)):  # user: os.times' ticks of 10 ms
            for a, b in pairs:
                values = per_round(a, b, part)
                ratios[f"{a} / {b}{label}"] = statistics.median(values) if values else None
                if values:
                    spread[f"{a} / {b}{label}"] = (min(values), max(values))
        for a, b in pairs:  # noise on a shared machine only adds time: the fastest calls' ratio, as timeit's best of N
            ratios[f"{a} / {b} (best)"] = common.ratio(min(map(total, rounds[a])), min(map(total, rounds[b])))
        times |= {f"{name} (system)": statistics.median(call.system for call in calls) for name, calls in rounds.items()}
    return dict(mode="lora" if lora else "full", times=times, ratios=ratios, spread=spread,
                trained=sum(p.numel() for p in policy.params.values()),
                tree=sum(p.numel() * p.element_size() for p in policy.params.values()))


class CPUTime(NamedTuple):
    """One call's CPU time of this process, in seconds."""

    total: float  # this process's CPU time (``time.process_time``)
    user: float  # its user and system shares (``os.times``, in ticks of 10 ms)
    system: float


def _recording_cpu_split(methods: dict) -> tuple[dict, dict[str, list[CPUTime]]]:
    """``methods`` wrapped to record each call's ``CPUTime``, and the lists they fill."""
    split = {name: [] for name in methods}

    def recording(name, fn):
        def call():
            before, start = os.times(), time.process_time()
            fn()
            total, after = time.process_time() - start, os.times()
            split[name].append(CPUTime(total, after.user - before.user, after.system - before.system))
        return call

    return {name: recording(name, fn) for name, fn in methods.items()}, split


def size_of(args, lora) -> dict:
    """The mode's record without timings (``--no-time``): its trained parameters and their bytes."""
    params = build(args.shape, "meta", lora).params
    return {"mode": "lora" if lora else "full", "trained": sum(p.numel() for p in params.values()),
            "tree": sum(p.numel() * p.element_size() for p in params.values())}


def memory_worker(args, lora, method):
    """Peak memory of one method above the set-up (model, batches), in this fresh process."""
    policy, E, U = setup_of(args, lora)
    mb = args.micro_batch
    one = U.select(slice(0, 1))
    bare_forward(policy.model, one, 1)  # lazy library set-up, outside the meter
    fprobe.token_stats(policy, policy.params, one)
    meter = common.MemoryMeter(args.device).start()
    opt = adamw()
    if method == "bare step":
        kept = common.bare_step(policy.model, U, mb, LR)
    elif method == "rl_step":
        kept = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U, micro_batch=mb)
    elif method == "probe":
        kept = fprobe.probe(policy, E, U, opt, micro_batch=mb)
    elif method == "second_order":
        kept = fprobe.probe(policy, E, U, opt, micro_batch=mb, second_order=True)
    elif method == "sweep":
        kept = fprobe.probe(policy, E, U, opt, micro_batch=mb).sweep(SWEEP)
    else:
        kept = fprobe.probe(policy, E, U, opt, micro_batch=mb).contributions()
    peak = meter.stop()["extra_bytes"]
    del kept
    return peak


def memory_mode(args, lora, runner) -> dict:
    return {method: runner(memory_worker, args, lora, method) for method in MEMORY_METHODS}


def probe_timings(args):
    """The whole probe once (LoRA), with its phases' wall times."""
    policy, E, U = setup_of(args, True)
    start = time.perf_counter()
    res = fprobe.probe(policy, E, U, adamw(), micro_batch=args.micro_batch)
    common.synchronize(args.device)
    return res, {**res.timings, "probe (total)": time.perf_counter() - start}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="0.5b", choices=list(SHAPES))
    p.add_argument("--tiny", "--quick", dest="quick", action="store_true", help="the tiny shape and batch (seconds on a CPU)")
    p.add_argument("--n-eval", type=int, default=4)
    p.add_argument("--n-update", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--response", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-time", action="store_true", help="peak memory only: no timed passes, no LoRA probe")
    p.add_argument("--memory-modes", default=None, help="modes whose peak memory is measured (default: --modes)")
    p.add_argument("--no-second-order", action="store_true", help="skip δH₂'s second-order pass")
    p.add_argument("--methods", default=None,
                   help=f"time only these (comma-separated: {', '.join(TIMED_METHODS)})")
    p.add_argument("--fprobe-root", default=None, help="measure the fprobe package under this directory")
    p.add_argument("--thp", action="store_true", help="CPU tensors of 2 MiB and more on transparent huge pages "
                   "(torch's THP_MEM_ALLOC_ENABLE=1): far fewer page faults of fresh memory, for every method alike")
    p.add_argument("--malloc-cache", action="store_true", help="timed passes on a glibc heap that keeps freed memory "
                   f"(GLIBC_TUNABLES={common.CACHING_TUNABLES}), as a GPU's caching allocator does: no page faults "
                   "of fresh memory (the memory runs keep their own allocator set-up)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    unknown = [m for m in (args.methods or "").split(",") if m and m not in TIMED_METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(TIMED_METHODS)}")
    if args.quick:
        args.shape, args.n_eval, args.n_update, args.prompt, args.response, args.micro_batch = "tiny", 4, 4, 8, 16, 2
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    runner = None if args.no_memory else common.Isolated(inline=args.quick).start()
    device = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    thp = ", huge-page CPU allocations (THP_MEM_ALLOC_ENABLE=1)" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else ""
    thp += ", a caching glibc heap (--malloc-cache)" if common.caching_malloc() else ""
    print(f"# fprobe at a real size — {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32{thp}; "
          f"fprobe from {Path(fprobe.__file__).parent}\n")
    print(f"shape {args.shape} {SHAPES[args.shape]}, |E| = {args.n_eval}, |U| = {args.n_update}, "
          f"{args.prompt} prompt + {args.response} response tokens, micro-batch {args.micro_batch}\n")
    if runner is not None:
        runner.wait()
    records = []
    for mode in args.modes.split(","):
        record = size_of(args, mode == "lora") if args.no_time else time_mode(args, mode == "lora")
        if runner is not None and mode in (args.memory_modes or args.modes).split(","):
            record["memory"] = memory_mode(args, mode == "lora", runner)
        records.append(record)
    if not args.no_time:
        print_times(records)
    if runner is not None:
        measured = [r for r in records if "memory" in r]
        methods = list(measured[0]["memory"])
        rows = []
        for r in measured:
            limit = (r["memory"]["bare step"] or 0) + r["tree"]
            rows.append([r["mode"], f"{common.mib(r['tree']):.0f}", *[f"{common.mib(r['memory'][m] or 0):.0f}" for m in methods],
                         *[common.fmt(common.ratio(r["memory"][m], limit), ".2f") for m in methods[1:]]])
        print()
        print(common.table(["mode", "tree MiB", *[f"{m} MiB" for m in methods], *[f"{m} / (step + tree)" for m in methods[1:]]],
                           rows, "peak memory above the set-up, each in a fresh process"))
    if args.no_time:
        common.write_json(args.json, {"device": device, "shape": args.shape, "records": records})
        return records
    res, timings = probe_timings(args)
    print()
    print(common.table(["phase (LoRA probe)", "wall [s]"], [[k, f"{v:.2f}"] for k, v in timings.items()]))
    print(f"\nΔH_true {res.delta_h_true:.6e}, δH₁ {res.delta_h1:.6e}, ratio {res.ratio:.4f}")
    common.write_json(args.json, dict(device=device, shape=args.shape, records=records, timings=timings,
                                      ratio=res.ratio, delta_h1=res.delta_h1, delta_h_true=res.delta_h_true))
    return records


def print_times(records) -> None:
    names = list(records[0]["times"])
    print(common.table(["mode", "trained", *[f"{n} [s]" for n in names]],
                       [[r["mode"], f"{r['trained'] / 1e6:.1f}M", *[f"{r['times'][n]:.2f}" for n in names]] for r in records],
                       "time (median; CPU time of the one thread on a CPU, wall time on a GPU)"))
    ratio_names = list(records[0]["ratios"])
    print()
    shown = lambda r, n: common.fmt(r["ratios"][n], ".2f") + ("" if n not in r["spread"] else
                                                               " ({:.2f}–{:.2f})".format(*r["spread"][n]))
    print(common.table(["mode", *ratio_names], [[r["mode"], *[shown(r, n) for n in ratio_names]] for r in records],
                       "ratios, measured side by side (CPU: the median of the rounds' own ratios, and their range)"))


if __name__ == "__main__":
    main()
