"""The second-order Taylor pass (``fprobe.model.taylor``) against torch.func's nested jvp, torch's generic rules
for every op: the same values bit for bit, the same first and second derivatives to float64 rounding, on Qwen2,
Llama and GPT-2, full parameters and LoRA; and the nested jvp where the Taylor pass meets an op it has no rule for."""

import pytest
import torch

import fprobe
from fprobe.model import passes, taylor
from fprobe.model.tokens import token_stats


def _lora(policy, arch):
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    model = get_peft_model(policy.model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter a non-zero function
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return fprobe.Policy(model)


def _delta(params, seed=3, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for name, p in params.items()}


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_taylor_pass_equals_nested_jvp(load_policy, batch, arch, lora):
    policy = load_policy(arch)
    policy = _lora(policy, arch) if lora else policy
    E = batch(n=4, width=12, seed=1, with_advantages=False)
    params, delta = policy.params, _delta(policy.params)
    stats = lambda p: token_stats(policy, p, E)
    with torch.no_grad():
        ours, nested, plain = passes._taylor_jvp2(stats, params, delta), passes._nested_jvp(stats, params, delta), stats(params)
    for got, want, value in zip(ours.value, nested.value, plain):
        assert torch.equal(got, want) and torch.equal(got, value)
    for field in ("tangent", "second"):
        for got, want in zip(getattr(ours, field), getattr(nested, field)):
            assert _relative(got, want) < 1e-12


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_delta_h2_equals_nested_jvp(load_policy, batch, arch, monkeypatch):
    policy = load_policy(arch)
    E, U = batch(n=6, width=10, seed=4, with_advantages=False), batch(n=4, width=10, seed=5)
    res = fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=1e-3), second_order=True)
    monkeypatch.setattr(passes, "_taylor_jvp2", passes._nested_jvp)
    nested = fprobe.entropy_change(policy, E, res.delta_named, second_order=True)
    assert res.delta_h2 == pytest.approx(nested.delta_h2, rel=1e-12)
    assert res.delta_h1 == pytest.approx(nested.delta_h1, rel=1e-12)
    assert res.delta_h_true == nested.delta_h_true


class _Cube(torch.nn.Module):
    """An op without a Taylor rule (``aten.sinh``) on the path from a parameter to the logits."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return torch.sinh(self.module(x))


def test_an_op_without_a_rule_falls_back_to_the_nested_jvp(load_policy, batch):
    model = load_policy("gpt2").model
    model.transformer.h[0].mlp.c_proj = _Cube(model.transformer.h[0].mlp.c_proj)
    policy = fprobe.Policy(model)
    E = batch(n=4, width=10, seed=1, with_advantages=False)
    params, delta = policy.params, _delta(policy.params)
    with torch.no_grad(), pytest.raises(taylor.NoRule, match="sinh"):
        passes._taylor_jvp2(lambda p: token_stats(policy, p, E), params, delta)
    with torch.no_grad():
        nested = [passes._nested_jvp(lambda p, mb=mb: token_stats(policy, p, mb), params, delta) for mb in E.micro_batches(2)]
    got = passes.jet(policy, params, delta, E, order=2, micro_batch=2)
    for field in ("value", "tangent", "second"):
        for k, whole in enumerate(getattr(got, field)):
            assert torch.equal(whole, torch.cat([getattr(part, field)[k] for part in nested]))


def test_closed_form_token_statistics_equal_torch_rules():
    """ℓ, h of a chunk of logits with random first and second derivatives against the nested jvp of
    z(ε) = z + ε ż + ε²/2 z̈ through torch's log-softmax."""
    from fprobe.model import vocab

    g = torch.Generator().manual_seed(0)
    z, z1, z2 = (3 * torch.randn(5, 40, generator=g, dtype=torch.float64) for _ in range(3))
    targets = torch.randint(0, 40, (5,), generator=g)

    def stats(eps):
        logprobs = torch.log_softmax(z + eps * z1 + eps * eps / 2 * z2, -1)
        return logprobs.gather(-1, targets[:, None])[:, 0], -(logprobs.exp() * logprobs).sum(-1)

    zero = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    (_, first), (_, second) = torch.func.jvp(lambda e: torch.func.jvp(stats, (e,), (one,)), (zero,), (one,))
    ours = vocab.logp_and_entropy(taylor.Jet(z, z1, z2), targets)
    for jet, d1, d2 in zip(ours, first, second):
        assert _relative(taylor.parts(jet).first, d1) < 1e-13
        assert _relative(taylor.parts(jet).second, d2) < 1e-13
