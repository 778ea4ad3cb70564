"""fprobe on many transformers causal-LM architectures (tiny random float64 models, left- and right-padded
rows), each checked against computations that do not go through fprobe's attention or its estimators:

(a) ``policy.apply`` equals the model's own forward with transformers' eager attention, run under a
    reference mode that keeps eager's float32 softmax and float32 casts of float64 tensors in float64
    (else eager has a ~1e-8 floor, and NaN rows under left padding);
(b) δH₁ (jvp) equals ``method="grad"`` and a central finite difference of the plain SNIS entropy
    (``helpers.plain_entropy``, which reads ``policy.apply`` on the rows as given, not left-aligned);
(c) ``fprobe.probe`` runs (its step's reverse pass takes SDPA on left-aligned rows) and the ratio ≈ 1;
(d) the model's attention implementation and its own outputs are the same after fprobe's calls.

Architectures fprobe cannot support must say so: at ``Policy(...)`` where it can be seen (no
AttentionInterface, attention sinks), else at the first call with a message that names the cause."""

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fprobe
from fprobe import tree
from helpers import VOCAB, make_batch, plain_entropy

COMMON = dict(
    num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    vocab_size=VOCAB, max_position_embeddings=64, head_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# model_type → config overrides (None removes a COMMON key). Sliding windows / chunks shorter than the rows.
ARCHS = {
    "gemma": {},
    "gemma2": dict(sliding_window=4, attn_logit_softcapping=2.0),  # soft-capped: blocked attention in reverse mode too
    "gemma3_text": dict(sliding_window=4),  # local and global layers
    "phi": {},  # partial rotary, parallel block
    "phi3": {},
    "gpt_neox": {},
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "opt": {},  # learned positions with offset, ReLU
    "stablelm": {},
    "cohere": dict(logit_scale=1.0, initializer_range=0.2),
    "cohere2": dict(logit_scale=1.0, initializer_range=0.2, sliding_window=4),
    "olmo": {},
    "olmo2": {},  # q/k norms
    "olmo3": {},
    "starcoder2": dict(sliding_window=4),
    "gpt_bigcode": {},  # multi-query
    "falcon": dict(head_dim=None),  # multi-query, parallel block (routed through AttentionInterface since transformers 5.x)
    "granite": {},  # attention/residual/logit multipliers
    "qwen3": {},
    "smollm3": dict(no_rope_layer_interval=2),  # NoPE layers
    "llama4_text": dict(**MOE, intermediate_size_mlp=64, attention_chunk_size=4),  # chunked attention
    "exaone4": {},
    "glm": {},
    "glm4": {},
    "helium": {},
    "nemotron": {},
    "persimmon": {},
    "biogpt": {},
    "ernie4_5": {},
    "seed_oss": {},
    "hunyuan_v1_dense": {},
    "bitnet": {},
    "lfm2": {},  # convolution layers
    "jamba": {},  # Mamba layers (reference scan) + attention
    "mixtral": MOE,
    "phimoe": MOE,
    "jetmoe": {},
    "granitemoe": {},
    "minimax": MOE,
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}


def config(model_type: str, **overrides):
    kw = {k: v for k, v in {**COMMON, **overrides}.items() if v is not None}
    return AutoConfig.for_model(model_type, **kw)


def build(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(model_type, **overrides))


def eager_experts(model):
    """transformers' default MoE experts kernel (grouped_mm) has no float64 on CPU: use the eager one."""
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        model.set_experts_implementation("eager")


class Float64Reference(torch.overrides.TorchFunctionMode):
    """Independent of fprobe's own mode: float64 tensors are never cast to float32 (``.float()``,
    ``.to``/``.type``, any ``dtype=torch.float32``), and softmaxes asked for in float32 run in float64."""

    SOFTMAX = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from64 = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64
        if func is torch.Tensor.float and from64:
            return args[0]
        asks32 = any(a is torch.float32 for a in (*args, *kwargs.values()))
        if asks32 and (from64 or func in self.SOFTMAX):
            swap = lambda a: torch.float64 if a is torch.float32 else a
            args, kwargs = tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def own_forward(model, ids, attn):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=attn, position_ids=pos, use_cache=False).logits


@functools.cache
def measured(arch: str, root: str):
    """Everything fprobe computes for ``arch``, with the model's own outputs around it."""
    path = f"{root}/{arch}"
    build(arch, **ARCHS[arch]).save_pretrained(path)
    policy = fprobe.Policy.from_pretrained(path, dtype=torch.float64)
    model = policy.model
    eager_experts(model)
    E = make_batch(n=4, width=10, seed=1, with_advantages=False)
    U = make_batch(n=4, width=10, seed=2)
    implementation = model.config._attn_implementation
    own_before = own_forward(model, E.input_ids, E.attention_mask)
    logits = policy.apply(policy.params, E.input_ids, E.attention_mask)
    res = fprobe.probe(policy, E, U, fprobe.optim.sgd(lr=1e-3), lr=1e-6)
    grad = fprobe.entropy_change(policy, E, res.delta_named, method="grad")
    own_after = own_forward(model, E.input_ids, E.attention_mask)
    return dict(
        policy=policy, E=E, logits=logits, res=res, grad=grad, implementation=implementation,
        implementation_after=model.config._attn_implementation, own_before=own_before, own_after=own_after,
    )


@pytest.fixture(scope="module")
def arch_setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("archs"))
    return lambda arch: measured(arch, root)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_eager_attention_in_float64(arch_setup, arch):
    s = arch_setup(arch)
    model, E = s["policy"].model, s["E"]
    model.set_attn_implementation("eager")
    try:
        with Float64Reference():
            ref = own_forward(model, E.input_ids, E.attention_mask)
    finally:
        model.set_attn_implementation(s["implementation"])
    real = E.attention_mask.bool()
    assert torch.isfinite(s["logits"][real]).all()
    assert (s["logits"] - ref)[real].abs().max() < 1e-12


@pytest.mark.parametrize("arch", ARCHS)
def test_delta_h1_matches_gradient_path_and_finite_difference(arch_setup, arch):
    s = arch_setup(arch)
    policy, E, res = s["policy"], s["E"], s["res"]
    assert res.delta_h1 != 0.0
    assert s["grad"].delta_h1 == pytest.approx(res.delta_h1, rel=1e-9)
    params, delta = policy.params, res.delta_named
    eps = 1e-9 / abs(res.delta_h1)  # H moves by ~1e-9 each way: float64 rounding ~1e-6 relative, curvature far less
    plus = float(plain_entropy(policy, tree.axpy(eps, delta, params), E, params0=params))
    minus = float(plain_entropy(policy, tree.axpy(-eps, delta, params), E, params0=params))
    assert (plus - minus) / (2 * eps) == pytest.approx(res.delta_h1, rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_ratio_tends_to_one(arch_setup, arch):
    res = arch_setup(arch)["res"]
    assert abs(res.ratio - 1) < 1e-2, (res.delta_h_true, res.delta_h1)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_left_as_found(arch_setup, arch):
    s = arch_setup(arch)
    assert s["implementation_after"] == s["implementation"]
    # bit for bit; NaN where the model's own eager float64 forward gives NaN (its float32 softmax of a row that is
    # all padding, whose NaN values then reach real rows through 0·NaN: Gemma-2 with left padding)
    torch.testing.assert_close(s["own_after"], s["own_before"], rtol=0, atol=0, equal_nan=True)


# ---- architectures fprobe cannot run ----

NOT_ROUTED = {  # attention not dispatched through AttentionInterface (alibi: Bloom, MPT)
    "bloom": {},
    "mpt": dict(d_model=32, n_heads=4, n_layers=2, head_dim=None),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    "xglm": {},
}


@pytest.mark.parametrize("arch", NOT_ROUTED)
def test_attention_outside_the_interface_is_refused_at_policy(arch):
    model = build(arch, **NOT_ROUTED[arch]).double().eval()
    with pytest.raises(TypeError, match="AttentionInterface"):
        fprobe.Policy(model)


def gpt_oss():
    model = build("gpt_oss", **MOE, sliding_window=4).double().eval()
    eager_experts(model)
    return model


def test_attention_sinks_are_refused_at_policy():
    with pytest.raises(ValueError, match="sinks"):
        fprobe.Policy(gpt_oss())


def doge():
    return build("doge").double().eval()


def falcon_alibi():
    return build("falcon", head_dim=None, alibi=True).double().eval()


def recurrent_gemma():
    return build("recurrent_gemma").double().eval()


UNSUPPORTED_LATE = {  # model, the error it raises at the first call, and why it is not refused at Policy(...)
    "doge": (doge, AttributeError, "Doge's attention code reads attention_mask as a tensor (prepare_dynamic_mask: "
             "attention_mask.dtype), which only shows when it runs: the first call fails with fprobe's message that the "
             "model reads the mask as a tensor; Policy(...) cannot see it beforehand"),
    "falcon_alibi": (falcon_alibi, AttributeError, "Falcon with alibi=True adds its position bias to the attention "
                     "mask in the model's forward (causal_mask.dtype, masked_fill): the mask must be a tensor there"),
}


@pytest.mark.parametrize("arch", UNSUPPORTED_LATE)
def test_unsupported_architecture_fails_clearly_at_the_first_call(arch):
    make, error, _ = UNSUPPORTED_LATE[arch]
    policy = fprobe.Policy(make())
    E = make_batch(n=2, width=8, seed=1, with_advantages=False)
    with pytest.raises(error, match="reads the attention mask as a tensor"):
        fprobe.entropy_change(policy, E, tree.zeros_like(policy.params))


def test_float32_modules_in_a_float64_model(tmp_path):
    """DeepSeek-V3 keeps its router (gate.weight, _keep_in_fp32_modules_strict) float32 in a float64 model; fprobe
    keeps activations float64, so the router's product is upcast (was: F.linear(float64, float32) raised)."""
    overrides = dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4, num_key_value_heads=4,
        first_k_dense_replace=1,
    )
    build("deepseek_v3", **overrides).save_pretrained(tmp_path)
    policy = fprobe.Policy.from_pretrained(tmp_path, dtype=torch.float64)
    eager_experts(policy.model)
    E = make_batch(n=2, width=8, seed=1, with_advantages=False)
    own = own_forward(policy.model, E.input_ids, E.attention_mask)
    logits = policy.apply(policy.params, E.input_ids, E.attention_mask)
    real = E.attention_mask.bool()
    assert (logits - own)[real].abs().max() < 1e-6
    delta = tree.tree_map(lambda p: 1e-6 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(3)), policy.params)
    jvp = fprobe.entropy_change(policy, E, delta)
    grad = fprobe.entropy_change(policy, E, delta, method="grad")
    assert grad.delta_h1 == pytest.approx(jvp.delta_h1, rel=1e-9) and abs(jvp.ratio - 1) < 1e-2


def test_a_model_without_forward_mode_derivatives_says_so_and_the_gradient_path_works():
    """RecurrentGemma's SqrtBoundDerivative (a custom autograd.Function) has no jvp: the error names the model
    and the way out, and method='grad' gives δH₁ matching a central difference of ΔH_true."""
    policy = fprobe.Policy(recurrent_gemma())
    E = make_batch(n=2, width=8, seed=1, with_advantages=False)
    delta = tree.tree_map(lambda p: 1e-3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(4)), policy.params)
    with pytest.raises(NotImplementedError, match=r"RecurrentGemma\w* runs an operation with no forward-mode derivative.*method='grad'"):
        fprobe.entropy_change(policy, E, delta)
    grad = fprobe.entropy_change(policy, E, delta, method="grad")
    eps = 1e-2
    plus = fprobe.entropy_change(policy, E, tree.scale(delta, eps), method="grad").delta_h_true
    minus = fprobe.entropy_change(policy, E, tree.scale(delta, -eps), method="grad").delta_h_true
    assert grad.delta_h1 == pytest.approx((plus - minus) / (2 * eps), rel=1e-5)


def test_moe_with_transformers_default_experts_kernel():
    """transformers' default MoE experts kernel (grouped_mm) has no forward-mode derivative and no float64:
    fprobe's calls run the eager experts and put the model's own setting back (was: jvp and float64 failed)."""
    model = build("qwen3_moe", **MOE).double().eval()
    own_setting = model.config._experts_implementation
    policy = fprobe.Policy(model)
    E = make_batch(n=2, width=8, seed=1, with_advantages=False)
    delta = tree.tree_map(lambda p: 1e-6 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(4)), policy.params)
    jvp = fprobe.entropy_change(policy, E, delta)
    grad = fprobe.entropy_change(policy, E, delta, method="grad")
    assert grad.delta_h1 == pytest.approx(jvp.delta_h1, rel=1e-9) and abs(jvp.ratio - 1) < 1e-3
    assert model.config._experts_implementation == own_setting != "eager"
