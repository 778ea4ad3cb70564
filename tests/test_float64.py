"""Float64 end to end: no float32 floor under ΔH on RMSNorm models, and second-order forward-mode AD
through LayerNorm and SiLU (whose fused torch kernels get it wrong or lack it)."""

import math

import pytest
import torch
from helpers import plain_entropy

import fprobe
from fprobe import tree


def float64_rmsnorm(self, hidden_states):
    """Qwen2/Llama RMSNorm computed in its input's dtype (transformers' rounds to float32)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("arch,norm", [("qwen2", "Qwen2RMSNorm"), ("llama", "LlamaRMSNorm")])
def test_float64_model_has_no_float32_rounding(load_policy, batch, arch, norm, monkeypatch):
    import importlib

    policy = load_policy(arch)
    E = batch(n=4, width=10, seed=3, with_advantages=False)
    ours = policy.apply(policy.params, E.input_ids, E.attention_mask)
    kwargs = dict(attention_mask=E.attention_mask, position_ids=fprobe.model.policy.position_ids_from_mask(E.attention_mask), use_cache=False)
    with torch.no_grad():
        rounded = policy.model(E.input_ids, **kwargs).logits
        module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        monkeypatch.setattr(getattr(module, norm), "forward", float64_rmsnorm)
        exact = policy.model(E.input_ids, **kwargs).logits
    mask = E.attention_mask.bool()
    assert (ours - exact)[mask].abs().max() < 1e-14
    assert (rounded - exact)[mask].abs().max() > 1e-10


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_second_order_matches_second_finite_difference(load_policy, batch, arch):
    policy = load_policy(arch)
    E, U = batch(n=6, width=10, seed=4, with_advantages=False), batch(n=4, width=10, seed=5)
    res = fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=1e-3), second_order=True)
    p, d = policy.params, res.delta_named
    eps = 1e-2
    h = lambda s: float(plain_entropy(policy, tree.axpy(s, d, p), E, params0=p))
    second = (h(eps) - 2 * h(0.0) + h(-eps)) / (2 * eps * eps)
    assert res.delta_h2 == pytest.approx(second, rel=1e-5)


def test_qwen2_ratio_is_one_at_tiny_learning_rates(load_policy, batch):
    policy = load_policy("qwen2")
    E, U = batch(n=8, width=12, seed=6, with_advantages=False), batch(n=6, width=12, seed=7)
    res = fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=1e-3), lr=1e-4)
    for ratio in res.sweep([1e-9, 1e-8]).ratio:
        assert math.isfinite(ratio) and abs(ratio - 1) < 1e-4
