"""Exact decomposition of δH₁ over U's sequences and tokens (fprobe.decompose), float64, tiny GPT-2.

Every optimizer case is probed once; each test then checks one property of its decomposition:
the parts sum to δH₁ (1e-10 relative), each δH_j equals a brute-force ⟨gain ⊙ ∇Ĥ, c·∇L_j⟩ from that
row's own gradient (a plain autograd loop, with ∇Ĥ by autograd through helpers.plain_entropy and the
gain from the optimizer's affine form, itself tested against its updates in test_optim.py), token parts sum to
δH_j, and zero-advantage rows contribute exactly zero.
"""

import dataclasses

import pytest
import torch

import fprobe
from fprobe import tree

from helpers import make_batch, no_pass, plain_entropy, sequence_log_probs, strict_json

ADVANTAGES = torch.tensor([0.0, 0.7, -1.2, 0.0, 0.4, -0.9], dtype=torch.float64)
ZERO_ROWS = [0, 3]


@pytest.fixture(scope="module")
def policy(load_policy):
    return load_policy("gpt2", torch.float64)


@pytest.fixture(scope="module")
def batches():
    E = make_batch(8, seed=11, with_advantages=False)
    U = dataclasses.replace(make_batch(6, seed=12, max_response_length=10), advantages=ADVANTAGES.clone())
    return E, U


def _clones(params):
    return {name: torch.nn.Parameter(p.detach().clone()) for name, p in params.items()}


def _two_torch_steps(torch_opt, clones, seed):
    """Two real steps of a torch optimizer (random gradients) on copies of the parameters."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for p in clones.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2
        torch_opt.step()


def imported_adamw(params):
    clones = _clones(params)
    attn = [p for n, p in clones.items() if ".attn." in n]
    rest = [p for n, p in clones.items() if ".attn." not in n]
    torch_opt = torch.optim.AdamW(
        [dict(params=rest, lr=1e-3, weight_decay=0.02), dict(params=attn, lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99))]
    )
    _two_torch_steps(torch_opt, clones, seed=3)
    return fprobe.optim.from_torch_optimizer(torch_opt, clones.items(), params)


def imported_sgd(params, nesterov):
    clones = _clones(params)
    kw = dict(momentum=0.9, nesterov=True, dampening=0.0) if nesterov else dict(momentum=0.8, dampening=0.1)
    torch_opt = torch.optim.SGD(list(clones.values()), lr=1e-2, weight_decay=0.01, **kw)
    _two_torch_steps(torch_opt, clones, seed=4)
    return fprobe.optim.from_torch_optimizer(torch_opt, clones.items(), params)


# name -> params -> (optimizer, state or None, probe keyword arguments)
CASES = {
    "adamw_fresh_decay": lambda p: (fprobe.optim.adamw(lr=1e-3, weight_decay=0.1), None, dict(loss="seq_mean_token_mean")),
    "adamw_imported_clip": lambda p: (*imported_adamw(p), dict(lr=5e-4, loss="token_mean", max_grad_norm=1e-3)),
    "sgd_plain": lambda p: (fprobe.optim.sgd(lr=0.5), None, {}),
    "sgd_first_nesterov_clip": lambda p: (
        fprobe.optim.sgd(lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01), None, dict(max_grad_norm=1e-3)
    ),
    "sgd_imported": lambda p: (*imported_sgd(p, nesterov=False), dict(loss="seq_mean_token_mean")),
    "sgd_imported_nesterov": lambda p: (*imported_sgd(p, nesterov=True), dict(lr=0.2)),
}


@pytest.fixture(scope="module")
def probed(policy, batches):
    """probed(case) -> (ProbeResult, Contributions), computed once per case."""
    E, U = batches
    cache = {}

    def get(case):
        if case not in cache:
            opt, state, kw = CASES[case](policy.params)
            result = fprobe.probe(policy, E, U, opt, state, **kw)
            cache[case] = (result, result.contributions())
        return cache[case]

    return get


def affine_trees(result) -> dict[str, tree.Params]:
    """The probe's step as Δθ = gain ⊙ g + momentum + decay: {"gain", "momentum", "decay"} float64 trees."""
    params, step = result.context.params, result.replay_step()
    terms = dict(result.optimizer.affine(result.start_state, step.opt_state, params, step.lr))
    full = lambda name, x: torch.zeros_like(params[name], dtype=torch.float64) + (0.0 if x is None else x)
    trees = {part: {name: full(name, getattr(terms[name], part)) for name in params} for part in ("gain", "momentum")}
    return trees | {"decay": {name: terms[name].decay_rate * params[name].double() for name in params}}


def plain_entropy_gradient(policy, params, E):
    """u = ∇Ĥ_tok at θ₀ (SNIS, Rao–Blackwell, per-token normalisation) by autograd through the plain Ĥ."""
    p = {n: x.detach().clone().requires_grad_(True) for n, x in params.items()}
    return dict(zip(p, torch.autograd.grad(plain_entropy(policy, p, E), list(p.values()))))


def plain_row_gradient(policy, params, U, j, c_j):
    """∇L_j of row j alone, on policy: L_j = −c_j A_j Σ_k ℓ_jk."""
    p = {n: x.detach().clone().requires_grad_(True) for n, x in params.items()}
    (ell,), _ = sequence_log_probs(policy, p, U.select([j]))
    loss = -c_j * float(U.advantages[j]) * ell.sum()
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def plain_row_weights(U, loss_type):
    T = U.response_mask.sum(-1).double()
    B = len(U)
    if loss_type == "dr_grpo":
        return torch.full((B,), 1.0 / (B * U.max_response_length), dtype=torch.float64)
    if loss_type == "token_mean":
        return torch.full((B,), 1.0 / float(T.sum()), dtype=torch.float64)
    return 1.0 / (B * T)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("case", list(CASES))
def test_parts_sum_to_delta_h1(probed, case):
    result, c = probed(case)
    assert c.delta_h1 == result.delta_h1 != 0
    assert abs(c.residual) <= 1e-10 * abs(c.delta_h1)
    assert rel(c.momentum + c.decay + float(c.per_sequence.sum()), result.delta_h1) <= 1e-10
    assert rel(c.delta_h1_grad, result.delta_h1) <= 1e-10
    assert (c.decay != 0) == (case != "sgd_plain")
    assert (c.momentum != 0) == ("imported" in case)
    assert (result.clip_coef < 1) == ("clip" in case)


@pytest.mark.parametrize("case", list(CASES))
def test_each_sequence_matches_its_own_gradient(policy, batches, probed, case):
    E, U = batches
    result, c = probed(case)
    params = result.context.params
    parts = affine_trees(result)
    u = plain_entropy_gradient(policy, params, E)
    direction = tree.tree_map(lambda gain, x: gain * x, parts["gain"], u)
    weights = plain_row_weights(U, result.loss_type)
    brute = torch.tensor(
        [
            result.clip_coef * float(tree.vdot(direction, plain_row_gradient(policy, params, U, j, float(weights[j]))))
            for j in range(len(U))
        ],
        dtype=torch.float64,
    )
    scale = float(brute.abs().max())
    assert scale > 0
    assert float((c.per_sequence - brute).abs().max()) <= 1e-9 * scale
    momentum = float(tree.vdot(u, parts["momentum"]))
    decay = float(tree.vdot(u, parts["decay"]))
    assert abs(momentum - c.momentum) <= 1e-9 * max(abs(c.momentum), scale)
    assert abs(decay - c.decay) <= 1e-9 * max(abs(c.decay), scale)
    assert rel(momentum + decay + float(brute.sum()), result.delta_h1) <= 1e-9


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_sum_to_rows_and_zero_advantage_rows_are_zero(probed, case):
    _, c = probed(case)
    assert c.per_token.dtype == torch.float64
    assert c.per_token.shape == c.response_mask.shape
    assert bool((c.per_token[~c.response_mask] == 0).all())
    sums = c.per_token.sum(-1)
    assert float((sums - c.per_sequence).abs().max()) <= 1e-13 * float(c.per_sequence.abs().max())
    for j in ZERO_ROWS:
        assert float(c.per_sequence[j]) == 0.0
        assert bool((c.per_token[j] == 0.0).all())
    nonzero = [j for j in range(len(ADVANTAGES)) if j not in ZERO_ROWS]
    assert bool((c.per_sequence[nonzero] != 0).all())


def test_per_token_is_the_on_policy_formula(policy, probed):
    """δH_jk = c · (−c_j A_j) · ℓ̇_jk along gain ⊙ u, with ℓ̇ from an independent jvp."""
    result, c = probed("adamw_imported_clip")
    params = result.context.params
    u = plain_entropy_gradient(policy, params, result.context.E)
    direction = tree.tree_map(lambda gain, x: gain * x, affine_trees(result)["gain"], u)
    U = result.U
    ell = lambda p: fprobe.token_stats(policy, p, U).logp
    _, ell_dot = torch.func.jvp(ell, (tree.detach(params),), (direction,))
    weights = plain_row_weights(U, result.loss_type)
    expected = result.clip_coef * (-weights * U.advantages)[:, None] * ell_dot * U.response_mask
    assert float((c.per_token - expected).abs().max()) <= 1e-9 * float(expected.abs().max())


def test_micro_batch_does_not_change_the_parts(probed):
    result, c = probed("adamw_imported_clip")
    again = result.contributions(micro_batch=4)
    assert float((again.per_token - c.per_token).abs().max()) <= 1e-12 * float(c.per_token.abs().max())
    assert rel(again.momentum, c.momentum) <= 1e-12 and rel(again.decay, c.decay) <= 1e-12


def test_records_columns_repr_and_metadata(batches, probed):
    _, U = batches
    result, c = probed("adamw_imported_clip")
    n = len(U)
    records, columns = c.records(), c.columns()
    assert len(records) == n and all(set(r) == set(columns) for r in records)
    assert set(columns) == {"row", "group", "reward", "advantage", "length", "mean_logp", "delta_h"}
    assert all(len(v) == n for v in columns.values())
    assert columns["delta_h"] == c.per_sequence.tolist()
    assert columns["advantage"] == ADVANTAGES.tolist()
    assert columns["group"] == U.group_ids.tolist() and columns["reward"] == U.rewards.tolist()
    assert columns["length"] == U.lengths.tolist()
    mean_logp = (result.replay_step().logp * U.response_mask).sum(-1) / U.lengths
    assert torch.equal(c.mean_logp, mean_logp)
    assert [r["row"] for r in c.top(3)] == torch.argsort(c.per_sequence.abs(), descending=True)[:3].tolist()
    text = repr(c)
    for piece in ("δH₁", "momentum", "weight decay", "Σ sequences", "residual", "top rows"):
        assert piece in text
    assert c.to_dict()["delta_h1"] == c.delta_h1


def test_plots_save_png(tmp_path, probed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, c = probed("sgd_imported")
    for path, draw in [
        (tmp_path / "rows.png", lambda p: c.plot(p)),
        (tmp_path / "tokens.png", lambda p: c.plot_tokens(1, p)),
        (tmp_path / "labelled.png", lambda p: c.plot_tokens(-1, p, labels=[f"t{k}" for k in range(int(c.lengths[-1]))])),
    ]:
        fig = draw(path)
        plt.close(fig)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="labels"):
        c.plot_tokens(1, labels=["only one"])
    with pytest.raises(IndexError):
        c.plot_tokens(len(c.per_sequence))


def test_sum_holds_for_every_estimator_setting(policy, batches):
    """u is the gradient of the same linear functional that gives δH₁, whatever the estimator."""
    E, U = batches
    opt = fprobe.optim.adamw(lr=1e-3, weight_decay=0.05)
    result = fprobe.probe(policy, E, U, opt, estimator="togo", normalize="seq", entropy="naive", baseline="position")
    c = result.contributions()
    assert abs(c.residual) <= 1e-10 * abs(c.delta_h1)
    assert c.delta_h1 != 0 and c.decay != 0


# --- contributions: strict JSON, checked arguments, a starting state changed in place


def test_contributions_write_strict_json_and_check_their_arguments(fresh_gpt2, fresh_batches, monkeypatch):
    E, U = fresh_batches
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    parts = res.contributions()
    data = strict_json(parts.to_json())
    assert data["per_sequence"] == parts.per_sequence.tolist() and "token_ids" not in data
    assert [r["row"] for r in parts.top(len(U))] == sorted(range(len(U)), key=lambda j: -abs(float(parts.per_sequence[j])))
    with pytest.raises(ValueError, match="k >= 0"):
        parts.top(-1)  # was: every row but the last
    monkeypatch.setattr(fprobe.model.passes, "gradient", no_pass)
    with pytest.raises(ValueError, match="micro_batch"):
        res.contributions(micro_batch=0)  # was: refused only after replaying the step


def test_contributions_refuse_a_starting_optimizer_state_changed_in_place(fresh_gpt2, fresh_batches):
    E, U = fresh_batches
    opt = fprobe.optim.adamw(lr=1e-4)
    first = fprobe.rl_step(fresh_gpt2, fresh_gpt2.params, opt, opt.init(fresh_gpt2.params), U)
    res = fprobe.probe(fresh_gpt2, E, U, opt, first.opt_state, keep_step=True)
    parts = res.contributions()
    assert parts.momentum + parts.decay + float(parts.per_sequence.sum()) == pytest.approx(res.delta_h1, rel=1e-9)
    for m in first.opt_state.exp_avg.values():
        m.mul_(4.0)  # the caller's state object, reused
    # was: parts missing δH₁ by 1.4× of its size, with a warning blaming the policy's precision (float64 here)
    with pytest.raises(RuntimeError, match=r"changed in place .*opt_state.exp_avg\["):
        res.contributions()
