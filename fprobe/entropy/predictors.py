"""Published logit-space predictors of the entropy change of one RL step, refereed by fprobe.

Each predictor is a pure function of U's token statistics at θ₀ — the log-prob ℓ = log π(y_k | y_<k)
of the sampled token, the full-vocabulary entropy h of its state, and the advantage A of its sequence —
that assumes each state's logits move on their own (the tabular softmax picture). All of them are
multiplied by −η, η the step's learning rate, so that a positive value predicts a rise in entropy.
They are not in the units of a parameter step: the comparison fits the least-squares scale c that
maps each onto the truth, and reports Pearson and Spearman correlations and the fraction of right signs.

The truth, on the same step (``compare``):
  Δh_ik = h_ik(θ₀+Δθ) − h_ik(θ₀) at U's own states (teacher-forced: the prefixes are fixed, so no
  importance sampling is needed), and fprobe's exact first-order term ḣ_ik = d/dε h_ik(θ₀+εΔθ)|₀ by
  one jvp along Δθ — the reference row; and, from a probe result, ΔH_true and δH₁ on E.

Predictors (per token, and the aggregate each paper uses):
  cui_pg   Cui et al. 2025 (arXiv 2505.22617), Theorem 1: policy gradient, ΔH ≈ −η Cov(ℓ, π·A).
  cui_npg  Cui et al. 2025, Theorem 2: natural policy gradient, ΔH ≈ −η Cov(ℓ, A) (fprobe's
           ``cov_baseline``). Both theorems hold per state with the covariance over actions a ~ π(·|s);
           with one sampled token per state the paper estimates it over the batch's tokens, and its
           Clip-Cov/KL-Cov (Sec. 4) rank tokens by the centred product (ℓ_i − ℓ̄)(A_i − Ā): that
           product, times −η, is the per-token value; its (weighted) mean is the covariance.
  wang     Wang et al. 2026 (arXiv 2602.03392), Theorem 3.2: one logit update δz = ε e_k changes the
           entropy by −ε S* + O(ε²), S* = p_k (H + log p_k) the entropy discriminator. Our mapping to
           a step: the sampled token's logit moves with its advantage, ε = η A; aggregate: the token mean.
  wang_grpo  Wang et al. 2026, Theorem 3.3, the GRPO step's form, as the authors' Clip_V computes it
           (Trinity-RFT, ``trinity/algorithm/advantage_fn/clipv_advantage.py``: the per-token score
           xD = N − S with S = p (H + log p); N from ``compute_N_from_logits`` in
           ``examples/entropy/clipv_dp_actor.py``: N = H Σ_v π_v² + Σ_v π_v² log π_v = Σ_v π_v S*_v,
           the π-mean of every token's discriminator). The sampled token's score step
           Δz = ηA ∇_z log π_k = ηA(e_k − π) changes the entropy by ηA(N − S) + O(η²): the per-token
           value; aggregate: the token mean. N needs the full distribution: one more forward pass on U.
  steer    Hao et al. 2025 (STEER, arXiv 2510.10150): token weight Ω = (A/π_old) π (1 − π)(log π + H),
           entropy change ∝ −Ω; on-policy π_old = π. Aggregate: the token mean (STEER's token-mean loss).
           The formula is as the authors' released code computes Ω (``compute_token_weights``); the
           stored text of the paper did not give us its equation number.

Cui et al.'s per-token products are centred over all of U by default; ``compare(..., cov_micro_batch=n)``
centres them within consecutive micro-batches of n rows of U, as verl's Clip-Cov/KL-Cov do
(``verl/trainer/ppo/core_algos.py``, ``compute_policy_loss_clip_cov``: token means over the micro-batch's
response mask; ``verl/workers/actor/dp_actor.py`` splits each mini-batch into
``ppo_micro_batch_size_per_gpu`` rows and calls the loss on each).

Sources: the stored copies of the papers gave their abstracts and, for Wang et al., Theorem 3.2's
statement; Cui et al.'s centred product is as in their released Clip-Cov/KL-Cov code, Wang et al.'s
Theorem 3.3 form as in their Clip_V code (above). Cui et al.'s Theorems 1 and 2 and Wang et al.'s
Theorems 3.2 and 3.3 are checked in tests/test_predictors.py where they are exact: a single-state
softmax whose parameters are the logits.

Scores that are undefined (NaN: a prediction or the truth that is the same at every token, e.g. U with one
response token, or every advantage 0) raise an ``UndefinedScoreWarning`` and are explained in the
comparison's ``undefined``.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from fprobe import checks, records, tree
from fprobe.model import passes, tokens
from fprobe.rollouts import Rollouts
from fprobe.warnings import UndefinedScoreWarning, warn


class TokenInputs(NamedTuple):
    """U's response tokens, flattened in row order: ℓ, h at θ₀, the sequence's advantage A, the collision
    term N = Σ_v π_v² (log π_v + H) of the token's state (None where not computed), and the group within
    which Cui et al.'s products are centred (None: all tokens together)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor
    nec: torch.Tensor | None = None
    groups: torch.Tensor | None = None


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w v / Σ w (the plain mean without weights)."""
    return values.mean() if weights is None else (weights * values).sum() / weights.sum()


def centred(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` less their (weighted) mean; exactly 0 for constant values (their rounded mean can be an ulp off)."""
    if len(values) and bool((values == values[0]).all()):
        return torch.zeros_like(values)
    return values - weighted_mean(values, weights)


def _centred_within(values: torch.Tensor, weights: torch.Tensor | None, groups: torch.Tensor | None) -> torch.Tensor:
    """``centred`` separately within each group of ``groups`` (one label per value; None: all together)."""
    if groups is None:
        return centred(values, weights)
    out = torch.empty_like(values)
    for group in groups.unique():
        at = groups == group
        out[at] = centred(values[at], None if weights is None else weights[at])
    return out


def cui_pg_tokens(logp, advantages, lr: float, weights=None, groups=None) -> torch.Tensor:
    """Cui et al. 2025, Theorem 1 (policy gradient on a tabular softmax, Δz_a = η π(a) A(a)):
    per token −η (ℓ − E ℓ)(πA − E πA); its ``weighted_mean`` is −η Cov(log π, π·A).
    ``weights``: π(a) for an exact expectation over actions; None for sampled tokens. ``groups``: the means
    taken within each group (verl's micro-batches); None: over all tokens."""
    return -lr * _centred_within(logp, weights, groups) * _centred_within(logp.exp() * advantages, weights, groups)


def cui_npg_tokens(logp, advantages, lr: float, weights=None, groups=None) -> torch.Tensor:
    """Cui et al. 2025, Theorem 2 (natural policy gradient, Δz_a = η A(a)): per token
    −η (ℓ − E ℓ)(A − E A); its ``weighted_mean`` is −η Cov(log π, A). ``weights``, ``groups``: as ``cui_pg_tokens``."""
    return -lr * _centred_within(logp, weights, groups) * _centred_within(advantages, weights, groups)


def entropy_discriminator(logp, entropy) -> torch.Tensor:
    """Wang et al. 2026, Theorem 3.2: S* = p (H + log p) of the updated token."""
    return logp.exp() * (entropy + logp)


def wang_tokens(logp, entropy, advantages, lr: float) -> torch.Tensor:
    """Wang et al. 2026, Theorem 3.2: ΔH = −ε S* + O(ε²) for the logit step ε = η A of the sampled token."""
    return -lr * advantages * entropy_discriminator(logp, entropy)


def collision_term(logits: torch.Tensor) -> torch.Tensor:
    """N = H Σ_v π_v² + Σ_v π_v² log π_v = Σ_v π_v S*_v of each row of [N, V] logits, in float64
    (Trinity-RFT's ``compute_N_from_logits``)."""
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    p2 = p * p
    return entropy * p2.sum(-1) + (p2 * logp).sum(-1)


def wang_grpo_tokens(logp, entropy, nec, advantages, lr: float) -> torch.Tensor:
    """Wang et al. 2026, Theorem 3.3 / Clip_V: ΔH = ηA (N − S) + O(η²) for the score step
    Δz = ηA(e_k − π) of the sampled token, S = p (H + log p), N = ``collision_term``."""
    return lr * advantages * (nec - entropy_discriminator(logp, entropy))


def _steer_tokens(logp, entropy, advantages, lr: float) -> torch.Tensor:
    """Hao et al. 2025 (STEER): −η Ω, Ω = (A/π_old) π (1 − π)(log π + H); on-policy π_old = π, so
    Ω = A (1 − π)(log π + H)."""
    return -lr * advantages * (1 - logp.exp()) * (logp + entropy)


class _Predictor(NamedTuple):
    """A published predictor: its name, a one-line citation and its per-token values (inputs, η) -> [N]."""

    name: str
    citation: str
    tokens: Callable[[TokenInputs, float], torch.Tensor]


PREDICTORS = (
    _Predictor("cui_pg", "Cui et al. 2025, Thm 1: −η Cov(log π, π·A)",
              lambda x, lr: cui_pg_tokens(x.logp, x.advantages, lr, groups=x.groups)),
    _Predictor("cui_npg", "Cui et al. 2025, Thm 2: −η Cov(log π, A)",
              lambda x, lr: cui_npg_tokens(x.logp, x.advantages, lr, groups=x.groups)),
    _Predictor("wang", "Wang et al. 2026, Thm 3.2: −ηA·p(H + log p)", lambda x, lr: wang_tokens(x.logp, x.entropy, x.advantages, lr)),
    _Predictor("wang_grpo", "Wang et al. 2026, Thm 3.3 / Clip_V: ηA(N − S), N = Σ_v π_v²(log π_v + H)",
              lambda x, lr: wang_grpo_tokens(x.logp, x.entropy, x.nec, x.advantages, lr)),
    _Predictor("steer", "Hao et al. 2025 (STEER): −η(A/π_old)π(1−π)(log π + H)", lambda x, lr: _steer_tokens(x.logp, x.entropy, x.advantages, lr)),
)
REFERENCE = "fprobe_first_order"


# --- agreement statistics over tokens ---


def least_squares_scale(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """argmin_c Σ (c·p − t)² = Σ p t / Σ p² (NaN when the prediction is identically zero)."""
    denominator = float((predicted * predicted).sum())
    return float((predicted * truth).sum()) / denominator if denominator else float("nan")


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    dx, dy = centred(x), centred(y)
    denominator = float((dx * dx).sum().sqrt() * (dy * dy).sum().sqrt())
    return float((dx * dy).sum()) / denominator if denominator else float("nan")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1…n of ``x``; tied values share the mean of their ranks."""
    values, order = x.sort()
    _, group, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(mean_rank[group])
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson of the average ranks (NaN when either side holds a NaN)."""
    if bool(x.isnan().any() or y.isnan().any()):
        return float("nan")
    return pearson(average_ranks(x), average_ranks(y))


def sign_agreement(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of tokens where sign(prediction) = sign(truth) ≠ 0: a zero prediction counts as wrong, even
    where the truth is 0 too (NaN for no tokens)."""
    right = (predicted.sign() == truth.sign()) & (predicted != 0)
    return float(right.double().mean()) if len(predicted) else float("nan")


class Score(NamedTuple):
    """One predictor against the per-token truth Δh_ik: its aggregate, the scale c minimising
    Σ (c·p − Δh)², Pearson and Spearman correlations, the fraction of right signs over all tokens (a
    zero prediction counts as wrong) and over the tokens where it predicts a change (p ≠ 0); ``intervals``:
    {statistic: [low, high]} 95% bootstrap intervals of scale, Pearson, Spearman and sign agreement over U's
    sequences (None without the tokens' rows)."""

    aggregate: float
    scale: float
    pearson: float
    spearman: float
    sign_agreement: float
    sign_agreement_nonzero: float
    intervals: dict | None = None


_STATISTICS = {"scale": least_squares_scale, "pearson": pearson, "spearman": spearman, "sign_agreement": sign_agreement}
_BOOTSTRAP_DRAWS = 400


def bootstrap_intervals(predicted: torch.Tensor, truth: torch.Tensor, rows: torch.Tensor, draws: int = _BOOTSTRAP_DRAWS,
                        level: float = 0.95, seed: int = 0) -> dict:
    """Percentile intervals of ``_STATISTICS`` over ``draws`` resamples of U's sequences (rows drawn with
    replacement, each with all its tokens: one sequence's tokens are not independent); ``rows`` [tokens] names
    each token's row. Reproducible from ``seed``; a resample whose statistic is NaN is left out."""
    _, row_of = torch.unique(rows, return_inverse=True)
    members = [torch.nonzero(row_of == r).flatten() for r in range(int(row_of.max()) + 1)]
    generator = torch.Generator().manual_seed(seed)
    values = {name: [] for name in _STATISTICS}
    for _ in range(draws):
        index = torch.cat([members[r] for r in torch.randint(len(members), (len(members),), generator=generator).tolist()])
        for name, statistic in _STATISTICS.items():
            values[name].append(statistic(predicted[index], truth[index]))
    tail = (1 - level) / 2
    bounds = lambda x: [float(q) for q in torch.tensor(x, dtype=torch.float64).nanquantile(torch.tensor([tail, 1 - tail], dtype=torch.float64))]
    return {name: bounds(x) for name, x in values.items()}


def score(predicted: torch.Tensor, truth: torch.Tensor, rows: torch.Tensor | None = None) -> Score:
    """The ``Score`` of ``predicted`` against ``truth`` over tokens; with ``rows`` (each token's row of U), its
    bootstrap intervals over U's sequences."""
    nonzero = predicted != 0
    return Score(
        float(predicted.mean()), least_squares_scale(predicted, truth), pearson(predicted, truth),
        spearman(predicted, truth), sign_agreement(predicted, truth), sign_agreement(predicted[nonzero], truth[nonzero]),
        None if rows is None else bootstrap_intervals(predicted, truth, rows),
    )


# --- the truths and the comparison ---


def flat(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Response-token entries of a [B, L] tensor, in row order."""
    return values[mask.to(values.device)].cpu()


def micro_batch_groups(U: Rollouts, rows: int | None) -> torch.Tensor | None:
    """Each response token's micro-batch: its row // ``rows`` (verl splits U into consecutive micro-batches
    of ``rows`` rows); None for no split."""
    if rows is None:
        return None
    row = torch.arange(len(U))[:, None].expand(U.response_mask.shape)
    return flat(row // rows, U.response_mask)


def token_inputs(logp: torch.Tensor, entropy: torch.Tensor, U: Rollouts, nec=None, cov_micro_batch=None) -> TokenInputs:
    """Flatten U's [B, L] statistics (``nec``: N already flat, or None); each token takes its sequence's
    advantage and, with ``cov_micro_batch``, its micro-batch as the centring group."""
    if U.advantages is None:
        raise ValueError("the update batch U has no advantages: the predictors need them")
    advantages = U.advantages.double()[:, None].expand(U.response_mask.shape)
    mask = U.response_mask
    return TokenInputs(flat(logp, mask), flat(entropy, mask), flat(advantages, mask), nec,
                       micro_batch_groups(U, cov_micro_batch))


def collision_terms(policy, params, U: Rollouts, micro_batch=passes.DEFAULT_MICRO_BATCH) -> torch.Tensor:
    """N (``collision_term``) at U's response tokens under π_params, flattened in row order like ``flat``:
    one forward pass, ``tokens.chunk_rows`` states of logits upcast to float64 at a time."""
    parts = []
    with torch.no_grad():
        for batch in U.micro_batches(micro_batch):
            attention_mask = batch.attention_mask.to(policy.device)
            aligned = lambda x: tokens.left_aligned(x.to(policy.device), attention_mask)
            logits = policy.apply(params, aligned(batch.input_ids), aligned(attention_mask))
            states = logits[:, :-1][aligned(batch.response_mask)[:, 1:]]
            parts += [collision_term(rows) for rows in states.split(tokens.chunk_rows(states.shape[-1], states.device))]
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


class _Truths(NamedTuple):
    """At U's response tokens: Δh_ik (exact) and ḣ_ik (fprobe's first order), flattened; inputs at θ₀."""

    delta_h: torch.Tensor
    first_order: torch.Tensor
    inputs: TokenInputs


def truths(
    policy, params, delta, U: Rollouts, new_params=None, micro_batch=passes.DEFAULT_MICRO_BATCH, cov_micro_batch=None,
) -> _Truths:
    """One jvp on U along Δθ (ℓ, h, ḣ at θ₀), one forward pass at θ₀+Δθ (default ``params + delta``) and
    one at θ₀ for N."""
    jet = passes.jet(policy, params, delta, U, micro_batch=micro_batch)
    new_params = tree.add(params, delta) if new_params is None else new_params
    new = passes.forward(policy, new_params, U, micro_batch)
    mask = U.response_mask
    nec = collision_terms(policy, params, U, micro_batch)
    return _Truths(
        flat(new.entropy - jet.value.entropy, mask), flat(jet.tangent.entropy, mask),
        token_inputs(jet.value.logp, jet.value.entropy, U, nec, cov_micro_batch),
    )


def _interval_text(bounds) -> str:
    return "" if bounds is None else f"[{bounds[0]:.3g}, {bounds[1]:.3g}]"


def _undefined_reason(predicted: torch.Tensor, truth: torch.Tensor, inputs: TokenInputs) -> str | None:
    """Why a prediction's correlations and scale are NaN, or None when they are defined."""
    if len(truth) < 2:
        return f"U has {len(truth)} response token(s): correlations need two"
    if bool((truth == truth[0]).all()):
        return "the true Δh is the same at every token of U"
    if bool((predicted == predicted[0]).all()):
        constant = "0" if float(predicted[0]) == 0 else "the same value"
        zero = " (every advantage in U is 0)" if bool((inputs.advantages == 0).all()) else ""
        return f"it predicts {constant} at every token{zero}"
    return None


@dataclass(frozen=True, kw_only=True, repr=False)
class PredictorComparison(records.Record):
    """Each predictor against the truth on one step. ``scores[name]`` holds a ``Score`` as a dict;
    the ``fprobe_first_order`` row is fprobe's own ḣ_ik. ``delta_h_tokens`` is the mean Δh over U's
    response tokens (the aggregate the predictors aim at); ``delta_h_true`` and ``delta_h1`` are the
    probe's on E (None when compared without a probe). ``undefined[name]`` says why that row's scale and
    correlations are NaN (``_undefined_reason``); ``cov_micro_batch``: the rows of U within which Cui et al.'s
    products were centred (None: all of U)."""

    lr: float
    n_tokens: int
    delta_h_tokens: float
    delta_h_true: float | None
    delta_h1: float | None
    scores: dict
    citations: dict
    undefined: dict
    cov_micro_batch: int | None = None
    truth: torch.Tensor = records.internal()
    predicted: dict = records.internal()

    COLUMNS: ClassVar[tuple[str, ...]] = Score._fields[:-1]

    def __repr__(self) -> str:
        head = records.table(
            "PredictorComparison",
            [("lr", self.lr), ("U: response tokens", self.n_tokens), ("mean Δh on U (truth)", self.delta_h_tokens),
             ("ΔH_true on E", self.delta_h_true), ("δH₁ on E", self.delta_h1)],
        )
        width = max(len(name) for name in self.scores)
        lines = [f"{'predictor':<{width}}" + "".join(f"  {c:>14}" for c in self.COLUMNS)]
        for name, s in self.scores.items():
            lines.append(f"{name:<{width}}" + "".join(f"  {records.format_number(s[c]):>14}" for c in self.COLUMNS))
            if s.get("intervals"):
                lines.append(f"{'  95% interval':<{width}}" + "".join(f"  {_interval_text(s['intervals'].get(c)):>14}" for c in self.COLUMNS))
        return head + "\n\n" + "\n".join(lines)

    def plot(self, path=None):
        """Predicted vs true Δh per token, one panel per predictor, with the least-squares line."""
        return _plot_comparison(self, path)


def _plot_comparison(comparison: PredictorComparison, path=None):
    from fprobe.plots import _figure, _save

    fig, axes = _figure(len(comparison.predicted), width=4.0)
    truth = comparison.truth.numpy()
    for ax, (name, predicted) in zip(axes[0], comparison.predicted.items()):
        s = comparison.scores[name]
        ax.scatter(predicted.numpy(), truth, s=8, alpha=0.6)
        line = torch.stack([predicted.min(), predicted.max()])
        ax.plot(line.numpy(), (s["scale"] * line).numpy(), color="black", lw=0.8, label=f"Δh = {s['scale']:.3g}·p")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_title(f"{name}\nPearson {s['pearson']:.3f}, Spearman {s['spearman']:.3f}, signs {s['sign_agreement']:.2f}", fontsize="small")
        ax.set_xlabel("predicted")
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("true Δh_ik on U")
    fig.suptitle(f"per-token entropy change on U's states, lr {comparison.lr:.3g}, {comparison.n_tokens} tokens")
    fig.tight_layout()
    return _save(fig, path)


def compare(
    policy, params, delta, U: Rollouts, lr: float, *, new_params=None, delta_h_true=None, delta_h1=None,
    micro_batch=passes.DEFAULT_MICRO_BATCH, cov_micro_batch: int | None = None,
) -> PredictorComparison:
    """Every predictor of ``PREDICTORS`` and fprobe's ḣ_ik against Δh_ik on U's response tokens, for the
    step Δθ = ``delta`` taken at learning rate ``lr`` from θ₀ = ``params``. ``cov_micro_batch``: centre Cui
    et al.'s products within consecutive micro-batches of that many rows of U, as verl does (its
    ``ppo_micro_batch_size_per_gpu``); None: over all of U. The inputs are checked before any pass; an
    ``UndefinedScoreWarning`` names the rows whose scores are NaN, and why."""
    params = tree.check_like(policy.params, params, "params")
    delta = tree.check_like(params, delta, "delta")
    tree.check_finite(delta, "delta")
    if new_params is not None:
        new_params = tree.check_like(params, new_params, "new_params")
    lr = checks.learning_rate(lr)
    if cov_micro_batch is not None:
        checks.positive_int(cov_micro_batch, "cov_micro_batch", "rows of U, or None (all of U)")
    if U.advantages is None:
        raise ValueError("the update batch U has no advantages: the predictors need them")
    t = truths(policy, params, delta, U, new_params, micro_batch, cov_micro_batch)
    rows = flat(torch.arange(len(U))[:, None].expand(U.response_mask.shape), U.response_mask)
    predicted = {p.name: p.tokens(t.inputs, lr) for p in PREDICTORS} | {REFERENCE: t.first_order}
    undefined = {name: reason for name, p in predicted.items() if (reason := _undefined_reason(p, t.delta_h, t.inputs))}
    if undefined:
        warn("predictor scores undefined (NaN): " + "; ".join(f"{n}: {r}" for n, r in undefined.items()),
             UndefinedScoreWarning)
    return PredictorComparison(
        lr=float(lr),
        n_tokens=len(t.delta_h),
        delta_h_tokens=float(t.delta_h.mean()),
        delta_h_true=delta_h_true,
        delta_h1=delta_h1,
        scores={name: score(p, t.delta_h, rows)._asdict() for name, p in predicted.items()},
        citations={p.name: p.citation for p in PREDICTORS} | {REFERENCE: "fprobe: ḣ_ik = d/dε h_ik(θ₀+εΔθ), one jvp"},
        undefined=undefined,
        cov_micro_batch=cov_micro_batch,
        truth=t.delta_h,
        predicted=predicted,
    )


def from_probe(result) -> PredictorComparison:
    """``compare`` on a probe's own step (U, θ₀, Δθ, its learning rate), with its ΔH_true and δH₁ on E."""
    result.context.check_unchanged()
    return compare(
        result.context.policy, result.context.params, result.delta_named, result.U, result.lr_used,
        delta_h_true=result.delta_h_true, delta_h1=result.delta_h1, micro_batch=result.context.settings.micro_batch,
    )
