"""fprobe's attention: same logits as transformers' eager attention, causal, padding-masked,
float64 end to end, and differentiable in forward mode (torch.func.jvp)."""

import pytest
import torch
from conftest import make_batch
from transformers import AutoModelForCausalLM

import fprobe
from fprobe import tree
from fprobe.attention import fprobe_attention, repeat_kv_heads
from fprobe.policy import position_ids_from_mask

ARCHS = ["gpt2", "llama", "qwen2"]


def eager_logits(model_dir, arch, dtype, input_ids, attention_mask):
    """Logits of the same saved model run with transformers' own eager attention, same position ids."""
    model = AutoModelForCausalLM.from_pretrained(model_dir(arch), dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False
        )
    return out.logits


def fprobe_logits(policy, input_ids, attention_mask):
    with torch.no_grad():
        return policy.apply(policy.params, input_ids, attention_mask)


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_models_load_with_fprobe_attention(load_policy):
    for arch in ARCHS:
        assert load_policy(arch).model.config._attn_implementation == "fprobe"


def test_wrapping_a_model_switches_it_to_fprobe_attention(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir("gpt2"), attn_implementation="sdpa").eval()
    assert fprobe.Policy(model).model.config._attn_implementation == "fprobe"


def test_gpt2_float64_with_left_padding_matches_eager_to_1e_12(load_policy, model_dir):
    # GPT-2's eager kernel keeps the softmax in the input dtype, so float64 is comparable with padding.
    policy = load_policy("gpt2", torch.float64)
    batch = make_batch(n=6, width=12, seed=1)
    assert bool((batch.attention_mask == 0).any()), "the batch must contain padding"
    ours = fprobe_logits(policy, batch.input_ids, batch.attention_mask)
    theirs = eager_logits(model_dir, "gpt2", torch.float64, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    assert max_rel_error(ours[real], theirs[real]) <= 1e-12


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float32_with_left_padding_matches_eager(load_policy, model_dir, arch):
    policy = load_policy(arch, torch.float32)
    batch = make_batch(n=6, width=12, seed=2)
    ours = fprobe_logits(policy, batch.input_ids, batch.attention_mask)
    theirs = eager_logits(model_dir, arch, torch.float32, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    assert max_rel_error(ours[real], theirs[real]) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float64_without_padding_matches_eager_to_its_float32_softmax(load_policy, model_dir, arch):
    # Llama/Qwen2 eager rounds the attention softmax to float32: agreement is bounded by that rounding.
    policy = load_policy(arch, torch.float64)
    ids = make_batch(n=4, width=10, seed=3).input_ids
    full = torch.ones_like(ids)
    ours = fprobe_logits(policy, ids, full)
    theirs = eager_logits(model_dir, arch, torch.float64, ids, full)
    assert ours.dtype == torch.float64
    assert max_rel_error(ours, theirs) <= 1e-6


def reference_attention(q, k, v, additive_mask, scaling):
    """softmax(q·k·s + M)·v one (batch, head) at a time, grouped KV heads indexed explicitly."""
    B, H, L, D = q.shape
    group = H // k.shape[1]
    out = torch.empty(B, L, H, D, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            scores = q[b, h] @ k[b, h // group].T * scaling + additive_mask[b, 0]
            out[b, :, h] = torch.softmax(scores, dim=-1) @ v[b, h // group]
    return out


def test_kernel_matches_a_per_head_reference_in_float64_with_grouped_kv_heads():
    g = torch.Generator().manual_seed(0)
    B, H, KV, L, D = 2, 4, 2, 5, 3
    q, k, v = (torch.randn(B, n, L, D, generator=g, dtype=torch.float64) for n in (H, KV, KV))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = torch.zeros(B, 1, L, L, dtype=torch.float64).masked_fill(~causal, torch.finfo(torch.float64).min)
    module = torch.nn.Module().eval()
    out, weights = fprobe_attention(module, q, k, v, mask, scaling=0.7)
    assert out.dtype == torch.float64 and weights.dtype == torch.float64
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, 0.7), rtol=1e-14, atol=1e-14)
    assert torch.equal(weights.triu(1), torch.zeros_like(weights)), "masked (future) positions must get weight 0"


def test_repeat_kv_heads_rejects_an_uneven_grouping():
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key/value heads"):
        repeat_kv_heads(torch.zeros(1, 3, 2, 2), 4)


def test_kernel_refuses_dropout_in_train_mode():
    module = torch.nn.Module().train()
    q = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="without dropout.*eval mode"):
        fprobe_attention(module, q, q, q, None, dropout=0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_a_later_token_does_not_change_an_earlier_logit(load_policy, arch):
    policy = load_policy(arch, torch.float64)
    ids = make_batch(n=3, width=10, seed=4).input_ids
    full = torch.ones_like(ids)
    j = 6
    changed = ids.clone()
    changed[:, j] = (ids[:, j] + 7) % 59 + 2
    before, after = fprobe_logits(policy, ids, full), fprobe_logits(policy, changed, full)
    assert torch.equal(before[:, :j], after[:, :j]), "a future token leaked into an earlier position"
    assert not torch.allclose(before[:, j:], after[:, j:]), "the changed token must matter from its own position on"


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_token_ids_are_masked(load_policy, arch):
    policy = load_policy(arch, torch.float64)
    batch = make_batch(n=6, width=12, seed=5)
    pad = batch.attention_mask == 0
    left_pad = pad & (batch.attention_mask.cumsum(-1) == 0)
    assert bool(left_pad.any()), "the batch must contain left padding"
    other_ids = torch.where(pad, (batch.input_ids + 11) % 59 + 2, batch.input_ids)
    real = batch.attention_mask.bool()
    before = fprobe_logits(policy, batch.input_ids, batch.attention_mask)
    after = fprobe_logits(policy, other_ids, batch.attention_mask)
    torch.testing.assert_close(after[real], before[real], rtol=0, atol=1e-12)


def random_tangent(params: tree.Params, seed: int) -> tree.Params:
    g = torch.Generator().manual_seed(seed)
    return tree.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01, params)


@pytest.mark.parametrize("arch", ARCHS)
def test_jvp_through_the_policy_matches_a_central_finite_difference(load_policy, arch):
    policy = load_policy(arch, torch.float64)
    batch = make_batch(n=3, width=10, seed=6)
    params, tangent = policy.params, random_tangent(policy.params, 1)
    f = lambda p: policy.apply(p, batch.input_ids, batch.attention_mask)
    eps = 1e-5  # float64 throughout (fprobe keeps Llama/Qwen2 RMSNorm in float64 too)
    with torch.no_grad():
        value, derivative = torch.func.jvp(f, (params,), (tangent,))
        difference = (f(tree.axpy(eps, tangent, params)) - f(tree.axpy(-eps, tangent, params))) / (2 * eps)
        plain = f(params)
    assert torch.equal(value, plain)
    # Padding query rows attend to nothing (score + finfo.min absorbs the score), so only real positions
    # have a derivative to compare; they are the only ones any statistic reads.
    real = batch.attention_mask.bool()
    assert max_rel_error(derivative[real], difference[real]) <= 1e-8
    assert float(derivative[real].abs().max()) > 0
