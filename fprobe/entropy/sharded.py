"""ΔH_true and δH₁ of a model whose parameters are sharded by FSDP2, measured through the engine itself.

``functional_call`` on an FSDP2 module ignores the parameters it is given, and forward-mode AD does not
pass its all-gathers: nothing here evaluates the model at parameters it does not hold. Instead

- Ĥ(θ_k) and Ĥ(θ_{k+1}) come from forwards of the sharded module while it holds θ_k, then θ_{k+1}
  (fprobe's attention and float64 handling inside, ``fprobe_numerics``);
- ∇Ĥ(θ_k) comes from FSDP2's own backward into ``.grad`` (the trainer's gradients set aside and put back,
  the very tensor objects); FSDP2 reduce-scatters the *mean* over ranks of each rank's gradient, and each
  rank's functional covers its own rows of E, so the gradient of the whole functional is that mean × the
  number of ranks;
- δH₁ = ⟨∇Ĥ(θ_k), Δθ⟩ = Σ over ranks of the local dot of the shards (one all-reduce).

Every forward of a sharded module is a collective (its all-gathers), so every rank runs the same number of
passes over the same number of rows (``distributed.lockstep_rows``: rows padded with repeats that carry
no weight), and after fprobe's passes every FSDP module is resharded (a no-grad forward leaves the root's
parameters gathered). Memory beyond the trainer's: the gradient's shard (one rank's shard of the trainable
parameters) and E's statistics; the caller keeps θ_k's shard for Δθ.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fprobe import distributed
from fprobe import tree
from fprobe.entropy import estimators, uncertainty
from fprobe.model import attention, passes
from fprobe.model.policy import check_no_dropout, computation_dtype, fprobe_numerics, last_logits, position_ids_from_mask
from fprobe.model.tokens import TokenStats, token_stats
from fprobe.rollouts import Rollouts, check_token_ids

DEFAULT_MICRO_BATCH = passes.DEFAULT_MICRO_BATCH
GRADIENT_PATH = (f"sharded parameters (FSDP2): {uncertainty.GRADIENT_PATH}; gather=True adds its standard error "
                 "(by jvp on rank 0's whole parameters)")


@dataclass(frozen=True, eq=False)
class ShardedPolicy:
    """π_θ = softmax(logits / temperature) of an FSDP2-sharded causal LM at the parameters it holds now.

    It has ``fprobe.Policy``'s ``apply``, ``device``, ``model``, ``temperature`` and ``chunk_size``, so that
    fprobe's token statistics and sampling run on it, except that ``apply`` takes no parameters (``params``
    must be None): the module runs its own, gathered by FSDP2. Its passes compute in ``dtype`` (``eval_dtype``, else
    the widest parameter dtype and at least float32, as ``fprobe.Policy``): FSDP2's gathered parameters cannot be
    swapped for upcast copies, so ``fprobe.model.numerics.Numerics`` upcasts the embedding lookup's output, after
    which matrix products upcast the narrower weights they meet and elementwise operations promote."""

    model: torch.nn.Module
    temperature: float = 1.0
    chunk_size: int | None = None
    eval_dtype: torch.dtype | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_sharded(self.model)
        check_no_dropout(self.model)
        computation_dtype(self.model, self.eval_dtype)

    @property
    def dtype(self) -> torch.dtype:
        return computation_dtype(self.model, self.eval_dtype)

    @property
    def device(self) -> torch.device:
        return distributed.local_part(next(self.model.parameters())).device

    def apply(self, params, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        """Logits [B, L, V] of the module at the parameters it holds, divided by the temperature (``keep_last``: as
        ``Policy.apply``)."""
        if params is not None:
            raise ValueError("a sharded model runs at the parameters it holds: params must be None")
        check_no_dropout(self.model)
        check_token_ids(input_ids, self.model.get_input_embeddings().num_embeddings)
        attention_mask = attention_mask.to(self.device)
        with fprobe_numerics(self.model, self.device, self.dtype):
            forward = lambda **head: self.model(input_ids.to(self.device), attention_mask=attention_mask,
                                                position_ids=position_ids_from_mask(attention_mask), use_cache=False, **head)
            logits = last_logits(forward, self.model, keep_last)
        return logits if self.temperature == 1.0 else logits / self.temperature


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name (DTensors for a sharded model)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_sharded(model: torch.nn.Module) -> None:
    """ValueError unless every trainable parameter is a DTensor sharded along one dimension of a mesh that spans
    every rank (FSDP2 over the whole world): then the sum over ranks of the local dots is the whole dot."""
    params = trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to probe")
    plain = [name for name, p in params.items() if not distributed.is_dtensor(p)]
    if plain:
        raise ValueError(
            f"{plain[0]!r} (and {len(plain) - 1} more trainable parameters) is not sharded while others are: "
            "fprobe's sharded mode needs every trainable parameter managed by FSDP2"
        )
    size = distributed.world()[1]
    for name, p in params.items():
        placements = p.placements
        if p.device_mesh.ndim != 1 or p.device_mesh.size() != size or not placements[0].is_shard():
            raise ValueError(
                f"{name!r} is placed {placements} on a mesh of shape {tuple(p.device_mesh.shape)}: fprobe's sharded "
                f"mode supports FSDP2 sharding over all {size} ranks (no HSDP replicas, no tensor parallelism)"
            )


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: torch.nn.Module) -> None:
    """Free every FSDP module's gathered parameters: each holds its shard only, as the trainer left it."""
    for module in _fsdp_modules(model):
        module.reshard()


def is_resharded(model: torch.nn.Module) -> bool:
    """Whether every parameter the modules hold is a shard (FSDP2 swaps in plain gathered tensors while unsharded)."""
    return all(distributed.is_dtensor(p) for p in model.parameters())


class _Lockstep(NamedTuple):
    """This rank's rows of a batch for sharded passes: the padded block (``distributed.lockstep_rows``), their
    global indices, and how many of them (the first ``n_real``) are its own; the rest are padding."""

    rows: Rollouts
    index: torch.Tensor
    n_real: int


def lockstep(batch: Rollouts) -> _Lockstep:
    index, n_real = distributed.lockstep_rows(len(batch))
    return _Lockstep(batch.select(index), torch.tensor(index), n_real)


def micro_batches(block: _Lockstep, micro_batch: int | None) -> list[tuple[Rollouts, slice]]:
    """(micro-batch, its slice of the block); the same count on every rank, as every block has the same length."""
    size = len(block.rows) if micro_batch is None else micro_batch
    return [(block.rows.select(slice(i, i + size)), slice(i, i + size)) for i in range(0, len(block.rows), size)]


def forward(policy: ShardedPolicy, batch: Rollouts, micro_batch=DEFAULT_MICRO_BATCH) -> TokenStats:
    """(ℓ, h) of every row of ``batch``, in order, on every rank, at the parameters the module holds (no graph
    kept); the module is resharded after."""
    block = lockstep(batch)
    try:
        with torch.no_grad():
            parts = [token_stats(policy, None, mb) for mb, _ in micro_batches(block, micro_batch)]
    finally:
        reshard(policy.model)
    own = lambda field: distributed.gather_rows(torch.cat(field)[: block.n_real])
    return TokenStats(*(own(field) for field in zip(*parts)))


def gradient(policy: ShardedPolicy, batch: Rollouts, alpha: torch.Tensor, beta: torch.Tensor, micro_batch=DEFAULT_MICRO_BATCH) -> tree.Params:
    """This rank's shards of ∇_θ Σ_ik (α_ik ℓ_ik + β_ik h_ik) over the whole batch (α, β: [n, L] for every row),
    by FSDP2's backward at the parameters the module holds. The trainer's ``.grad`` are set aside and put back
    (the same objects); the module is resharded after. Padding rows of the lockstep block get zero weight."""
    params = trainable(policy.model)
    block = lockstep(batch)
    weight = (torch.arange(len(block.rows)) < block.n_real).double()[:, None]
    alpha_block, beta_block = alpha.cpu()[block.index] * weight, beta.cpu()[block.index] * weight
    saved = {name: p.grad for name, p in params.items()}  # the trainer's gradients: put back, the same tensors
    for p in params.values():
        p.grad = None
    try:
        for mb, rows in micro_batches(block, micro_batch):
            with torch.enable_grad(), attention.for_reverse_mode():
                stats = token_stats(policy, None, mb)
                device = stats.logp.device
                value = (alpha_block[rows].to(device) * stats.logp).sum() + (beta_block[rows].to(device) * stats.entropy).sum()
                value.backward()
        size = distributed.world()[1]
        return {
            name: torch.zeros_like(distributed.local_part(p.detach())) if p.grad is None else distributed.local_part(p.grad).detach() * size
            for name, p in params.items()
        }
    finally:
        for name, p in params.items():
            p.grad = saved[name]
        reshard(policy.model)


def dot(a: tree.Params, b: tree.Params) -> float:
    """⟨a, b⟩ of whole trees from this rank's shards: Σ over ranks of the local float64 dots."""
    device = next(iter(a.values())).device
    local = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    return distributed.all_reduce_sum(local, device)


class _AtStart(NamedTuple):
    """What is kept at θ_k for the measurement after the update: E's statistics at θ_k (every row), Ĥ's
    denominators and this rank's shards of ∇Ĥ(θ_k)."""

    stats0: TokenStats
    denom: torch.Tensor
    gradient: tree.Params


class _ShardedChange(NamedTuple):
    """Ĥ at θ_k and θ_{k+1}, ΔH_true by SNIS, δH₁ = ⟨∇Ĥ(θ_k), Δθ⟩, the ESS fraction at θ_{k+1}, ‖Δθ‖, the dtype
    the passes computed in; the standard errors over E's independent units (``fprobe.entropy.uncertainty`` on the
    gathered rows: the single-process values), δH₁'s and the ratio's None (``se_undefined`` says why:
    ``GRADIENT_PATH``), δH₂'s None (not computed)."""

    h_orig: float
    h_upd: float
    delta_h_true: float
    delta_h1: float
    ess_fraction: float
    delta_l2: float
    eval_dtype: str
    h_orig_se: float | None
    h_upd_se: float | None
    delta_h_true_se: float | None
    delta_h1_se: float | None
    delta_h2_se: float | None
    ratio_se: float | None
    se_units: int
    se_undefined: dict


def at_start(policy: ShardedPolicy, E: Rollouts, micro_batch=DEFAULT_MICRO_BATCH) -> _AtStart:
    """At θ_k (the module holds it): a forward of E, the coefficients of δH₁ (token-normalised Rao–Blackwell
    SNIS, ``estimators.first_order_coefficients``) and the gradient pass."""
    stats0 = forward(policy, E, micro_batch)
    alpha, beta = estimators.first_order_coefficients(stats0, E.response_mask)
    denom = estimators.denominators(E.response_mask.to(stats0.logp.device), "token")
    return _AtStart(stats0, denom, gradient(policy, E, alpha, beta, micro_batch))


def after_update(policy: ShardedPolicy, E: Rollouts, start: _AtStart, delta: tree.Params, micro_batch=DEFAULT_MICRO_BATCH) -> _ShardedChange:
    """At θ_{k+1} (the module holds it): Ĥ by SNIS with log w_i = S_i(θ_{k+1}) − S_i(θ_k), and δH₁ along ``delta``,
    this rank's shards of Δθ = θ_{k+1} − θ_k (names as the trainable parameters')."""
    rows0 = estimators.rows(start.stats0)
    h0 = float(estimators.snis_value(rows0.logp, rows0.entropy, rows0.logp, start.denom))
    moved = estimators.rows(forward(policy, E, micro_batch))
    new = estimators.snis(moved, rows0.logp, start.denom)
    errors = uncertainty.of_statistics(start.stats0, E.response_mask, groups=E.group_ids, moved=moved,
                                       missing=dict.fromkeys(("n1", "m1"), GRADIENT_PATH))
    se = {f"{name}_se": errors.se.get(name) for name in uncertainty.ESTIMATES}
    return _ShardedChange(h0, float(new.value), float(new.value) - h0, dot(start.gradient, delta), float(new.ess_fraction),
                          math.sqrt(dot(delta, delta)), str(policy.dtype), **se, se_units=errors.n_units,
                          se_undefined=errors.undefined)


# ---------------------------------------------------------------------------------------------
# whole parameters, gathered on rank 0 (``gather=True``)


def gathered_state(model: torch.nn.Module) -> dict | None:
    """The model's whole state dict (every parameter and persistent buffer) on rank 0's CPU, None on the other
    ranks: torch's ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, a collective every rank calls."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if distributed.is_main() else None


def whole_trainable(model: torch.nn.Module, state: dict) -> tree.Params:
    """The trainable parameters, by name, from a gathered state dict."""
    missing = [name for name in trainable(model) if name not in state]
    if missing:
        raise ValueError(f"the gathered state dict has no {missing[0]!r}: its names are not the model's parameter names")
    return {name: state[name] for name in trainable(model)}


def replica(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """An unsharded CPU model of ``model``'s architecture and configuration holding the gathered ``state``, in eval
    mode, its trainable parameters those of ``model``: what fprobe's functional paths run on."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "distributed_config"):
        del config.distributed_config
    with torch.random.fork_rng(devices=[]):  # its random initialisation must not draw from the run's generator
        copy_model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    copy_model.load_state_dict(state)
    names = set(trainable(model))
    for name, p in copy_model.named_parameters():
        p.requires_grad_(name in names)
    return copy_model.eval()
