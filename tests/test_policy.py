"""The policy as a pure function of its parameters: same logits and gradients as the model run
normally, padding-invariant, tied embeddings counted once, LoRA adapters only, no dropout."""

import copy
import shutil

import pytest
import torch
from helpers import make_batch
from transformers import AutoModelForCausalLM

import fprobe
from fprobe import tree
from fprobe.model.policy import position_ids_from_mask
from fprobe.rl.step import loss_and_grad

LORA = {
    "gpt2": dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
    "qwen2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "llama": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


# Gradient agreement with the model run normally, in float64. GPT-2 is float64 throughout either way;
# transformers' Llama/Qwen2 RMSNorm rounds to float32 when run normally, while fprobe's calls keep a
# float64 model float64, so there the plain reference itself carries float32 rounding (~1e-7).
GRAD_TOLERANCE = {"gpt2": 1e-12, "qwen2": 1e-6, "llama": 1e-6}


def model_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model, before: dict) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def plain_dr_grpo_loss(model, batch, clip=0.2):
    """The dr_grpo loss of ``batch`` written plainly on ``model(...).logits`` (TRL's formula)."""
    mask = batch.response_mask[:, 1:].double()
    logits = model(
        batch.input_ids, attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False,
    ).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    adv = batch.advantages.double()[:, None]
    ratio = torch.exp(logp - logp.detach())
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    max_len = batch.max_response_length or int(batch.lengths.max())
    return (per_token * mask).sum() / (len(batch) * max_len)


def plain_gradient(model, batch) -> tuple[float, dict]:
    """(loss, ∂loss/∂θ) of the model run normally, by autograd, over its trainable parameters."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = plain_dr_grpo_loss(model, batch)
    return loss.item(), dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


def assert_trees_close(got: dict, expected: dict, rel: float) -> None:
    assert list(got) == list(expected)
    scale = max(float(x.abs().max()) for x in expected.values())
    for name in expected:
        err = float((got[name] - expected[name]).abs().max())
        assert err <= rel * scale, f"{name}: |Δ| = {err:.3g} > {rel:g}·{scale:.3g}"


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_gradient_equals_plain_autograd_of_the_model(load_policy, arch):
    policy = load_policy(arch, torch.float64)
    batch = make_batch(n=6, width=12, seed=11, max_response_length=12)
    value, grads = loss_and_grad(policy, policy.params, batch)[:2]
    expected_value, expected = plain_gradient(policy.model, batch)
    assert abs(value - expected_value) <= 1e-14 * max(1.0, abs(expected_value))
    assert_trees_close(grads, expected, GRAD_TOLERANCE[arch])


def test_gpt2_gradient_equals_that_of_the_eager_attention_model(load_policy, model_dir):
    policy = load_policy("gpt2", torch.float64)
    eager = AutoModelForCausalLM.from_pretrained(model_dir("gpt2"), dtype=torch.float64, attn_implementation="eager").eval()
    batch = make_batch(n=6, width=12, seed=12)
    assert_trees_close(loss_and_grad(policy, policy.params, batch)[1], plain_gradient(eager, batch)[1], 1e-12)


def test_tied_embeddings_are_one_parameter_with_the_lm_heads_share_of_the_gradient(load_policy):
    policy = load_policy("llama", torch.float64)
    assert policy.model.lm_head.weight is policy.model.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in policy.params and "lm_head.weight" not in policy.params
    batch = make_batch(n=6, width=12, seed=13)
    grads = loss_and_grad(policy, policy.params, batch)[1]
    assert_trees_close(grads, plain_gradient(policy.model, batch)[1], GRAD_TOLERANCE["llama"])
    # token 0 never occurs in the batch: its embedding row gets gradient only through the lm_head
    assert not bool((batch.input_ids == 0).any())
    assert float(grads["model.embed_tokens.weight"][0].abs().max()) > 0


def test_apply_at_other_params_equals_the_model_with_those_weights_loaded(load_policy):
    policy = load_policy("gpt2", torch.float64)
    before = model_state(policy.model)
    g = torch.Generator().manual_seed(0)
    other = tree.tree_map(lambda p: p + 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype), policy.params)
    reference = copy.deepcopy(policy.model)
    reference.load_state_dict(other, strict=False)
    batch = make_batch(n=4, width=10, seed=14)
    with torch.no_grad():
        ours = policy.apply(other, batch.input_ids, batch.attention_mask)
        theirs = reference(batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=position_ids_from_mask(batch.attention_mask)).logits
        own = policy.apply(policy.params, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()  # padded query rows see no key: their values are no statistic's concern
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-14)  # functional_call vs direct: to the last ulps
    assert not torch.allclose(ours, own)
    assert_state_unchanged(policy.model, before)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_left_padding_does_not_change_a_rows_token_statistics(load_policy, arch):
    policy = load_policy(arch, torch.float64)
    batch = make_batch(n=8, width=14, seed=15)
    assert bool((batch.attention_mask[:, 0] == 0).any()), "some rows must be left-padded"
    stats = fprobe.token_stats(policy, policy.params, batch)
    for i in range(len(batch)):
        real = batch.attention_mask[i].bool()
        alone = fprobe.Rollouts(batch.input_ids[i, real][None], torch.ones(1, int(real.sum())), batch.response_mask[i, real][None])
        single = fprobe.token_stats(policy, policy.params, alone)
        torch.testing.assert_close(stats.logp[i, real], single.logp[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(stats.entropy[i, real], single.entropy[0], rtol=0, atol=1e-10)


def test_temperature_divides_the_logits(load_policy):
    hot = load_policy("gpt2", torch.float64, temperature=2.0)
    batch = make_batch(n=2, width=8, seed=16)
    with torch.no_grad():
        logits = hot.model(batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=position_ids_from_mask(batch.attention_mask)).logits
        ours = hot.apply(hot.params, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], logits[real] / 2.0, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fprobe.Policy(hot.model, temperature=0.0)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_lora_params_are_the_adapter_weights_only(load_policy, arch):
    policy = load_policy(arch, torch.float64, lora=LORA[arch])
    names = list(policy.params)
    n_layers = 2
    assert len(names) == 2 * n_layers * len(LORA[arch]["target_modules"])
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    frozen = [n for n, p in policy.model.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_lora_step_moves_the_adapter_and_never_the_base(load_policy, arch):
    policy = load_policy(arch, torch.float64, lora=LORA[arch])
    before = model_state(policy.model)
    batch = make_batch(n=6, width=12, seed=17)
    opt = fprobe.optim.adamw(lr=1e-2)
    step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch)
    assert list(step.params) == list(policy.params) == list(step.delta)
    assert step.delta_l2 > 0
    assert_state_unchanged(policy.model, before)
    with torch.no_grad():
        moved = policy.apply(step.params, batch.input_ids, batch.attention_mask)
        base = policy.apply(policy.params, batch.input_ids, batch.attention_mask)
    assert not torch.allclose(moved, base), "the adapter step must change the policy"


def test_lora_gradient_equals_plain_autograd(load_policy):
    policy = load_policy("qwen2", torch.float64, lora=LORA["qwen2"])
    batch = make_batch(n=6, width=12, seed=18)
    opt = fprobe.optim.sgd(lr=1.0)
    # move off LoRA's zero-initialised B so that every adapter weight has a gradient
    params = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch).params
    reference = copy.deepcopy(policy.model)
    reference.load_state_dict(params, strict=False)
    assert_trees_close(loss_and_grad(policy, params, batch)[1], plain_gradient(reference, batch)[1], GRAD_TOLERANCE["qwen2"])


def test_jvp_works_with_input_require_grads_hooks_and_keeps_them(load_policy):
    policy = load_policy("gpt2", torch.float64, lora=LORA["gpt2"])
    batch = make_batch(n=3, width=10, seed=19)
    g = torch.Generator().manual_seed(1)
    tangent = tree.tree_map(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype), policy.params)
    f = lambda p: policy.apply(p, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        _, without_hooks = torch.func.jvp(f, (policy.params,), (tangent,))
    policy.model.enable_input_require_grads()
    try:
        with torch.no_grad():
            _, with_hooks = torch.func.jvp(f, (policy.params,), (tangent,))
        assert torch.equal(with_hooks, without_hooks)
        assert float(with_hooks.abs().max()) > 0
        # the user's hook is back in place after the pure call
        assert policy.model.get_input_embeddings()(batch.input_ids).requires_grad
    finally:
        policy.model.disable_input_require_grads()


def test_train_mode_with_dropout_is_refused_and_changes_nothing(load_policy):
    policy = load_policy("gpt2", torch.float64)
    batch = make_batch(n=4, width=10, seed=20)
    before = model_state(policy.model)
    policy.model.train()
    try:
        with pytest.raises(ValueError, match=r"train mode with active dropout \('transformer.drop'.*model.eval\(\)"):
            policy.apply(policy.params, batch.input_ids, batch.attention_mask)
        with pytest.raises(ValueError, match="train mode with active dropout"):
            fprobe.Policy(policy.model)
    finally:
        policy.model.eval()
    assert_state_unchanged(policy.model, before)
    policy.apply(policy.params, batch.input_ids, batch.attention_mask)  # fine again in eval mode


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_attention_dropout_given_as_an_argument_counts_as_active_dropout(rate):
    """Qwen2/Llama attention passes ``config.attention_dropout`` to its attention function instead of holding
    an ``nn.Dropout`` module (was: not seen, so a trainer's step with dropout was cross-checked as "ok")."""
    from helpers import CONFIGS

    torch.manual_seed(0)
    config = CONFIGS["qwen2"]()
    config.attention_dropout = rate
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.train()
    batch = make_batch(n=2, width=8, seed=3)
    twice = [model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits for _ in range(2)]
    acts = not torch.equal(*twice)  # independent evidence: in train mode the forward is random exactly when rate > 0
    assert acts == (rate > 0)
    expected = ["model.layers.0.self_attn.attention_dropout", "model.layers.1.self_attn.attention_dropout"]
    assert fprobe.model.policy.active_dropout(model) == (expected if acts else [])
    if acts:
        with pytest.raises(ValueError, match="attention_dropout"):
            fprobe.Policy(model)
    model.eval()
    assert fprobe.model.policy.active_dropout(model) == []


def test_a_model_without_trainable_parameters_is_refused(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir("gpt2")).eval().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fprobe.Policy(model)


def test_a_missing_model_fails_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load model .*not a local folder"):
        fprobe.Policy.from_pretrained(tmp_path / "no-such-model")


def test_position_ids_follow_the_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def own_forward(model, batch):
    """The model's own forward, as a trainer would run it."""
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


@pytest.mark.parametrize("lora", [False, True], ids=["base", "peft"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_policy_and_probe_leave_the_models_attention_as_found(model_dir, monkeypatch, implementation, lora):
    model = AutoModelForCausalLM.from_pretrained(model_dir("qwen2"), attn_implementation=implementation).eval()
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, fprobe.model.policy.lora_config(LORA["qwen2"])).eval()
    configs = fprobe.model.policy.attention_configs(model)
    batch = make_batch(n=4, width=12, seed=21)
    before = own_forward(model, batch)
    inside = []  # the implementation each attention layer finds while fprobe's calls run
    blocked = fprobe.model.attention.blocked_attention
    monkeypatch.setattr(fprobe.model.attention, "blocked_attention", lambda *a, **k: inside.append(1) or blocked(*a, **k))
    policy = fprobe.Policy(model)
    fprobe.probe(policy, batch, batch, fprobe.optim.adamw(lr=1e-3))
    assert inside, "fprobe's calls must run fprobe's attention"
    assert [c._attn_implementation for c in configs] == [implementation] * len(configs)
    assert torch.equal(own_forward(model, batch), before)


def test_attention_is_restored_when_a_call_fails(load_policy):
    policy = load_policy("gpt2", torch.float64)
    found = policy.model.config._attn_implementation
    with pytest.raises(RuntimeError, match="inside"):
        with fprobe.model.policy.fprobe_kernels_installed(policy.model):
            assert policy.model.config._attn_implementation == "fprobe"
            raise RuntimeError("inside")
    assert policy.model.config._attn_implementation == found != "fprobe"


def test_chunk_rows_fit_the_budget_of_four_float64_arrays_of_the_device():
    from fprobe.model.tokens import CHUNK_BYTES, CHUNK_BYTES_DEFAULT, chunk_rows

    for device, budget in (("cpu", CHUNK_BYTES["cpu"]), ("meta", CHUNK_BYTES_DEFAULT), ("cpu", 10**6)):
        for vocab in (61, 8192, 151936):
            rows = chunk_rows(vocab, device, budget=budget if budget == 10**6 else None)
            assert (4 * 8 * vocab * rows <= budget or rows == 1) and budget < 4 * 8 * vocab * (rows + 1)
        assert chunk_rows(10**12, device) == 1
    assert chunk_rows(151936, "cpu") < chunk_rows(151936, "meta")  # a CPU's chunks stay nearer its caches


def test_chunk_size_and_skipping_the_entropy_change_no_value(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir("qwen2"), dtype=torch.float64).eval()
    batch = make_batch(n=4, width=12, seed=22)
    default = fprobe.token_stats(fprobe.Policy(model), fprobe.Policy(model).params, batch)
    one_row = fprobe.Policy(model, chunk_size=1)
    chunked = fprobe.token_stats(one_row, one_row.params, batch)
    logp_only = fprobe.model.tokens.token_stats(one_row, one_row.params, batch, with_entropy=False)
    assert torch.equal(chunked.logp, default.logp) and torch.equal(chunked.entropy, default.entropy)
    assert torch.equal(logp_only.logp, default.logp) and logp_only.entropy is None
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        fprobe.Policy(model, chunk_size=0)


def test_reverse_mode_statistics_recompute_from_the_logits_with_autograds_gradient():
    from fprobe.model import vocab

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (20,), generator=g)
    w_logp, w_entropy = (torch.randn(20, generator=g, dtype=torch.float64) for _ in range(2))
    plain = vocab._values(vocab._exponentials(logits, targets))  # autograd through the formulas themselves
    ours = vocab.logp_and_entropy(logits, targets)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])
    grad = lambda stats: torch.autograd.grad((w_logp * stats[0]).sum() + (w_entropy * stats[1]).sum(), logits)[0]
    torch.testing.assert_close(grad(ours), grad(plain), rtol=1e-6, atol=1e-9)  # float32 logits
    logp_grad = lambda value: torch.autograd.grad((w_logp * value).sum(), logits)[0]
    plain_logp = vocab._values(vocab._exponentials(logits, targets, products=False))[0]
    assert torch.equal(logp_grad(vocab.logp(logits, targets)), logp_grad(plain_logp)), "ℓ's gradient is autograd's, bit for bit"
    small = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda z: vocab.logp_and_entropy(z, targets[:4] % 6), (small,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_entropy", [True, False], ids=["logp+entropy", "logp"])
def test_a_chunked_backward_that_reuses_one_workspace_gives_each_chunk_its_own_gradient(dtype, with_entropy):
    """The reverse-mode backward recomputes every chunk into the one reused workspace (chunks of 2 rows here, the
    rows gathered): the gradient of Σ α ℓ + β h is that of each chunk alone without a workspace, bit for bit, and
    autograd's through the formulas themselves to rounding."""
    from fprobe.model import tokens, vocab

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 17, generator=g, dtype=dtype, requires_grad=True)
    rows = torch.tensor([0, 1, 2, 4, 5, 7, 8])
    targets = torch.randint(0, 17, (7,), generator=g)
    alpha, beta = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(2))
    objective = lambda logp, entropy: (alpha * logp).sum() + (0 if entropy is None else (beta * entropy).sum())
    stats = tokens.chunked_statistics(logits[rows], targets, 2, with_entropy)
    (ours,) = torch.autograd.grad(objective(*stats), logits)
    reference = torch.zeros_like(logits)
    for block in rows.split(2):
        leaf = logits.detach()[block].requires_grad_()
        index = torch.searchsorted(rows, block)
        alone = vocab._Recomputed.apply(leaf, targets[index], with_entropy, None)
        value = (alpha[index] * alone[0]).sum() + ((beta[index] * alone[1]).sum() if with_entropy else 0)
        reference[block] = torch.autograd.grad(value, leaf)[0]
    assert torch.equal(ours, reference)
    plain = vocab._values(vocab._exponentials(logits[rows], targets, products=with_entropy))
    (formulas,) = torch.autograd.grad(objective(*plain), logits)
    torch.testing.assert_close(ours, formulas, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=1e-15)


@pytest.mark.parametrize("mode", ["values", "reverse", "jvp", "taylor"])
def test_a_logit_of_minus_infinity_is_a_token_of_probability_zero_in_every_mode(mode):
    """A row whose logits rule some tokens out (−∞) has the entropy of its other tokens (π log π → 0, not 0·(−∞) = NaN)
    and finite derivatives, in every mode; ℓ and h against log-softmax over the finite entries alone."""
    from torch.autograd import forward_ad

    from fprobe.model import taylor, vocab
    from fprobe.model.jvp_rules import cheap_jvp

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 9, generator=g, dtype=torch.float64)
    logits[0, [2, 5]] = float("-inf")
    targets = torch.tensor([1, 3, 8])
    finite = lambda row: logits[row][torch.isfinite(logits[row])]
    expected_h = [float(-(torch.softmax(finite(r), -1) * torch.log_softmax(finite(r), -1)).sum()) for r in range(3)]
    expected_l = [float(logits[r, targets[r]] - torch.logsumexp(finite(r), -1)) for r in range(3)]
    tangent = torch.randn(3, 9, generator=g, dtype=torch.float64)
    if mode == "values":
        (logp, entropy), derivatives = vocab.logp_and_entropy(logits, targets), ()
    elif mode == "reverse":  # upstream gradients larger than 1 must not overflow the floor's products into NaN
        leaf = logits.clone().requires_grad_()
        logp, entropy = vocab.logp_and_entropy(leaf, targets)
        derivatives = torch.autograd.grad((logp - 1000 * entropy).sum(), leaf)
    elif mode == "jvp":
        with torch.no_grad(), forward_ad.dual_level(), cheap_jvp():
            logp, entropy = vocab.logp_and_entropy(forward_ad.make_dual(logits, tangent), targets)
            derivatives = (forward_ad.unpack_dual(logp).tangent, forward_ad.unpack_dual(entropy).tangent)
            logp, entropy = (forward_ad.unpack_dual(x).primal for x in (logp, entropy))
    else:
        jets = vocab.logp_and_entropy(taylor.Jet(logits, tangent, tangent), targets)
        (logp, *d_logp), (entropy, *d_entropy) = (taylor.parts(j) for j in jets)
        derivatives = (*d_logp, *d_entropy)
    torch.testing.assert_close(entropy.detach(), torch.tensor(expected_h, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(logp.detach(), torch.tensor(expected_l, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    assert all(bool(torch.isfinite(d).all()) for d in derivatives)


def test_the_first_order_rule_is_for_forward_mode_without_a_graph():
    """Inside ``cheap_jvp`` the statistics of logits without a tangent are the plain values, bit for bit; logits that a
    graph follows are refused with an error that says why (the rule writes into reused buffers and forms no backward)."""
    from torch.autograd import forward_ad

    from fprobe.model import vocab
    from fprobe.model.jvp_rules import cheap_jvp

    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    targets = torch.tensor([0, 4, 10])
    plain = vocab.logp_and_entropy(logits, targets)
    with torch.no_grad(), forward_ad.dual_level(), cheap_jvp():
        got = vocab.logp_and_entropy(logits, targets)
    assert all(torch.equal(a, b) and forward_ad.unpack_dual(a).tangent is None for a, b in zip(got, plain))
    with forward_ad.dual_level(), cheap_jvp(), pytest.raises(RuntimeError, match="forward mode only"):
        vocab.logp_and_entropy(logits.clone().requires_grad_(), targets)


def test_a_ruled_out_target_has_log_probability_minus_infinity_and_the_same_derivative_in_every_mode():
    """ℓ of a target whose logit is −∞ is −∞, as log-softmax's (not the floor), and ∂ℓ/∂z_y = 1 − π_y = 1 in reverse
    mode, in the first-order rule and in the Taylor jets alike; ℓ alone (``logp``) takes a Taylor jet too."""
    from torch.autograd import forward_ad

    from fprobe.model import taylor, vocab
    from fprobe.model.jvp_rules import cheap_jvp

    logits = torch.tensor([[0.5, float("-inf"), 1.0]], dtype=torch.float64)
    targets, along = torch.tensor([1]), torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert float(vocab.logp_and_entropy(logits, targets)[0]) == float("-inf") == float(vocab.logp(logits, targets))
    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(vocab.logp(leaf, targets).sum(), leaf)
    with torch.no_grad(), forward_ad.dual_level(), cheap_jvp():
        first = forward_ad.unpack_dual(vocab.logp_and_entropy(forward_ad.make_dual(logits, along), targets)[0]).tangent
    jet = taylor.parts(vocab.logp(taylor.Jet(logits, along), targets))
    assert float(grad[0, 1]) == float(first) == float(jet.first) == 1.0
    assert float(jet.value) == float("-inf")


# --- a model folder without weights


def test_a_model_folder_without_weights_is_not_called_uncached(tmp_path, checkpoint):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    with pytest.raises(FileNotFoundError) as error:
        fprobe.Policy.from_pretrained(folder)
    assert "local cache" not in str(error.value) and str(folder) in str(error.value)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama"])
def test_the_lm_head_runs_from_the_first_predicting_position_on(load_policy, arch, monkeypatch):
    """The token statistics ask the model for logits from the first position that predicts a response token on (the
    shortest prompt's last token, rows left-aligned): the LM head sees only those positions, and every statistic equals
    the one read from the logits of all positions (float64)."""
    from fprobe.model import tokens

    policy, E = load_policy(arch), make_batch(n=5, width=12, seed=3)
    prompts = [int(E.attention_mask[i].nonzero()[0]) for i in range(len(E))]
    prompts = [int(E.response_mask[i].nonzero()[0]) - first for i, first in enumerate(prompts)]
    widths = []
    hook = policy.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    try:
        sliced = fprobe.token_stats(policy, policy.params, E)
        monkeypatch.setattr(tokens, "first_predicting_position", lambda predicting: 0)
        whole = fprobe.token_stats(policy, policy.params, E)
    finally:
        hook.remove()
    assert widths == [E.input_ids.shape[1] - (min(prompts) - 1), E.input_ids.shape[1]]
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_model_without_logits_to_keep_has_its_logits_sliced(load_policy, monkeypatch):
    """Where the model's forward takes no ``logits_to_keep``, ``apply(keep_last=k)`` slices the whole logits."""
    from fprobe.model import policy as policy_module

    policy, E = load_policy("qwen2"), make_batch(n=3, width=10, seed=4)
    monkeypatch.setattr(policy_module, "_takes_logits_to_keep", lambda model: False)
    last4 = policy.apply(policy.params, E.input_ids, E.attention_mask, keep_last=4)
    assert torch.equal(last4, policy.apply(policy.params, E.input_ids, E.attention_mask)[:, -4:])


def test_a_model_that_ignores_logits_to_keep_still_gives_the_last_positions(load_policy, monkeypatch):
    """A forward that takes ``logits_to_keep`` but returns every position's logits: ``apply(keep_last=k)`` still gives
    the last k."""
    from fprobe.model import policy as policy_module

    policy, E = load_policy("gpt2"), make_batch(n=3, width=10, seed=5)
    forward, ignored = policy.model.forward, []
    monkeypatch.setattr(policy_module, "_takes_logits_to_keep", lambda model: True)
    monkeypatch.setattr(policy.model, "forward", lambda *a, logits_to_keep=0, **kw: ignored.append(logits_to_keep) or forward(*a, **kw))
    last3 = policy.apply(policy.params, E.input_ids, E.attention_mask, keep_last=3)
    assert ignored == [3] and last3.shape[1] == 3
    assert torch.equal(last3, policy.apply(policy.params, E.input_ids, E.attention_mask)[:, -3:])
