"""One probe at a real size: a Qwen2.5-1.5B-shaped model built from its configuration (random weights,
no download: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocabulary 151936), LoRA rank 16
on q/v, |E| = 2048 sequences of 128 prompt + 128 response tokens, float32 (fprobe turns TF32 off inside
its calls). Prints the wall time of each phase: building, the step on U, the jvp (δH₁) on E, the
forward pass at θ₀+Δθ (ΔH_true) and the whole probe.

    python benchmarks/real_size.py --device cuda             # the GPU measurement (benchmarks/gpu.sh)
    python benchmarks/real_size.py --tiny                    # the same script at a tiny size on the CPU (seconds)
    python benchmarks/real_size.py --quick                   # the same (smoke test, CI)
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

import fprobe  # noqa: E402
from benchmarks import common  # noqa: E402

QWEN_1P5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000)


def build(shape: dict, device, dtype, rank: int):
    """A random Qwen2 of ``shape`` made on ``device`` directly, with a LoRA adapter on q/v."""
    from peft import LoraConfig, get_peft_model

    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    lora = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(model, lora).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter a non-zero function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return fprobe.Policy(model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", "--quick", action="store_true", help="a tiny model and batch (runs on a CPU in seconds)")
    p.add_argument("--n-eval", type=int, default=2048)
    p.add_argument("--n-update", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--response", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = QWEN_1P5B
    if args.tiny:
        shape, args.n_eval, args.n_update, args.prompt, args.response, args.micro_batch = TINY, 16, 8, 16, 16, 4
    wall = {}
    start = time.perf_counter()
    policy = build(shape, args.device, torch.float32, args.rank)
    common.synchronize(args.device)
    wall["build model"] = time.perf_counter() - start
    vocab = shape["vocab_size"]
    E = common.make_rollouts(args.n_eval, args.response, vocab, prompt=args.prompt, seed=1, ragged=False)
    U = common.make_rollouts(args.n_update, args.response, vocab, prompt=args.prompt, seed=2)
    start = time.perf_counter()
    res = fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=args.lr), micro_batch=args.micro_batch)
    common.synchronize(args.device)
    wall["probe (total)"] = time.perf_counter() - start
    device = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"# probe at real size — {device}, torch {torch.__version__}, float32, TF32 off inside fprobe\n")
    print(f"model {shape}, LoRA r{args.rank} q/v ({sum(x.numel() for x in policy.params.values()):,} trained), "
          f"|E| = {len(E)} × ({args.prompt}+{args.response}) tokens ({E.n_tokens:,} response tokens), "
          f"|U| = {len(U)}, micro-batch {args.micro_batch}\n")
    rows = [[name, f"{t:.2f}"] for name, t in {**{"build model": wall["build model"]}, **res.timings}.items()]
    rows.append(["probe (total)", f"{wall['probe (total)']:.2f}"])
    print(common.table(["phase", "wall [s]"], rows))
    print(f"\nΔH_true {res.delta_h_true:.6e}, δH₁ {res.delta_h1:.6e}, ratio {res.ratio:.4f}, ESS fraction {res.ess_fraction:.4f}")
    if torch.device(args.device).type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device, wall=wall, timings=res.timings, delta_h1=res.delta_h1,
                                                   delta_h_true=res.delta_h_true, ratio=res.ratio), indent=1))
    return res, wall


if __name__ == "__main__":
    main()
