"""Shared test helpers (imported as ``from helpers import ...``; fixtures live in conftest.py): the tiny
model configs, the one batch builder, Ĥ written out plainly as an independent reference, a saved tiny
checkpoint with the toy tokenizer, strict JSON and a pass that must not run."""

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

import fprobe
from fprobe.sampling import toy

VOCAB = 61

CONFIGS = {
    "gpt2": lambda: GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=1,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    ),
    "llama": lambda: LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    ),
    "qwen2": lambda: Qwen2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
    ),
}


def make_batch(n=6, width=12, seed=0, groups=2, with_advantages=True, max_response_length=None) -> fprobe.Rollouts:
    """n rows: left padding of 0–2 tokens, a prompt, then a response of 2..(width−prompt) tokens,
    right padding after it. Rewards in {0, 1}, each group (row i is in group i mod groups) holding
    both a 0 and a 1 when it has two rows, so the advantages are not all zero."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    resp = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        left = int(torch.randint(0, 3, (1,), generator=g))
        prompt = int(torch.randint(2, 4, (1,), generator=g))
        length = int(torch.randint(2, width - left - prompt + 1, (1,), generator=g))
        attn[i, left : left + prompt + length] = 1
        resp[i, left + prompt : left + prompt + length] = True
    kw = {}
    if with_advantages:
        rewards = torch.randint(0, 2, (n,), generator=g).double()
        group_ids = torch.arange(n) % groups
        rewards[:groups] = 0.0
        rewards[groups : 2 * groups] = 1.0
        kw = dict(rewards=rewards, group_ids=group_ids, advantages=fprobe.group_advantages(rewards, group_ids))
    return fprobe.Rollouts(ids, attn, resp, max_response_length=max_response_length, **kw)


def sequence_log_probs(policy, params, E: fprobe.Rollouts) -> tuple[list, list]:
    """Per row of E, from the model's logits with a plain float64 log-softmax (not fprobe's token
    statistics): the response tokens' log-probs ℓ_k and full-vocabulary entropies h_k, as 1-d tensors."""
    logprobs = policy.apply(params, E.input_ids, E.attention_mask).double().log_softmax(-1)[:, :-1]
    mask, targets = E.response_mask[:, 1:], E.input_ids[:, 1:]
    ell = logprobs.gather(-1, targets[..., None])[..., 0]
    h = -(logprobs.exp() * logprobs).sum(-1)
    return [ell[i][mask[i]] for i in range(len(E))], [h[i][mask[i]] for i in range(len(E))]


def plain_entropy(policy, params, E: fprobe.Rollouts, normalize="token", entropy="rb", params0=None) -> torch.Tensor:
    """Ĥ = Σ_i w_i H_i / Σ_i w_i D_i at ``params``, one sequence at a time: log w_i = S_i(params) − S_i(params0),
    H_i = Σ_k h_ik ("rb") or −S_i ("naive"), D_i = T_i ("token") or 1 ("seq"). A float64 scalar tensor,
    differentiable in ``params``; without ``params0`` every w_i = 1 in value, with the gradient of
    w_i = exp(S_i − sg(S_i)) — the score-function term of SNIS at θ₀."""
    ell, h = sequence_log_probs(policy, params, E)
    if params0 is None:
        ell0 = [e.detach() for e in ell]
    else:
        with torch.no_grad():
            ell0, _ = sequence_log_probs(policy, params0, E)
    num = den = torch.zeros((), dtype=torch.float64)
    for e, e0, hi in zip(ell, ell0, h):
        w = torch.exp(e.sum() - e0.sum())
        num = num + w * (hi.sum() if entropy == "rb" else -e.sum())
        den = den + w * (len(e) if normalize == "token" else 1.0)
    return num / den


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models run fastest on one thread


def save_checkpoint(path: Path, seed: int) -> Path:
    """A tiny GPT-2 over the toy tokenizer's 17 tokens, saved with that tokenizer."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=17, n_positions=64, bos_token_id=2, eos_token_id=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy.DEFAULT_MODEL_PATH / name, path / name)
    return path


def strict_json(text: str):
    """json.loads that refuses the NaN/Infinity tokens Python's json writes by default."""
    return json.loads(text, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(f"non-JSON token {token}")))


def no_pass(*args, **kwargs):
    """Stands in for a pass (forward, jvp, gradient) or a model load that must not run: raises."""
    raise AssertionError("a pass ran before the options were checked")
