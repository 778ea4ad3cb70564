"""Exact enumeration of a tiny policy's responses, for calibrating fprobe's standard errors.

The built-in policy (17-token vocabulary) answers a pool of addition prompts with responses of at most
``LENGTH`` = 3 tokens (EOS included when it comes earlier): 1 + 16 + 16·16·17 = 4369 complete responses per
prompt, over 1 + 17 + 17² prefixes. Every next-token distribution is read from the model's logits with a
plain float64 log-softmax, at θ₀ with its derivative along Δθ (``torch.func.jvp``) and at θ₀+Δθ. From them:

- the population values by plain loops over every prefix u (not over responses): with P(u) the prefix's
  probability and h(u) its next-token entropy, E[H] = Σ_u P(u) h(u), E[T] = Σ_u P(u) per prompt, and
  Ĥ_token = Σ_p E_p[H] / Σ_p E_p[T], Ĥ_seq = mean_p E_p[H] (the SNIS limits); ΔH between θ₀ and θ₀+Δθ; δH₁ from
  the ε-derivatives Ṗ(u) = P(u) Σ_{k} ℓ̇(u_k), ḣ(u);
- per complete response, its token statistics [LENGTH] (ℓ, h and their tangents at θ₀; ℓ, h at θ₀+Δθ), so
  that a draw of E is an index into them (prompts uniform with replacement, responses from π_θ₀).

Imported by tests/test_calibration.py and experiments/variance.py.
"""

import itertools
from typing import NamedTuple

import torch

import fprobe
from fprobe.model.tokens import TokenStats
from fprobe.sampling import toy

LENGTH = 3


class Population(NamedTuple):
    """Exact values over the pool, per normalisation: {"token": ..., "seq": ...}."""

    h0: dict
    delta_h: dict
    delta_h1: dict


class Responses(NamedTuple):
    """Every complete response of every prompt: [P, R, LENGTH] token statistics, masks and θ₀ probabilities [P, R]."""

    value: TokenStats
    tangent: TokenStats
    moved: TokenStats
    mask: torch.Tensor
    prob: torch.Tensor


class Case(NamedTuple):
    """The policy, Δθ, the exact population values, every response's statistics, the pool's prompt token ids and
    the responses' token ids (the R of ``Responses``, in order)."""

    policy: object
    delta: dict
    population: Population
    responses: Responses
    prompt_ids: list
    response_ids: list


def distributions(policy, params, delta, prompt: list[int]):
    """Next-token log-probs [17^(LENGTH−1), LENGTH, V] after the prompt and every continuation (a, b): position
    k holds log π(· | prompt, first k tokens), at ``params`` with its jvp along ``delta`` (None: value only)."""
    V = policy.model.get_input_embeddings().num_embeddings
    tails = torch.tensor(list(itertools.product(range(V), repeat=LENGTH - 1)))
    ids = torch.cat([torch.tensor(prompt).expand(len(tails), -1), tails], 1)
    mask = torch.ones_like(ids)
    read = lambda p: policy.apply(p, ids, mask).double().log_softmax(-1)[:, len(prompt) - 1 :]
    with torch.no_grad():
        if delta is None:
            return read(params), None
        return torch.func.jvp(read, (params,), (delta,))


def entropy_and_tangent(logp, dlogp):
    p = logp.exp()
    h = -(p * logp).sum(-1)
    dh = -(p * dlogp * (logp + 1)).sum(-1) if dlogp is not None else None
    return h, dh


def prompt_population(logp, dlogp, logp1, eos: int):
    """(E[H], E[T], d/dε E[H], d/dε E[T]) at θ₀ and (E[H], E[T]) at θ₀+Δθ for one prompt, by a plain loop over
    every prefix u of at most LENGTH−1 tokens without EOS (a response ends at EOS or after LENGTH tokens)."""
    V = logp.shape[-1]
    h, dh = entropy_and_tangent(logp, dlogp)
    h1, _ = entropy_and_tangent(logp1, None)
    eh = et = deh = det = eh1 = et1 = 0.0
    for length in range(LENGTH):
        for prefix in itertools.product([v for v in range(V) if v != eos], repeat=length):
            row = sum(t * V ** (LENGTH - 2 - k) for k, t in enumerate(prefix))  # any row whose tail starts with prefix
            log_p = sum(float(logp[row, k, t]) for k, t in enumerate(prefix))
            dlog_p = sum(float(dlogp[row, k, t]) for k, t in enumerate(prefix))
            log_p1 = sum(float(logp1[row, k, t]) for k, t in enumerate(prefix))
            P, P1 = torch.tensor(log_p).exp().item(), torch.tensor(log_p1).exp().item()
            hk, dhk, h1k = float(h[row, length]), float(dh[row, length]), float(h1[row, length])
            eh, et = eh + P * hk, et + P
            deh, det = deh + P * dlog_p * hk + P * dhk, det + P * dlog_p
            eh1, et1 = eh1 + P1 * h1k, et1 + P1
    return eh, et, deh, det, eh1, et1


def complete_responses(V: int, eos: int) -> list[tuple[int, ...]]:
    others = [v for v in range(V) if v != eos]
    out = [(eos,)] + [(a, eos) for a in others]
    return out + [(a, b, c) for a in others for b in others for c in range(V)]


def response_statistics(tables, responses, V: int):
    """[R, LENGTH] statistics of each response from one prompt's [rows, LENGTH, V] ``tables`` (ℓ of the token,
    or a per-position table such as h: [rows, LENGTH])."""
    padded = [r + (0,) * (LENGTH - len(r)) for r in responses]
    tokens = torch.tensor(padded)
    row = (tokens[:, : LENGTH - 1] * V ** torch.arange(LENGTH - 2, -1, -1)).sum(-1)
    mask = torch.tensor([[k < len(r) for k in range(LENGTH)] for r in responses])
    pick = lambda t: (t[row].gather(-1, tokens[..., None])[..., 0] if t.dim() == 3 else t[row]) * mask
    return [pick(t) for t in tables], mask


def build(n_prompts: int = 16, lr: float = 1e-4, seed: int = 0) -> Case:
    """The built-in policy in float64, a pool of ``n_prompts`` addition prompts, Δθ of one AdamW step (``lr``) on
    an update batch sampled from the same pool, and the exact population and per-response statistics."""
    from transformers import AutoTokenizer

    policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    pool = toy.make_prompts(n_prompts, seed)
    _, U = fprobe.sample(policy, tokenizer, pool, n_eval=1, n_update_prompts=8, group_size=4, reward="toy",
                         max_new_tokens=LENGTH, seed=seed)
    step = fprobe.rl_step(policy, policy.params, fprobe.optim.adamw(lr=lr), fprobe.optim.adamw(lr=lr).init(policy.params), U)
    params, delta = policy.params, step.delta
    moved = fprobe.tree.add(params, delta)
    V, eos = policy.model.get_input_embeddings().num_embeddings, tokenizer.eos_token_id
    responses = complete_responses(V, eos)
    per_prompt, sums = [], []
    prompt_ids = [tokenizer(record["prompt"])["input_ids"] for record in pool]
    for prompt in prompt_ids:
        logp, dlogp = distributions(policy, params, delta, prompt)
        logp1, _ = distributions(policy, moved, None, prompt)
        sums.append(prompt_population(logp, dlogp, logp1, eos))
        h, dh = entropy_and_tangent(logp, dlogp)
        h1, _ = entropy_and_tangent(logp1, None)
        stats, mask = response_statistics([logp, h, dlogp, dh, logp1, h1], responses, V)
        per_prompt.append((stats, mask))
    eh, et, deh, det, eh1, et1 = (torch.tensor(column, dtype=torch.float64) for column in zip(*sums))
    token0, token1 = eh.sum() / et.sum(), eh1.sum() / et1.sum()
    population = Population(
        h0={"token": float(token0), "seq": float(eh.mean())},
        delta_h={"token": float(token1 - token0), "seq": float(eh1.mean() - eh.mean())},
        delta_h1={"token": float((deh.sum() - token0 * det.sum()) / et.sum()), "seq": float(deh.mean())},
    )
    stack = lambda j: torch.stack([s[j] for s, _ in per_prompt])
    mask = torch.stack([m for _, m in per_prompt])
    value, tangent, moved_stats = TokenStats(stack(0), stack(1)), TokenStats(stack(2), stack(3)), TokenStats(stack(4), stack(5))
    prob = value.logp.sum(-1).exp()
    return Case(policy, delta, population, Responses(value, tangent, moved_stats, mask, prob), prompt_ids, responses)


class Draw(NamedTuple):
    """One E: [n, LENGTH] statistics (θ₀, tangent, θ₀+Δθ), mask, group ids (one per prompt draw), and its
    (prompt, response) indices."""

    value: TokenStats
    tangent: TokenStats
    moved: TokenStats
    mask: torch.Tensor
    groups: torch.Tensor
    index: tuple


def draw(responses: Responses, n_rows: int, group_size: int, generator: torch.Generator) -> Draw:
    """E of ``n_rows`` rows: n_rows / group_size prompts uniform with replacement, ``group_size`` responses of
    each from π_θ₀ (independently, with replacement)."""
    n_prompts = n_rows // group_size
    prompts = torch.randint(responses.prob.shape[0], (n_prompts,), generator=generator)
    picks = torch.multinomial(responses.prob[prompts], group_size, replacement=True, generator=generator)
    p, r = prompts.repeat_interleave(group_size), picks.reshape(-1)
    take = lambda s: TokenStats(s.logp[p, r], s.entropy[p, r])
    groups = torch.arange(n_prompts).repeat_interleave(group_size)
    return Draw(take(responses.value), take(responses.tangent), take(responses.moved), responses.mask[p, r], groups, (p, r))
