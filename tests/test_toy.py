import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fprobe.sampling.toy import DEFAULT_MODEL_PATH, make_prompts, verify


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH).eval()


def test_make_prompts_is_reproducible_and_correct():
    prompts = make_prompts(50, seed=3, digits=3)
    assert prompts == make_prompts(50, seed=3, digits=3)
    assert prompts != make_prompts(50, seed=4, digits=3)
    for record in prompts:
        a, b = record["prompt"].removesuffix("=").split("+")
        assert record["prompt"].endswith("=")
        assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3
        assert record["answer"] == str(int(a) + int(b))


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("357", "357", 1.0),
        (" 357\n", "357", 1.0),
        ("357", 357, 1.0),
        ("358", "357", 0.0),
        ("357 ", "358", 0.0),
        ("35 7", "357", 0.0),
        ("357+1", "357", 0.0),
        ("", "357", 0.0),
        ("-357", "-357", 0.0),
        (None, "357", 0.0),
    ],
)
def test_verify(response, answer, expected):
    assert verify("12+345=", response, {"answer": answer}) == expected


def test_verify_never_raises_on_bad_examples():
    assert verify("1+1=", "2", {}) == 0.0
    assert verify("1+1=", "2", None) == 0.0
    assert verify("1+1=", "2", {"answer": "two"}) == 0.0


def test_shipped_model_is_tiny_and_matches_tokenizer(model, tokenizer):
    assert model.config.model_type in {"qwen2", "llama"}
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}) == 3


def test_tokenizer_round_trips_a_prompt(tokenizer):
    ids = tokenizer("12+345=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len("12+345=")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12+345="
    assert tokenizer.decode(tokenizer("357", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) == (
        "357" + tokenizer.eos_token
    )


def test_sampled_answers_are_right_about_half_the_time(model, tokenizer):
    examples = make_prompts(256, seed=1234)
    inputs = tokenizer([e["prompt"] for e in examples], return_tensors="pt", padding=True, padding_side="left")
    assert (inputs["attention_mask"][:, -1] == 1).all()
    torch.manual_seed(0)
    with torch.no_grad():
        output = model.generate(
            **inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8
        )
    responses = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = [verify(e["prompt"], r, e) for e, r in zip(examples, responses)]
    mean_reward = sum(rewards) / len(rewards)
    assert 0.2 < mean_reward < 0.8
    assert all(len(r) <= 8 for r in responses)
