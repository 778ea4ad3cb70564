"""Sampling the evaluation batch E and the update batch U from the policy at θ₀ with ``model.generate``.

Reproducibility that does not depend on batching: every row owns a random stream, a
``torch.Generator`` seeded from (global seed, batch role, prompt index, sample index) — never from
the row's position in a generation batch or a process rank — so the same seed gives the same E and U
whatever the generation batch size (and however a later data-parallel run splits the rows).
``generate`` itself only takes the argmax of a one-hot score that ``RowStreamSampler`` builds from
the row's own draw.

The tokens are drawn from π_θ₀ at ``policy.temperature`` — the very policy whose entropy is
measured, so sampling and scoring cannot disagree on the temperature. The log-probs used by the
estimators are *not* taken from generation (transformers hands the sampler float32 logits) but
recomputed by fprobe at θ₀, in float64 (``fprobe.token_stats``).
"""

import contextlib
import hashlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from fprobe import distributed
from fprobe.model.policy import without_adapter
from fprobe.sampling import prompts as prompt_records
from fprobe.sampling import rewards as reward_functions
from fprobe.rollouts import Rollouts

EVAL, UPDATE = "eval", "update"


def stream_seed(seed: int, *path) -> int:
    """A 63-bit seed derived from ``(seed, *path)`` by SHA-256: independent streams per row and role."""
    digest = hashlib.sha256("/".join(map(str, (seed, *path))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _row_generator(seed: int, role: str, prompt_index: int, sample_index: int, device) -> torch.Generator:
    """The random stream of one sampled row, on ``device``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, role, prompt_index, sample_index))


def check_scores(scores: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` if any row of next-token logits holds a NaN or has no finite maximum:
    there is no distribution to sample from (non-finite weights or activations)."""
    bad = torch.isnan(scores).any(-1) | ~torch.isfinite(scores.amax(-1))
    if bool(bad.any()):
        raise FloatingPointError(
            f"the policy's next-token logits are NaN or infinite in {int(bad.sum())} of {len(bad)} rows of a "
            "generation batch: the model's weights or activations are not finite; nothing can be sampled"
        )


class RowStreamSampler(LogitsProcessor):
    """Draws each row's next token from softmax(logits / T) (optionally top-p filtered) with that row's
    own generator, by inverse CDF; returns scores that are 0 at the drawn token and −∞ elsewhere, so that
    greedy decoding emits exactly the draw."""

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float = 1.0):
        self.generators = list(generators)
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
        uniforms = torch.stack(
            [torch.rand((), generator=g, device=g.device, dtype=torch.float64) for g in self.generators]
        )
        drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(-1, drawn, 0.0)


def _stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids: the tokenizer's and those of the model's generation config (which may list several)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [i for i in configured if i not in ids]
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


def pad_token_id(tokenizer, eos_ids: list[int]) -> int:
    """The tokenizer's pad id, or the (first) EOS id for models without a pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _response_until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """The generated tokens up to and including the first EOS (all of them if none)."""
    stops = [k for k, t in enumerate(tokens) if t in eos_ids]
    return tokens[: stops[0] + 1] if stops else tokens


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with each row right-aligned (left padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@contextlib.contextmanager
def _plain_generation_config(model, eos_ids: list[int], pad_id: int):
    """Hide the checkpoint's ``generation_config`` (its top_k, repetition penalty, … would make the samples
    not π_θ's) behind one that sets only the special tokens; restored afterwards."""
    base = without_adapter(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=pad_id, bos_token_id=saved.bos_token_id
    )
    try:
        yield
    finally:
        base.generation_config = saved


def _generate_responses(
    policy,
    prompt_ids: Sequence[list[int]],
    generators: Sequence[torch.Generator],
    *,
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    top_p: float = 1.0,
    batch_size: int = 16,
    quiet: bool = True,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """One sampled response per prompt (token ids up to and including EOS), generated ``batch_size`` rows
    at a time with left padding; row i uses ``generators[i]`` only. ``synced_gpus``: every rank keeps
    running forwards until all ranks' rows have finished (sharded parameters: each forward is a collective)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    model, device = policy.model, policy.device
    starts = range(0, len(prompt_ids), batch_size)
    responses = []
    with _plain_generation_config(model, eos_ids, pad_id), torch.no_grad():
        for start in tqdm(starts, desc="generate", leave=False, disable=quiet or len(starts) < 2):
            rows = slice(start, start + batch_size)
            ids, mask = _left_padded(prompt_ids[rows], pad_id)
            sampler = RowStreamSampler(generators[rows], policy.temperature, top_p)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList([sampler]),
                synced_gpus=synced_gpus,
            )
            responses += [_response_until_eos(row.tolist(), eos_ids) for row in out[:, ids.shape[1] :].cpu()]
    return responses


def to_rollouts(prompt_ids: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, **fields) -> Rollouts:
    """Rows laid out as [left padding, prompt, response, right padding]; the response mask marks
    exactly the generated tokens (EOS included), the attention mask prompt and response."""
    prompt_width = max(len(p) for p in prompt_ids)
    width = prompt_width + max(len(r) for r in responses)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        start, end = prompt_width - len(p), prompt_width + len(r)
        ids[i, start:end] = torch.tensor(p + r)
        attention[i, start:end] = 1
        response[i, prompt_width:end] = True
    return Rollouts(ids, attention, response, **fields)


def choose_prompts(
    n_pool: int, n_eval: int, n_update_prompts: int, group_size: int, seed: int, replace: bool = False,
    eval_group_size: int = 1,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(prompt index, sample index) of every row of E and of U, from ``seed`` alone.

    E: ``n_eval`` rows, ``n_eval / eval_group_size`` prompts drawn from the pool without (or with) replacement,
    ``eval_group_size`` responses each, consecutive (a prompt drawn again gets the next sample indices, hence
    new streams). U: ``n_update_prompts`` distinct prompts, ``group_size`` responses each. E and U are drawn
    independently of each other.
    """
    if min(n_eval, n_update_prompts, group_size, eval_group_size) < 1:
        raise ValueError(
            f"n_eval, n_update_prompts, group_size and eval_group_size must be >= 1, got {n_eval}, "
            f"{n_update_prompts}, {group_size}, {eval_group_size}"
        )
    if n_eval % eval_group_size:
        raise ValueError(f"n_eval={n_eval} rows are not a whole number of groups of eval_group_size={eval_group_size}")
    if n_update_prompts > n_pool:
        raise ValueError(f"n_update_prompts={n_update_prompts} distinct prompts, but the pool has only {n_pool}")
    n_draws = n_eval // eval_group_size
    if n_draws > n_pool and not replace:
        raise ValueError(
            f"{n_draws} evaluation prompts (n_eval={n_eval} / eval_group_size={eval_group_size}) without replacement, "
            f"but the pool has only {n_pool}: draw with replacement (replace=True; fprobe --replace)"
        )
    pick = torch.Generator().manual_seed(stream_seed(seed, EVAL, "prompts"))
    if replace:
        eval_prompts = torch.randint(n_pool, (n_draws,), generator=pick)
    else:
        eval_prompts = torch.randperm(n_pool, generator=pick)[:n_draws]
    seen: dict[int, int] = {}
    eval_rows = []
    for p in eval_prompts.tolist():
        eval_rows += [(p, seen.get(p, 0) + s) for s in range(eval_group_size)]
        seen[p] = seen.get(p, 0) + eval_group_size
    pick = torch.Generator().manual_seed(stream_seed(seed, UPDATE, "prompts"))
    update_prompts = torch.randperm(n_pool, generator=pick)[:n_update_prompts].tolist()
    return eval_rows, [(p, s) for p in update_prompts for s in range(group_size)]


def _tokenize_prompts(tokenizer, records: dict[int, dict], chat_template: bool = False) -> dict[int, list[int]]:
    """Token ids of the pool's prompts ``{index: record}``, as raw text with the tokenizer's special tokens
    or in its chat template."""
    chosen = list(records.values())
    texts = prompt_records.prompt_texts(tokenizer, chosen, chat_template)
    ids = {i: tokenizer(text, add_special_tokens=not chat_template)["input_ids"] for i, text in zip(records, texts)}
    empty = [i for i, row in ids.items() if not row]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty after tokenization: a response needs a prefix to condition on")
    return ids


def _check_prompt_vocabulary(prompt_ids: dict[int, list[int]], vocab_size: int) -> None:
    """Raise ``ValueError`` naming the prompts whose token ids the model has no embedding for (a tokenizer
    with added tokens, or one that belongs to another model)."""
    outside = [i for i, row in prompt_ids.items() if min(row) < 0 or max(row) >= vocab_size]
    if outside:
        raise ValueError(
            f"prompts {outside[:5]} ({len(outside)} in all) tokenize to ids outside the model's vocabulary "
            f"[0, {vocab_size}): the tokenizer does not match the model"
        )


def sample(
    policy,
    tokenizer,
    prompts,
    *,
    n_eval: int,
    n_update_prompts: int,
    group_size: int,
    reward,
    max_new_tokens: int,
    seed: int = 0,
    replace: bool = False,
    eval_group_size: int = 1,
    top_p: float = 1.0,
    advantage_scale: str = "group",
    chat_template: bool = False,
    batch_size: int = 16,
    quiet: bool = True,
) -> tuple[Rollouts, Rollouts]:
    """E and U sampled from π_θ₀ at ``policy.temperature``: (E, U) ``Rollouts``.

    ``prompts``: a JSONL path or a list of strings / records (``fprobe.prompts.load_prompts``);
    ``reward``: a name, ``"module:function"`` or callable (``fprobe.rewards.resolve_reward``), scored on
    U's decoded responses. U carries rewards, group ids (the prompt's pool index), group-relative
    advantages (``fprobe.group_advantages`` with ``advantage_scale``) and
    ``max_response_length = max_new_tokens``. E holds ``n_eval`` rows: ``n_eval / eval_group_size`` prompt
    draws with ``eval_group_size`` responses each, and its group ids number the draws (0, 1, …; a prompt drawn
    twice with replacement is two independent groups): the units of its standard errors and the groups of
    ``baseline='prompt'``. Every row samples until EOS or ``max_new_tokens``,
    with no top-k truncation; ``top_p < 1`` samples a truncated distribution, no longer π_θ₀ itself.
    Reproducible from ``seed`` whatever ``batch_size`` (see the module docstring). Under
    torch.distributed each rank generates its block of rows and every rank receives all of them; with
    sharded parameters (FSDP2) every rank generates the same number of rows in the same number of calls
    (``distributed.lockstep_rows``; the padding rows are dropped).
    """
    records = prompt_records.load_prompts(prompts)
    reward_fn = reward_functions.resolve_reward(reward)
    eval_rows, update_rows = choose_prompts(len(records), n_eval, n_update_prompts, group_size, seed, replace, eval_group_size)
    rows = [(EVAL, *r) for r in eval_rows] + [(UPDATE, *r) for r in update_rows]
    prompt_ids = _tokenize_prompts(tokenizer, {p: records[p] for _, p, _ in rows}, chat_template)
    _check_prompt_vocabulary(prompt_ids, policy.model.get_input_embeddings().num_embeddings)
    eos_ids = _stop_token_ids(policy.model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)
    row_prompts = [prompt_ids[p] for _, p, _ in rows]
    sharded = distributed.is_sharded(policy.model)
    mine, own = distributed.lockstep_rows(len(rows)) if sharded else (list(range(len(rows)))[distributed.local_rows(len(rows))], None)
    generators = [_row_generator(seed, *rows[i], policy.device) for i in mine]
    responses = distributed.gather_lists(_generate_responses(
        policy, [row_prompts[i] for i in mine], generators, eos_ids=eos_ids, pad_id=pad_id,
        max_new_tokens=max_new_tokens, top_p=top_p, batch_size=batch_size, quiet=quiet,
        synced_gpus=sharded and distributed.world()[1] > 1,
    )[:own])
    n = len(eval_rows)
    E = to_rollouts(row_prompts[:n], responses[:n], pad_id, group_ids=torch.arange(n) // eval_group_size)
    update_records = [records[p] for p, _ in update_rows]
    texts = tokenizer.batch_decode(responses[n:], skip_special_tokens=True)
    scores = reward_functions.score(reward_fn, [r["prompt"] for r in update_records], texts, update_records)
    rewards = torch.tensor(scores, dtype=torch.float64)
    group_ids = torch.tensor([p for p, _ in update_rows])
    U = to_rollouts(
        row_prompts[n:], responses[n:], pad_id,
        rewards=rewards, group_ids=group_ids, advantages=reward_functions.group_advantages(rewards, group_ids, advantage_scale),
        max_response_length=max_new_tokens,
    )
    return E, U
