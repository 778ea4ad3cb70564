"""Exact decomposition of δH₁ over the update batch's sequences and tokens.

Which samples of U drive the entropy change? δH₁ = ⟨u, Δθ⟩ with u = ∇Ĥ(θ₀) on E, Ĥ the SNIS
estimator of the entropy at θ₀ + Δθ (exactly the linear functional of E's token statistics whose
contraction with the jvp tangents gives δH₁). Each optimizer writes its update as an affine function
of the (clipped) full-batch gradient g = c · Σ_j ∇L_j, given the states before and after the step, with λ_d
the multiple of θ₀ that weight decay subtracts (−ηλ for AdamW; ``Optimizer.affine``; the formulas live with each optimizer in ``fprobe.optim``):

    Δθ = gain ⊙ g + momentum + λ_d θ₀                                                      (1)

so that, exactly,

    δH₁ = ⟨u, momentum⟩ + λ_d ⟨u, θ₀⟩ + Σ_j δH_j,   δH_j = c · ⟨gain ⊙ u, ∇L_j⟩,          (2)

and, with L_j = Σ_k L_jk (``losses.token_losses``) and ℓ̇_jk = ⟨∇ℓ_jk, gain ⊙ u⟩,
δH_jk = c · (∂L_jk/∂ℓ_jk) ℓ̇_jk, which on policy (ratio 1) is c · (−c_j A_j) · ℓ̇_jk; Σ_k δH_jk = δH_j.
Rows with A_j = 0 contribute exactly zero.

Cost: one reverse-mode pass (vjp) on E for u, and one forward-mode pass (jvp) on U along gain ⊙ u
for ℓ̇ of every token at once; the rest is tensor algebra on [B, L] and parameter-sized trees.
No per-sample gradient is ever materialised. Parameter-sized float64 temporaries (the optimizer's gain and
momentum) are made one parameter at a time.
"""

import time
from dataclasses import dataclass

import torch

from fprobe.rl import losses
from fprobe.model import passes
from fprobe import records
from fprobe import tree
from fprobe.rollouts import Rollouts
from fprobe.warnings import DecompositionWarning, warn

RESIDUAL_WARNING = 1e-3


@dataclass(frozen=True, eq=False, kw_only=True)
class Contributions(records.Record):
    """δH₁ of one RL step = ``momentum`` + ``decay`` + Σ_j ``per_sequence``[j], exactly (up to rounding).

    ``per_sequence`` [B] is aligned with U's rows; ``per_token`` [B, L] float64 (zero off
    ``response_mask``) sums over each row to ``per_sequence``. Row metadata: ``group_ids``,
    ``rewards``, ``advantages``, ``lengths`` (response tokens) and ``mean_logp`` (mean token
    log-prob at θ₀), the quantities of Cui et al.'s covariance picture. ``residual`` = δH₁ −
    (momentum + decay + Σ per_sequence); ``delta_h1_grad`` = ⟨∇Ĥ, Δθ⟩ is the same δH₁ by the
    gradient, a cross-check independent of the optimizer algebra.

    Cost: one vjp on E (∇Ĥ) and one jvp on U (along gain ⊙ ∇Ĥ), no per-sample gradients.
    """

    delta_h1: float
    momentum: float
    decay: float
    per_sequence: torch.Tensor
    per_token: torch.Tensor
    response_mask: torch.Tensor
    group_ids: torch.Tensor | None
    rewards: torch.Tensor | None
    advantages: torch.Tensor
    lengths: torch.Tensor
    mean_logp: torch.Tensor
    residual: float
    delta_h1_grad: float
    clip_coef: float
    optimizer: str
    lr: float
    timings: dict
    token_ids: torch.Tensor = records.internal()

    @property
    def sequences(self) -> float:
        """Σ_j δH_j."""
        return float(self.per_sequence.sum())

    @property
    def total(self) -> float:
        """momentum + decay + Σ_j δH_j (equals δH₁ up to ``residual``)."""
        return self.momentum + self.decay + self.sequences

    @property
    def relative_residual(self) -> float:
        return abs(self.residual) / abs(self.delta_h1) if self.delta_h1 else abs(self.residual)

    def columns(self) -> dict[str, list]:
        """One list per field, one entry per row of U (``pandas.DataFrame(c.columns())``)."""
        n = len(self.per_sequence)
        plain = lambda x: [None] * n if x is None else x.tolist()
        return {
            "row": list(range(n)),
            "group": plain(self.group_ids),
            "reward": plain(self.rewards),
            "advantage": plain(self.advantages),
            "length": plain(self.lengths),
            "mean_logp": plain(self.mean_logp),
            "delta_h": plain(self.per_sequence),
        }

    def records(self) -> list[dict]:
        """One dict per row of U: row, group, reward, advantage, length, mean_logp, delta_h (δH_j)."""
        cols = self.columns()
        return [dict(zip(cols, values)) for values in zip(*cols.values())]

    def top(self, k: int = 5) -> list[dict]:
        """The k records with the largest |δH_j|, largest first."""
        if k < 0:
            raise ValueError(f"top(k) needs k >= 0, got {k}")
        order = torch.argsort(self.per_sequence.abs(), descending=True, stable=True)[:k].tolist()
        recs = self.records()
        return [recs[i] for i in order]

    def __repr__(self) -> str:
        parts = records.table(
            f"Contributions ({self.optimizer}, lr {records.format_number(self.lr)}, clip coef {records.format_number(self.clip_coef)})",
            [
                ("δH₁", self.delta_h1),
                ("  momentum", self.momentum),
                ("  weight decay", self.decay),
                (f"  Σ sequences ({len(self.per_sequence)})", self.sequences),
                ("sum of parts", self.total),
                ("residual", self.residual),
                ("relative residual", self.relative_residual),
            ],
        )
        fmt = records.cell
        head = f"{'row':>4} {'group':>5} {'reward':>8} {'advantage':>10} {'T':>4} {'mean logp':>10} {'δH_j':>12}"
        lines = [
            f"{r['row']:>4} {'—' if r['group'] is None else r['group']:>5} {fmt(r['reward'], 8)} {fmt(r['advantage'], 10)} "
            f"{r['length']:>4} {fmt(r['mean_logp'], 10)} {fmt(r['delta_h'], 12)}"
            for r in self.top(5)
        ]
        return "\n".join([parts, "top rows by |δH_j|:", head, *lines])

    def plot(self, path=None):
        """δH_j against the advantage A_j and against the mean token log-prob (scatter, one point per row)."""
        from fprobe.plots import plot_contributions

        return plot_contributions(self, path)

    def plot_tokens(self, row: int, path=None, labels=None):
        """Heat-strip of row ``row``'s per-token contributions δH_jk over its response; ``labels`` are
        optional token strings (one per response token) or a tokenizer with ``decode``."""
        from fprobe.plots import plot_token_contributions

        return plot_token_contributions(self, row, path, labels)


def decompose(context, take_step, U: Rollouts, optimizer, delta_h1: float | None, loss, clip: float, *,
              micro_batch: int | None = None, progress: bool = False) -> Contributions:
    """Exact per-sequence and per-token parts of δH₁ of one RL step (see the module docstring).

    ``context``: θ₀ and Ĥ's linear functional on E (``fprobe.entropy.context.Context``); ``take_step(order)``: the
    ``rl_step`` taken from θ₀ on U with ``optimizer``, ``loss`` and ``clip`` (its row weights c_j are the loss's), as a
    ``fprobe.rl.step.StepByParameter`` whose updates come in ``order`` (``rl_step_by_parameter``, or ``by_parameter``
    of a kept step); it is called once ∇Ĥ is computed. ``delta_h1``: δH₁ along the step's Δθ (None: ⟨∇Ĥ, Δθ⟩ from
    this decomposition's own gradient). ``micro_batch``: rows per pass (None: the whole batch). Cost: one vjp of Ĥ's
    linear functional on E (u = ∇Ĥ) and one jvp of U's token log-probs along gain ⊙ u; no per-sample gradient is
    materialised. Memory: u becomes gain ⊙ u in place, one parameter at a time, smallest first (so that the largest
    parameters' float64 temporaries meet a step whose other gradients are gone). Returns the ``Contributions``.
    """
    if U.advantages is None:
        raise ValueError("the update batch has no advantages")
    ctx = context
    policy, params = ctx.policy, ctx.params
    timings = {}

    start = time.perf_counter()
    _, tangent, _ = passes.gradient(policy, params, ctx.E, passes.linear_functional(ctx.alpha, ctx.beta), micro_batch, progress)
    timings["vjp_E"] = time.perf_counter() - start

    start = time.perf_counter()
    step = take_step(sorted(params, key=lambda name: params[name].numel()))
    timings["step"] = time.perf_counter() - start

    start = time.perf_counter()
    momenta, decays, along_delta = {}, {}, {}
    for update in step.updates:
        name = update.name
        u = tangent[name]  # ∇Ĥ of this parameter; the float64 dots upcast it a chunk at a time
        along_delta[name] = tree.dot64(u, update.delta)
        ((_, terms),) = optimizer.affine(update.state, update.new_state, {name: params[name]}, step.lr)
        del update
        if terms.momentum is not None:
            momenta[name] = tree.dot64(u, terms.momentum)
        if terms.decay_rate:
            decays[name] = terms.decay_rate * tree.dot64(u, params[name])
        gain = terms.gain
        del terms
        tangent[name] = (gain.mul_(u) if isinstance(gain, torch.Tensor) else u.double().mul_(gain)).to(params[name].dtype)
        del u, gain
    missing = [name for name in params if name not in along_delta]
    if missing:
        raise ValueError(f"the step's updates miss parameters {missing[:8]}")
    momentum, decay = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for name in params:  # summed in the parameters' order, whatever order the updates came in
        momentum = momentum + momenta[name] if name in momenta else momentum
        decay = decay + decays[name] if name in decays else decay
    delta_h1_grad = float(tree.leaf_sum(along_delta))  # ⟨∇Ĥ, Δθ⟩ as tree.vdot sums it
    delta_h1 = delta_h1_grad if delta_h1 is None else float(delta_h1)
    timings["parts"] = time.perf_counter() - start

    start = time.perf_counter()
    jet = passes.jet(policy, params, tangent, U, order=1, micro_batch=micro_batch, progress=progress)
    timings["jvp_U"] = time.perf_counter() - start

    mask = U.response_mask.to(jet.tangent.logp.device)
    logp0 = (step.logp if step.logp is not None else jet.value.logp).to(jet.tangent.logp.device)
    weights = losses.row_weights(U, loss)
    token_loss = lambda logp: losses.token_losses(logp, U, weights, clip)
    _, loss_dot = torch.func.jvp(token_loss, (logp0,), (jet.tangent.logp,))
    per_token = (loss_dot * step.clip_coef).double() * mask
    per_sequence = per_token.sum(-1)
    momentum, decay = float(momentum), float(decay)
    lengths = U.lengths
    contributions = Contributions(
        delta_h1=float(delta_h1),
        momentum=momentum,
        decay=decay,
        per_sequence=per_sequence.cpu(),
        per_token=per_token.cpu(),
        response_mask=U.response_mask.cpu(),
        group_ids=None if U.group_ids is None else U.group_ids.cpu(),
        rewards=None if U.rewards is None else U.rewards.double().cpu(),
        advantages=U.advantages.double().cpu(),
        lengths=lengths.cpu(),
        mean_logp=((logp0 * mask).sum(-1) / lengths.to(mask.device)).double().cpu(),
        residual=float(delta_h1) - (momentum + decay + float(per_sequence.sum())),
        delta_h1_grad=delta_h1_grad,
        clip_coef=float(step.clip_coef),
        optimizer=optimizer.name,
        lr=float(step.lr),
        timings=timings,
        token_ids=U.input_ids.cpu(),
    )
    if contributions.relative_residual > RESIDUAL_WARNING:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
        warn(
            f"the parts of δH₁ miss it by {contributions.relative_residual:.2g} of its size (parameters in {', '.join(dtypes)}): "
            "the passes are not precise enough for an exact decomposition; use a float64 (or float32) policy",
            DecompositionWarning,
        )
    return contributions
