"""rl_step: one pure optimizer update. Property tests over random tiny models and batches (purity,
exactly one update, Δθ), linearity in the learning rate, micro-batch invariance, clipping against
torch, bf16 rounding loss, and bad input that is refused without changing anything."""

import warnings

import optree
import pytest
import torch
from helpers import CONFIGS, VOCAB, make_batch, no_pass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

import fprobe
from fprobe.model import passes
from fprobe.rl import losses
from fprobe import tree
from fprobe.rl import step as step_module
from fprobe.rl.step import loss_and_grad
from fprobe.rollouts import Rollouts

PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# helpers


def tiny_model(arch: str, layers: int, hidden: int, heads: int, kv_heads: int, tied: bool, seed: int, dtype):
    """A randomly initialised tiny causal LM of ``arch`` (built from a config, eval mode)."""
    if arch == "gpt2":
        config = GPT2Config(n_layer=layers, n_head=heads, n_embd=hidden, vocab_size=VOCAB, n_positions=32,
                            bos_token_id=0, eos_token_id=1)
    else:
        kind = LlamaConfig if arch == "llama" else Qwen2Config
        config = kind(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=tied)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@st.composite
def tiny_policies(draw, dtypes=(torch.float32, torch.float64)):
    arch = draw(st.sampled_from(["gpt2", "llama", "qwen2"]))
    heads = draw(st.sampled_from([2, 4]))
    model = tiny_model(
        arch, layers=draw(st.integers(1, 2)), hidden=heads * draw(st.sampled_from([2, 4])), heads=heads,
        kv_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])), tied=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)), dtype=draw(st.sampled_from(dtypes)),
    )
    return fprobe.Policy(model)


@st.composite
def update_batches(draw):
    """Random rows (left padding, prompt, ragged response, right padding), groups, and optionally a
    configured maximum response length (the dr_grpo normaliser)."""
    width = draw(st.integers(7, 12))
    return make_batch(n=draw(st.integers(2, 6)), width=width, seed=draw(st.integers(0, 2**16)), groups=draw(st.integers(1, 3)),
                      max_response_length=draw(st.sampled_from([None, width])))


def optimizers(lr: float):
    return st.sampled_from([
        fprobe.optim.adamw(lr=lr, weight_decay=0.1),
        fprobe.optim.adamw(lr=lr, weight_decay=0.1, foreach=True),
        fprobe.optim.adamw(lr=lr, weight_decay=0.0, betas=(0.8, 0.95)),
        fprobe.optim.sgd(lr=lr),
        fprobe.optim.sgd(lr=lr, momentum=0.9, weight_decay=0.01),
        fprobe.optim.sgd(lr=lr, momentum=0.9, weight_decay=0.01, foreach=True),
        fprobe.optim.sgd(lr=lr, momentum=0.9, nesterov=True),
    ])


def with_bias_group(opt: fprobe.optim.Optimizer, params) -> fprobe.optim.Optimizer:
    """The same optimizer with a second param group (biases and norms: 3× the lr, no weight decay)."""
    groups = {n: dict(lr=3 * opt.lr, weight_decay=0.0) for n in params if n.endswith("bias") or "norm" in n or "ln" in n}
    make = fprobe.optim.adamw if opt.name == "adamw" else fprobe.optim.sgd
    hyper = opt.hyper("")
    foreach = bool(hyper["foreach"])
    if opt.name == "adamw":
        return make(lr=opt.lr, betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                    groups=groups, foreach=foreach)
    return make(lr=opt.lr, momentum=hyper["momentum"], weight_decay=hyper["weight_decay"], nesterov=bool(hyper["nesterov"]),
                groups=groups, foreach=foreach)


def counting(opt: fprobe.optim.Optimizer):
    """``opt`` whose update counts its calls in the returned list."""
    calls = []

    def update(*args, **kwargs):
        calls.append(1)
        return opt.update(*args, **kwargs)

    return opt._replace(update=update), calls


def snapshot(t):
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t, none_is_leaf=True)


def identical(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and values, NaNs in the same places."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not x.is_floating_point():
        return torch.equal(x, y)
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(torch.where(x.isnan(), 0, x), torch.where(y.isnan(), 0, y))


def assert_same(now, before, what: str) -> None:
    assert optree.tree_structure(now, none_is_leaf=True) == optree.tree_structure(before, none_is_leaf=True), what
    for x, y in zip(optree.tree_leaves(now, none_is_leaf=True), optree.tree_leaves(before, none_is_leaf=True)):
        assert identical(x, y) if isinstance(x, torch.Tensor) else x == y, what


def batch_tensors(batch: fprobe.Rollouts) -> tuple:
    return (batch.input_ids, batch.attention_mask, batch.response_mask, batch.advantages, batch.rewards, batch.group_ids)


class Unchanged:
    """Snapshot of everything rl_step must leave alone: params, optimizer state, the batch, the model."""

    def __init__(self, policy, params, state, batch):
        self.policy, self.live = policy, (params, state, batch)
        self.before = snapshot((params, state, batch_tensors(batch)))
        self.model = snapshot(policy.model.state_dict())

    def check(self):
        params, state, batch = self.live
        assert_same(params, self.before[0], "params")
        assert_same(state, self.before[1], "optimizer state")
        assert_same(batch_tensors(batch), self.before[2], "update batch")
        assert_same(self.policy.model.state_dict(), self.model, "model weights")


def warm_state(policy, opt, params, batch):
    """Optimizer state after one earlier step (non-zero moments / momentum buffers), and its params."""
    step = fprobe.rl_step(policy, params, opt, opt.init(params), batch)
    return step.params, step.opt_state


def rounding_bound(p, d_big, d_small, k):
    """Elementwise bound on |Δθ(kη) − kΔθ(η)|: a few roundings of the parameter's dtype on θ and Δθ."""
    eps = torch.finfo(p.dtype).eps
    return 4 * eps * ((1 + k) * p.abs() + d_big.abs() + k * d_small.abs())


# ---------------------------------------------------------------------------------------------
# purity, one update, Δθ


@PROPERTY
@given(policy=tiny_policies(), batch=update_batches(), lr=st.floats(1e-6, 1e-2), data=st.data())
def test_rl_step_is_pure_and_updates_exactly_once(policy, batch, lr, data):
    opt = data.draw(optimizers(lr))
    if data.draw(st.booleans()):
        opt = with_bias_group(opt, policy.params)
    params, state = policy.params, opt.init(policy.params)
    if data.draw(st.booleans()):
        params, state = warm_state(policy, opt, params, batch)
    counted, calls = counting(opt)
    kw = dict(
        lr=data.draw(st.one_of(st.none(), st.floats(1e-6, 1e-2))),
        loss=data.draw(st.sampled_from(losses.LOSS_TYPES)),
        micro_batch=data.draw(st.one_of(st.none(), st.integers(1, 4))),
        max_grad_norm=data.draw(st.one_of(st.none(), st.floats(1e-3, 10.0))),
    )
    unchanged = Unchanged(policy, params, state, batch)
    step = fprobe.rl_step(policy, params, counted, state, batch, **kw)
    assert calls == [1], "exactly one optimizer update per rl_step"
    unchanged.check()
    assert list(step.params) == list(params) == list(step.delta)
    assert step.lr == (opt.lr if kw["lr"] is None else kw["lr"])
    for name, p in params.items():
        assert step.params[name].dtype == p.dtype
        assert torch.equal(step.delta[name], step.params[name] - p), name
    assert step.delta_l2 == float(tree.norm(step.delta))
    assert_params_plus_delta_is_new_params(params, step)


def assert_params_plus_delta_is_new_params(params, step):
    """θ + Δθ == θ_new bit for bit wherever floating point can promise it (Sterbenz: θ_new/2 ≤ θ ≤ 2θ_new,
    so θ_new − θ is exact; or θ = 0), and to one rounding of |θ_new| + |Δθ| everywhere else."""
    for name, p in params.items():
        new, d = step.params[name], step.delta[name]
        rebuilt = p + d
        exact = ((new / 2 <= p) & (p <= 2 * new)) | ((2 * new <= p) & (p <= new / 2)) | (p == 0)
        assert torch.equal(rebuilt[exact], new[exact]), f"{name}: θ + Δθ ≠ θ_new where the subtraction is exact"
        eps = torch.finfo(p.dtype).eps
        assert bool(((rebuilt - new).abs() <= eps * (new.abs() + d.abs())).all()), name


def test_params_plus_delta_is_new_params_bit_for_bit_at_a_small_lr(load_policy):
    for dtype in (torch.float32, torch.float64):
        policy = load_policy("gpt2", dtype)
        opt = fprobe.optim.adamw(lr=1e-5)
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), make_batch())
        for name, p in policy.params.items():
            assert torch.equal(p + step.delta[name], step.params[name]), name


# ---------------------------------------------------------------------------------------------
# learning rate


_POLICIES = {}


def cached_policy(load_policy, arch, dtype):
    """A policy shared across hypothesis examples (rl_step never changes it: tested above)."""
    if (arch, dtype) not in _POLICIES:
        _POLICIES[arch, dtype] = load_policy(arch, dtype)
    return _POLICIES[arch, dtype]


@PROPERTY
@given(
    arch=st.sampled_from(["gpt2", "qwen2"]), dtype=st.sampled_from([torch.float32, torch.float64]),
    lr=st.floats(1e-6, 1e-3), k=st.sampled_from([0.1, 0.5, 2.0, 3.0, 10.0]), warm=st.booleans(), data=st.data(),
)
def test_delta_is_linear_in_the_lr_override(load_policy, arch, dtype, lr, k, warm, data):
    policy = cached_policy(load_policy, arch, dtype)
    batch = make_batch(seed=data.draw(st.integers(0, 99)))
    opt = with_bias_group(data.draw(optimizers(1e-3)), policy.params)
    params, state = policy.params, opt.init(policy.params)
    if warm:
        params, state = warm_state(policy, opt, params, batch)
    small = fprobe.rl_step(policy, params, opt, state, batch, lr=lr)
    big = fprobe.rl_step(policy, params, opt, state, batch, lr=k * lr)
    bounds = {n: rounding_bound(params[n], big.delta[n], small.delta[n], k) for n in params}
    for name in params:
        error = (big.delta[name] - k * small.delta[name]).abs()
        assert bool((error <= bounds[name]).all()), f"{name}: Δθ(kη) − kΔθ(η) beyond rounding"
    assert abs(big.delta_l2 - k * small.delta_l2) <= float(tree.norm(bounds))
    assert small.delta_l2 > 0


@pytest.mark.parametrize("opt", [
    fprobe.optim.adamw(lr=1e-3, weight_decay=0.1),
    fprobe.optim.sgd(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
], ids=["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_lr_gives_exactly_zero_delta(load_policy, opt, dtype):
    policy = load_policy("gpt2", dtype)
    batch = make_batch()
    opt = with_bias_group(opt, policy.params)
    params, state = warm_state(policy, opt, policy.params, batch)
    step = fprobe.rl_step(policy, params, opt, state, batch, lr=0.0)
    assert step.delta_l2 == 0.0 and step.lr == 0.0
    for name, p in params.items():
        assert torch.count_nonzero(step.delta[name]) == 0, name
        assert torch.equal(step.params[name], p), name


# ---------------------------------------------------------------------------------------------
# micro-batches


def relative(a: tree.Params, b: tree.Params) -> float:
    return float(tree.norm(tree.sub(a, b)) / tree.norm(b))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama"])
def test_micro_batch_size_does_not_change_the_gradient(load_policy, arch):
    policy = load_policy(arch, torch.float64)
    batch = make_batch(n=7, width=12, seed=21)
    for loss, sizes in zip(losses.LOSS_TYPES, [(1, 5), (2,), (3,)]):
        value, full = loss_and_grad(policy, policy.params, batch, loss)[:2]
        for size in sizes:
            value_mb, grads = loss_and_grad(policy, policy.params, batch, loss, micro_batch=size)[:2]
            assert relative(grads, full) <= 1e-12, (loss, size)
            assert abs(value_mb - value) <= 1e-14 * max(1.0, abs(value))


@pytest.mark.parametrize("opt", [fprobe.optim.adamw(lr=1e-3), fprobe.optim.sgd(lr=1e-2, momentum=0.9)], ids=["adamw", "sgd"])
def test_micro_batch_size_does_not_change_the_step(load_policy, opt):
    policy = load_policy("gpt2", torch.float64)
    batch = make_batch(n=7, width=12, seed=22)
    params, state = warm_state(policy, opt, policy.params, batch)
    full = fprobe.rl_step(policy, params, opt, state, batch)
    for size in (1, 2, 4):
        step = fprobe.rl_step(policy, params, opt, state, batch, micro_batch=size)
        assert relative(step.delta, full.delta) <= 1e-12, size
        assert abs(step.grad_norm - full.grad_norm) <= 1e-12 * full.grad_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("opt", [fprobe.optim.adamw(lr=1e-3, weight_decay=0.1), fprobe.optim.adamw(lr=1e-3, foreach=True),
                                 fprobe.optim.sgd(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True),
                                 fprobe.optim.sgd(lr=1e-2, momentum=0.8, dampening=0.1)],
                         ids=["adamw", "adamw_foreach", "sgd_nesterov_foreach", "sgd"])
def test_the_step_one_parameter_at_a_time_is_rl_step_bit_for_bit(load_policy, opt, dtype):
    """rl_step_by_parameter's states and Δθ, in any order, are rl_step's (from a warm state: non-zero moments)."""
    policy = load_policy("gpt2", dtype)
    batch = make_batch(n=5, width=10, seed=23)
    params, state = warm_state(policy, opt, policy.params, batch)
    whole = fprobe.rl_step(policy, params, opt, state, batch, max_grad_norm=1e-2)
    order = list(reversed(params))
    parts = step_module.rl_step_by_parameter(policy, params, opt, state, batch, order=order, max_grad_norm=1e-2)
    assert (parts.lr, parts.clip_coef) == (whole.lr, whole.clip_coef) and torch.equal(parts.logp, whole.logp)
    seen = []
    for update in parts.updates:
        seen.append(update.name)
        assert torch.equal(update.delta, whole.delta[update.name]), update.name
        for slot, now, kept in zip(update.new_state._fields, update.new_state, whole.opt_state):
            assert list(now) == [update.name] and (now[update.name] == kept[update.name] if slot == "step" else
                                                    torch.equal(now[update.name], kept[update.name])), (slot, update.name)
        for now, before in zip(update.state, state):
            assert {n: v for n, v in before.items() if n == update.name}.keys() == now.keys()
    assert seen == order


# ---------------------------------------------------------------------------------------------
# clipping


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_step_equals_torch_clip_then_sgd(load_policy, dtype):
    policy = load_policy("gpt2", dtype)
    batch = make_batch()
    grads = loss_and_grad(policy, policy.params, batch)[1]
    torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in policy.params.items()}
    for n, p in torch_params.items():
        p.grad = grads[n].clone()
    max_norm = 0.1
    total = torch.nn.utils.clip_grad_norm_(list(torch_params.values()), max_norm, foreach=False)
    torch.optim.SGD(list(torch_params.values()), lr=0.05, foreach=False).step()
    opt = fprobe.optim.sgd(lr=0.05)
    step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch, max_grad_norm=max_norm)
    assert float(total) > max_norm, "the clip must act in this test"
    assert step.clip_coef == min(1.0, float(max_norm / (total + 1e-6)))
    assert abs(step.grad_norm - float(total)) <= 1e-6 * float(total)
    for name, p in torch_params.items():
        assert torch.equal(step.params[name], p.detach()), name


# ---------------------------------------------------------------------------------------------
# bf16


def test_bf16_step_reports_the_update_lost_to_rounding(load_policy):
    policy = load_policy("gpt2", torch.bfloat16)
    batch = make_batch()
    opt = fprobe.optim.adamw(lr=1e-3, weight_decay=0.01)
    step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch)
    # independent: torch AdamW in float64 on float64 copies, then one rounding to bf16
    grads = loss_and_grad(policy, policy.params, batch)[1]
    wide = {n: torch.nn.Parameter(p.double()) for n, p in policy.params.items()}
    for n, p in wide.items():
        p.grad = grads[n].double()
    torch.optim.AdamW(list(wide.values()), lr=1e-3, weight_decay=0.01, foreach=False).step()
    intended = torch.cat([(wide[n].detach() - p.double()).flatten() for n, p in policy.params.items()])
    applied = torch.cat([(wide[n].detach().bfloat16().double() - p.double()).flatten() for n, p in policy.params.items()])
    lost = float(torch.linalg.vector_norm(intended - applied) / torch.linalg.vector_norm(intended))
    assert 0 < step.update_lost <= 1
    assert abs(step.update_lost - lost) <= 1e-12 * lost
    for name in policy.params:
        assert step.params[name].dtype == torch.bfloat16
        assert torch.equal(step.params[name], wide[name].detach().bfloat16()), name


def test_float32_step_reports_no_update_lost(load_policy):
    policy = load_policy("gpt2", torch.float32)
    opt = fprobe.optim.adamw(lr=1e-3)
    assert fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), make_batch()).update_lost is None


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the problem, and nothing changed


def assert_refused(policy, params, batch, error, match, opt=None, updates=0, **kw):
    opt = opt or fprobe.optim.adamw(lr=1e-3)
    state = opt.init(policy.params)
    counted, calls = counting(opt)
    unchanged = Unchanged(policy, params, state, batch)
    with pytest.raises(error, match=match):
        fprobe.rl_step(policy, params, counted, state, batch, **kw)
    assert len(calls) == updates
    unchanged.check()


@pytest.fixture
def gpt2(load_policy):
    return load_policy("gpt2", torch.float64)


def test_params_with_a_missing_name_are_refused(gpt2):
    params = {n: p for n, p in gpt2.params.items() if n != "transformer.ln_f.bias"}
    assert_refused(gpt2, params, make_batch(), ValueError, r"params: names do not match.*missing \['transformer.ln_f.bias'\]")


def test_params_with_an_unexpected_name_are_refused(gpt2):
    params = {**gpt2.params, "lm_head.weight": gpt2.params["transformer.wte.weight"]}
    assert_refused(gpt2, params, make_batch(), ValueError, r"unexpected \['lm_head.weight'\]")


def test_params_with_a_wrong_shape_are_refused(gpt2):
    params = {**gpt2.params, "transformer.ln_f.bias": torch.zeros(17, dtype=torch.float64)}
    assert_refused(gpt2, params, make_batch(), ValueError, r"params\['transformer.ln_f.bias'\] has shape \(17,\), the parameter has \(16,\)")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_params_name_the_first_offending_parameter(gpt2, bad):
    params = dict(gpt2.params)
    for name in ("transformer.h.1.ln_2.weight", "transformer.ln_f.weight"):
        params[name] = params[name].clone()
        params[name][3] = bad
    assert_refused(gpt2, params, make_batch(), FloatingPointError, r"parameter 'transformer.h.1.ln_2.weight' is not finite")


def test_a_non_finite_loss_is_refused(load_policy):
    policy = load_policy("gpt2", torch.float32)
    params = dict(policy.params)
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):  # finite, but the logits overflow
        params[name] = torch.full_like(params[name], 3e38)
    assert_refused(policy, params, make_batch(), FloatingPointError, r"the dr_grpo loss on the update batch is not finite")


def poison_gradient(model, name: str):
    """A forward hook that adds √(w − sg(w)) = 0 to the output of w's module: the value is unchanged,
    the gradient of w alone becomes non-finite (1/(2√0))."""
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    return module.register_forward_hook(lambda m, args, out: out + torch.sqrt(getattr(m, attr) - getattr(m, attr).detach()).sum())


def test_a_non_finite_gradient_names_the_first_offending_parameter(gpt2):
    hooks = [poison_gradient(gpt2.model, n) for n in ("transformer.h.1.mlp.c_fc.bias", "transformer.h.1.attn.c_proj.weight")]
    try:
        value, grads = loss_and_grad(gpt2, gpt2.params, make_batch())[:2]
        bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
        assert torch.isfinite(torch.tensor(value)) and bad == ["transformer.h.1.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.bias"]
        assert_refused(gpt2, gpt2.params, make_batch(), FloatingPointError,
                       r"^the gradient of parameter 'transformer.h.1.attn.c_proj.weight' is not finite")
    finally:
        for h in hooks:
            h.remove()


def test_an_update_that_overflows_names_the_first_parameter(gpt2):
    first = next(iter(gpt2.params))
    assert_refused(gpt2, gpt2.params, make_batch(), FloatingPointError, rf"the updated value of parameter '{first}' is not finite",
                   opt=fprobe.optim.sgd(lr=1e3, weight_decay=1e308), updates=1)


@pytest.mark.parametrize("bad", [dict(lr=float("inf")), dict(lr=-1e-3), dict(clip=-1.0), dict(max_grad_norm=0.0), dict(max_grad_norm=-1.0)])
def test_step_options_are_refused_before_any_pass(gpt2, bad):
    assert_refused(gpt2, gpt2.params, make_batch(), ValueError, next(iter(bad)).replace("lr", "learning rate"), opt=fprobe.optim.sgd(lr=1e-2), **bad)


def test_a_model_in_train_mode_with_dropout_is_refused(gpt2):
    gpt2.model.train()
    try:
        assert_refused(gpt2, gpt2.params, make_batch(), ValueError, r"train mode with active dropout .*call model.eval\(\)")
    finally:
        gpt2.model.eval()


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match=r"empty batch: input_ids has shape \(0, 6\)"):
        fprobe.Rollouts(torch.zeros(0, 6, dtype=torch.long), torch.zeros(0, 6), torch.zeros(0, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"empty batch: input_ids has shape \(3, 0\)"):
        fprobe.Rollouts(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty batch"):
        make_batch().select([])


def test_a_row_without_response_tokens_is_named():
    batch = make_batch(n=4)
    response = batch.response_mask.clone()
    response[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\] have no response tokens"):
        fprobe.Rollouts(batch.input_ids, batch.attention_mask, response, advantages=batch.advantages)


def test_a_non_positive_micro_batch_is_refused(gpt2):
    assert_refused(gpt2, gpt2.params, make_batch(), ValueError, "micro_batch must be a positive number of rows", micro_batch=0)


def test_an_unknown_loss_is_refused(gpt2):
    assert_refused(gpt2, gpt2.params, make_batch(), ValueError, "unknown loss 'ppo'", loss="ppo")


# --- updates lost to bf16 rounding, all-zero advantages, step options checked before any pass


def test_bf16_step_that_loses_most_of_its_update_warns(load_policy):
    policy, batch = load_policy("gpt2", torch.bfloat16), make_batch()
    opt = fprobe.optim.adamw(lr=1e-7, weight_decay=0.0)
    with pytest.warns(fprobe.UpdateLostWarning) as caught:
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch)
    assert step.update_lost > 0.5
    (warning,) = caught
    message = str(warning.message)
    assert f"{step.update_lost:.1%} of the update was rounded away by the bfloat16 parameters" in message
    assert "dtype=torch.float32" in message and "LoRA adapter (lora=...)" in message
    assert warning.filename == __file__, "attributed to the caller's line"


def test_lora_on_a_bf16_base_keeps_its_update_as_the_warning_says(load_policy):
    policy = load_policy("gpt2", torch.bfloat16, lora=(2, 4, ["c_attn"]))
    assert {p.dtype for p in policy.params.values()} == {torch.float32}
    assert {p.dtype for p in policy.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    opt = fprobe.optim.adamw(lr=1e-7, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.UpdateLostWarning)
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), make_batch())
    assert step.update_lost is None and step.delta_l2 > 0


def test_bf16_step_that_keeps_most_of_its_update_does_not_warn(load_policy):
    policy, batch = load_policy("gpt2", torch.bfloat16), make_batch()
    opt = fprobe.optim.adamw(lr=1e-2, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.UpdateLostWarning)
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), batch)
    assert step.update_lost < 0.5


def test_all_zero_advantages_warn_and_the_step_is_weight_decay_alone(load_policy):
    policy, batch = load_policy("gpt2"), make_batch()
    U = Rollouts(batch.input_ids, batch.attention_mask, batch.response_mask,
                 advantages=torch.zeros(len(batch), dtype=torch.float64), group_ids=torch.arange(len(batch)))
    opt = fprobe.optim.adamw(lr=1e-3, weight_decay=0.1)
    with pytest.warns(fprobe.ZeroAdvantagesWarning, match="Δθ is weight decay"):
        step = fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U)
    for name, p in policy.params.items():  # θ(1 − ηλ) − θ, and no gradient term
        torch.testing.assert_close(step.delta[name], p * (1 - 1e-3 * 0.1) - p, rtol=0, atol=1e-18)


def test_nonzero_advantages_do_not_warn(load_policy):
    policy, U = load_policy("gpt2"), make_batch()
    opt = fprobe.optim.adamw(lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.ZeroAdvantagesWarning)
        fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U)


def other_state(opt, params):
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(CONFIGS["llama"]()).double()
    return opt.init(fprobe.Policy(other).params)


def moments(params, first_moment) -> fprobe.optim.AdamWState:
    """An AdamW state after one step whose first moments are ``first_moment(param)`` (second moments zero)."""
    return fprobe.optim.AdamWState({k: 1 for k in params}, {k: first_moment(v) for k, v in params.items()},
                                   {k: torch.zeros_like(v) for k, v in params.items()})


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),  # was: clip coefficient −1.65, the step reversed
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),  # was: a zero step (HF's 0 means "no clipping")
        (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
        (dict(lr=-1e-3), ValueError, "learning rate"),  # was: gradient ascent, accepted
        (dict(lr=float("nan")), ValueError, "learning rate"),
        (dict(clip=-1.0), ValueError, "clip"),  # was: δH₁ changed 4×
        (dict(clip=float("nan")), ValueError, "clip"),
        (dict(state=lambda opt, p: moments(p, lambda v: torch.zeros_like(v[..., :1]))), ValueError, r"exp_avg\[.*shape"),
        (dict(state=lambda opt, p: moments(p, lambda v: torch.zeros_like(v, dtype=torch.float32))), ValueError, r"exp_avg\[.*dtype"),
        (dict(state=other_state), ValueError, "not the policy's parameters"),  # was: KeyError after the gradient
        (dict(state=lambda opt, p: moments(p, lambda v: torch.full_like(v, float("nan")))),
         FloatingPointError, r"opt_state.exp_avg of parameter .* not finite"),  # was: "the updated value" after the gradient
        (dict(state=lambda opt, p: fprobe.optim.sgd(lr=1e-3, momentum=0.9).init(p)), TypeError, "SGDState"),
    ],
)
def test_bad_step_options_are_refused_before_any_pass(fresh_gpt2, fresh_batches, monkeypatch, kw, error, match):
    E, U = fresh_batches
    opt = kw.pop("opt", fprobe.optim.adamw(lr=1e-3))
    state = kw.pop("state")(opt, fresh_gpt2.params) if "state" in kw else None
    for name in ("gradient", "forward", "jet"):
        monkeypatch.setattr(passes, name, no_pass)
    with pytest.raises(error, match=match):
        fprobe.probe(fresh_gpt2, E, U, opt, state, **kw)


def test_a_real_optimizer_state_is_still_accepted(fresh_gpt2, fresh_batches):
    E, U = fresh_batches
    opt = fprobe.optim.adamw(lr=1e-3)
    first = fprobe.rl_step(fresh_gpt2, fresh_gpt2.params, opt, opt.init(fresh_gpt2.params), U)
    second = fprobe.rl_step(fresh_gpt2, fresh_gpt2.params, opt, first.opt_state, U)
    res = fprobe.probe(fresh_gpt2, E, U, opt, first.opt_state, max_grad_norm=1e3, clip=0.0)
    assert res.delta_l2 == second.delta_l2  # the same step, taken independently by rl_step


def test_a_custom_optimizer_whose_init_needs_parameters_is_still_accepted(fresh_gpt2, fresh_batches):
    E, U = fresh_batches
    sgd = fprobe.optim.sgd(lr=1e-3)

    def init(params):
        next(iter(params))  # fails on the empty tree
        return sgd.init(params)

    custom = sgd._replace(init=init)
    state = custom.init(fresh_gpt2.params)
    res = fprobe.probe(fresh_gpt2, E, U, custom, state)
    assert res.delta_l2 == fprobe.rl_step(fresh_gpt2, fresh_gpt2.params, sgd, sgd.init(fresh_gpt2.params), U).delta_l2
