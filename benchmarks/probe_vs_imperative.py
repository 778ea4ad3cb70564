"""``fprobe.probe`` against the probe as the original imperative design does it, on the same model,
batches and AdamW state.

The imperative probe, written plainly here with torch alone: snapshot the model's state and the
``torch.optim.AdamW`` state to CPU, forward E at θ₀, one in-place optimizer step on U (loss
``dr_grpo`` as in ``fprobe.losses``, gradients accumulated over micro-batches), Δθ = θ − snapshot,
forward E at θ₀+Δθ (SNIS ΔH_true), restore model and optimizer, then a separate forward/backward
pass on E for ∇Ĥ, and δH₁ = ⟨∇Ĥ, Δθ⟩.

Checks that both give the same numbers to rounding (Δθ, ΔH_true, δH₁: the imperative probe runs the
model's own SDPA attention with transformers' padding mask, fprobe's step SDPA on left-aligned rows and
its E passes fprobe's blocked attention, so Δθ agrees to float32 rounding, which AdamW's first steps
amplify where a gradient is ~0) and that the imperative probe restored everything, then reports wall time (median of interleaved repeats after
warm-up) and peak memory (each probe in a fresh process) as ratios.

    python benchmarks/probe_vs_imperative.py                     # CPU defaults
    python benchmarks/probe_vs_imperative.py --size 15m --n-e 64 --length 256
    python benchmarks/probe_vs_imperative.py --device cuda --size 60m --lora
    python benchmarks/probe_vs_imperative.py --quick
"""

import copy
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fprobe  # noqa: E402
from benchmarks import common  # noqa: E402
from fprobe import tree  # noqa: E402
from fprobe.model.numerics import Numerics  # noqa: E402

CHUNK = 1024


# ------------------------------------------------------------------------------------ the imperative probe


def plain_token_stats(model, input_ids, attention_mask, response_mask):
    """[B, L] float64 (log π(y_k | y_<k), entropy at k) on the response tokens, zeros elsewhere.

    The model runs as it is called, under fprobe's ``Numerics`` function mode only: that mode is
    part of the policy's definition (SiLU and LayerNorm from primitive ops, float64 kept float64), so
    both probes evaluate the same function of θ — without it the logits differ in the last bit."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with Numerics():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    predicting = response_mask[:, 1:]
    rows, targets = logits[:, :-1][predicting], input_ids[:, 1:][predicting]
    logps, entropies = [], []
    for z, y in zip(rows.split(CHUNK), targets.split(CHUNK)):
        logprobs = torch.log_softmax(z.double(), dim=-1)
        logps.append(logprobs.gather(-1, y[:, None])[:, 0])
        entropies.append(-(logprobs.exp() * logprobs).sum(-1))
    place = lambda v: torch.zeros(response_mask.shape, dtype=v.dtype, device=v.device).masked_scatter(response_mask, v)
    return place(torch.cat(logps)), place(torch.cat(entropies))


def micro_batches(batch, size, device):
    n = batch.input_ids.shape[0]
    size = n if size is None else size
    for start in range(0, n, size):
        rows = slice(start, start + size)
        yield rows, batch.input_ids[rows].to(device), batch.attention_mask[rows].to(device), batch.response_mask[rows].to(device)


def to_cpu_copy(obj):
    """A deep copy of a (nested) state with every tensor cloned to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def imperative_probe(model, optimizer, E, U, micro_batch=None, clip=0.2):
    """(Δθ by name, ΔH_true, δH₁) — mutates the model and optimizer, and restores them."""
    device = next(model.parameters()).device
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # 1. snapshot the model and the optimizer state to CPU
    model_snapshot = to_cpu_copy(model.state_dict())
    optimizer_snapshot = to_cpu_copy(optimizer.state_dict())
    # 2. forward E at θ₀
    with torch.no_grad():
        stats0 = [plain_token_stats(model, ids, attn, resp) for _, ids, attn, resp in micro_batches(E, micro_batch, device)]
    logp0 = torch.cat([s[0] for s in stats0]).sum(-1)
    ent0 = torch.cat([s[1] for s in stats0]).sum(-1)
    tokens = E.response_mask.sum(-1).double().to(device)
    # 3. one optimizer step on U, in place (dr_grpo: c_i = 1 / (B · L_max))
    n_u = U.input_ids.shape[0]
    max_len = U.max_response_length or int(U.response_mask.sum(-1).max())
    weight = torch.full((n_u,), 1.0 / (n_u * max_len), dtype=torch.float64, device=device)
    advantages = U.advantages.to(device=device, dtype=torch.float64)
    optimizer.zero_grad(set_to_none=True)
    for rows, ids, attn, resp in micro_batches(U, micro_batch, device):
        logp, _ = plain_token_stats(model, ids, attn, resp)
        ratio = torch.exp(logp - logp.detach())
        adv = advantages[rows][:, None]
        objective = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
        loss = (-weight[rows] * (objective * resp).sum(-1)).sum()
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    delta = {name: p.detach() - model_snapshot[name].to(device) for name, p in named.items()}
    # 4. forward E at θ₀+Δθ: ΔH_true by SNIS (per-token normalisation, Rao–Blackwell entropy)
    with torch.no_grad():
        stats1 = [plain_token_stats(model, ids, attn, resp) for _, ids, attn, resp in micro_batches(E, micro_batch, device)]
    logp1 = torch.cat([s[0] for s in stats1]).sum(-1)
    ent1 = torch.cat([s[1] for s in stats1]).sum(-1)
    h0 = ent0.sum() / tokens.sum()
    logw = logp1 - logp0
    w = torch.exp(logw - logw.max())
    h1 = (w * ent1).sum() / (w * tokens).sum()
    # 5. restore the model and the optimizer
    model.load_state_dict(model_snapshot)
    optimizer.load_state_dict(optimizer_snapshot)
    del model_snapshot, optimizer_snapshot
    # 6. a separate backward pass on E: ∇ of δH₁'s linear functional Σ α ℓ + β h at θ₀
    total = tokens.sum()
    for (rows, ids, attn, resp), (lp0, _) in zip(micro_batches(E, micro_batch, device), stats0):
        logp, ent = plain_token_stats(model, ids, attn, resp)
        mask = resp.double()
        alpha = (ent0[rows] - h0 * tokens[rows])[:, None] * mask / total
        beta = mask / total
        ((alpha * logp).sum() + (beta * ent).sum()).backward()
    delta_h1 = sum(torch.vdot(p.grad.double().flatten(), delta[name].double().flatten()) for name, p in named.items())
    optimizer.zero_grad(set_to_none=True)
    return delta, float(h1 - h0), float(delta_h1)


# ------------------------------------------------------------------------------------ set-up and runs


def make_setup(arch, size, lora, dtype, device, n_u, n_e, length, lr, warm_steps=2, seed=0):
    """(policy, torch AdamW with a non-trivial state, the same state as fprobe's, U, E)."""
    policy = common.build_policy(arch, size, common.dtype_of(dtype), device, lora=lora, seed=seed)
    model = policy.model
    vocab = common.VOCAB[size]
    U = common.make_rollouts(n_u, length, vocab, seed=seed + 1)
    E = common.make_rollouts(n_e, length, vocab, seed=seed + 2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, foreach=False)
    for step in range(warm_steps):  # a real Adam state: moments and step count from earlier updates
        W = common.make_rollouts(min(n_u, 8), min(length, 32), vocab, seed=seed + 100 + step)
        optimizer.zero_grad(set_to_none=True)
        for rows, ids, attn, resp in micro_batches(W, None, device):
            logp, _ = plain_token_stats(model, ids, attn, resp)
            (-(W.advantages.to(device)[rows, None] * logp).sum() / logp.numel()).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    opt, opt_state = fprobe.optim.from_torch_optimizer(optimizer, model.named_parameters(), policy.params)
    return policy, optimizer, opt, opt_state, U, E


def run(method, setup, micro_batch):
    policy, optimizer, opt, opt_state, U, E = setup
    if method == "imperative":
        return imperative_probe(policy.model, optimizer, E, U, micro_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fprobe.LowESSWarning)
        kw = {} if method == "fprobe" else {"method": method.split(":")[1]}
        res = fprobe.probe(policy, E, U, opt, opt_state, micro_batch=micro_batch, **kw)
    return res.delta_named, res.delta_h_true, res.delta_h1


def memory_worker(setup_args, method, micro_batch, device):
    setup = make_setup(*setup_args)
    # one probe on 1-row, 8-token batches first: lazy library set-up is not the probe's memory
    policy, optimizer, opt, opt_state, U, E = setup
    tiny = lambda seed: common.make_rollouts(1, 8, common.VOCAB[setup_args[1]], prompt=4, seed=seed)
    run(method, (policy, optimizer, opt, opt_state, tiny(98), tiny(99)), None)
    meter = common.MemoryMeter(device).start()
    delta, dh_true, dh1 = run(method, setup, micro_batch)
    return {**meter.stop(), "delta_h_true": dh_true, "delta_h1": dh1}


def state_fingerprint(model, optimizer):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return params, to_cpu_copy(optimizer.state_dict())


def same_state(a, b) -> bool:
    (pa, oa), (pb, ob) = a, b
    if pa.keys() != pb.keys() or not all(torch.equal(pa[k], pb[k]) for k in pa):
        return False
    flat = lambda s: [(k, v) for k, v in sorted(s["state"].items())]
    for (ka, va), (kb, vb) in zip(flat(oa), flat(ob)):
        if ka != kb or va.keys() != vb.keys() or not all(torch.equal(torch.as_tensor(va[x]), torch.as_tensor(vb[x])) for x in va):
            return False
    return oa["param_groups"] == ob["param_groups"]


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="1m", choices=sorted(common.VOCAB))
    p.add_argument("--lora", action="store_true")
    p.add_argument("--n-u", type=int, default=16, help="sequences in U")
    p.add_argument("--n-e", type=int, default=32, help="sequences in E")
    p.add_argument("--length", type=int, default=128, help="response length (tokens)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.size, args.n_u, args.n_e, args.length, args.micro_batch = "1m", 4, 8, 16, 4
    isolated = common.isolated(args)
    setup_args = (args.arch, args.size, args.lora, args.dtype, args.device, args.n_u, args.n_e, args.length, args.lr)
    setup = make_setup(*setup_args)
    policy, optimizer = setup[0], setup[1]
    everything, trainable = common.count_params(policy)
    print(f"# fprobe.probe vs the imperative snapshot/restore probe — {common.environment(args)}")
    print(f"model {args.size} ({everything / 1e6:.3g}M parameters, {trainable / 1e6:.3g}M trained{', LoRA' if args.lora else ''}), "
          f"|U| = {args.n_u}, |E| = {args.n_e}, response length {args.length}, micro-batch {args.micro_batch}, lr {args.lr:g}\n")

    before = state_fingerprint(policy.model, optimizer)
    methods = ["fprobe", "fprobe:grad", "imperative"]
    results = {m: run(m, setup, args.micro_batch) for m in methods}
    restored = same_state(before, state_fingerprint(policy.model, optimizer))
    d_imp = results["imperative"][0]
    rel = lambda a, b: abs(a - b) / abs(b) if b else float("nan")
    check_rows = []
    for m in methods:
        delta, dh_true, dh1 = results[m]
        assert delta.keys() == d_imp.keys()
        check_rows.append([m, f"{dh_true:.10e}", f"{dh1:.10e}", f"{float(tree.norm(tree.sub(delta, d_imp)) / tree.norm(d_imp)):.1e}",
                           f"{rel(dh_true, results['imperative'][1]):.1e}", f"{rel(dh1, results['imperative'][2]):.1e}"])
    print(common.table(["probe", "ΔH_true", "δH₁", "rel Δθ", "rel ΔH_true", "rel δH₁"], check_rows, "Results"))
    print(f"\nimperative probe restored model and optimizer bit for bit: {'yes' if restored else 'NO'}\n")

    fns = {m: (lambda m=m: run(m, setup, args.micro_batch)) for m in methods}
    if isolated is not None:
        isolated.wait()
    times = common.time_interleaved(fns, args.repeats, args.warmup, args.device)
    mem = {m: isolated(memory_worker, setup_args, m, args.micro_batch, args.device) for m in methods} if isolated else {}
    rows = []
    for m in methods:
        mib = common.mib(mem[m]["extra_bytes"]) if mem else None
        rows.append([m, f"{times[m]:.3f}", f"{times[m] / times['imperative']:.2f}", common.fmt(mib, ".0f"),
                     common.fmt(common.ratio(mib, common.mib(mem["imperative"]["extra_bytes"]) if mem else None), ".2f")])
    print(common.table(["probe", "time [s]", "time / imperative", "peak MiB", "memory / imperative"], rows, "Cost"))
    print("\nfprobe = fprobe.probe with default settings; fprobe:grad = method='grad'. "
          f"Peak MiB: {common.memory_note(args)}.")
    common.write_json(args.json, {"environment": common.environment(args), "args": vars(args), "times": times, "memory": mem,
                                  "checks": check_rows, "restored": restored})
    return times, mem, check_rows, restored


if __name__ == "__main__":
    main()
