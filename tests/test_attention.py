"""fprobe's attention: the same logits as attention computed whole with transformers' eager mask
(causal, padding, sliding windows, soft-capping, grouped KV heads) however it is blocked, causal,
float64 end to end, differentiable in forward mode, never an [L, L] tensor in any pass, and SDPA in
the reverse-mode passes with the same gradients."""

import pytest
import torch
from helpers import VOCAB, make_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AttentionInterface, AutoModelForCausalLM, Gemma2Config, MistralConfig, Qwen2Config
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    eager_mask,
    sliding_window_causal_mask_function,
)

import fprobe
from fprobe.model import attention
from fprobe.model import passes
from fprobe import tree
from fprobe.model.attention import fprobe_attention, mask_blocks, repeat_kv_heads
from fprobe.model.numerics import Numerics
from fprobe.model.policy import position_ids_from_mask
from fprobe.model.tokens import chunked_statistics, left_aligned, scatter_rows, token_stats

ARCHS = ["gpt2", "llama", "qwen2"]
WINDOWED = {  # sliding windows shorter than the test rows; Gemma-2 also soft-caps its attention scores
    "mistral": lambda: MistralConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=64, sliding_window=4, bos_token_id=0, eos_token_id=1,
    ),
    "qwen2_window": lambda: Qwen2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=64, use_sliding_window=True, sliding_window=3, max_window_layers=0,
        bos_token_id=0, eos_token_id=1,
    ),
    "gemma2": lambda: Gemma2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16, intermediate_size=32,
        head_dim=8, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=None, query_pre_attn_scalar=8, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    ),
}
TINY_BLOCKS = 4 * 4 * 12 * 8 * 3  # three query rows per block for 4 rows × 4 heads × 12 keys in float64


def whole_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """The reference: softmax(QKᵀ·s + M)·V with the whole [B, H, L, L] scores and transformers' additive
    eager mask M, in the input's dtype (transformers' own eager kernels round the softmax to float32)."""
    key, value = repeat_kv_heads(key, query.shape[1]), repeat_kv_heads(value, query.shape[1])
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores + attention_mask[..., : key.shape[-2]], dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("whole_reference", whole_attention)
AttentionMaskInterface.register("whole_reference", eager_mask)


def build(arch, dtype=torch.float64, implementation="eager"):
    from helpers import CONFIGS

    torch.manual_seed(0)
    config = (CONFIGS | WINDOWED)[arch]()
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).to(dtype).eval()


def logits_of(model, batch, implementation=None):
    """The model's own forward (optionally with another attention), fprobe's numerics, no graph."""
    kwargs = dict(attention_mask=batch.attention_mask, position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False)
    if implementation is not None:
        model.set_attn_implementation(implementation)
    with torch.no_grad(), Numerics():
        return model(batch.input_ids, **kwargs).logits


def fprobe_logits(policy, batch):
    with torch.no_grad():
        return policy.apply(policy.params, batch.input_ids, batch.attention_mask)


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setitem(attention.BLOCK_BYTES, "cpu", TINY_BLOCKS)


@pytest.mark.parametrize("arch", ARCHS + list(WINDOWED))
def test_blocked_attention_equals_whole_attention_with_the_eager_mask_in_float64(arch, tiny_blocks):
    model = build(arch)
    batch = make_batch(n=4, width=12, seed=1)
    assert bool((batch.attention_mask == 0).any()), "the batch must contain padding"
    ours = fprobe_logits(fprobe.Policy(model), batch)
    reference = logits_of(model, batch, "whole_reference")
    real = batch.attention_mask.bool()
    assert max_rel_error(ours[real], reference[real]) <= 1e-12


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_float32_logits_match_transformers_eager_attention(arch):
    model = build(arch, torch.float32)
    batch = make_batch(n=4, width=12, seed=2)
    ours = fprobe_logits(fprobe.Policy(model), batch)
    eager = logits_of(model, batch, "eager")
    real = batch.attention_mask.bool()
    assert max_rel_error(ours[real], eager[real]) <= 1e-5


def test_gpt2_float64_with_left_padding_matches_transformers_eager_to_1e_12(load_policy, model_dir):
    # GPT-2's eager kernel keeps the softmax in the input dtype, so float64 is comparable with padding.
    policy = load_policy("gpt2", torch.float64)
    batch = make_batch(n=6, width=12, seed=1)
    eager = AutoModelForCausalLM.from_pretrained(model_dir("gpt2"), dtype=torch.float64, attn_implementation="eager").eval()
    real = batch.attention_mask.bool()
    assert max_rel_error(fprobe_logits(policy, batch)[real], logits_of(eager, batch)[real]) <= 1e-12


@pytest.mark.parametrize(
    "mask_function", [causal_mask_function, sliding_window_causal_mask_function(3)], ids=["causal", "window3"]
)
def test_mask_blocks_are_the_rows_of_transformers_eager_mask(mask_function):
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 0, 0]]).bool()
    args = dict(batch_size=3, q_length=8, kv_length=8, mask_function=mask_function, attention_mask=padding)
    whole = eager_mask(**args, dtype=torch.float64) == 0
    blocks = mask_blocks(**args)
    for start, stop in [(0, 3), (3, 6), (6, 8), (0, 8)]:
        rows = blocks.rows(start, stop)
        assert torch.equal(rows, whole[:, :, start:stop])
        assert not rows[..., blocks.visible_keys(stop) :].any(), "a key the block may see was cut off"
    assert blocks.visible_keys(3) == (3 if mask_function is causal_mask_function else 8)


def test_only_a_plain_causal_mask_with_trailing_padding_is_a_causal_prefix():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).bool()
    kw = dict(batch_size=2, q_length=4, kv_length=4)
    assert mask_blocks(**kw, attention_mask=right).causal_prefix
    assert mask_blocks(**kw).causal_prefix
    assert not mask_blocks(**kw, attention_mask=left).causal_prefix
    assert not mask_blocks(**kw, attention_mask=right, mask_function=sliding_window_causal_mask_function(2)).causal_prefix
    assert not mask_blocks(**kw, attention_mask=right, q_offset=1).causal_prefix


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


@pytest.mark.parametrize("budget", [1, 2 * 4 * 7 * 8 * 2, 2**30], ids=["row_blocks", "two_row_blocks", "one_block"])
def test_kernel_matches_a_per_head_reference_in_float64_with_grouped_kv_heads(budget, monkeypatch):
    monkeypatch.setitem(attention.BLOCK_BYTES, "cpu", budget)
    g = torch.Generator().manual_seed(0)
    B, H, KV, L, D = 2, 4, 2, 7, 3
    q, k, v = (torch.randn(B, n, L, D, generator=g, dtype=torch.float64) for n in (H, KV, KV))
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]).bool()
    mask = mask_blocks(B, L, L, attention_mask=padding)
    out, weights = fprobe_attention(torch.nn.Module().eval(), q, k, v, mask, scaling=0.7)
    additive = eager_mask(B, L, L, attention_mask=padding, dtype=torch.float64)
    assert out.dtype == torch.float64 and weights is None
    # Query rows that may see no key at all (left padding) are never read by any statistic: compare the others.
    seen = (additive == 0).any(-1)[:, 0]
    assert not seen.all()
    torch.testing.assert_close(out[seen], reference_attention(q, k, v, additive, 0.7)[seen], rtol=1e-14, atol=1e-14)


def test_repeat_kv_heads_rejects_an_uneven_grouping():
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key/value heads"):
        repeat_kv_heads(torch.zeros(1, 3, 2, 2), 4)


def test_kernel_refuses_dropout_in_train_mode():
    module = torch.nn.Module().train()
    q = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="without dropout.*eval mode"):
        fprobe_attention(module, q, q, q, None, dropout=0.1)


@pytest.mark.parametrize("arch", ARCHS + ["mistral"])
def test_changing_a_later_token_does_not_change_an_earlier_logit(arch, tiny_blocks):
    policy = fprobe.Policy(build(arch))
    batch = make_batch(n=3, width=10, seed=4)
    full = fprobe.Rollouts(batch.input_ids, torch.ones_like(batch.input_ids), batch.response_mask)
    j = 6
    changed_ids = full.input_ids.clone()
    changed_ids[:, j] = (changed_ids[:, j] + 7) % 59 + 2
    changed = fprobe.Rollouts(changed_ids, full.attention_mask, full.response_mask)
    before, after = fprobe_logits(policy, full), fprobe_logits(policy, changed)
    assert torch.equal(before[:, :j], after[:, :j]), "a future token leaked into an earlier position"
    assert not torch.allclose(before[:, j:], after[:, j:]), "the changed token must matter from its own position on"


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_token_ids_are_masked(load_policy, arch, tiny_blocks):
    policy = load_policy(arch, torch.float64)
    batch = make_batch(n=6, width=12, seed=5)
    pad = batch.attention_mask == 0
    left_pad = pad & (batch.attention_mask.cumsum(-1) == 0)
    assert bool(left_pad.any()), "the batch must contain left padding"
    other = fprobe.Rollouts(torch.where(pad, (batch.input_ids + 11) % 59 + 2, batch.input_ids), batch.attention_mask, batch.response_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(fprobe_logits(policy, other)[real], fprobe_logits(policy, batch)[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_left_aligned_rows_give_the_token_statistics_of_the_rows_as_given(arch):
    policy = fprobe.Policy(build(arch))
    batch = make_batch(n=6, width=12, seed=7)
    aligned_mask = left_aligned(batch.attention_mask, batch.attention_mask)
    assert torch.equal(aligned_mask, aligned_mask.sort(-1, descending=True).values), "padding must end up on the right"
    logits = fprobe_logits(policy, batch)
    predicting = batch.response_mask[:, 1:]
    logp, entropy = chunked_statistics(logits[:, :-1][predicting], batch.input_ids[:, 1:][predicting])
    with torch.no_grad():
        stats = token_stats(policy, policy.params, batch)
    torch.testing.assert_close(stats.logp, scatter_rows(logp, batch.response_mask), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(stats.entropy, scatter_rows(entropy, batch.response_mask), rtol=1e-12, atol=1e-13)


def random_tangent(params: tree.Params, seed: int) -> tree.Params:
    g = torch.Generator().manual_seed(seed)
    return tree.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01, params)


@pytest.mark.parametrize("arch", ARCHS + ["gemma2"])
def test_jvp_through_blocked_attention_matches_a_central_finite_difference(arch, tiny_blocks):
    policy = fprobe.Policy(build(arch))
    batch = make_batch(n=4, width=12, seed=6)
    params, tangent = policy.params, random_tangent(policy.params, 1)
    f = lambda p: policy.apply(p, batch.input_ids, batch.attention_mask)
    eps = 1e-5  # float64 throughout (fprobe keeps Llama/Qwen2 RMSNorm in float64 too)
    with torch.no_grad():
        value, derivative = torch.func.jvp(f, (params,), (tangent,))
        difference = (f(tree.axpy(eps, tangent, params)) - f(tree.axpy(-eps, tangent, params))) / (2 * eps)
        plain = f(params)
    assert torch.equal(value, plain)
    # Padding query rows attend to nothing, so only real positions have a derivative to compare;
    # they are the only ones any statistic reads.
    real = batch.attention_mask.bool()
    assert max_rel_error(derivative[real], difference[real]) <= 1e-8
    assert float(derivative[real].abs().max()) > 0


class SquareTensors(TorchDispatchMode):
    """Records every op output whose last two dimensions are (L, L): attention scores, weights or masks whole."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.found = length, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (self.length, self.length):
                self.found.append((str(func), tuple(t.shape)))
        return out


def every_pass(policy, batch):
    """forward, jvp, jvp of jvp and a reverse-mode gradient of one batch, by name."""
    params, delta = policy.params, random_tangent(policy.params, 2)
    ones = torch.ones(batch.input_ids.shape, dtype=torch.float64)
    return {
        "forward": lambda: passes.forward(policy, params, batch),
        "jvp": lambda: passes.jet(policy, params, delta, batch, order=1),
        "jvp2": lambda: passes.jet(policy, params, delta, batch, order=2),
        "gradient": lambda: passes.gradient(policy, params, batch, passes.linear_functional(ones, ones)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_pass_forms_an_l_by_l_tensor(dtype, monkeypatch):
    length = 80  # longer than the vocabulary (61), so that [.., L, L] can only be attention
    monkeypatch.setitem(attention.BLOCK_BYTES, "cpu", 3 * 4 * length * 8 * 16)
    policy = fprobe.Policy(build("qwen2", dtype))
    batch = make_batch(n=3, width=length, seed=8)
    for name, run in every_pass(policy, batch).items():
        with SquareTensors(length) as seen:
            run()
        assert not seen.found, f"{name} formed {seen.found[:3]}"
    monkeypatch.setitem(attention.BLOCK_BYTES, "cpu", 2**30)  # the detector itself: one block is [.., L, L]
    with SquareTensors(length) as seen:
        every_pass(policy, batch)["forward"]()
    assert seen.found


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_reverse_mode_uses_sdpa_and_gives_the_gradient_of_blocked_attention(arch, monkeypatch):
    policy = fprobe.Policy(build(arch))
    batch = make_batch(n=6, width=12, seed=9)
    alpha = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    functional = passes.linear_functional(alpha, alpha.flip(0))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or sdpa(*a, **k))
    value, grads, _ = passes.gradient(policy, policy.params, batch, functional, micro_batch=4)
    layers = policy.model.config.num_hidden_layers
    assert len(calls) == 2 * layers and all(k["is_causal"] for k in calls), "left-padded rows must reach SDPA as plain causal"
    leaves = {n: p.detach().requires_grad_() for n, p in policy.params.items()}
    blocked = functional(token_stats(policy, leaves, batch), batch, slice(0, len(batch)))  # outside reverse mode
    expected = dict(zip(leaves, torch.autograd.grad(blocked, list(leaves.values()))))
    assert len(calls) == 2 * layers, "outside passes.gradient attention must not be SDPA"
    assert value == pytest.approx(blocked.item(), rel=1e-13)
    scale = max(float(g.abs().max()) for g in expected.values())
    assert max(float((grads[n] - expected[n]).abs().max()) for n in expected) <= 1e-11 * scale


def test_soft_capped_attention_stays_blocked_in_reverse_mode(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(k))
    policy = fprobe.Policy(build("gemma2"))
    batch = make_batch(n=2, width=8, seed=10)
    ones = torch.ones(batch.input_ids.shape, dtype=torch.float64)
    _, grads, _ = passes.gradient(policy, policy.params, batch, passes.linear_functional(ones, ones))
    assert not calls and all(torch.isfinite(g).all() for g in grads.values())


def test_token_statistics_without_a_graph_read_the_logits_a_chunk_at_a_time_with_the_same_values():
    """The forward and jvp passes gather each chunk's rows from the logits as they are read (no gathered copy);
    the reverse-mode pass gathers them once. Same rows, same kernels: the same statistics bit for bit."""
    policy = fprobe.Policy(build("qwen2"), chunk_size=5)
    batch = make_batch(n=6, width=12, seed=7)
    with torch.no_grad():
        chunked = token_stats(policy, policy.params, batch)
    leaves = {n: p.detach().requires_grad_() for n, p in policy.params.items()}
    gathered = token_stats(policy, leaves, batch)
    assert torch.equal(chunked.logp, gathered.logp.detach()) and torch.equal(chunked.entropy, gathered.entropy.detach())


class _Ops(TorchDispatchMode):
    """Records the aten ops that run."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_linear_layer_on_a_strided_view_runs_one_matrix_product():
    """The positions ``logits_to_keep`` keeps are a strided view of the hidden states; within fprobe's numerics
    ``F.linear`` gets them contiguous, so it runs one matrix product (torch runs a view as a batched product over an
    expanded weight) and gives what it gives on a contiguous copy, bit for bit."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(40, 16, generator=g)
    kept = hidden[:, -5:]
    assert not kept.is_contiguous()
    with Numerics(torch.float32), _Ops() as ops:
        out = torch.nn.functional.linear(kept, weight)
    assert "aten.bmm" not in ops.names and "aten.mm" in ops.names
    assert torch.equal(out, torch.nn.functional.linear(kept.contiguous(), weight))
