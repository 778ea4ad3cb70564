"""Fixtures: tiny transformers models built from configs (``helpers.CONFIGS``), saved with save_pretrained
and loaded through the real from_pretrained path, and the batch builder. Helpers to import are in helpers.py."""

import functools
import os

import pytest
import torch

import fprobe
from helpers import CONFIGS, make_batch, save_checkpoint

# Tiny models run fastest on one thread (two OpenMP threads contend on a 2-core machine); subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


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


@pytest.fixture
def batch():
    return make_batch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny GPT-2 checkpoint with the toy tokenizer (``helpers.save_checkpoint``), one per test module."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-1", seed=0)


@pytest.fixture
def fresh_gpt2():
    """A tiny float64 GPT-2 built from its config (seed 0), new for each test: tests may change it in place."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return fprobe.Policy(AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).double().eval())


@pytest.fixture
def fresh_batches():
    """(E, U): 6 rows each, E without advantages; new for each test."""
    return make_batch(6, seed=1, with_advantages=False), make_batch(6, seed=2)
