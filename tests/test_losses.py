"""Group advantages and the GRPO-family losses against TRL's formulas, written inline here."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fprobe
from fprobe.rl import losses
from fprobe.rollouts import Rollouts

# ---------------------------------------------------------------------------------------------
# advantages


def advantages_by_loop(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i − mean_group r (÷ (std_group r + eps)), one group at a time, torch.std unbiased; eps as TRL's
    GRPOTrainer adds it (tests/test_trl.py checks it against TRL's own advantages)."""
    rewards = rewards.double()
    out = torch.empty_like(rewards)
    for g in group_ids.unique():
        rows = group_ids == g
        out[rows] = rewards[rows] - rewards[rows].mean()
        if scale == "group":
            out[rows] = out[rows] / (rewards[rows].std() + eps)
    if scale == "batch":
        out = out / (rewards.std() + eps)
    return out


@st.composite
def grouped_rewards(draw, min_group=2):
    """Rewards of several groups (ids arbitrary and interleaved, every group ≥ min_group rows)."""
    sizes = draw(st.lists(st.integers(min_group, 5), min_size=1, max_size=4))
    labels = draw(st.lists(st.integers(-50, 50), min_size=len(sizes), max_size=len(sizes), unique=True))
    ids = torch.tensor([label for label, size in zip(labels, sizes) for _ in range(size)])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))]
    binary = draw(st.booleans())
    values = st.sampled_from([0.0, 1.0]) if binary else st.floats(-5, 5, allow_nan=False)
    rewards = torch.tensor(draw(st.lists(values, min_size=len(ids), max_size=len(ids))), dtype=torch.float64)
    return rewards, ids


@settings(max_examples=25, deadline=None)
@given(grouped_rewards(), st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_match_a_loop_over_groups(data, scale):
    rewards, ids = data
    expected = advantages_by_loop(rewards, ids, scale)
    got = fprobe.group_advantages(rewards, ids, scale=scale)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(grouped_rewards())
def test_group_advantages_sum_to_zero_in_each_group(data):
    rewards, ids = data
    adv = fprobe.group_advantages(rewards, ids, scale="none")
    for g in ids.unique():
        assert abs(float(adv[ids == g].sum())) <= 1e-12 * (1 + float(rewards.abs().max())) * len(rewards)


def test_a_single_response_group_gets_zero_advantage():
    adv = fprobe.group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))
    assert bool(torch.isfinite(adv).all()) and float(adv[2]) == 0.0
    assert float(adv[0]) > 0 > float(adv[1])


def test_unknown_advantage_scale_is_rejected():
    with pytest.raises(ValueError, match="unknown advantage scale 'rank'"):
        fprobe.group_advantages(torch.ones(2), torch.zeros(2), scale="rank")


# ---------------------------------------------------------------------------------------------
# losses


def trl_loss(logp: torch.Tensor, batch: Rollouts, loss_type: str, clip: float, max_completion_length: int) -> torch.Tensor:
    """TRL GRPOTrainer's loss: per_token_loss = −min(r·A, clip(r)·A), r = exp(logp − logp.detach())."""
    mask = batch.response_mask.double()
    adv = batch.advantages.double()[:, None]
    ratio = torch.exp(logp - logp.detach())
    per_token_loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (logp.shape[0] * max_completion_length)
    if loss_type == "token_mean":  # TRL's "bnpo" (and "dapo")
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "seq_mean_token_mean":  # TRL's "grpo"
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if isinstance(loss_type, losses.Dapo):  # TRL's "dapo": num_items_in_batch tokens of the generation batch
        return (per_token_loss * mask).sum() / loss_type.num_items
    raise AssertionError(loss_type)


@st.composite
def update_batches(draw):
    """A random batch: left padding, prompt ≥ 1 token, response ≥ 1 token, right padding;
    random advantages; a configured maximum response length at least the longest response."""
    n, width = draw(st.integers(1, 6)), draw(st.integers(3, 12))
    attn = torch.zeros(n, width, dtype=torch.long)
    resp = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        left = draw(st.integers(0, width - 2))
        prompt = draw(st.integers(1, width - left - 1))
        length = draw(st.integers(1, width - left - prompt))
        attn[i, left : left + prompt + length] = 1
        resp[i, left + prompt : left + prompt + length] = True
    adv = torch.tensor(draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=n, max_size=n)), dtype=torch.float64)
    longest = int(resp.sum(-1).max())
    max_len = draw(st.one_of(st.none(), st.integers(longest, longest + 5)))
    ids = torch.randint(2, 50, (n, width), generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    return Rollouts(ids, attn, resp, advantages=adv, max_response_length=max_len)


def random_logp(batch: Rollouts, seed: int) -> torch.Tensor:
    """[B, L] float64 log-probs, zero off the response mask (as token_stats returns them), a leaf."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch.input_ids.shape, generator=g, dtype=torch.float64) * 5
    return (logp * batch.response_mask).requires_grad_(True)


def fprobe_loss(logp, batch, loss_type, clip):
    return losses.sequence_losses(logp, batch, losses.row_weights(batch, loss_type), clip).sum()


LOSSES = st.one_of(st.sampled_from(losses.LOSS_TYPES), st.floats(1.0, 200.0).map(losses.Dapo))


@settings(max_examples=25, deadline=None)
@given(update_batches(), LOSSES, st.floats(0.05, 0.5), st.integers(0, 999))
def test_losses_match_trl_in_value_and_gradient(batch, loss_type, clip, seed):
    logp = random_logp(batch, seed)
    max_len = batch.max_response_length or int(batch.lengths.max())
    ours, theirs = fprobe_loss(logp, batch, loss_type, clip), trl_loss(logp, batch, loss_type, clip, max_len)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    (grad_theirs,) = torch.autograd.grad(theirs, logp)
    assert ours.dtype == torch.float64
    value, expected = ours.item(), theirs.item()
    assert abs(value - expected) <= 1e-14 * max(1.0, abs(expected))
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-14, atol=1e-16)
    assert bool((grad_ours[~batch.response_mask] == 0).all()), "prompt and padding must get no gradient"


@settings(max_examples=15, deadline=None)
@given(update_batches(), LOSSES, st.integers(0, 999), st.integers(1, 3))
def test_row_weights_make_micro_batch_losses_add_up(batch, loss_type, seed, size):
    logp = random_logp(batch, seed).detach()
    weights = losses.row_weights(batch, loss_type)
    full = losses.sequence_losses(logp, batch, weights).sum()
    parts = [
        losses.sequence_losses(logp[i : i + size], batch.select(slice(i, i + size)), weights[i : i + size]).sum()
        for i in range(0, len(batch), size)
    ]
    assert abs(float(sum(parts)) - float(full)) <= 1e-14 * max(1.0, abs(float(full)))


def test_dr_grpo_uses_the_configured_maximum_length_not_the_batchs():
    response = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]).bool()
    batch = Rollouts(torch.full((2, 6), 3), torch.ones(2, 6), response, advantages=torch.tensor([1.0, -1.0]), max_response_length=10)
    assert torch.equal(losses.row_weights(batch, "dr_grpo"), torch.full((2,), 1 / 20, dtype=torch.float64))
    assert torch.equal(losses.row_weights(dataclasses.replace(batch, max_response_length=None), "dr_grpo"),
                       torch.full((2,), 1 / 8, dtype=torch.float64))


def test_dapo_over_the_batchs_own_tokens_is_token_mean_and_row_weights_are_taken_as_given():
    response = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]).bool()
    batch = Rollouts(torch.full((2, 6), 3), torch.ones(2, 6), response, advantages=torch.tensor([1.0, -1.0]))
    assert torch.equal(losses.row_weights(batch, losses.Dapo(6)), losses.row_weights(batch, "token_mean"))
    weights = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert torch.equal(losses.row_weights(batch, losses.RowWeights(weights)), weights)
    with pytest.raises(ValueError, match="RowWeights has shape"):
        losses.row_weights(batch, losses.RowWeights(torch.ones(3)))
    with pytest.raises(ValueError, match="num_items must be > 0"):
        losses.row_weights(batch, losses.Dapo(0))


def test_unknown_loss_type_is_rejected():
    batch = Rollouts(torch.full((1, 3), 3), torch.ones(1, 3), torch.tensor([[0, 1, 1]]).bool(), advantages=torch.ones(1))
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        losses.row_weights(batch, "ppo")


def test_loss_without_advantages_names_the_problem():
    batch = Rollouts(torch.full((1, 3), 3), torch.ones(1, 3), torch.tensor([[0, 1, 1]]).bool())
    with pytest.raises(ValueError, match="no advantages"):
        losses.sequence_losses(torch.zeros(1, 3, dtype=torch.float64), batch, torch.ones(1, dtype=torch.float64))
