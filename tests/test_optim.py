"""fprobe.optim against torch.optim bit for bit, on a real tiny GPT-2's parameters and gradients: AdamW
and SGD, torch's single-tensor (foreach=False) and multi-tensor (foreach=True) paths, float32 and float64,
two param groups, several steps, and after importing a torch optimizer's state mid-training (its
``foreach`` read from the param groups); lazy states; clipping against torch.nn.utils.clip_grad_norm_."""

import io
import re

import optree
import pytest
import torch
from helpers import make_batch

import fprobe
from fprobe.rl import optim
from fprobe.rl.step import loss_and_grad

STEPS = 3
DTYPES = [torch.float32, torch.float64]
PATHS = [False, True]  # torch's foreach flag: single-tensor loop, multi-tensor _foreach kernels

SGD_CONFIGS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": dict(momentum=0.8, nesterov=True, weight_decay=0.02),
}


def is_group_b(name: str) -> bool:
    """Second param group: LayerNorms and biases (different lr, no weight decay)."""
    return "ln" in name or name.endswith("bias")


# Two param groups with different lr and weight decay: (lr, weight_decay) of group a and group b.
GROUPS = {"adamw": ((3e-3, 0.1), (1e-2, 0.0)), "sgd": ((2e-2, None), (5e-2, 0.0))}


def torch_groups(named: dict, kind: str, weight_decay: float = 0.0) -> list[dict]:
    """The two torch param groups, in order; SGD's group a takes the config's weight decay."""
    (lr_a, wd_a), (lr_b, wd_b) = GROUPS[kind]
    a = [p for n, p in named.items() if not is_group_b(n)]
    b = [p for n, p in named.items() if is_group_b(n)]
    return [dict(params=a, lr=lr_a, weight_decay=weight_decay if wd_a is None else wd_a),
            dict(params=b, lr=lr_b, weight_decay=wd_b)]


def make_pair(named: dict, kind: str, foreach: bool = False, **kw) -> tuple[optim.Optimizer, torch.optim.Optimizer]:
    """fprobe's optimizer and torch's with the same hyperparameters, groups and implementation (``foreach``)."""
    (lr_a, wd_a), (lr_b, wd_b) = GROUPS[kind]
    group_b = {n: dict(lr=lr_b, weight_decay=wd_b) for n in named if is_group_b(n)}
    if kind == "adamw":
        fopt = optim.adamw(lr=lr_a, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd_a, groups=group_b, foreach=foreach)
        topt = torch.optim.AdamW(torch_groups(named, kind), betas=(0.9, 0.99), eps=1e-8, foreach=foreach)
        return fopt, topt
    wd = kw.pop("weight_decay", 0.0)
    fopt = optim.sgd(lr=lr_a, weight_decay=wd, groups=group_b, foreach=foreach, **kw)
    topt = torch.optim.SGD(torch_groups(named, kind, wd), foreach=foreach, **kw)
    return fopt, topt


class Setting:
    """A real tiny GPT-2 policy, its trainable params (cloned), and torch leaf copies of them."""

    def __init__(self, load_policy, dtype):
        self.policy = load_policy("gpt2", dtype)
        self.batch = make_batch(n=6, width=12, seed=7)
        self.params = {n: p.clone() for n, p in self.policy.params.items()}
        self.torch_params = {n: torch.nn.Parameter(p.clone()) for n, p in self.params.items()}

    def grads(self, params):
        return loss_and_grad(self.policy, params, self.batch)[1]

    def torch_step(self, opt, grads):
        for name, p in self.torch_params.items():
            p.grad = grads[name].clone()
        opt.step()

    def assert_params_equal(self, params, when):
        for name, p in self.torch_params.items():
            assert torch.equal(params[name], p.detach()), f"{name} differs from torch.optim {when}"


def assert_adam_state_equal(state: optim.AdamWState, torch_opt, torch_params):
    for name, p in torch_params.items():
        s = torch_opt.state[p]
        assert state.step[name] == int(s["step"]), name
        assert torch.equal(state.exp_avg[name], s["exp_avg"]), name
        assert torch.equal(state.exp_avg_sq[name], s["exp_avg_sq"]), name


def run_both(setting, fopt, fstate, params, topt, steps):
    """``steps`` steps of both optimizers on the same (real) gradients; bit-equal after each."""
    for k in range(steps):
        g = setting.grads(params)
        params, fstate = fopt.update(g, fstate, params)
        setting.torch_step(topt, g)
        setting.assert_params_equal(params, f"after step {k + 1}")
    return params, fstate


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_equals_torch_bit_for_bit(load_policy, dtype, foreach):
    s = Setting(load_policy, dtype)
    fopt, topt = make_pair(s.torch_params, "adamw", foreach)
    params, state = run_both(s, fopt, fopt.init(s.params), s.params, topt, STEPS)
    assert_adam_state_equal(state, topt, s.torch_params)
    assert not torch.equal(params["transformer.wte.weight"], s.params["transformer.wte.weight"])


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_equals_torch_bit_for_bit(load_policy, dtype, config, foreach):
    s = Setting(load_policy, dtype)
    fopt, topt = make_pair(s.torch_params, "sgd", foreach, **SGD_CONFIGS[config])
    _, state = run_both(s, fopt, fopt.init(s.params), s.params, topt, STEPS)
    for name, p in s.torch_params.items():
        buffer = topt.state[p].get("momentum_buffer")
        assert (buffer is None) == (name not in state.momentum_buffer)
        assert buffer is None or torch.equal(state.momentum_buffer[name], buffer), name


def snapshot(t):
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)


def assert_same(a, b):
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def save_and_load(state_dict) -> dict:
    """A state_dict through a checkpoint file, loaded the safe way."""
    f = io.BytesIO()
    torch.save(state_dict, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


def train_torch(setting, topt, steps):
    """Train the torch copy alone for ``steps`` steps; return its parameters as a name-keyed tree."""
    for _ in range(steps):
        setting.torch_step(topt, setting.grads({n: p.detach().clone() for n, p in setting.torch_params.items()}))
    return {n: p.detach().clone() for n, p in setting.torch_params.items()}


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_imported_from_a_checkpoint_continues_bit_for_bit(load_policy, dtype, kind, foreach):
    s = Setting(load_policy, dtype)
    kw = SGD_CONFIGS["nesterov"] if kind == "sgd" else {}
    _, topt = make_pair(s.torch_params, kind, foreach, **kw)
    params = train_torch(s, topt, 3)
    order = [n for n in s.torch_params if not is_group_b(n)] + [n for n in s.torch_params if is_group_b(n)]
    fopt, state = optim.from_torch(save_and_load(topt.state_dict()), order, params)
    assert fopt.name == kind
    for name in params:  # hyperparameters come from each param group
        expected_lr = topt.param_groups[1 if is_group_b(name) else 0]["lr"]
        assert fopt.hyper(name)["lr"] == expected_lr
        assert fopt.hyper(name)["weight_decay"] == topt.param_groups[1 if is_group_b(name) else 0]["weight_decay"]
        assert fopt.hyper(name)["foreach"] == float(foreach)
    if kind == "adamw":
        assert_adam_state_equal(state, topt, s.torch_params)
    run_both(s, fopt, state, params, topt, 3)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_state_imported_from_a_live_optimizer_is_a_copy_and_continues_bit_for_bit(load_policy, kind):
    s = Setting(load_policy, torch.float64)
    kw = SGD_CONFIGS["momentum"] if kind == "sgd" else {}
    _, topt = make_pair(s.torch_params, kind, **kw)
    params = train_torch(s, topt, 2)
    fopt, state = optim.from_torch_optimizer(topt, s.torch_params.items(), params)
    imported = snapshot(state)
    live = {t.untyped_storage().data_ptr() for st in topt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    assert not any(x.untyped_storage().data_ptr() in live for x in optree.tree_leaves(state) if isinstance(x, torch.Tensor))
    run_both(s, fopt, state, params, topt, 2)  # torch goes on training, updating its state in place
    assert_same(state, imported)


def test_unsupported_torch_options_are_named(load_policy):
    s = Setting(load_policy, torch.float64)
    names = list(s.torch_params)
    for make, message in [
        (lambda ps: torch.optim.AdamW(ps, amsgrad=True), r"\['amsgrad'\]"),
        (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), "coupled weight decay"),
        (lambda ps: torch.optim.RMSprop(ps, momentum=0.9), "neither Adam's nor SGD's"),
        (lambda ps: torch.optim.NAdam(ps), "neither Adam's nor SGD's"),
        (lambda ps: torch.optim.Adamax(ps), "neither Adam's nor SGD's"),
    ]:
        with pytest.raises(ValueError, match=message):
            optim.from_torch(make(list(s.torch_params.values())).state_dict(), names, s.params)


def test_import_checks_the_parameter_names(load_policy):
    s = Setting(load_policy, torch.float64)
    state_dict = torch.optim.AdamW(list(s.torch_params.values())).state_dict()
    with pytest.raises(ValueError, match=r"optimizer parameters: names do not match.*unexpected \['extra'\]"):
        optim.from_torch(state_dict, list(s.torch_params)[:-1] + ["extra"], s.params)
    with pytest.raises(ValueError, match="only 3 names were given"):
        optim.from_torch(state_dict, list(s.torch_params)[:3], s.params)
    stranger = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"positions \[0\] are not among the model's named parameters"):
        optim.from_torch_optimizer(stranger, s.torch_params.items(), s.params)


@pytest.mark.parametrize("make", [lambda: optim.adamw(lr=1e-2), lambda: optim.sgd(lr=1e-2, momentum=0.9, weight_decay=0.1)])
def test_update_mutates_nothing(load_policy, make):
    s = Setting(load_policy, torch.float64)
    opt = make()
    g = s.grads(s.params)
    params, state = opt.update(g, opt.init(s.params), s.params)  # a state with non-zero moments
    g2 = s.grads(params)
    before = snapshot((g2, state, params))
    opt.update(g2, state, params)
    assert_same((g2, state, params), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_global_norm_equals_torch(load_policy, dtype):
    s = Setting(load_policy, dtype)
    g = s.grads(s.params)
    for max_norm in (1e-3, 0.3, 1e6):
        clipped, coef = optim.clip_by_global_norm(g, max_norm)
        for name, p in s.torch_params.items():
            p.grad = g[name].clone()
        total = torch.nn.utils.clip_grad_norm_(list(s.torch_params.values()), max_norm, foreach=False)
        assert coef == min(1.0, float(max_norm / (total + 1e-6)))
        assert (coef < 1.0) == (max_norm < float(total))
        for name, p in s.torch_params.items():
            assert torch.equal(clipped[name], p.grad), (name, max_norm)


def test_lr_override_rescales_every_group_alike():
    names = ["a", "b"]
    opt = optim.sgd(lr=0.1, groups={"b": dict(lr=0.4)})
    params = {n: torch.ones(3, dtype=torch.float64) for n in names}
    grads = {n: torch.full((3,), 2.0 ** -3, dtype=torch.float64) for n in names}
    new, _ = opt.update(grads, opt.init(params), params, 0.05)
    assert torch.equal(new["a"], params["a"] - 0.05 * grads["a"])
    assert torch.equal(new["b"], params["b"] - 0.4 * 0.05 / 0.1 * grads["b"])


def test_optimizer_is_a_namedtuple_with_init_and_update():
    opt = optim.adamw(lr=1e-4)
    assert opt.name == "adamw" and opt.lr == 1e-4 and opt.hyper("anything")["weight_decay"] == 0.01
    assert opt._replace(lr=2.0).lr == 2.0
    params = {"w": torch.zeros(2)}
    state = opt.init(params)
    assert state == optim.AdamWState({"w": 0}, {}, {})  # lazy, as torch's: no moments before the first step
    assert fprobe.optim.sgd().init(params) == optim.SGDState({})


@pytest.mark.parametrize("foreach", PATHS)
def test_a_lazy_first_step_equals_a_zero_filled_one(foreach):
    """The moments of a parameter that has not stepped are absent, and its first step equals one from explicit
    zero moments bit for bit (torch fills zeros there); parameters that have stepped and not coexist."""
    g = torch.Generator().manual_seed(3)
    params = {n: torch.randn(5, 3, generator=g, dtype=torch.float64) for n in ("a", "b")}
    grads = {n: torch.randn(5, 3, generator=g, dtype=torch.float64) for n in ("a", "b")}
    opt = optim.adamw(lr=1e-2, betas=(0.3, 0.9), weight_decay=0.1, foreach=foreach)  # β₁ < 0.5: lerp's other branch
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    new, state = opt.update(grads, optim.AdamWState({"a": 0, "b": 2}, {"b": zeros["b"] + 0.5}, {"b": zeros["b"] + 0.25}), params)
    filled, filled_state = opt.update(grads, optim.AdamWState({"a": 0, "b": 2}, {"a": zeros["a"], "b": zeros["b"] + 0.5},
                                                              {"a": zeros["a"], "b": zeros["b"] + 0.25}), params)
    assert_same((new, state), (filled, filled_state))
    assert list(state.exp_avg) == list(state.exp_avg_sq) == ["a", "b"] and state.step == {"a": 1, "b": 3}
    assert all(m.is_contiguous() and m.stride() == (3, 1) for m in [*state.exp_avg.values(), *state.exp_avg_sq.values()])


def rebuilt_update(terms: optim.AffineTerms, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """gain ⊙ g + momentum + decay_rate · θ, an absent momentum taken as zero."""
    rebuilt = terms.gain * g.double() + terms.decay_rate * p.double()
    return rebuilt if terms.momentum is None else rebuilt + terms.momentum


AFFINE_CONFIGS = [("adamw", "adamw")] + [("sgd", config) for config in SGD_CONFIGS]


@pytest.mark.parametrize("kind,config", AFFINE_CONFIGS)
def test_affine_form_reproduces_every_update(load_policy, kind, config):
    """Δθ of ``update`` (torch's order of operations) = gain ⊙ g + momentum + decay of ``affine``, at each of
    three steps (the first without momentum, later ones with it), one of them with an ``lr`` override."""
    s = Setting(load_policy, torch.float64)
    fopt, _ = make_pair(s.torch_params, kind, **SGD_CONFIGS.get(config, {}))
    params, state = s.params, fopt.init(s.params)
    for k, lr in enumerate([None, 0.5 * fopt.lr, None]):
        g = s.grads(params)
        new_params, new_state = fopt.update(g, state, params, lr)
        affine = dict(fopt.affine(state, new_state, params, lr))
        assert list(affine) == list(params)
        for name, p in params.items():
            delta = new_params[name] - p
            # Δθ is a difference of rounded parameters: its rounding is relative to |θ|, not to |Δθ|
            bound = 1e-15 * float(p.abs().max()) + 1e-12 * float(delta.abs().max())
            assert float((rebuilt_update(affine[name], g[name], p) - delta).abs().max()) <= bound, (k, name)
            assert (affine[name].decay_rate == 0) == (fopt.hyper(name)["weight_decay"] == 0)
        has_momentum = k > 0 and fopt.hyper("")["beta1" if kind == "adamw" else "momentum"] != 0
        assert any(t.momentum is not None for t in affine.values()) == has_momentum
        params, state = new_params, new_state


def test_affine_refuses_states_that_are_not_one_step_apart(load_policy):
    s = Setting(load_policy, torch.float64)
    opt = optim.adamw()
    state = opt.init(s.params)
    with pytest.raises(ValueError, match="do not belong to one step: parameter .* went from step 0 to 0"):
        opt.affine(state, state, s.params)


# --- imported and new optimizer states: malformed or out-of-range ones refused, naming the parameter


@pytest.fixture
def adamw_state():
    """(state_dict, names, params) of a torch AdamW after one step on a two-parameter model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    return opt.state_dict(), list(params), params


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(1, dtype=torch.float64)),
         "parameter '0.bias': exp_avg has shape (1,), the parameter (2,)"),
        (lambda sd: sd["state"][0].update(exp_avg_sq=torch.zeros(2, 3, dtype=torch.long)),
         "parameter '0.weight': exp_avg_sq has dtype torch.int64"),
        (lambda sd: sd["state"][0].pop("exp_avg"), "parameter '0.weight': 'exp_avg' is missing"),
        (lambda sd: sd["state"][0].update(step=torch.tensor(-1.0)), "parameter '0.weight': step"),
        (lambda sd: sd.pop("param_groups"), "no param_groups (missing or empty)"),
        (lambda sd: sd.update(param_groups=[]), "no param_groups (missing or empty)"),
        (lambda sd: sd["param_groups"][0].pop("params"), "param_groups[0] is not a param group"),
        (lambda sd: sd.pop("state"), "not a torch optimizer state_dict"),
        (lambda sd: sd["state"].update({5: {}}), "parameter indices [5] that no param group lists"),
    ],
)
def test_a_malformed_optimizer_state_is_rejected(adamw_state, corrupt, message):
    state_dict, names, params = adamw_state
    optim.from_torch(state_dict, names, params)  # the intact state imports
    corrupt(state_dict)
    with pytest.raises(ValueError) as error:
        optim.from_torch(state_dict, names, params)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "group,match",
    [
        (dict(betas=(1.0, 0.999)), "beta1=1.0 must be"),  # was: ZeroDivisionError after the gradient pass
        (dict(weight_decay=-5.0), "weight_decay=-5.0 must be"),  # was: accepted (torch refuses it)
        (dict(eps=float("nan")), "eps=nan must be"),
        (dict(lr=-1e-3), "lr=-0.001 must be"),
    ],
)
def test_an_imported_state_with_hyperparameters_torch_refuses_is_refused(fresh_gpt2, group, match):
    state_dict = adamw_state_dict(fresh_gpt2)
    state_dict["param_groups"][0].update(group)
    with pytest.raises(ValueError, match=match):
        fprobe.optim.from_torch(state_dict, list(fresh_gpt2.params), fresh_gpt2.params)


@pytest.mark.parametrize("make", [lambda: fprobe.optim.adamw(lr=-1e-3), lambda: fprobe.optim.adamw(betas=(0.9, 1.0)),
                                  lambda: fprobe.optim.sgd(momentum=-0.5), lambda: fprobe.optim.sgd(groups={"w": {"lr": float("inf")}})])
def test_an_optimizer_with_an_out_of_range_hyperparameter_is_refused_when_made(make):
    with pytest.raises(ValueError, match="must be a finite number"):
        make()


def test_an_imported_state_with_negative_second_moments_is_refused(fresh_gpt2):
    state_dict = adamw_state_dict(fresh_gpt2)
    name = list(fresh_gpt2.params)[2]
    state_dict["state"][2]["exp_avg_sq"][0] = -1.0  # was: "updated value not finite" after the gradient pass
    with pytest.raises(ValueError, match=rf"{re.escape(name)}.*negative"):
        fprobe.optim.from_torch(state_dict, list(fresh_gpt2.params), fresh_gpt2.params)


def adamw_state_dict(policy):
    """A real torch.optim.AdamW state_dict after one step on a plain quadratic of the parameters."""
    params = [p.detach().clone().requires_grad_() for p in policy.params.values()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum((p * p).sum() for p in params).backward()
    opt.step()
    return opt.state_dict()
