"""Build and partly train fprobe's shipped toy policy, ``fprobe/assets/tiny-adder``.

Run from the repository root (CPU only, about four minutes on 2 cores):

    python scripts/train_tiny_policy.py                # writes fprobe/assets/tiny-adder
    python scripts/train_tiny_policy.py --out /tmp/x   # somewhere else

The model is a two-layer Qwen2 causal LM (about 0.1M parameters, float32) over a
character-level tokenizer (digits, '+', '=', space; <pad> <eos> <bos> <unk>). It learns the
addition task of ``fprobe.sampling.toy`` by teacher forcing on the answer tokens, and training stops
deliberately early: every ``--eval-every`` steps the answers sampled at temperature 1.0 (full
vocabulary, ``model.generate``) are scored on a held-out set with a fixed seed, and training
stops at the first checkpoint whose accuracy lies in ``[--target-low, --target-high]`` (the one
closest to 0.5 if none does). The result is a policy that is right about half of the time, so
that a GRPO step on it has non-zero advantages and entropy to change. Everything is seeded, so a
rerun on the same torch version reproduces the same stopping step.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fprobe.sampling.toy import DEFAULT_MODEL_PATH, make_prompts, verify  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARACTERS = "0123456789+= "
MAX_NEW_TOKENS = 8
HELD_OUT_SEED = 20_000_000
EVAL_SAMPLING_SEED = 0
REPORT_SEED = 1234


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that prepends <bos> and decodes by plain concatenation."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=64,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A tiny Qwen2 with tied embeddings whose special token ids match ``tokenizer``'s."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def encode_examples(tokenizer, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Left-padded ``<bos> prompt answer <eos>`` rows with a mask selecting the answer and <eos>."""
    rows, answer_lengths = [], []
    for example in examples:
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        answer_ids = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids + [tokenizer.eos_token_id])
        answer_lengths.append(len(answer_ids) + 1)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, answer_length) in enumerate(zip(rows, answer_lengths)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
        target_mask[i, width - answer_length :] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, positions following the attention mask."""
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids
    ).logits
    targets = batch["target_mask"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][targets], batch["input_ids"][:, 1:][targets])


@torch.no_grad()
def sampled_accuracy(model, tokenizer, examples: list[dict], seed: int) -> float:
    """Mean ``verify`` reward of answers sampled at temperature 1.0 from the full vocabulary."""
    model.eval()
    inputs = tokenizer([e["prompt"] for e in examples], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    output = model.generate(
        **inputs,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.train()
    responses = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(verify(e["prompt"], r, e) for e, r in zip(examples, responses)) / len(examples)


def train(args) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast, int, float]:
    """Train until the held-out sampled accuracy first lands in the target band."""
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    held_out = make_prompts(args.eval_size, seed=HELD_OUT_SEED, digits=args.digits)
    best_step, best_accuracy, best_state = 0, 0.0, None
    for step in range(1, args.max_steps + 1):
        examples = make_prompts(args.batch_size, seed=args.seed * 1_000_003 + step, digits=args.digits)
        batch = encode_examples(tokenizer, examples)
        loss = answer_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every:
            continue
        accuracy = sampled_accuracy(model, tokenizer, held_out, seed=EVAL_SAMPLING_SEED)
        print(f"step {step:5d}  loss {loss.item():.4f}  held-out sampled accuracy {accuracy:.3f}", flush=True)
        if best_state is None or abs(accuracy - 0.5) < abs(best_accuracy - 0.5):
            best_step, best_accuracy = step, accuracy
            best_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        if args.target_low <= accuracy <= args.target_high:
            break
    model.load_state_dict(best_state)
    return model.eval(), tokenizer, best_step, best_accuracy


def save(model, tokenizer, out: Path) -> None:
    """Write model (safetensors), generation config and tokenizer into ``out``."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--target-low", type=float, default=0.45)
    parser.add_argument("--target-high", type=float, default=0.55)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    model, tokenizer, step, accuracy = train(args)
    elapsed = time.perf_counter() - started
    print(f"stopped at step {step} (held-out sampled accuracy {accuracy:.3f}) after {elapsed:.0f} s")
    save(model, tokenizer, args.out)
    report = sampled_accuracy(model, tokenizer, make_prompts(256, seed=REPORT_SEED, digits=args.digits), seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {parameters} parameters; "
          f"mean reward on make_prompts(256, seed={REPORT_SEED}): {report:.3f}")


if __name__ == "__main__":
    main()
