"""Tiny transformers models built from configs, saved with save_pretrained and loaded through the
real from_pretrained path; hand-made batches with left padding and ragged responses."""

import functools
import os

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config

import fprobe

VOCAB = 61

# Tiny models run fastest on one thread (two OpenMP threads contend on a 2-core machine); subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

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


@functools.cache
def saved_model(arch: str, tmp_root: str) -> str:
    """Path of a tiny randomly initialised model of ``arch``, saved once per session."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    path = f"{tmp_root}/{arch}"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models"))
    return lambda arch: saved_model(arch, root)


@pytest.fixture(scope="session")
def load_policy(model_dir):
    """load_policy(arch, dtype) -> a fresh Policy loaded through from_pretrained."""
    return lambda arch="gpt2", dtype=torch.float64, **kw: fprobe.Policy.from_pretrained(model_dir(arch), dtype=dtype, **kw)


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


@pytest.fixture
def batch():
    return make_batch
