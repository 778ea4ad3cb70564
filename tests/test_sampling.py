"""Sampling E and U: reproducibility whatever the batching, exact masks, padding-free log-probs, and the
sampled distribution being the scored policy at its temperature."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

import fprobe
from fprobe.sampling import generate as sampling
from fprobe.sampling import toy

EOS, BOS = 1, 2
MAX_NEW = 12


def tiny_gpt2(seed: int = 0, init_range: float = 0.02):
    """A GPT-2 (absolute positions: left padding is wrong unless positions follow the mask) over the
    toy tokenizer's 17 tokens, float64, eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=17, n_positions=64, bos_token_id=BOS, eos_token_id=EOS,
        initializer_range=init_range,
    )
    return AutoModelForCausalLM.from_config(config).double().eval()



@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)


@pytest.fixture(scope="module")
def unpadded_tokenizer():
    """The toy tokenizer without a pad token: sampling must pad with EOS."""
    tok = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    tok.pad_token = None
    return tok


@pytest.fixture(scope="module")
def policy():
    return fprobe.Policy(tiny_gpt2())


def draw(policy, tokenizer, seed=0, batch_size=16, n_eval=10, n_update_prompts=3, group_size=3, reward="toy", **kw):
    return fprobe.sample(
        policy, tokenizer, toy.make_prompts(40, seed=7), n_eval=n_eval, n_update_prompts=n_update_prompts,
        group_size=group_size, reward=reward, max_new_tokens=MAX_NEW, seed=seed, batch_size=batch_size, **kw,
    )


def same_rollouts(a: fprobe.Rollouts, b: fprobe.Rollouts) -> bool:
    fields = ("input_ids", "attention_mask", "response_mask", "rewards", "group_ids", "advantages")
    return all(
        (getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f)) for f in fields
    )


@pytest.fixture
def record_draws(monkeypatch):
    """Every generate step's raw float32 scores and drawn tokens, as the sampler saw and chose them."""
    calls = []
    original = sampling.RowStreamSampler.__call__

    def recording(self, input_ids, scores):
        out = original(self, input_ids, scores)
        calls.append((scores.clone(), out.argmax(-1)))
        return out

    monkeypatch.setattr(sampling.RowStreamSampler, "__call__", recording)
    return calls


def test_same_seed_same_batches_whatever_the_generation_batch_size(policy, tokenizer):
    E, U = draw(policy, tokenizer, seed=3, batch_size=16)
    E_again, U_again = draw(policy, tokenizer, seed=3, batch_size=16)
    E_rows, U_rows = draw(policy, tokenizer, seed=3, batch_size=4)
    assert same_rollouts(E, E_again) and same_rollouts(U, U_again)
    assert same_rollouts(E, E_rows) and same_rollouts(U, U_rows)
    E_other, _ = draw(policy, tokenizer, seed=4)
    assert not same_rollouts(E, E_other)


def test_response_mask_marks_exactly_the_generated_tokens(policy, unpadded_tokenizer, record_draws):
    tok = unpadded_tokenizer
    E, U = draw(policy, tok, n_eval=24, n_update_prompts=1, group_size=2, batch_size=64)
    assert len(record_draws[0][1]) == len(E) + len(U), "one generate call: column k holds every row's k-th draw"
    drawn = torch.stack([tokens for _, tokens in record_draws], dim=1)[: len(E)]
    prompts = {tuple(tok(r["prompt"])["input_ids"]) for r in toy.make_prompts(40, seed=7)}
    stopped = 0
    for i in range(len(E)):
        ids, attn, resp = E.input_ids[i], E.attention_mask[i].bool(), E.response_mask[i]
        positions = torch.nonzero(resp).flatten()
        start, end = int(positions[0]), int(positions[-1]) + 1
        assert torch.equal(positions, torch.arange(start, end)), "the response is one contiguous span"
        response = ids[start:end].tolist()
        prompt = ids[attn & ~resp].tolist()
        assert tuple(prompt) in prompts and attn[start - len(prompt) : end].all() and not attn[end:].any()
        assert not attn[: start - len(prompt)].any()
        generated = drawn[i].tolist()
        first_eos = generated.index(EOS) if EOS in generated else None
        assert response == generated[: None if first_eos is None else first_eos + 1]
        assert EOS not in response[:-1]
        if response[-1] == EOS:
            stopped += 1
            assert tok.decode(response).endswith(tok.eos_token)
        else:
            assert len(response) == MAX_NEW
        assert (ids[~attn] == EOS).all(), "without a pad token, padding is EOS"
    assert 0 < stopped < len(E), "the batch should hold both stopped and truncated responses"


def test_left_padding_changes_no_log_prob(policy, tokenizer):
    E, _ = draw(policy, tokenizer, n_eval=12)
    assert (E.attention_mask[:, 0] == 0).any(), "some rows must be left padded"
    batched = fprobe.token_stats(policy, policy.params, E)
    for i in range(len(E)):
        span = torch.nonzero(E.attention_mask[i]).flatten()
        cols = slice(int(span[0]), int(span[-1]) + 1)
        alone = fprobe.Rollouts(*(x[i : i + 1, cols] for x in (E.input_ids, E.attention_mask, E.response_mask)))
        single = fprobe.token_stats(policy, policy.params, alone)
        for field in ("logp", "entropy"):
            torch.testing.assert_close(getattr(batched, field)[i, cols], getattr(single, field)[0], rtol=0, atol=1e-10)


def test_tokens_are_drawn_from_the_scored_policy_at_its_temperature(tokenizer, record_draws):
    model = tiny_gpt2(seed=1, init_range=0.5)  # peaked logits: the temperature matters
    hot = fprobe.Policy(model, temperature=0.6)
    E, _ = draw(hot, tokenizer, n_eval=16, n_update_prompts=1, group_size=1, batch_size=64)
    logp_of_draw = lambda scores, tokens: torch.log_softmax(scores.double() / 0.6, -1).gather(-1, tokens[:, None])[:, 0]
    drawn_logp = torch.stack([logp_of_draw(*step) for step in record_draws], 1)[: len(E)]
    sampled = torch.cat([drawn_logp[i, : int(T)] for i, T in enumerate(E.lengths)])  # row-major, as a masked select
    scored = lambda scorer: fprobe.token_stats(scorer, scorer.params, E).logp[E.response_mask]
    torch.testing.assert_close(scored(hot), sampled, rtol=0, atol=1e-5)  # generate's logits are float32
    assert (scored(fprobe.Policy(model, temperature=1.0)) - sampled).abs().max() > 1e-2
    record_draws.clear()
    draw(hot, tokenizer, n_eval=4, n_update_prompts=1, group_size=1, top_p=1e-9)  # the nucleus is the mode alone
    assert all(torch.equal(tokens, scores.argmax(-1)) for scores, tokens in record_draws)


def test_update_batch_has_rewards_groups_and_advantages(policy, tokenizer):
    seen = []

    def reward(prompt, response, example):
        seen.append((prompt, example))
        return float(len(response))

    E, U = draw(policy, tokenizer, n_eval=6, n_update_prompts=3, group_size=4, reward=reward)
    assert len(E) == 6 and len(U) == 12 and E.rewards is None and E.advantages is None
    assert U.max_response_length == MAX_NEW
    assert all(example["prompt"] == prompt for prompt, example in seen)
    assert torch.equal(U.group_ids.view(3, 4), U.group_ids.view(3, 4)[:, :1].expand(3, 4))
    assert len(set(U.group_ids.tolist())) == 3
    torch.testing.assert_close(U.advantages, fprobe.group_advantages(U.rewards, U.group_ids), rtol=0, atol=0)
    responses = [tokenizer.decode(U.input_ids[i][U.response_mask[i]], skip_special_tokens=True) for i in range(len(U))]
    assert U.rewards.tolist() == [float(len(r)) for r in responses]


def test_prompt_choice_with_and_without_replacement():
    eval_rows, update_rows = sampling.choose_prompts(5, 5, 2, 3, seed=0)
    assert sorted(p for p, _ in eval_rows) == list(range(5)) and all(s == 0 for _, s in eval_rows)
    assert [s for _, s in update_rows] == [0, 1, 2, 0, 1, 2] and len({p for p, _ in update_rows}) == 2
    eval_rows, _ = sampling.choose_prompts(3, 12, 1, 1, seed=0, replace=True)
    assert len(set(eval_rows)) == 12, "a prompt drawn again gets a new sample index, hence a new stream"
    assert eval_rows == sampling.choose_prompts(3, 12, 1, 1, seed=0, replace=True)[0]
    with pytest.raises(ValueError, match="pool has only 3"):
        sampling.choose_prompts(3, 12, 1, 1, seed=0)


def test_toy_policy_samples_answers_and_eos(tokenizer):
    toy_policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=torch.float64)
    E, U = fprobe.sample(
        toy_policy, tokenizer, toy.make_prompts(50, seed=0), n_eval=8, n_update_prompts=2, group_size=4,
        reward="toy", max_new_tokens=8, seed=0,
    )
    for i in range(len(E)):
        text = tokenizer.decode(E.input_ids[i][E.attention_mask[i].bool()])
        assert text.startswith(tokenizer.bos_token) and "=" in text
        assert (E.input_ids[i][~E.attention_mask[i].bool()] == tokenizer.pad_token_id).all()
    assert set(U.rewards.tolist()) <= {0.0, 1.0}


# --- models and prompts that cannot give a distribution: refused before or during generation


def test_sampling_a_model_with_nan_weights_raises():
    policy = fprobe.Policy.from_pretrained(toy.DEFAULT_MODEL_PATH, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    with torch.no_grad():
        next(policy.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="logits are NaN or infinite in 4 of 4 rows"):
        fprobe.sample(policy, tokenizer, toy.make_prompts(8, seed=0), n_eval=2, n_update_prompts=1, group_size=2,
                      reward="toy", max_new_tokens=3)


def test_prompts_the_model_has_no_embedding_for_are_named_before_generation():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=15, n_positions=32, bos_token_id=2, eos_token_id=1)
    policy = fprobe.Policy(AutoModelForCausalLM.from_config(config).double().eval())  # 15 ids; the tokenizer has 17 ("=" is 15)
    tokenizer = AutoTokenizer.from_pretrained(toy.DEFAULT_MODEL_PATH)
    pool = [{"prompt": "1+1"}, {"prompt": "1+1="}]
    assert max(tokenizer("1+1")["input_ids"]) < 15 <= max(tokenizer("1+1=")["input_ids"])
    with pytest.raises(ValueError, match=r"prompts \[1\] \(1 in all\) tokenize to ids outside the model's vocabulary \[0, 15\)"):
        fprobe.sample(policy, tokenizer, pool, n_eval=2, n_update_prompts=1, group_size=1, reward="toy", max_new_tokens=2)


def test_check_scores_accepts_masked_logits_and_rejects_rows_without_a_distribution():
    masked = torch.tensor([[0.0, -float("inf"), 1.0], [2.0, 1.0, -float("inf")]])
    sampling.check_scores(masked)  # -inf marks excluded tokens: fine
    for bad in (float("nan"), float("inf")):
        scores = masked.clone()
        scores[1, 0] = bad
        with pytest.raises(FloatingPointError, match="in 1 of 2 rows"):
            sampling.check_scores(scores)
    with pytest.raises(FloatingPointError, match="in 1 of 2 rows"):
        sampling.check_scores(torch.tensor([[0.0, 1.0], [-float("inf"), -float("inf")]]))


def test_several_responses_per_evaluation_prompt(policy, tokenizer):
    """eval_group_size=k: E's n_eval rows are n_eval/k prompt draws with k responses each (own streams, so
    they differ), numbered by E.group_ids; k=1 leaves E as it was, one group per row."""
    E, U = draw(policy, tokenizer, n_eval=12, eval_group_size=4)
    single, U1 = draw(policy, tokenizer, n_eval=12)
    assert len(E) == 12 and E.group_ids.tolist() == [g for g in range(3) for _ in range(4)]
    assert single.group_ids.tolist() == list(range(12)) and same_rollouts(U, U1)
    prompt_of = lambda i: E.input_ids[i][E.attention_mask[i].bool() & ~E.response_mask[i]].tolist()
    response_of = lambda i: E.input_ids[i][E.response_mask[i]].tolist()
    for g in range(3):
        rows = range(4 * g, 4 * g + 4)
        assert len({tuple(prompt_of(i)) for i in rows}) == 1
        assert len({tuple(response_of(i)) for i in rows}) > 1, "each response draws from its own stream"
    rows, _ = sampling.choose_prompts(3, 12, 1, 1, seed=0, replace=True, eval_group_size=4)
    assert len(set(rows)) == 12 and all(rows[4 * g][0] == rows[4 * g + 3][0] for g in range(3))
    with pytest.raises(ValueError, match="eval_group_size=5"):
        sampling.choose_prompts(40, 12, 1, 1, seed=0, eval_group_size=5)
