"""Rollouts: token ids, masks, advantages and rewards checked at construction, naming the rows;
narrow integer ids read as long ones."""

import pytest
import torch

import fprobe
from fprobe import tree
from fprobe.rollouts import Rollouts
from helpers import VOCAB, make_batch


def test_a_response_token_after_padding_only_is_rejected_naming_the_row():
    ids = torch.full((3, 6), 5)
    attention = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]).bool()
    with pytest.raises(ValueError, match=r"rows \[1\] have a response token whose whole prefix is padding"):
        Rollouts(ids, attention, response)
    attention[1, 1] = 1  # one prompt token before the response: fine
    assert len(Rollouts(ids, attention, response)) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_token_ids_are_rejected(dtype):
    batch = make_batch()
    with pytest.raises(TypeError, match=f"integer token ids, got dtype {dtype}"):
        Rollouts(batch.input_ids.to(dtype), batch.attention_mask, batch.response_mask)


@pytest.mark.parametrize("bad_id", [VOCAB, -1])
def test_token_ids_outside_the_vocabulary_are_rejected_naming_the_rows(load_policy, bad_id):
    policy, batch = load_policy("gpt2"), make_batch()
    ids = batch.input_ids.clone()
    ids[2, -1] = bad_id
    ids[4, 0] = bad_id
    E = Rollouts(ids, batch.attention_mask, batch.response_mask)
    with pytest.raises(ValueError, match=rf"rows \[2, 4\] hold token ids outside the model's vocabulary \[0, {VOCAB}\)"):
        fprobe.token_stats(policy, policy.params, E)


def test_a_non_binary_attention_mask_is_refused_not_reread(fresh_gpt2):
    E = make_batch(6, seed=1, with_advantages=False)
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), fresh_gpt2.params)
    reference = fprobe.entropy_change(fresh_gpt2, E, delta)
    as_bool = fprobe.Rollouts(E.input_ids, E.attention_mask.bool(), E.response_mask)  # 0/1 in another dtype: fine
    assert fprobe.entropy_change(fresh_gpt2, as_bool, delta).delta_h1 == reference.delta_h1
    # was: 2·mask accepted with δH₁ −2.5e-6 instead of −4.8e-6, −mask with its sign flipped; 0.5·mask read as all padding
    for scale in (2, -1, 0.5):
        with pytest.raises(ValueError, match="attention_mask must hold 0 .* and 1"):
            fprobe.Rollouts(E.input_ids, E.attention_mask * scale, E.response_mask)


@pytest.mark.parametrize("name", ["advantages", "rewards"])
@pytest.mark.parametrize("values", [torch.tensor([True, False] * 3), torch.ones(6, dtype=torch.complex64)])
def test_bool_or_complex_advantages_and_rewards_are_refused(name, values):
    U = make_batch(6, seed=2)
    with pytest.raises(TypeError, match=f"{name} must be real numbers"):  # was: read as 1/0, or the imaginary part dropped
        fprobe.Rollouts(U.input_ids, U.attention_mask, U.response_mask, **{name: values})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
def test_narrow_integer_token_ids_give_the_same_numbers_as_long_ones(fresh_gpt2, dtype):
    E = make_batch(6, seed=1, with_advantages=False)
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), fresh_gpt2.params)
    reference = fprobe.entropy_change(fresh_gpt2, E, delta)
    narrow = fprobe.Rollouts(E.input_ids.to(dtype), E.attention_mask, E.response_mask)
    got = fprobe.entropy_change(fresh_gpt2, narrow, delta)  # was: torch's "Expected ... indices ... Long, Int" at the pass
    assert (got.h_orig, got.delta_h_true, got.delta_h1) == (reference.h_orig, reference.delta_h_true, reference.delta_h1)
