"""The cheap first-order jvp rules (``fprobe.model.jvp_rules``) against torch's own forward-mode rules, outside
``cheap_jvp``: the same values bit for bit; the same tangents bit for bit where one operand carries a tangent, to
float64 rounding where a rule fuses two terms; fewer kernels (no zero-tensor kernels, one product per tangent that
exists, no separate sums); and a jvp of whole models that forms no zero tensor inside the model."""

import contextlib
import operator

import pytest
import torch
from helpers import CONFIGS, make_batch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import fprobe
from fprobe.model.jvp_rules import cheap_jvp, routed, silu


class _Ops(TorchDispatchMode):
    """Counts the aten ops that run, by name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def products(self) -> int:
        return sum(self.counts.get(f"aten.{n}", 0) for n in ("mm", "addmm", "addmm_", "bmm"))


def _jvp(f, inputs: dict, cheap: bool, count: bool = True, route: bool = True):
    """(value, tangent, ops) of ``f(**inputs)``, inputs given as (value, tangent or None), with or without the rules
    (``count=False``: no op counts — torch 2.13 crashes counting a scaled ``addmm``'s zero-tensor kernels). ``route``:
    ``f``'s ops go through the rules as ``Numerics`` routes a model's (``route=False`` for ``Policy.apply``, whose
    ``Numerics`` routes them itself, as in ``passes.jet``)."""
    with torch.no_grad(), forward_ad.dual_level():
        args = {k: value if t is None else forward_ad.make_dual(value, t) for k, (value, t) in inputs.items()}
        with _Ops() if count else contextlib.nullcontext() as ops:
            if cheap:
                with cheap_jvp(), routed() if route else contextlib.nullcontext():
                    out = f(**args)
            else:
                out = f(**args)
        value, tangent = forward_ad.unpack_dual(out)
    return value, tangent, ops


def _random(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


AFFINE = {
    "linear": (lambda x, w, b: torch.nn.functional.linear(x, w, b), (3, 5, 7), (4, 7)),
    "addmm": (lambda x, w, b: torch.addmm(b, x, w), (5, 7), (7, 4)),  # GPT-2's Conv1D
}


@pytest.mark.parametrize("op", list(AFFINE))
@pytest.mark.parametrize("tangents", ["x", "w", "b", "x+w", "x+b", "x+w+b"])
def test_an_affine_layer_multiplies_only_the_tangents_that_exist(op, tangents):
    """ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ with one matrix product per tangent that exists — a frozen weight (LoRA) costs one, not the
    two that torch's rule spends — and the second accumulated in the first (no separate sum). torch's tangent bit
    for bit where one term exists (torch adds exact zeros), to rounding otherwise."""
    f, x_shape, w_shape = AFFINE[op]
    values = {"x": _random(*x_shape, seed=0), "w": _random(*w_shape, seed=1), "b": _random(4, seed=2)}
    inputs = {k: (v, _random(*v.shape, seed=10 + i) if k in tangents.split("+") else None) for i, (k, v) in enumerate(values.items())}
    value, tangent, torch_ops = _jvp(f, inputs, cheap=False)
    cheap_value, cheap_tangent, ops = _jvp(f, inputs, cheap=True)
    assert torch.equal(cheap_value, value)
    if tangents.count("+") == 0 or tangents == "x+b":
        assert torch.equal(cheap_tangent, tangent)
    torch.testing.assert_close(cheap_tangent, tangent, rtol=1e-15, atol=1e-15)
    expected = 1 + ("x" in tangents) + ("w" in tangents)
    assert ops.products() == expected <= torch_ops.products()
    assert "aten._efficientzerotensor" not in ops.counts
    assert ops.counts.get("aten.add", 0) == 0, "the second product and the bias are added in place"


def test_the_affine_rule_leaves_autocast_and_scaled_addmm_to_torch():
    """Under bf16 autocast the rules give torch's bf16 values and tangents (torch's own rule follows autocast's casts);
    an addmm with beta or alpha is torch's."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 7, generator=g), torch.randn(4, 7, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _jvp(torch.nn.functional.linear, {"input": (x, torch.ones_like(x)), "weight": (weight, None)}, cheap=False)
        cheap = _jvp(torch.nn.functional.linear, {"input": (x, torch.ones_like(x)), "weight": (weight, None)}, cheap=True)
    assert cheap[0].dtype == torch.bfloat16 and torch.equal(cheap[0], plain[0]) and torch.equal(cheap[1], plain[1])
    scaled = lambda b, x, m: torch.addmm(b, x, m, beta=0.5, alpha=2.0)
    inputs = {"b": (_random(4, seed=0), None), "x": (_random(5, 7, seed=1), _random(5, 7, seed=2)), "m": (_random(7, 4, seed=3), None)}
    (value, tangent, _), (cheap_value, cheap_tangent, _) = (_jvp(scaled, inputs, cheap, count=False) for cheap in (False, True))
    assert torch.equal(cheap_value, value) and torch.equal(cheap_tangent, tangent)


ODD_AFFINE = {  # shapes torch broadcasts or allows, each with its tangents: the rule's, or torch's own where it stands aside
    "bias only, 1-D input": (lambda x, w, b: torch.nn.functional.linear(x, w, b), (7,), (4, 7), (4,), "b"),
    "bias only, one row": (lambda x, w, b: torch.nn.functional.linear(x, w, b), (1, 7), (4, 7), (4,), "b"),
    "0-d bias": (lambda x, w, b: torch.nn.functional.linear(x, w, b), (3, 7), (4, 7), (), "b"),
    "bias of one": (lambda x, w, b: torch.nn.functional.linear(x, w, b), (3, 7), (4, 7), (1,), "b"),
    "addmm, column bias": (lambda x, w, b: torch.addmm(b, x, w), (5, 7), (7, 4), (5, 1), "b"),
    "1-D weight": (lambda x, w, b: torch.nn.functional.linear(x, w), (3, 7), (7,), (), "x+w"),
    "no input features": (lambda x, w, b: torch.nn.functional.linear(x, w, b), (3, 0), (4, 0), (4,), "x+b"),
}


@pytest.mark.parametrize("case", list(ODD_AFFINE))
def test_an_affine_layer_of_any_shape_torch_allows_gets_torchs_tangent_and_shares_none(case):
    """Bias-only tangents of biases torch broadcasts, a 1-D weight, no input features: torch's value and tangent; and the
    result's tangent is never the bias's own (writing into one leaves the other as it was)."""
    f, x_shape, w_shape, b_shape, tangents = ODD_AFFINE[case]
    values = {"x": _random(*x_shape, seed=0), "w": _random(*w_shape, seed=1), "b": _random(*b_shape, seed=2)}
    inputs = {k: (v, _random(*v.shape, seed=10 + i) if k in tangents.split("+") else None) for i, (k, v) in enumerate(values.items())}
    (value, tangent, _), (cheap_value, cheap_tangent, _) = (_jvp(f, inputs, c) for c in (False, True))
    assert torch.equal(cheap_value, value)
    torch.testing.assert_close(cheap_tangent, tangent, rtol=1e-15, atol=1e-15)
    with torch.no_grad(), forward_ad.dual_level(), cheap_jvp(), routed():
        args = {k: v if t is None else forward_ad.make_dual(v, t.clone()) for k, (v, t) in inputs.items()}
        out = f(**args)
        forward_ad.unpack_dual(out).tangent.mul_(2)
        for k, (_, t) in inputs.items():
            assert t is None or torch.equal(forward_ad.unpack_dual(args[k]).tangent, t), f"{k}'s tangent changed"


BINARY = {
    "a * c": operator.mul, "c * a": lambda a, c: c * a, "torch.mul": torch.mul, "Tensor.mul": lambda a, c: a.mul(c),
    "a / c": operator.truediv, "torch.div": torch.div,
    "a + c": operator.add, "c + a": lambda a, c: c + a, "torch.add": torch.add,
    "a - c": operator.sub, "c - a": lambda a, c: c - a, "torch.sub(c, a)": lambda a, c: torch.sub(c, a),
    "a @ cᵀ": lambda a, c: a @ c.transpose(-1, -2), "c @ aᵀ": lambda a, c: torch.matmul(c, a.transpose(-1, -2)),
}
OTHERS = {  # the operand without a tangent: broadcast, same shape, a 0-d float64 tensor, a number
    "row": lambda a: _random(a.shape[-1], seed=5).float() + 2,
    "same": lambda a: _random(*a.shape, seed=6).float() + 2,
    "scalar tensor": lambda a: torch.tensor(2.5, dtype=torch.float64),
    "number": lambda a: 0.125,
    "wider": lambda a: _random(3, *a.shape, seed=7).float() + 2,  # the tangent's operand is the one broadcast
}


MATRIX_OTHERS = ("same", "wider")


@pytest.mark.parametrize(("op", "other"), [(op, other) for op in BINARY for other in OTHERS
                                           if "@" not in op or other in MATRIX_OTHERS])
def test_a_binary_op_with_one_tangent_is_torchs_bit_for_bit_without_zero_tensors(op, other):
    """ẋ·c, ẋ c, ẋ / c, ±ẋ: torch's value and tangent bit for bit (float32 operands: dtype promotion and broadcasting
    as torch's), without the zero-tensor kernels torch's formula runs for the missing tangent."""
    a = _random(4, 5, seed=0).float()
    c = OTHERS[other](a)
    f = lambda a: BINARY[op](a, c)
    inputs = {"a": (a, _random(4, 5, seed=1).float())}
    (value, tangent, _), (cheap_value, cheap_tangent, ops) = (_jvp(f, inputs, cheap) for cheap in (False, True))
    assert cheap_value.dtype == value.dtype and torch.equal(cheap_value, value)
    assert cheap_tangent.dtype == tangent.dtype and torch.equal(cheap_tangent, tangent)
    assert "aten._efficientzerotensor" not in ops.counts


def test_a_sum_with_one_tangent_does_not_share_its_tangent():
    """The tangent of a + c is a copy of ȧ, as torch's: writing into one tangent in place leaves the other as it was."""
    a, a_t, c = _random(3, 4, seed=0), _random(3, 4, seed=1), _random(3, 4, seed=2)
    with torch.no_grad(), forward_ad.dual_level(), cheap_jvp(), routed():
        total = forward_ad.make_dual(a, a_t.clone()) + c
        forward_ad.unpack_dual(total).tangent.mul_(0)
        assert torch.equal(forward_ad.unpack_dual(total).tangent, torch.zeros_like(a))
        doubled = forward_ad.make_dual(a, a_t) * 2  # the rules leave the operand's tangent alone too
        assert torch.equal(forward_ad.unpack_dual(doubled).tangent, 2 * a_t)


def test_a_quotient_by_a_tangent_and_a_product_of_two_are_right():
    """c / x is not linear in x: torch's rule, bit for bit. x·y with both tangents: ẋ·y + x·ẏ in one ``addcmul_`` pass,
    torch's tangent to rounding (a broadcast factor included)."""
    x, x_t = _random(4, 5, seed=0) + 3, _random(4, 5, seed=1)
    y, y_t = _random(5, seed=2), _random(5, seed=3)
    quotient = lambda x: 2.0 / x
    (value, tangent, _), (cheap_value, cheap_tangent, _) = (_jvp(quotient, {"x": (x, x_t)}, c) for c in (False, True))
    assert torch.equal(cheap_value, value) and torch.equal(cheap_tangent, tangent)
    inputs = {"x": (x, x_t), "y": (y, y_t)}
    (value, tangent, _), (cheap_value, cheap_tangent, ops) = (_jvp(lambda x, y: x * y, inputs, c) for c in (False, True))
    assert torch.equal(cheap_value, value)
    torch.testing.assert_close(cheap_tangent, x_t * y + x * y_t, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(cheap_tangent, tangent, rtol=1e-15, atol=1e-15)
    assert ops.counts.get("aten.addcmul_") == 1 and ops.counts.get("aten.add", 0) == 0  # in place, into ẋ·y


def test_silu_is_x_sigmoid_x_with_its_derivative_in_one_pass():
    """silu(x) = x·σ(x) bit for bit as the primitive ops compute it; its tangent ẋ·σ(x)(1 + x(1 − σ(x))) in one
    ``silu_backward`` pass, equal to the derivative formed from σ by hand and to torch's rule for F.silu (to rounding)."""
    x, x_t = 4 * _random(6, 7, seed=0), _random(6, 7, seed=1)
    value, tangent, ops = _jvp(silu, {"x": (x, x_t)}, cheap=True)
    assert torch.equal(value, x * torch.sigmoid(x))
    sigma = torch.sigmoid(x)
    torch.testing.assert_close(tangent, x_t * sigma * (1 + x * (1 - sigma)), rtol=1e-14, atol=1e-15)
    _, torch_tangent, _ = _jvp(torch.nn.functional.silu, {"input": (x, x_t)}, cheap=False)
    torch.testing.assert_close(tangent, torch_tangent, rtol=1e-14, atol=1e-15)
    assert ops.counts.get("aten.silu_backward") == 1 and ops.counts.get("aten.sigmoid_backward", 0) == 0


def test_silu_in_a_plain_forward_is_x_sigmoid_x_written_into_sigmas_array():
    """Without a graph or a transform, silu(x) is x·σ(x) bit for bit, the product written into σ's array (one fresh
    activation), x untouched; with a graph it stays out of place, with autograd's derivative."""
    x = 4 * _random(6, 7, seed=0)
    before = x.clone()
    with torch.no_grad(), _Ops() as ops:
        y = silu(x)
    assert torch.equal(y, x * torch.sigmoid(x)) and torch.equal(x, before)
    assert ops.counts.get("aten.mul_") == 1 and "aten.mul" not in ops.counts
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(silu(leaf).sum(), leaf)
    sigma = torch.sigmoid(x)
    torch.testing.assert_close(grad, sigma * (1 + x * (1 - sigma)), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_jvp_through_a_model_forms_no_zero_tensor(arch, lora):
    """Inside the model (rotary tables, norms, attention scale and mask, residual adds, LoRA's scaling, GPT-2's
    Conv1D), every op's missing tangent is handled by a rule: torch's zero-tensor kernels never run."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).double().eval()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]))
    policy = fprobe.Policy(model)
    batch = make_batch(n=3, width=10, seed=1)
    params = policy.params
    inputs = {name: (p, _random(*p.shape, seed=i)) for i, (name, p) in enumerate(params.items())}
    value, tangent, ops = _jvp(lambda **p: policy.apply(p, batch.input_ids, batch.attention_mask), inputs, cheap=True, route=False)
    assert "aten._efficientzerotensor" not in ops.counts
    assert torch.equal(value, policy.apply(params, batch.input_ids, batch.attention_mask).detach())
    assert tangent is not None and bool(tangent.abs().sum() > 0)
