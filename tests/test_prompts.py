import json

import pytest
from transformers import AutoTokenizer

from fprobe.sampling import prompts
from fprobe.sampling.prompts import apply_chat_template, load_prompts, prompt_texts
from fprobe.sampling.toy import DEFAULT_MODEL_PATH


def write_lines(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_keeps_extra_fields_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path,
        [json.dumps({"prompt": "1+1=", "answer": "2", "id": 7}), "", "   ", json.dumps({"prompt": "hi"})],
    )
    assert load_prompts(path) == [{"prompt": "1+1=", "answer": "2", "id": 7}, {"prompt": "hi"}]
    assert load_prompts(str(path)) == load_prompts(path)


def test_load_list_of_strings_and_dicts_copies_records():
    record = {"prompt": "b", "answer": 3}
    loaded = load_prompts(["a", record])
    assert loaded == [{"prompt": "a"}, {"prompt": "b", "answer": 3}]
    loaded[1]["answer"] = 4
    assert record["answer"] == 3


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": "a"}), "", '{"prompt": "b",'])
    with pytest.raises(ValueError, match=rf"{path.name}:3: malformed JSON"):
        load_prompts(path)


def test_record_without_prompt_names_the_line(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"prompt": "a"}), json.dumps({"question": "b"})])
    with pytest.raises(ValueError, match=r":2: record has no 'prompt'"):
        load_prompts(path)


def test_non_object_line_and_non_string_prompt(tmp_path):
    with pytest.raises(ValueError, match=r":1: expected an object"):
        load_prompts(write_lines(tmp_path, ['"just a string"']))
    with pytest.raises(ValueError, match="item 0.*not a string"):
        load_prompts([{"prompt": 5}])


def test_empty_sources(tmp_path):
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(write_lines(tmp_path, ["", " "]))
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts([])


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_prompts(missing)


def test_apply_chat_template():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(tokenizer, ["1+2="])
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert apply_chat_template(tokenizer, ["1+2=", {"prompt": "3+4="}]) == [
        "[user]1+2=[assistant]",
        "[user]3+4=[assistant]",
    ]


TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
SYSTEM_TURN = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]


def test_a_conversation_with_a_system_turn_loads_and_renders_through_the_chat_template(tmp_path):
    """Was: only a single user turn could be rendered, so a system turn needed plain-text prompts= and E lost
    the chat template."""
    path = write_lines(tmp_path, [json.dumps({"prompt": SYSTEM_TURN, "answer": "3"})])
    (record,) = load_prompts(path)
    assert record == {"prompt": SYSTEM_TURN, "answer": "3"}
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    tokenizer.chat_template = TEMPLATE
    assert apply_chat_template(tokenizer, [record, "4+5="]) == ["[system]add[user]1+2=[assistant]", "[user]4+5=[assistant]"]
    assert prompt_texts(tokenizer, [record], chat_template=True) == ["[system]add[user]1+2=[assistant]"]
    with pytest.raises(ValueError, match="prompt 0 is a conversation: it needs the tokenizer's chat template"):
        prompt_texts(tokenizer, [record], chat_template=False)


@pytest.mark.parametrize("bad", [[], [{"role": "user"}], [{"role": "user", "content": 5}], ["1+2="]])
def test_a_malformed_conversation_is_refused_naming_the_item(bad):
    with pytest.raises(ValueError, match="item 0: record has a 'prompt' that is not a string or a list"):
        load_prompts([{"prompt": bad}])


def test_sampling_from_a_conversation_conditions_on_its_rendered_template():
    import torch

    import fprobe

    policy = fprobe.Policy.from_pretrained(DEFAULT_MODEL_PATH, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conversation = [{"role": "system", "content": "1+"}, {"role": "user", "content": "2="}]
    E, _ = fprobe.sample(policy, tokenizer, [{"prompt": conversation, "answer": "3"}], n_eval=2, n_update_prompts=1,
                         group_size=2, reward="toy", max_new_tokens=3, seed=0, chat_template=True, replace=True, quiet=True)
    expected = tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    for row in range(len(E)):
        prompt = E.input_ids[row][E.attention_mask[row].bool() & ~E.response_mask[row]].tolist()
        assert prompt == expected

# --- prompt files: encoding errors name the file and line; a byte order mark is read


def test_non_utf8_prompt_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "1+1="}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: the prompt file is not UTF-8 text \(byte 16 of the line\)"):
        prompts.load_prompts(path)


def test_a_prompt_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    assert prompts.load_prompts(path) == [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}]
