"""Published entropy-change predictors: each against a plain loop of its paper's formula, Cui et al.'s
theorems and Wang et al.'s Theorem 3.2 on an exact single-state softmax, the agreement statistics against
plain-Python references, and the truths (Δh_ik, ḣ_ik) on the built-in policy against independent passes."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import fprobe
from fprobe.entropy import predictors
from fprobe.model import passes
from fprobe.sampling import toy
from fprobe import tree
from helpers import make_batch, no_pass, strict_json

LR = 0.3


def hand_built(n=40, seed=0, ties=False):
    """Token statistics of n sampled tokens: probabilities in (0, 1), entropies, advantages of a few rows."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.rand(n, generator=g, dtype=torch.float64).clamp_min(1e-3).log()
    entropy = 3 * torch.rand(n, generator=g, dtype=torch.float64)
    advantages = torch.randn(n // 4, generator=g, dtype=torch.float64).repeat_interleave(4)
    if ties:
        logp = (logp * 2).round() / 2
    nec = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return predictors.TokenInputs(logp, entropy, advantages, nec)


def loop_mean(values):
    return sum(values) / len(values)


def loop_cui_pg(x, lr):
    logp, adv = x.logp.tolist(), x.advantages.tolist()
    pa = [math.exp(l) * a for l, a in zip(logp, adv)]
    ml, mpa = loop_mean(logp), loop_mean(pa)
    return [-lr * (l - ml) * (v - mpa) for l, v in zip(logp, pa)]


def loop_cui_npg(x, lr):
    logp, adv = x.logp.tolist(), x.advantages.tolist()
    ml, ma = loop_mean(logp), loop_mean(adv)
    return [-lr * (l - ml) * (a - ma) for l, a in zip(logp, adv)]


def loop_wang(x, lr):
    """ΔH = −ε S*, S* = p (H + log p), ε = η A."""
    return [-lr * a * math.exp(l) * (h + l) for l, h, a in zip(x.logp.tolist(), x.entropy.tolist(), x.advantages.tolist())]


def loop_steer(x, lr):
    """−η Ω, Ω = (A / π_old) π (1 − π)(log π + H), with π_old = π (one on-policy step)."""
    out = []
    for l, h, a in zip(x.logp.tolist(), x.entropy.tolist(), x.advantages.tolist()):
        p = p_old = math.exp(l)
        out.append(-lr * (a / p_old) * p * (1 - p) * (l + h))
    return out


def loop_wang_grpo(x, lr):
    """Clip_V's xD = N − S (Trinity-RFT), S = p (H + log p), times η A."""
    out = []
    for l, h, n, a in zip(x.logp.tolist(), x.entropy.tolist(), x.nec.tolist(), x.advantages.tolist()):
        out.append(lr * a * (n - math.exp(l) * (h + l)))
    return out


LOOPS = {"cui_pg": loop_cui_pg, "cui_npg": loop_cui_npg, "wang": loop_wang, "wang_grpo": loop_wang_grpo,
         "steer": loop_steer}


@pytest.mark.parametrize("predictor", predictors.PREDICTORS, ids=lambda p: p.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_predictor_matches_a_plain_loop_of_its_formula(predictor, seed):
    x = hand_built(seed=seed)
    got = predictor.tokens(x, LR).tolist()
    expected = LOOPS[predictor.name](x, LR)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_registry_covers_exactly_the_looped_predictors():
    assert {p.name for p in predictors.PREDICTORS} == set(LOOPS)


def test_weighted_covariance_matches_a_plain_loop():
    x = hand_built(seed=3)
    w = torch.rand(len(x.logp), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = float(predictors.weighted_mean(predictors.cui_npg_tokens(x.logp, x.advantages, LR, w), w))
    ws, ls, as_ = w.tolist(), x.logp.tolist(), x.advantages.tolist()
    total = sum(ws)
    ml = sum(wi * li for wi, li in zip(ws, ls)) / total
    ma = sum(wi * ai for wi, ai in zip(ws, as_)) / total
    cov = sum(wi * (li - ml) * (ai - ma) for wi, li, ai in zip(ws, ls, as_)) / total
    assert got == pytest.approx(-LR * cov, rel=1e-12)


# --- the single-state softmax policy, parameters = logits, where the theorems are exact to first order ---


def softmax_entropy(z):
    logp = torch.log_softmax(z, -1)
    return float(-(logp.exp() * logp).sum())


def policy_gradient(z, rewards):
    """∇_z J for the exact objective J(z) = Σ_a π_z(a) r(a), by autograd."""
    z = z.detach().requires_grad_()
    (torch.softmax(z, -1) * rewards).sum().backward()
    return z.grad.detach()


def natural_policy_gradient(z, rewards):
    """F⁺ ∇J with the Fisher matrix F = Σ_a π(a) ∇log π(a) ∇log π(a)ᵀ (jacobian by autograd; F is
    singular along the all-ones direction, which does not move π, so the pseudo-inverse)."""
    scores = torch.autograd.functional.jacobian(lambda v: torch.log_softmax(v, -1), z)  # [a, j] = ∂log π(a)/∂z_j
    pi = torch.softmax(z, -1)
    fisher = (pi[:, None, None] * scores[:, :, None] * scores[:, None, :]).sum(0)
    return torch.linalg.pinv(fisher) @ policy_gradient(z, rewards)


def single_state():
    g = torch.Generator().manual_seed(7)
    z = 1.5 * torch.randn(6, generator=g, dtype=torch.float64)
    rewards = torch.rand(6, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(z, -1)
    advantages = rewards - (logp.exp() * rewards).sum()  # A(a) = r(a) − V
    return z, rewards, logp, advantages


def theorem_prediction(tokens, logp, advantages, eta):
    """The theorem's −η Cov_{a∼π}(·, ·): the predictor over all actions, weighted by π."""
    pi = logp.exp()
    return float(predictors.weighted_mean(tokens(logp, advantages, eta, pi), pi))


def relative_errors(step, tokens, etas):
    z, rewards, logp, advantages = single_state()
    direction = step(z, rewards)
    errors = []
    for eta in etas:
        true = softmax_entropy(z + eta * direction) - softmax_entropy(z)
        errors.append(abs(true / theorem_prediction(tokens, logp, advantages, eta) - 1))
    return errors


ETAS = [1e-1, 1e-2, 1e-3, 1e-4]


@pytest.mark.parametrize(
    "step, tokens",
    [(policy_gradient, predictors.cui_pg_tokens), (natural_policy_gradient, predictors.cui_npg_tokens)],
    ids=["theorem1_pg", "theorem2_npg"],
)
def test_cui_theorems_match_the_true_entropy_change_to_first_order(step, tokens):
    errors = relative_errors(step, tokens, ETAS)
    assert errors[-1] < 1e-3
    for larger, smaller in zip(errors, errors[1:]):
        assert smaller < larger / 5  # the error of a first-order formula shrinks like η


@pytest.mark.parametrize(
    "step, tokens",
    [(policy_gradient, predictors.cui_npg_tokens), (natural_policy_gradient, predictors.cui_pg_tokens)],
    ids=["pg_step_npg_formula", "npg_step_pg_formula"],
)
def test_the_other_theorem_does_not_match(step, tokens):
    assert relative_errors(step, tokens, [1e-5])[0] > 1e-2


def test_wang_theorem_3_2_matches_a_single_logit_update_to_first_order():
    z, _, logp, _ = single_state()
    errors = []
    for k in range(len(z)):
        for eps in (1e-3, 1e-5):
            moved = z.clone()
            moved[k] += eps
            true = softmax_entropy(moved) - softmax_entropy(z)
            h = torch.tensor(softmax_entropy(z), dtype=torch.float64)
            predicted = float(predictors.wang_tokens(logp[k], h, torch.tensor(1.0, dtype=torch.float64), eps))
            errors.append(abs(true - predicted) / abs(predicted))
    assert max(errors[1::2]) < 1e-3
    assert all(small < large / 5 for large, small in zip(errors[::2], errors[1::2]))


def loop_collision_term(logits_row):
    """Trinity-RFT's compute_N_from_logits for one state, in plain Python: H Σ p² + Σ p² log p."""
    zs = logits_row.tolist()
    top = max(zs)
    total = sum(math.exp(z - top) for z in zs)
    ps = [math.exp(z - top) / total for z in zs]
    h = -sum(p * math.log(p) for p in ps)
    return h * sum(p * p for p in ps) + sum(p * p * math.log(p) for p in ps)


def test_collision_term_matches_a_plain_loop_and_is_the_pi_mean_of_the_discriminators():
    g = torch.Generator().manual_seed(11)
    logits = 2 * torch.randn(5, 9, generator=g, dtype=torch.float64)
    got = predictors.collision_term(logits)
    assert got.tolist() == pytest.approx([loop_collision_term(row) for row in logits], rel=1e-12)
    logp = torch.log_softmax(logits, -1)
    h = -(logp.exp() * logp).sum(-1, keepdim=True)
    pi_mean = (logp.exp() * predictors.entropy_discriminator(logp, h)).sum(-1)  # Σ_v π_v S*_v
    assert torch.allclose(got, pi_mean, rtol=1e-12, atol=0)


def test_wang_theorem_3_3_is_the_exact_first_order_change_of_a_score_step():
    """On a single-state softmax with the logits as parameters, the sampled token's score step
    Δz = ηA ∇_z log π_k = ηA(e_k − π): the jvp of H along it is ηA(N − S_k) to rounding, and the true
    change agrees to first order in η."""
    z, _, logp, _ = single_state()
    entropy = lambda v: -(torch.softmax(v, -1) * torch.log_softmax(v, -1)).sum()
    h = entropy(z)
    nec = predictors.collision_term(z[None])[0]
    advantage = torch.tensor(0.7, dtype=torch.float64)
    for k in range(len(z)):
        score = -logp.exp()
        score[k] += 1  # ∇_z log π_k = e_k − π
        _, slope = torch.func.jvp(entropy, (z,), (advantage * score,))
        predicted_slope = predictors.wang_grpo_tokens(logp[k], h, nec, advantage, 1.0)
        assert float(slope) == pytest.approx(float(predicted_slope), rel=1e-12, abs=1e-15)
        errors = []
        for eta in (1e-2, 1e-3, 1e-4):
            true = float(entropy(z + eta * advantage * score) - h)
            errors.append(abs(true - eta * float(predicted_slope)))
        assert all(small < large / 5 for large, small in zip(errors, errors[1:]))
    # and Theorem 3.2's form (which leaves out N) is not the first order of this step
    k = int(logp.argmax())
    score = -logp.exp()
    score[k] += 1
    _, slope = torch.func.jvp(entropy, (z,), (score,))
    assert abs(float(slope) - float(predictors.wang_tokens(logp[k], h, torch.tensor(1.0, dtype=torch.float64), 1.0))) > 1e-3


def loop_verl_cov(logp_rows, adv_rows, mask_rows, rows_per_micro_batch, paired=lambda logp, advantage: advantage):
    """verl's Clip-Cov cov_all, micro-batch by micro-batch (dp_actor's data.split), in plain Python:
    (A − masked_mean(A)) · (ℓ − masked_mean(ℓ)) over each micro-batch's response tokens (verl's 1e-8
    guard in the mean's denominator left out), flattened in row order; ``paired``: what stands for A
    (π·A for Cui et al.'s Theorem 1)."""
    out = []
    for start in range(0, len(logp_rows), rows_per_micro_batch):
        chunk = range(start, min(start + rows_per_micro_batch, len(logp_rows)))
        tokens = [(logp_rows[i][k], paired(logp_rows[i][k], adv_rows[i]))
                  for i in chunk for k in range(len(mask_rows[i])) if mask_rows[i][k]]
        mean_l = sum(l for l, _ in tokens) / len(tokens)
        mean_a = sum(a for _, a in tokens) / len(tokens)
        out += [(a - mean_a) * (l - mean_l) for l, a in tokens]
    return out


@pytest.mark.parametrize("rows", [1, 2, 4, 6, 100])
def test_cui_centred_per_micro_batch_matches_verls_clip_cov_loop(rows):
    U = make_batch(n=6, width=12, seed=9)
    g = torch.Generator().manual_seed(rows)
    logp = -3 * torch.rand(U.response_mask.shape, generator=g, dtype=torch.float64)
    entropy = torch.rand(U.response_mask.shape, generator=g, dtype=torch.float64)
    x = predictors.token_inputs(logp, entropy, U, cov_micro_batch=rows)
    got = predictors.cui_npg_tokens(x.logp, x.advantages, LR, groups=x.groups)
    expected = loop_verl_cov(logp.tolist(), U.advantages.tolist(), U.response_mask.tolist(), rows)
    assert got.tolist() == pytest.approx([-LR * v for v in expected], rel=1e-12, abs=1e-15)
    pg = predictors.cui_pg_tokens(x.logp, x.advantages, LR, groups=x.groups)
    pi_a = loop_verl_cov(logp.tolist(), U.advantages.tolist(), U.response_mask.tolist(), rows,
                         paired=lambda l, a: math.exp(l) * a)
    assert pg.tolist() == pytest.approx([-LR * v for v in pi_a], rel=1e-12, abs=1e-15)
    whole = predictors.token_inputs(logp, entropy, U)
    same = torch.equal(got, predictors.cui_npg_tokens(whole.logp, whole.advantages, LR))
    assert same == (rows >= len(U))  # one micro-batch holding all of U is the whole-batch centring


# --- agreement statistics against plain-Python references ---


def loop_pearson(x, y):
    mx, my = loop_mean(x), loop_mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def loop_ranks(x):
    """Rank of each value: 1 + how many are smaller + half of the other equal ones."""
    return [1 + sum(v < xi for v in x) + (sum(v == xi for v in x) - 1) / 2 for xi in x]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_plain_python(seed, ties):
    x = hand_built(seed=seed, ties=ties)
    a, b = x.logp, predictors.wang_tokens(x.logp, x.entropy, x.advantages, 1.0)
    assert predictors.average_ranks(a).tolist() == loop_ranks(a.tolist())
    assert predictors.pearson(a, b) == pytest.approx(loop_pearson(a.tolist(), b.tolist()), rel=1e-12)
    assert predictors.spearman(a, b) == pytest.approx(loop_pearson(loop_ranks(a.tolist()), loop_ranks(b.tolist())), rel=1e-12)


def test_scale_and_signs_match_plain_python():
    x = hand_built(seed=5)
    p, t = x.logp + 2.0, x.advantages  # mixed signs in the truth, one sign in the prediction
    ps, ts = p.tolist(), t.tolist()
    scale = sum(a * b for a, b in zip(ps, ts)) / sum(a * a for a in ps)
    assert predictors.least_squares_scale(p, t) == pytest.approx(scale, rel=1e-12)
    residual = t - predictors.least_squares_scale(p, t) * p
    assert abs(float((residual * p).sum())) < 1e-10  # least squares: the residual is orthogonal to p
    same = sum((a > 0) == (b > 0) and (a < 0) == (b < 0) for a, b in zip(ps, ts)) / len(ps)
    assert predictors.sign_agreement(p, t) == same
    assert 0 < same < 1


def test_zero_predictions_count_as_wrong_signs_except_in_the_nonzero_column():
    x = hand_built(seed=6)
    p = x.advantages * (torch.arange(len(x.advantages)) % 3 != 0)  # every third prediction is zero
    t = x.advantages + 0.1 * x.logp  # never exactly zero
    ps, ts = p.tolist(), t.tolist()
    right = [(a > 0) == (b > 0) for a, b in zip(ps, ts) if a != 0]
    s = predictors.score(p, t)
    assert s.sign_agreement == pytest.approx(sum(right) / len(ps), rel=1e-15)
    assert s.sign_agreement_nonzero == pytest.approx(sum(right) / len(right), rel=1e-15)


# --- the truths on the built-in policy ---


@pytest.fixture(scope="module")
def probed():
    policy = fprobe.Policy.from_pretrained(str(toy.DEFAULT_MODEL_PATH), dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
    E, U = fprobe.sample(
        policy, tokenizer, toy.make_prompts(32, 0), n_eval=8, n_update_prompts=4, group_size=4, reward="toy",
        max_new_tokens=8, seed=0,
    )
    result = fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=1e-6, weight_decay=0.01))
    return policy, U, result, predictors.from_probe(result)


def test_fprobe_first_order_tracks_the_true_change_at_a_small_learning_rate(probed):
    _, _, _, comparison = probed
    truth = comparison.truth.tolist()
    first = comparison.predicted[predictors.REFERENCE].tolist()
    assert comparison.scores[predictors.REFERENCE]["pearson"] == pytest.approx(loop_pearson(first, truth), rel=1e-12)
    assert loop_pearson(first, truth) >= 0.999


def test_truths_equal_independent_token_statistics(probed):
    """Δh from two full-batch token_stats calls; ḣ against a central difference (h(θ₀+Δθ) − h(θ₀−Δθ))/2,
    exact up to third order in the small step."""
    policy, U, result, comparison = probed
    params, delta = result.context.params, result.delta_named
    mask = U.response_mask
    at = lambda p: fprobe.token_stats(policy, p, U)
    with torch.no_grad():
        before, after, back = at(params), at(tree.add(params, delta)), at(tree.sub(params, delta))
    assert torch.allclose(comparison.truth, (after.entropy - before.entropy)[mask], rtol=0, atol=1e-13)
    central = ((after.entropy - back.entropy) / 2)[mask]
    first = comparison.predicted[predictors.REFERENCE]
    assert float((first - central).abs().max()) < 1e-3 * float(first.abs().max())


def test_inputs_are_u_statistics_with_each_rows_advantage(probed):
    policy, U, result, comparison = probed
    with torch.no_grad():
        stats = fprobe.token_stats(policy, result.context.params, U)
    t = predictors.truths(policy, result.context.params, result.delta_named, U)
    expected_adv = [float(U.advantages[i]) for i in range(len(U)) for _ in range(int(U.response_mask[i].sum()))]
    assert t.inputs.advantages.tolist() == expected_adv
    assert torch.allclose(t.inputs.logp, stats.logp[U.response_mask], rtol=0, atol=1e-13)
    assert torch.allclose(t.inputs.entropy, stats.entropy[U.response_mask], rtol=0, atol=1e-13)
    for p in predictors.PREDICTORS:
        assert torch.equal(comparison.predicted[p.name], p.tokens(t.inputs, result.lr_used))


def test_comparison_carries_the_probes_numbers_and_aggregates(probed):
    _, U, result, c = probed
    assert (c.lr, c.delta_h_true, c.delta_h1, c.n_tokens) == (result.lr_used, result.delta_h_true, result.delta_h1, U.n_tokens)
    assert c.delta_h_tokens == pytest.approx(loop_mean(c.truth.tolist()), rel=1e-12)
    for name, predicted in c.predicted.items():
        assert c.scores[name]["aggregate"] == pytest.approx(loop_mean(predicted.tolist()), rel=1e-12, abs=1e-300)
    # Cui et al.'s Theorem 2 aggregated over U's tokens is fprobe's covariance baseline
    assert c.scores["cui_npg"]["aggregate"] == pytest.approx(result.cov_baseline, rel=1e-10)


def test_comparison_prints_converts_and_plots(probed, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    _, _, _, c = probed
    names = [p.name for p in predictors.PREDICTORS] + [predictors.REFERENCE]
    record = json.loads(c.to_json())
    assert list(record["scores"]) == names
    assert "truth" not in record and "predicted" not in record
    assert all(name in repr(c) for name in names)
    fig = c.plot(tmp_path / "predictors.png")
    assert (tmp_path / "predictors.png").stat().st_size > 0
    assert len(fig.axes) == len(names)


def test_update_batch_without_advantages_is_rejected(probed):
    policy, U, result, _ = probed
    bare = fprobe.Rollouts(U.input_ids, U.attention_mask, U.response_mask)
    with pytest.raises(ValueError, match="advantages"):
        predictors.compare(policy, result.context.params, result.delta_named, bare, 1e-6)


def test_probe_result_method_is_the_comparison_of_its_own_step(probed):
    _, _, result, comparison = probed
    assert result.predictors().to_dict() == comparison.to_dict()


def test_cli_probe_predictors_flag_adds_the_comparison_to_the_record(tmp_path):
    from fprobe.cli import command as cli

    out = tmp_path / "results.json"
    argv = ["probe", "--predictors", "--quiet", "--n-eval", "8", "--n-update-prompts", "2", "--group-size", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    comparison = record["predictors"]
    assert list(comparison["scores"]) == [p.name for p in predictors.PREDICTORS] + [predictors.REFERENCE]
    assert comparison["n_tokens"] == record["sampling"]["update_tokens"]
    assert (comparison["lr"], comparison["delta_h_true"]) == (record["result"]["lr_used"], record["result"]["delta_h_true"])


def test_bootstrap_intervals_over_sequences():
    """Over U's sequences: an exact relationship gives degenerate intervals at its values; one token per row gives
    Pearson's interval of the textbook Fisher transform, atanh r ± 1.96/√(n−3); copying every row's token three
    times within its row (a row resampled whole) leaves every interval as it was."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(400, generator=g, dtype=torch.float64)
    rows = torch.arange(400)
    exact = predictors.bootstrap_intervals(p, 2 * p, rows)
    assert exact["scale"] == pytest.approx([2.0, 2.0], rel=1e-12) and exact["pearson"] == pytest.approx([1.0, 1.0], rel=1e-12)
    assert exact["spearman"] == pytest.approx([1.0, 1.0], rel=1e-12) and exact["sign_agreement"] == [1.0, 1.0]
    truth = 0.5 * p + torch.randn(400, generator=g, dtype=torch.float64)
    got = predictors.bootstrap_intervals(p, truth, rows, draws=2000)
    r = predictors.pearson(p, truth)
    fisher = [math.tanh(math.atanh(r) + s * 1.959964 / math.sqrt(400 - 3)) for s in (-1, 1)]
    assert got["pearson"] == pytest.approx(fisher, abs=0.02)
    copies = predictors.bootstrap_intervals(p.repeat_interleave(3), truth.repeat_interleave(3), rows.repeat_interleave(3), draws=2000)
    for name in ("scale", "pearson", "spearman", "sign_agreement"):
        assert copies[name] == pytest.approx(got[name], rel=1e-9), name
    score = predictors.score(p, truth, rows)
    assert score.intervals["pearson"][0] < score.pearson < score.intervals["pearson"][1]


def test_collision_terms_on_u_equal_an_independent_full_vocabulary_loop(probed):
    policy, U, result, _ = probed
    params = result.context.params
    with torch.no_grad():
        logits = policy.apply(params, U.input_ids, U.attention_mask).double()
    expected = []
    for i in range(len(U)):
        for k in range(1, U.response_mask.shape[1]):
            if U.response_mask[i, k]:
                logp = torch.log_softmax(logits[i, k - 1], -1)
                h = -(logp.exp() * logp).sum()
                expected.append(float((logp.exp() * logp.exp() * (logp + h)).sum()))  # Σ_v π_v² (log π_v + H)
    got = predictors.collision_terms(policy, params, U, micro_batch=3)
    assert got.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-14)


def test_cov_micro_batch_centres_the_cui_rows_within_u_micro_batches(probed):
    policy, U, result, comparison = probed
    split = predictors.compare(policy, result.context.params, result.delta_named, U, result.lr_used, cov_micro_batch=4)
    t = predictors.truths(policy, result.context.params, result.delta_named, U)
    groups = predictors.micro_batch_groups(U, 4)
    for name, tokens in (("cui_npg", predictors.cui_npg_tokens), ("cui_pg", predictors.cui_pg_tokens)):
        assert torch.equal(split.predicted[name], tokens(t.inputs.logp, t.inputs.advantages, result.lr_used, groups=groups))
        assert not torch.equal(split.predicted[name], comparison.predicted[name])
    assert torch.equal(split.predicted["wang"], comparison.predicted["wang"]) and split.cov_micro_batch == 4
    with pytest.raises(ValueError, match="cov_micro_batch"):
        predictors.compare(policy, result.context.params, result.delta_named, U, 1e-6, cov_micro_batch=0)


def test_undefined_scores_warn_and_say_why(probed):
    """Was: NaN (null in JSON) scores without a word, for U with one token or with every advantage 0."""
    policy, U, result, _ = probed
    params, delta = result.context.params, result.delta_named
    zero = fprobe.Rollouts(U.input_ids, U.attention_mask, U.response_mask, advantages=torch.zeros(len(U)))
    with pytest.warns(fprobe.UndefinedScoreWarning, match="every advantage in U is 0"):
        c = predictors.compare(policy, params, delta, zero, 1e-6)
    published = [p.name for p in predictors.PREDICTORS]
    assert set(c.undefined) == set(published)  # fprobe's own row follows Δθ, which is not zero here
    assert all(math.isnan(c.scores[name]["pearson"]) for name in published)
    assert not math.isnan(c.scores[predictors.REFERENCE]["pearson"])
    assert json.loads(c.to_json())["undefined"]["wang"].startswith("it predicts 0 at every token")
    row = int(U.response_mask.sum(-1).argmax())
    one = U.response_mask[row : row + 1].clone()
    one[0, one[0].nonzero()[1:, 0]] = False  # keep the row's first response token only
    single = fprobe.Rollouts(U.input_ids[row : row + 1], U.attention_mask[row : row + 1], one, advantages=torch.ones(1))
    with pytest.warns(fprobe.UndefinedScoreWarning, match="U has 1 response token"):
        c = predictors.compare(policy, params, delta, single, 1e-6)
    assert set(c.undefined) == set(published) | {predictors.REFERENCE}
    assert all(math.isnan(s["pearson"]) for s in c.scores.values())

# --- degenerate inputs: zero predictions and steps, constant advantages, NaN sides, inputs checked first


def plain_sign_agreement(p, t):
    return sum(a != 0 and (a > 0) == (b > 0) and (a < 0) == (b < 0) for a, b in zip(p, t)) / len(p)


def test_a_zero_prediction_is_a_wrong_sign_even_where_the_truth_is_zero():
    p, t = [0.0, 0.0, 1.0, -1.0, 2.0], [0.0, 1.0, 1.0, 1.0, 3.0]
    got = predictors.sign_agreement(torch.tensor(p, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
    assert got == plain_sign_agreement(p, t) == 0.4  # was 0.6: 0 = 0 counted as a right sign


def test_a_zero_step_scores_no_predictor_as_right_and_writes_strict_json(fresh_gpt2, fresh_batches):
    E, U = fresh_batches
    res = fprobe.probe(fresh_gpt2, E, U, fprobe.optim.adamw(lr=0.0))
    comparison = res.predictors()
    assert comparison.delta_h_tokens == 0.0 and float(comparison.truth.abs().max()) == 0.0
    for name, s in strict_json(comparison.to_json())["scores"].items():
        assert s["sign_agreement"] == 0.0, name  # was 1.0 for every predictor: nothing was predicted
        assert s["pearson"] is None and s["spearman"] is None and s["scale"] is None  # 0/0: undefined
    assert strict_json(res.to_json())["ratio"] is None


def test_constant_advantages_give_exactly_zero_covariance_and_undefined_correlations():
    n = 7
    advantages = torch.full((n,), 0.1, dtype=torch.float64)  # REINFORCE-style: every row the same advantage
    logp = torch.linspace(-3.0, -0.1, n, dtype=torch.float64)
    truth = torch.tensor([0.3, -1.0, 0.2, 0.5, -0.4, 0.9, -0.6], dtype=torch.float64)
    predicted = predictors.cui_npg_tokens(logp, advantages, 1e-6)
    assert predicted.tolist() == [0.0] * n  # Cov(log π, A) of a constant A is exactly 0 (was ~1e-23 of rounding)
    s = predictors.score(predicted, truth)
    assert math.isnan(s.pearson) and math.isnan(s.scale)  # was Pearson −0.44: a correlation with rounding noise
    assert math.isnan(predictors.pearson(advantages, truth))  # "NaN when either side is constant" (was 2.7e-17)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda d, U: (tree.tree_map(lambda x: x.float(), d), U, 1e-4), ValueError, "dtype"),  # was: torch matmul error
        (lambda d, U: (dict(list(d.items())[1:]), U, 1e-4), ValueError, "missing"),  # was: KeyError
        (lambda d, U: (tree.scale(d, float("nan")), U, 1e-4), FloatingPointError, "not finite"),  # was: Spearman 1.0
        (lambda d, U: (d, U, float("nan")), ValueError, "lr"),  # was: NaN predictions with a Spearman of 0.22
        (lambda d, U: (d, fprobe.Rollouts(U.input_ids, U.attention_mask, U.response_mask), 1e-4), ValueError,
         "advantages"),  # was: refused only after a jvp and a forward pass on U
    ],
)
def test_compare_checks_its_inputs_before_any_pass(fresh_gpt2, fresh_batches, monkeypatch, change, error, match):
    _, U = fresh_batches
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), fresh_gpt2.params)
    args = change(delta, U)
    for name in ("forward", "jet"):
        monkeypatch.setattr(passes, name, no_pass)
    with pytest.raises(error, match=match):
        predictors.compare(fresh_gpt2, fresh_gpt2.params, *args)


def test_spearman_of_a_side_with_nan_is_nan():
    x = torch.tensor([1.0, float("nan"), 3.0, 4.0], dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert math.isnan(predictors.spearman(x, y)) and math.isnan(predictors.spearman(y, x))  # was 0.4 and 0.4
    assert math.isnan(predictors.pearson(x, y))
