"""Shared helpers of fprobe's benchmarks: models built from configs, batches, timing, peak memory.

- ``build_policy(arch, size, ...)``: a randomly initialised Qwen2 / Llama / GPT-2 of about 1M, 15M
  or 60M parameters (``SIZES``), optionally with a LoRA adapter, wrapped as an ``fprobe.Policy``.
- ``make_rollouts(...)``: a batch of random prompts + responses (left-padded prompts, ragged
  responses, group-relative advantages), reproducible from a seed.
- ``time_interleaved({name: fn}, ...)``: wall time of several methods measured side by side:
  warm-up, then rounds that call every method once in a rotating order; medians per method.
- ``Isolated``: runs a function in a fresh process (forked from a server that has only imported
  torch/transformers/fprobe) and returns its result with the peak memory of the measured part:
  peak RSS on CPU (``/proc/self/status`` VmHWM after resetting it, else ``getrusage``),
  ``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fprobe  # noqa: E402

VOCAB = {"1m": 2048, "15m": 8192, "60m": 16384}

# (hidden, layers, heads, kv heads, intermediate) per size; GPT-2 uses hidden, layers, heads and a 4x MLP.
SIZES = {
    "1m": (128, 4, 4, 2, 384),
    "15m": (320, 10, 8, 4, 960),
    "60m": (512, 16, 8, 4, 1536),
}
GPT2_SIZES = {"1m": (128, 4, 4), "15m": (320, 10, 8), "60m": (512, 16, 8)}
LORA_TARGETS = {"qwen2": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def model_config(arch: str, size: str, max_positions: int = 2048):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    vocab = VOCAB[size]
    if arch == "gpt2":
        d, layers, heads = GPT2_SIZES[size]
        return GPT2Config(
            n_layer=layers, n_head=heads, n_embd=d, vocab_size=vocab, n_positions=max_positions,
            bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    d, layers, heads, kv, inter = SIZES[size]
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, hidden_size=d,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=max_positions,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    )


def build_model(arch: str = "qwen2", size: str = "1m", dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                max_positions: int = 2048):
    """A randomly initialised causal LM in eval mode (no LoRA) with transformers' SDPA attention, as a
    trainer would hold it; fprobe's calls switch it to fprobe's attention and back."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, size, max_positions), attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


def build_policy(arch="qwen2", size="1m", dtype=torch.float32, device="cpu", lora: bool = False, seed: int = 0,
                 max_positions: int = 2048):
    """``fprobe.Policy`` of ``build_model``; with ``lora`` a rank-8 adapter on the attention projections
    (its B matrices set to small random values, so that the adapter is not a zero function)."""
    model = build_model(arch, size, dtype, device, seed, max_positions)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=LORA_TARGETS[arch], lora_dropout=0.0)
        model = get_peft_model(model, config).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return fprobe.Policy(model)


def count_params(policy) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    everything = sum(p.numel() for p in policy.model.parameters())
    return everything, sum(p.numel() for p in policy.params.values())


def make_rollouts(n: int, response: int, vocab: int, prompt: int = 16, seed: int = 0, group: int = 4, ragged: bool = True):
    """n rows of [left-padded prompt of 8..``prompt`` tokens | response of ¾·``response``..``response`` tokens | right padding],
    rewards in {0, 1}, group-relative advantages over groups of ``group`` consecutive rows."""
    g = torch.Generator().manual_seed(seed)
    width = prompt + response
    ids = torch.randint(2, vocab, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    resp = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        p = int(torch.randint(max(1, prompt // 2), prompt + 1, (1,), generator=g)) if ragged else prompt
        t = int(torch.randint(max(1, (3 * response) // 4), response + 1, (1,), generator=g)) if ragged else response
        attn[i, prompt - p : prompt + t] = 1
        resp[i, prompt : prompt + t] = True
    rewards = torch.randint(0, 2, (n,), generator=g).double()
    rewards[0] = 1.0 - rewards[0] if n > 1 and rewards[0] == rewards[1] else rewards[0]
    group_ids = torch.arange(n) // group
    advantages = fprobe.group_advantages(rewards, group_ids)
    return fprobe.Rollouts(ids, attn, resp, advantages=advantages, rewards=rewards, group_ids=group_ids, max_response_length=response)


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(methods: dict[str, Callable], repeats: int = 3, warmup: int = 1, device="cpu",
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time [s] of each method: ``warmup`` untimed rounds, then ``repeats`` rounds in which
    every method runs once, in an order rotated each round (so drifting machine load hits all alike).
    ``clock``: wall time by default; ``time.process_time`` (this process's CPU time) is steadier on a
    busy shared CPU for one-thread runs."""
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            synchronize(device)
            start = clock()
            methods[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


class MemoryMeter:
    """Peak memory of the code between ``start()`` and ``stop()``, above what was in use at ``start()``:
    on CUDA allocated tensor bytes (``max_memory_allocated``), on CPU the process's resident set."""

    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.exact = _reset_peak_rss()
            self.base = rss_bytes()
        return self

    def stop(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_rss_bytes()
        return {"peak_bytes": peak, "base_bytes": self.base, "extra_bytes": max(peak - self.base, 0),
                "kind": "cuda_allocated" if self.cuda else ("rss" if self.exact else "rss_since_start")}


def allocate_and_measure(nbytes: int, device="cpu") -> dict:
    """``MemoryMeter`` around the allocation of ``nbytes`` (written, so resident): a check of the meter."""
    meter = MemoryMeter(device).start()
    x = torch.ones(nbytes // 8, dtype=torch.float64, device=device)
    result = meter.stop()
    del x
    return result


def _noop():
    return None


def _run_isolated(fn, args, kwargs):
    torch.set_num_threads(kwargs.pop("_threads"))
    return fn(*args, **kwargs)


# glibc raises its mmap threshold after each large free (up to 32 MiB), so later large tensors come
# from the heap, which fragments and is not given back: with the default, peak RSS of a probe grew
# +312% from |E| = 64 to 1024 at a fixed micro-batch, all of it fragmentation (+1.3% with this).
# A fixed threshold makes peak RSS measure live memory. Set only in the memory-measuring processes.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}

# For timing on a CPU, the opposite: by default glibc gives every freed block over 32 MiB back to the kernel, so each
# fresh parameter-sized tensor is page faults again (at the 0.5B shape on this project's VM, ~40% of a bare training
# step's CPU time was the kernel's). Serving every block from a heap that is never trimmed keeps freed memory in the
# process, as torch's CUDA caching allocator (or jemalloc/tcmalloc in CPU training) does. glibc reads this at start.
CACHING_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def caching_malloc() -> bool:
    """Whether this process started with ``CACHING_TUNABLES`` among glibc's tunables."""
    return CACHING_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def _tunables_without_caching() -> str:
    """``GLIBC_TUNABLES`` less ``CACHING_TUNABLES`` (the user's own tunables, if any)."""
    return ":".join(t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and t not in CACHING_TUNABLES.split(":"))


def restart_with_caching_malloc() -> None:
    """Re-execute this script, with the interpreter's own options, with ``CACHING_TUNABLES`` added to glibc's tunables
    (unless it runs with them already)."""
    if caching_malloc():
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (_tunables_without_caching(), CACHING_TUNABLES)))
    sys.stdout.flush()
    os.execv(sys.executable, sys.orig_argv)


class Isolated:
    """Runs ``fn(*args, **kwargs)`` each time in a fresh process forked from a server that has imported
    torch, transformers and fprobe once (so memory is per run, and no import time is paid per run).
    ``fn`` must be a module-level function; it measures its own memory with ``MemoryMeter``.
    With ``inline=True`` (``--quick``) it runs ``fn`` in this process instead: the numbers are then only
    indicative (the allocator keeps memory between runs), but no server has to start."""

    def __init__(self, inline: bool = False):
        self.inline, self.ready = inline, inline
        if inline:
            return
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "transformers", "peft", "fprobe", "benchmarks.common"])
        self.threads = torch.get_num_threads()

    def start(self) -> "Isolated":
        """Start the server now: its imports overlap with the caller's set-up (call ``wait`` before timing)."""
        if not self.inline:
            from multiprocessing import forkserver

            saved = {k: os.environ.get(k) for k in (*MALLOC_ENV, "GLIBC_TUNABLES")}
            os.environ.update(MALLOC_ENV, GLIBC_TUNABLES=_tunables_without_caching())  # read by glibc when the server
            # starts; its children inherit it
            try:
                forkserver.ensure_running()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self

    def wait(self) -> None:
        """Block until the server has finished its imports (so that it does not disturb timings)."""
        if not self.ready:
            self(_noop)
            self.ready = True

    def __call__(self, fn, *args, **kwargs):
        if self.inline:
            return fn(*args, **kwargs)
        with self.ctx.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(_run_isolated, (fn, args, {**kwargs, "_threads": self.threads}))


# ---------------------------------------------------------------------------------------------- tables and CLI


def ratio(a, b):
    """a / b, or None where either is missing or b is 0 (e.g. in-process memory in --quick)."""
    return a / b if a is not None and b else None


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return format(v, spec)


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A GitHub-markdown table (readable as plain text too)."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.rjust(w) for s, w in zip(items, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out += [line(r) for r in cells]
    return ((f"**{title}**\n\n") if title else "") + "\n".join(out)


def isolated(args) -> Isolated | None:
    """The memory runner for ``args``: None with ``--no-memory``, in-process with ``--quick``."""
    return None if args.no_memory else Isolated(inline=args.quick).start()


def memory_note(args) -> str:
    if args.no_memory:
        return "memory not measured (--no-memory)"
    if args.quick:
        return "memory measured in-process (--quick): indicative only"
    cpu = torch.device(args.device).type == "cpu"
    return ("peak memory above the set-up (model, batches, states), each run in a fresh process: "
            + ("peak RSS, glibc mmap threshold fixed at 64 KiB" if cpu else "torch.cuda.max_memory_allocated"))


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--arch", default="qwen2", choices=["qwen2", "llama", "gpt2"])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default 1: stable ratios on a shared machine; 0 = torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory subprocesses")
    p.add_argument("--quick", action="store_true",
                   help="smoke test (CI): tiny sizes, one repeat, memory measured in-process (indicative only)")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    return p


def setup(args) -> None:
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 1, 1


def environment(args) -> str:
    dev = args.device
    if torch.device(dev).type == "cuda":
        dev = f"cuda ({torch.cuda.get_device_name()})"
    return (f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, dtype {args.dtype}, arch {args.arch}")


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def write_json(path: str | None, payload) -> None:
    if path:
        import json

        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        os.replace(tmp, path)


def first_kept_position(mb) -> int:
    """The first position whose logits predict a response token (the last prompt column, 0 for none): a trainer keeps
    the logits from there on (TRL: ``logits_to_keep`` = completion width + 1), as fprobe's passes do."""
    return fprobe.model.tokens.first_predicting_position(mb.response_mask[:, 1:])


def trainer_logits(model, mb, device, whole: bool = False) -> tuple[torch.Tensor, int]:
    """(logits from ``first_kept_position(mb)`` on, that position): the model's forward of a micro-batch as a trainer
    runs it — its own attention, the LM head on the kept positions alone (``logits_to_keep``); with ``whole`` the
    logits of every position (from 0)."""
    ids, attn = mb.input_ids.to(device), mb.attention_mask.to(device)
    start = 0 if whole else first_kept_position(mb)
    position_ids = fprobe.model.policy.position_ids_from_mask(attn)
    out = model(ids, attention_mask=attn, position_ids=position_ids, use_cache=False, logits_to_keep=ids.shape[1] - start)
    return out.logits, start


def trainer_loss(model, mb, device, normaliser: float) -> torch.Tensor:
    """A micro-batch's dr_grpo loss −Σ A_i ℓ_ik / ``normaliser`` as a trainer forms it: log-probs of the response tokens
    from the kept logits (``trainer_logits``) in float32."""
    logits, start = trainer_logits(model, mb, device)
    targets = mb.input_ids[:, start + 1:].to(device)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets[..., None])[..., 0]
    weights = mb.advantages.to(device, torch.float32)[:, None] * mb.response_mask[:, start + 1:].to(device)
    return -(weights * logp).sum() / normaliser


def bare_step(model, U, micro_batch, lr: float):
    """One dr_grpo training step the plain way: ``trainer_loss(...).backward()`` per micro-batch, AdamW.step() in place."""
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    normaliser = len(U) * U.max_response_length
    for mb in U.micro_batches(micro_batch):
        trainer_loss(model, mb, device, normaliser).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer
