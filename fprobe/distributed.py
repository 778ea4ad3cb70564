"""Data parallelism on ``torch.distributed`` (launched with ``torchrun``; gloo on CPU, nccl on GPU).

Every rank holds the same parameters, optimizer state and *global* batches E and U; each pass
works on the rank's contiguous block of rows (``shard``), then per-row statistics are gathered in
row order and gradients are all-reduced (one flat bucket per dtype). Everything downstream — the
loss normaliser, SNIS sums, jvp contractions, δH₂, the sweep, the decomposition — then sees the
global batch and equals the single-process result up to the order of floating-point sums.
Without an initialised process group (or with one process) every function here is the identity.
"""

import contextlib
import contextvars
import datetime
import os

import torch
import torch.distributed as dist

from fprobe import tree


_ALONE = contextvars.ContextVar("fprobe_this_rank_alone", default=False)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group, or inside ``alone()``."""
    if dist.is_available() and dist.is_initialized() and not _ALONE.get():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def alone():
    """Within: fprobe's passes on this rank run as one process (no row blocks, no collectives), e.g. on rank 0's
    gathered copy of a sharded model while the other ranks wait."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def broadcast_from_main(value):
    """Rank 0's ``value`` (a small picklable object) on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_main() -> bool:
    return world()[0] == 0


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [start, stop) of ``rank``: contiguous blocks, the first n mod size ranks one row longer."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def local_rows(n: int) -> slice:
    """This rank's slice of a global batch of n rows."""
    return slice(*shard_bounds(n, *world()))


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's [n_r, ...] block in rank order (uneven blocks allowed)."""
    rank, size = world()
    if size == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    blocks = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(blocks, padded)
    return torch.cat([b[: int(c.item())] for b, c in zip(blocks, counts)])


def gather_lists(items: list) -> list:
    """Concatenate every rank's Python list in rank order (small, picklable items: sampled token ids)."""
    if world()[1] == 1:
        return items
    lists = [None] * world()[1]
    dist.all_gather_object(lists, items)
    return [x for part in lists for x in part]


def all_reduce_tree(grads: tree.Params) -> tree.Params:
    """Σ over ranks of a name-keyed tree, as one flat all-reduce per dtype."""
    if world()[1] == 1:
        return grads
    out = dict(grads)
    for dtype in {g.dtype for g in grads.values()}:
        names = [n for n, g in grads.items() if g.dtype == dtype]
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        dist.all_reduce(flat)
        for n, piece in zip(names, flat.split([grads[n].numel() for n in names])):
            out[n] = piece.view_as(grads[n])
    return out


def all_reduce_sum(value: float, device) -> float:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def init_from_env(timeout_s: float = 300.0) -> bool:
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1): nccl on CUDA, gloo
    otherwise, with a timeout so that a failed rank makes the others exit instead of hanging."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


# ---------------------------------------------------------------------------------------------
# sharded parameters (FSDP2): every rank makes the same collective calls


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter is one)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's trainable parameters are DTensors (FSDP2: each rank holds a shard)."""
    return any(p.requires_grad and is_dtensor(p) for p in model.parameters())


def local_part(x: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view, no copy); a plain tensor as it is."""
    return x.to_local() if is_dtensor(x) else x


def lockstep_block(n: int, rank: int, size: int) -> tuple[list[int], int]:
    """(rank's global row indices of a batch of n rows, how many of them are its own): the contiguous block of
    ``shard_bounds``, padded to ⌈n / size⌉ rows with repeats of a row (its last, or the batch's last for a rank
    with none), so that every rank runs the same number of passes over the same number of rows — with sharded
    parameters each forward is a collective, and unequal call counts hang."""
    start, stop = shard_bounds(n, rank, size)
    width = -(-n // size)
    filler = stop - 1 if stop > start else n - 1
    return list(range(start, stop)) + [filler] * (width - (stop - start)), stop - start


def lockstep_rows(n: int) -> tuple[list[int], int]:
    """This rank's ``lockstep_block`` of a batch of n rows."""
    return lockstep_block(n, *world())
