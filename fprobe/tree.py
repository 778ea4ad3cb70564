"""Name-keyed parameter pytrees: ``dict[str, Tensor]`` with names as in ``named_parameters()``.

Every tree is built by ``optree.tree_map`` over a reference tree, so primal and tangent trees
that cross the ``torch.func`` boundary share structure and key order.
"""

from collections.abc import Mapping

import optree
import torch

Params = dict[str, torch.Tensor]


def tree_map(fn, tree: Params, *rest: Params) -> Params:
    """``fn`` applied leaf-wise; the result keeps ``tree``'s key order."""
    return optree.tree_map(fn, tree, *rest)


def check_names(reference: Mapping, tree: Mapping, what: str = "tree") -> None:
    """Raise ``ValueError`` listing the names of ``reference`` missing from ``tree`` and the unexpected ones."""
    missing = [k for k in reference if k not in tree]
    unexpected = [k for k in tree if k not in reference]
    if missing or unexpected:
        raise ValueError(
            f"{what}: names do not match the parameters; "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )


def check_like(reference: Mapping, tree: Mapping, what: str = "tree") -> Params:
    """``tree`` as a plain dict in ``reference``'s key order, after checking names (``check_names``),
    shapes, dtypes and devices; raises ``ValueError`` naming the first mismatch and its parameter."""
    check_names(reference, tree, what)
    for name, ref in reference.items():
        leaf = tree[name]
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(leaf).__name__}, not a tensor")
        for attribute in ("shape", "dtype", "device"):
            mine, theirs = getattr(leaf, attribute), getattr(ref, attribute)
            if mine != theirs:
                shown = (lambda v: tuple(v)) if attribute == "shape" else str
                raise ValueError(f"{what}[{name!r}] has {attribute} {shown(mine)}, the parameter has {shown(theirs)}")
    return {name: tree[name] for name in reference}


def all_finite(leaves) -> bool:
    """Whether every entry of every tensor is finite, from one cheap reduction per tensor and one
    synchronisation per device: a NaN or an Inf makes its tensor's sum non-finite (NaN and Inf propagate
    through additions in any order); a sum that is not finite without one (overflow) only sends
    ``first_nonfinite`` to its exact, entry-wise check."""
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for x in leaves:
        if x.is_floating_point() or x.is_complex():
            sums.setdefault(x.device, []).append(x.sum().reshape(1))
    return all(bool(torch.isfinite(torch.cat(parts)).all()) for parts in sums.values())


def first_nonfinite(tree: Mapping) -> str | None:
    """Name of the first leaf holding a NaN or Inf, or None (the entry-wise check runs only when
    ``all_finite`` finds a non-finite sum)."""
    if all_finite(tree.values()):
        return None
    return next((name for name, x in tree.items() if not bool(torch.isfinite(x).all())), None)


def check_finite(tree: Mapping, what: str) -> None:
    """Raise ``FloatingPointError`` naming the first parameter whose ``what`` is not finite."""
    name = first_nonfinite(tree)
    if name is not None:
        raise FloatingPointError(f"{what} of parameter {name!r} is not finite (NaN or Inf)")


def add(a: Params, b: Params) -> Params:
    return tree_map(torch.add, a, b)


def sub(a: Params, b: Params) -> Params:
    return tree_map(torch.sub, a, b)


def scale(a: Params, s: float) -> Params:
    return tree_map(lambda x: x * s, a)


def axpy(alpha: float, x: Params, y: Params) -> Params:
    """α·x + y."""
    return tree_map(lambda xi, yi: torch.add(yi, xi, alpha=alpha), x, y)


def zeros_like(a: Params) -> Params:
    return tree_map(torch.zeros_like, a)


def detach(a: Mapping) -> Params:
    return {name: x.detach() for name, x in a.items()}


_CHUNK = 1 << 16  # entries per float64 chunk of a reduction: 512 KiB, which stay in the cache (2²⁰-entry chunks, 8 MiB,
# were mapped afresh each time on a CPU: 3.5× slower at 0.5B parameters)


def _float64_chunks(x: torch.Tensor):
    """x's entries in float64, ``_CHUNK`` at a time: views of a float64 tensor, else copies into one buffer that each
    chunk reuses once the previous one has been read (a fresh upcast per chunk took twice as long)."""
    flat = x.reshape(-1)
    if flat.dtype == torch.float64:
        yield from flat.split(_CHUNK)
        return
    buffer = torch.empty(min(_CHUNK, flat.numel()), dtype=torch.float64, device=x.device)
    for chunk in flat.split(_CHUNK):
        yield buffer[: len(chunk)].copy_(chunk)


@torch.no_grad()
def dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x, y⟩ of two tensors accumulated in float64, 2¹⁶ entries at a time: no float64 copy of a whole tensor (at
    0.5B parameters two such copies of a gradient tree were 8 GB of fresh memory, a quarter of a step's time on a CPU).
    A reduction for reporting: not differentiable."""
    if x.numel() != y.numel():
        raise ValueError(f"dot64 of tensors of {x.numel()} and {y.numel()} entries")
    if y is x:  # ‖x‖²: each chunk upcast once
        parts = [torch.vdot(a, a) for a in _float64_chunks(x)]
    else:
        parts = [torch.vdot(a, b) for a, b in zip(_float64_chunks(x), _float64_chunks(y))]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=x.device)


def leaf_sum(values: Params) -> torch.Tensor:
    """Σ of one float64 scalar per leaf, in the tree's leaf order (so that sums made a leaf at a time, in any order, round
    as ``vdot`` rounds)."""
    leaves = optree.tree_leaves(values)
    return torch.stack(leaves).sum() if leaves else torch.zeros((), dtype=torch.float64)


def vdot(a: Params, b: Params) -> torch.Tensor:
    """⟨a, b⟩ accumulated in float64."""
    return leaf_sum(tree_map(dot64, a, b))


def leaf_norms(a: Params) -> Params:
    """‖a_name‖₂ per leaf, in float64."""
    return tree_map(lambda x: dot64(x, x).sqrt(), a)


def norm(a: Params) -> torch.Tensor:
    """Global L2 norm √Σ‖a_name‖², in float64."""
    return leaf_sum(tree_map(lambda x: dot64(x, x), a)).sqrt()


def top_k(a: Params, k: int = 10) -> list[tuple[str, float]]:
    """The k names with the largest ‖a_name‖₂, largest first."""
    norms = {name: float(v) for name, v in leaf_norms(a).items()}
    return sorted(norms.items(), key=lambda kv: kv[1], reverse=True)[:k]
