"""Worker for tests/test_sharded.py: one rank of a 2-process gloo run of a model sharded by transformers'
native FSDP2 (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))``), float64.

usage: sharded_probe.py OUT_DIR QWEN2_DIR LLAMA_DIR UNTIED_ADDER_DIR TIED_ADDER_DIR (see ``main``)
``engine``: two AdamW steps of a plain policy-gradient loss on each rank's own rows, each probed through
``fprobe.entropy.sharded`` (E of 7 rows: uneven blocks), and the same two steps on a second copy of the model
without the probe. Rank r saves OUT_DIR/rank{r}.pt with the records, E, whole θ_k and θ_{k+1} (rank 0, through
``get_model_state_dict``), the trainer's gradients before and after each probe, the reshard state, and both
runs' final shards, losses and optimizer states.
``uneven``: forwards and a gradient pass on a batch of 3 rows (2 + 1) and of 1 row (1 + 0); then whether a plain
no-grad forward leaves parameters gathered, whether ``reshard`` frees them, and ``fprobe.Policy``'s refusal.
"""

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers import make_batch  # noqa: E402
import fprobe  # noqa: E402
from fprobe import distributed  # noqa: E402
from fprobe.entropy import sharded  # noqa: E402


def load(model_dir: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, distributed_config=DistributedConfig(fsdp_size=2))


def whole(model) -> dict:
    """Whole parameters on rank 0 (empty elsewhere), as the gather path takes them."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: state[n].clone() for n in names} if dist.get_rank() == 0 else {}


def policy_gradient_loss(model, U) -> torch.Tensor:
    """−Σ A_i ℓ_ik / Σ T over this rank's update rows, through the model's own attention."""
    logp = model(U.input_ids, attention_mask=U.attention_mask).logits[:, :-1].log_softmax(-1)
    ell = logp.gather(-1, U.input_ids[:, 1:, None])[..., 0]
    mask = U.response_mask[:, 1:].double()
    return -(U.advantages[:, None] * ell * mask).sum() / mask.sum()


def train(model, steps: int, probe_E=None) -> dict:
    rank = dist.get_rank()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    out = {"losses": [], "records": [], "grads_kept": [], "resharded": [], "theta_k": [], "theta_k1": []}
    for step in range(steps):
        U = make_batch(n=4, width=10, seed=100 + 10 * step + rank)
        loss = policy_gradient_loss(model, U)
        loss.backward()
        out["losses"].append(float(loss.detach()))
        if probe_E is not None:
            model.eval()
            policy = sharded.ShardedPolicy(model)
            grads = {n: p.grad for n, p in model.named_parameters()}
            copies = {n: g.to_local().clone() for n, g in grads.items()}
            out["theta_k"].append(whole(model))
            theta_k = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
            start = sharded.at_start(policy, probe_E, micro_batch=3)
            out["grads_kept"].append(all(p.grad is grads[n] and torch.equal(p.grad.to_local(), copies[n])
                                         for n, p in model.named_parameters()))
            out["resharded"].append(sharded.is_resharded(model))
            model.train()
        optimizer.step()
        optimizer.zero_grad()
        if probe_E is not None:
            model.eval()
            delta = {n: p.detach().to_local() - theta_k[n] for n, p in model.named_parameters()}
            out["records"].append(sharded.after_update(sharded.ShardedPolicy(model), probe_E, start, delta, micro_batch=3)._asdict())
            out["resharded"].append(sharded.is_resharded(model))
            out["theta_k1"].append(whole(model))
            model.train()
    out["shards"] = {n: p.to_local().clone() for n, p in model.named_parameters()}
    out["optimizer"] = {n: {k: v.to_local().clone() if distributed.is_dtensor(v) else v for k, v in optimizer.state[p].items()}
                        for n, p in model.named_parameters()}
    return out


def engine(model_dir: str, out_dir: Path) -> None:
    E = make_batch(n=7, width=12, seed=3, with_advantages=False)
    probed = train(load(model_dir), 2, probe_E=E)
    plain = train(load(model_dir), 2)
    torch.save({"probed": probed, "plain": plain, "E": E}, out_dir / f"rank{dist.get_rank()}.pt")


@contextlib.contextmanager
def altered_in_fsdp2():
    """Within: the FSDP2 functions (``torch.distributed.fsdp._fully_shard``) from which fprobe's ``Numerics`` is handed a
    torch function it changes (a cast kept in the computation's dtype, an upcast matmul or lookup), as a set of names."""
    import traceback

    from fprobe.model import numerics

    found, original = set(), numerics.Numerics.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        changes = (numerics._casts_down(func, args, kwargs or {}, self.dtype) or func in numerics._LOOKUPS
                   or (func in numerics._MATMULS and any(isinstance(a, torch.Tensor) and numerics.narrower(a.dtype, self.dtype) for a in args)))
        if changes:
            found.update(f.name for f in traceback.extract_stack() if "_fully_shard" in f.filename)
        return original(self, func, types, args, kwargs)

    numerics.Numerics.__torch_function__ = spy
    try:
        yield found
    finally:
        numerics.Numerics.__torch_function__ = original


def precision(model_dir: str, out_dir: Path) -> None:
    """One probed AdamW step of the model in bf16, measured with ``eval_dtype=torch.float64`` twice at the same θ_k and
    θ_{k+1}: as fprobe runs it, and with the embedding lookup's upcast switched off (activations then start in bf16)."""
    from fprobe.model import numerics

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, distributed_config=DistributedConfig(fsdp_size=2))
    E = make_batch(n=5, width=10, seed=4, with_advantages=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    U = make_batch(n=4, width=10, seed=200 + dist.get_rank())
    policy_gradient_loss(model, U).backward()
    model.eval()
    theta_k = {n: p.detach().to_local().clone() for n, p in model.named_parameters()}
    whole_k = whole(model)
    policy = sharded.ShardedPolicy(model, eval_dtype=torch.float64)
    lookups = numerics._LOOKUPS
    with altered_in_fsdp2() as altered:
        starts = {"upcast": sharded.at_start(policy, E)}
    numerics._LOOKUPS = set()
    starts["bf16 activations"] = sharded.at_start(policy, E)
    numerics._LOOKUPS = lookups
    optimizer.step()
    delta = numerics.exact_delta({n: p.detach().to_local() for n, p in model.named_parameters()}, theta_k)
    records = {"upcast": sharded.after_update(policy, E, starts["upcast"], delta)._asdict()}
    numerics._LOOKUPS = set()
    records["bf16 activations"] = sharded.after_update(policy, E, starts["bf16 activations"], delta)._asdict()
    numerics._LOOKUPS = lookups
    torch.save({"records": records, "E": E, "theta_k": whole_k, "theta_k1": whole(model), "resharded": sharded.is_resharded(model),
                "altered_in_fsdp2": altered},
               out_dir / f"rank{dist.get_rank()}.pt")


def uneven(model_dir: str, out_dir: Path) -> None:
    model = load(model_dir).eval()
    policy = sharded.ShardedPolicy(model)
    sizes = []
    for n in (3, 1):
        E = make_batch(n=n, width=8, seed=n, with_advantages=False)
        stats = sharded.forward(policy, E, micro_batch=1)
        zeros = torch.zeros(n, 8, dtype=torch.float64)
        sharded.gradient(policy, E, zeros, E.response_mask.double(), micro_batch=1)
        sizes.append(stats.logp.shape[0])
    with torch.no_grad():
        model(E.input_ids)
    gathered = not sharded.is_resharded(model)  # what a no-grad forward leaves: the check can fail
    sharded.reshard(model)
    try:
        fprobe.Policy(model)
        refusal = "none"
    except ValueError as error:
        refusal = str(error)
    (out_dir / f"rank{dist.get_rank()}.txt").write_text(" ".join(map(str, [*sizes, gathered, sharded.is_resharded(model)])) + "\n" + refusal)


def main(out_dir: str, qwen2: str, llama: str, untied_adder: str, tied_adder: str) -> None:
    """Everything test_sharded.py asks of the two ranks, in one launch: the engine on both architectures, the
    uneven batches, the TRL run (``sharded_trl.run``); each writes under its own folder of OUT_DIR."""
    import sharded_trl

    dist.init_process_group("gloo")
    out = Path(out_dir)
    for folder in ("qwen2", "llama", "precision", "uneven", "trl"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    try:
        for name, model_dir in (("qwen2", qwen2), ("llama", llama)):
            engine(model_dir, out / name)
        precision(qwen2, out / "precision")
        uneven(qwen2, out / "uneven")
        sharded_trl.run(untied_adder, tied_adder, out / "trl")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
