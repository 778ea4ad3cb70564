"""fprobe.trl: probing TRL GRPOTrainer's own steps. Runs a few real GRPO steps of the built-in tiny policy
(float64, no bf16 autocast) with and without the probe, and checks every number against an independent
computation: TRL's applied update (the step cross-check), a plain-torch SNIS estimate from θ_k and θ_{k+1}
kept by a separate callback, and TRL's own advantages."""

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from trl import GRPOConfig, GRPOTrainer

import fprobe
import fprobe.trl
from fprobe.entropy import uncertainty
from fprobe.model.policy import modes_kept
from fprobe.trl import batches as trl_batches
from fprobe.trl import prompts as trl_prompts
from fprobe.trl import probe as trl_probe
from fprobe.sampling import toy
from fprobe.model.numerics import Numerics

TOKENIZER = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
DATASET = Dataset.from_list(toy.make_prompts(64, 0))
MAX_COMPLETION = 6
TEMPERATURE = 1.5


def make_trainer(tmp_path, loss_type="dapo", accumulation=1, lora=False, dtype=torch.float64, steps=3, **config):
    """A GRPOTrainer on the tiny policy: AdamW with weight decay, a linear schedule, clipping at 0.2 (active
    on these steps), 2 prompts × 4 completions per micro-batch at temperature 1.5 (varied lengths and
    rewards). Returns (trainer, the completions its reward saw)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(toy.DEFAULT_MODEL_PATH), dtype=dtype)
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_generations=4, temperature=TEMPERATURE,
        max_completion_length=MAX_COMPLETION, max_steps=steps, learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="linear", max_grad_norm=0.2,
        gradient_accumulation_steps=accumulation, loss_type=loss_type, bf16=False, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    seen = []

    def reward(prompts, completions, answer, **_):
        seen.extend(completions)
        return [toy.verify(p, c, {"answer": a}) for p, c, a in zip(prompts, completions, answer)]

    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if lora else None
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**{**settings, **config}), train_dataset=DATASET,
                          processing_class=TOKENIZER, peft_config=peft)
    return trainer, seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_random_states() -> tuple:
    """torch's, Python's and numpy's global random states (the Trainer seeds all three)."""
    return torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].tolist()


def trainable(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def logged(trainer, key: str) -> list:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def model_state(model) -> dict:
    """Everything about the model that the probe must leave as it found it."""
    return {
        "attention": [m.config._attn_implementation for m in model.modules() if hasattr(m, "_can_set_attn_implementation")],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "checkpointing": getattr(model, "is_gradient_checkpointing", None),
        "forward_hooks": [len(m._forward_hooks) for m in model.modules()],
    }


def state_dicts_equal(a, b) -> bool:
    """Equal nested state dicts, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_dicts_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_dicts_equal(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# attaching changes nothing, and the step cross-check


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo", "dapo"])
def test_attached_run_is_bit_identical_and_fprobe_replays_trl_step(tmp_path, loss_type, accumulation, lora):
    plain, plain_completions = make_trainer(tmp_path, loss_type, accumulation, lora)
    plain.train()
    plain_rng = global_random_states()
    probed, probed_completions = make_trainer(tmp_path, loss_type, accumulation, lora)
    callbacks = list(probed.callback_handler.callbacks)
    probe = fprobe.trl.attach(probed, every=1, n_eval=8)
    probed.train()

    assert state_dicts_equal(global_random_states(), plain_rng), "the probe drew from the global random state"
    new, old = trainable(probed.model), trainable(plain.model)
    assert new.keys() == old.keys() and all(torch.equal(new[n], old[n]) for n in new)
    assert logged(probed, "loss") == logged(plain, "loss") and len(logged(plain, "loss")) == 3
    assert logged(probed, "grad_norm") == logged(plain, "grad_norm")
    assert probed_completions == plain_completions
    assert model_state(probed.model) == model_state(plain.model)
    assert model_state(plain.model)["checkpointing"] is True  # TRL's default, which fprobe's passes turn off and restore
    assert state_dicts_equal(probed.optimizer.state_dict(), plain.optimizer.state_dict())
    assert state_dicts_equal(probed.lr_scheduler.state_dict(), plain.lr_scheduler.state_dict())
    assert "compute_loss" not in vars(probed), "the compute_loss wrapper outlived train()"
    assert not probed.optimizer.optimizer._optimizer_step_post_hooks, "the update counter outlived train()"
    assert [c for c in probed.callback_handler.callbacks if c is not probe.capture] == callbacks

    assert [r["step"] for r in probe.records] == [1, 2, 3] and all(r["updates"] == 1 for r in probe.records)
    assert any(g > 0.2 for g in logged(plain, "grad_norm")), "clipping should act in this run"
    lrs = [r["lr"] for r in probe.records]
    assert lrs == logged(plain, "learning_rate") and len(set(lrs)) == 3  # the linear schedule's rate at each step
    for record in probe.records:
        assert record["step_check"] == "ok" and record["delta_l2"] > 0
        # float64 model, but TRL's forward rounds to float32 in its fused LM head, Qwen2's RMSNorm and the
        # rotary angles, so TRL's gradient carries ~1e-7 relative rounding; AdamW divides each component by
        # its own √v (its first step is sign-like), which turns that rounding into update differences
        # wherever |g| is small (measured 7e-5 to 3e-4; with those three in float64, 1e-13:
        # test_step_rel_error_with_adamw_is_trls_float32_rounding)
        assert record["step_rel_error"] <= 1e-3, record


CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if doubled %}{{ bos_token }}{% endif %}{{ m['content'] }}{% endfor %}"


def make_chat_trainer(tmp_path, system: bool = False, **options):
    """``make_trainer`` with conversational prompts (one user turn each, after a system turn if ``system``)
    rendered by a chat template that TRL and fprobe must both apply, with the run's ``chat_template_kwargs`` (a
    second <bos> before each turn, which plain-text prompts and the template without them do not have)."""
    trainer, seen = make_trainer(tmp_path, chat_template_kwargs={"doubled": True}, **options)
    tokenizer = AutoTokenizer.from_pretrained(str(toy.DEFAULT_MODEL_PATH))
    tokenizer.chat_template = CHAT_TEMPLATE
    turns = [{"role": "system", "content": "1+1=2"}] if system else []
    dataset = Dataset.from_list([{"prompt": turns + [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in toy.make_prompts(64, 0)])

    def reward(prompts, completions, answer, **_):
        seen.extend(c[0]["content"] for c in completions)
        return [toy.verify(p[-1]["content"], c[0]["content"], {"answer": a}) for p, c, a in zip(prompts, completions, answer)]

    trainer = GRPOTrainer(model=trainer.model, reward_funcs=reward, args=trainer.args, train_dataset=dataset, processing_class=tokenizer)
    return trainer, seen


@pytest.mark.parametrize("case", ["bf16_autocast", "two_iterations", "conversational", "conversational_system"])
def test_attaching_changes_nothing_in_other_kinds_of_run(tmp_path, case):
    """bf16 autocast on CPU (a float32 model), two iterations per generation (old log-probs, no replay),
    conversational prompts: bit-identical weights, losses, completions and model state with and without the
    probe, and records that say what they could not check."""
    build = {
        "bf16_autocast": lambda: make_trainer(tmp_path, dtype=torch.float32, bf16=True, steps=2),
        "two_iterations": lambda: make_trainer(tmp_path, num_iterations=2, steps=2),
        "conversational": lambda: make_chat_trainer(tmp_path, steps=2),
        "conversational_system": lambda: make_chat_trainer(tmp_path, system=True, steps=2),
    }[case]
    plain, plain_completions = build()
    plain.train()
    probed, probed_completions = build()
    probe = fprobe.trl.attach(probed, every=1, n_eval=4)
    probed.train()
    new, old = trainable(probed.model), trainable(plain.model)
    assert all(torch.equal(new[n], old[n]) for n in old)
    assert logged(probed, "loss") == logged(plain, "loss") and probed_completions == plain_completions
    assert model_state(probed.model) == model_state(plain.model)
    assert [r["step"] for r in probe.records] == [1, 2] and all(r["delta_h1"] != 0 for r in probe.records)
    checks = [r["step_check"] for r in probe.records]
    if case == "bf16_autocast":
        assert all(c.startswith("ok (the trainer's forward ran under bf16/fp16 autocast") for c in checks)
    elif case == "two_iterations":
        assert all(c.startswith("skipped: num_iterations = 2") for c in checks)
        assert all(r["step_rel_error"] is None for r in probe.records)
    else:
        assert checks == ["ok", "ok"] and max(r["step_rel_error"] for r in probe.records) <= 1e-3
        tokenizer = probed.processing_class
        rendered = {tuple(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, doubled=True)["input_ids"])
                    for row in probed.train_dataset}  # TRL's own rendering of the prompts
        E = probe.eval_batches[1]
        prompts = {tuple(ids[(mask & ~response).bool()].tolist()) for ids, mask, response in
                   zip(E.input_ids, E.attention_mask.bool(), E.response_mask)}
        assert prompts <= rendered and all(p[:2] == (tokenizer.bos_token_id,) * 2 for p in prompts)


@pytest.mark.parametrize("optimizer, bound", [("sgd", 3e-5), ("adamw_torch", 1e-3)])
def test_step_rel_error_in_float32(tmp_path, optimizer, bound):
    """Measured in float32 (SGD: 0.6-5e-6; AdamW: ~7e-5 on its first step, ~4e-7 after): TRL and fprobe
    compute the same loss with differently rounded kernels (SDPA vs fprobe's attention, TRL's chunked
    float32 LM head vs fprobe's float64 log-softmax), so their gradients differ by float32 rounding; AdamW's
    first, sign-like step magnifies that wherever |g| is small."""
    trainer, _ = make_trainer(tmp_path, "dapo", dtype=torch.float32, steps=2, optim=optimizer)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4)
    trainer.train()
    errors = [r["step_rel_error"] for r in probe.records]
    print(f"float32 {optimizer} step_rel_error:", errors)
    assert all(e < bound for e in errors) and max(errors) > 1e-9  # steps without a gradient (weight decay alone) replay exactly


@pytest.mark.parametrize("loss_type, generations", [("dr_grpo", 1), ("grpo", 1), ("bnpo", 1), ("dapo", 1), ("dapo", 2)])
def test_step_rel_error_in_float64_with_sgd(tmp_path, loss_type, generations):
    """Two micro-batches per step (bnpo then divides each by its own token count, which is not the token
    mean of the step; with two generations per step, dapo divides each by its own generation's tokens
    times 2), SGD with momentum and weight decay, a linear schedule, clipping at 0.2: fprobe's replay
    equals TRL's applied update to 1e-5 (measured 1e-8 to 1e-7: TRL's float32 LM head)."""
    trainer, _ = make_trainer(tmp_path, loss_type, accumulation=2, steps=3, optim="sgd", optim_args="momentum=0.9",
                              steps_per_generation=2 // generations)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4)
    trainer.train()
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9 and trainer.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert any(g > 0.2 for g in logged(trainer, "grad_norm"))
    errors = [r["step_rel_error"] for r in probe.records]
    print(f"{loss_type} float64 SGD step_rel_error:", errors)
    assert all(r["step_check"] == "ok" for r in probe.records) and all(e <= 1e-5 for e in errors)
    assert max(errors) > 0, "some step must have a gradient"


class ExactFloat64LogProbs:
    """Stands in for TRL's ``ChunkedLogProbFunction`` (the fused LM head, which computes in float32 whatever
    the model's dtype): the same per-token log-probs (and entropies) from whole logits in the model's dtype,
    differentiated by autograd."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        logits = hidden @ weight.t() + (0 if bias is None else bias)
        logits = logits * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits / temperature, -1)
        entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
        return logp.gather(-1, targets[:, None])[:, 0], entropy, None, None, None


def rms_norm_in_input_dtype(self, hidden):
    """Qwen2RMSNorm without its float32 cast."""
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def rotary_in_float64(self, x, position_ids):
    """Qwen2RotaryEmbedding with its angles in float64 instead of float32."""
    angles = position_ids[..., None].double() * self.inv_freq.double()
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


@pytest.mark.parametrize("float64_forward", [False, True], ids=["trl_as_is", "trl_in_float64"])
def test_step_rel_error_with_adamw_is_trls_float32_rounding(tmp_path, monkeypatch, float64_forward):
    """AdamW with weight decay, a linear schedule, clipping active, two micro-batches per step. TRL's forward of
    a float64 model still rounds to float32 in three places: its fused LM head, Qwen2's RMSNorm and its rotary
    angles (fprobe keeps all three in float64). Adam's first, sign-like step magnifies that rounding where |g|
    is small: measured step_rel_error 1.6e-4 then 1.6e-5. Making those three float64 (and nothing else of
    TRL's step) leaves 1e-13: fprobe's replay is TRL's update; each of the three alone leaves > 1e-5."""
    if float64_forward:
        from transformers.models.qwen2 import modeling_qwen2
        from trl.trainer import utils as trl_utils

        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ExactFloat64LogProbs)
        monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", rms_norm_in_input_dtype)
        monkeypatch.setattr(modeling_qwen2.Qwen2RotaryEmbedding, "forward", rotary_in_float64)
    trainer, _ = make_trainer(tmp_path, "dapo", accumulation=2, steps=2)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4)
    trainer.train()
    assert trainer.args.optim.startswith("adamw") and trainer.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert all(g > 0.2 for g in logged(trainer, "grad_norm")), "clipping should act on both steps"
    assert [r["lr"] for r in probe.records] == [3e-3, 1.5e-3]
    errors = [r["step_rel_error"] for r in probe.records]
    print(f"float64 AdamW step_rel_error ({'float64 forward' if float64_forward else 'TRL as is'}):", errors)
    assert all(r["step_check"] == "ok" for r in probe.records)
    if float64_forward:
        assert max(errors) <= 1e-10
    else:
        assert 1e-5 < max(errors) <= 1e-3


@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo", "bnpo", "dapo"])
def test_row_weights_are_trls_own_normalisers(tmp_path, loss_type):
    """TRL's ``_compute_loss`` itself, run on two micro-batches of different lengths with given per-token
    log-probs: ∂loss/∂ℓ_ik = −c_i A_i must be ``trl_row_weights``' c_i times −A_i."""
    trainer, _ = make_trainer(tmp_path, loss_type, accumulation=2, steps=1)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    g = torch.Generator().manual_seed(1)
    micro, grads = [], []
    for rows, width, num_items in ((3, 4, 17.0), (5, 6, 17.0)):
        completion_mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (rows, 1), generator=g)).long()
        inputs = {
            "prompt_ids": torch.randint(2, 17, (rows, 3), generator=g), "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
            "completion_ids": torch.randint(2, 17, (rows, width), generator=g), "completion_mask": completion_mask,
            "advantages": torch.randn(rows, generator=g), "num_items_in_batch": torch.tensor(num_items),
        }
        logp = (-torch.rand(rows, width, generator=g)).requires_grad_()
        trainer._get_per_token_logps_and_entropies = lambda *a, logp=logp, **k: (logp, torch.zeros_like(logp), None)
        (grad,) = torch.autograd.grad(trainer._compute_loss(trainer.model, inputs), logp)
        micro.append(trl_batches.micro_batch_from_inputs(inputs, 2))
        grads.append(grad.double() * completion_mask)
    weights = trl_batches.trl_row_weights(micro, loss_type, 1, trainer.args.steps_per_generation, MAX_COMPLETION)
    advantages = torch.cat([mb.advantages for mb in micro])
    for grad, mb, rows in zip(grads, micro, (slice(0, 3), slice(3, 8))):
        expected = -(weights[rows] * advantages[rows])[:, None] * mb.completion_mask
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)  # TRL's float32 arithmetic


# ---------------------------------------------------------------------------------------------
# ΔH_true against an independent SNIS computation


class KeepParameters(TrainerCallback):
    """Saves θ just before each optimizer update and just after each step."""

    def __init__(self, model):
        self.model, self.before, self.after = model, {}, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before[state.global_step + 1] = trainable(self.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.after[state.global_step] = trainable(self.model)


def plain_statistics(model, params, E: fprobe.Rollouts, temperature: float = TEMPERATURE, grad: bool = False):
    """(S_i, H_i) of E at ``params``: the model's own float64 forward (its SDPA attention; its RMSNorm's
    float32 casts kept in float64, which would otherwise leave ~1e-7 on these ΔH), a plain log-softmax at
    the sampling temperature; differentiable if ``grad``."""
    positions = (E.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.enable_grad() if grad else torch.no_grad(), Numerics():
        logits = functional_call(model, params, (E.input_ids,), dict(attention_mask=E.attention_mask, position_ids=positions)).logits
    logp = torch.log_softmax(logits[:, :-1].double() / temperature, -1)
    token_logp = logp.gather(-1, E.input_ids[:, 1:, None])[..., 0]
    token_entropy = -(logp.exp() * logp).sum(-1)
    mask = E.response_mask[:, 1:]  # padding rows may hold NaN logits: select, do not multiply
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(mask, token_logp, zero).sum(-1), torch.where(mask, token_entropy, zero).sum(-1)


def snis_entropy(S, H, S_sampler, T) -> float:
    """Σ w H / Σ w T with w = exp(S − S_sampler), in float64."""
    w = torch.exp(S - S_sampler - (S - S_sampler).max())
    return float((w * H).sum() / (w * T).sum())


def eval_model(trainer):
    """A separate copy of the trainer's architecture in eval mode, transformers' own (SDPA) attention, for the
    plain computation (its float64 eager attention turns left-padded rows into NaN)."""
    model = AutoModelForCausalLM.from_pretrained(str(toy.DEFAULT_MODEL_PATH), dtype=torch.float64)
    if hasattr(trainer.model, "peft_config"):
        raise AssertionError("plain_statistics expects a full-parameter run")
    return model.eval()


def test_delta_h_true_equals_an_independent_snis_from_saved_parameters(tmp_path):
    trainer, _ = make_trainer(tmp_path, "dr_grpo", steps=2)
    keep = KeepParameters(trainer.model)
    trainer.add_callback(keep)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=12, second_order=True)
    trainer.train()
    model = eval_model(trainer)
    for record in probe.records:
        k = record["step"]
        E = probe.eval_batches[k]
        assert len(E) == 12 and record["eval_sampled_at"] == k
        before, after = keep.before[k], keep.after[k]
        S0, H0 = plain_statistics(model, before, E)
        S1, H1 = plain_statistics(model, after, E)
        T = E.lengths.double()
        expected = snis_entropy(S1, H1, S0, T) - snis_entropy(S0, H0, S0, T)
        assert abs(record["delta_h_true"] - expected) <= 1e-12, (record["delta_h_true"], expected)
        assert abs(record["h_orig"] - snis_entropy(S0, H0, S0, T)) <= 1e-12
        # δH₁ and δH₂ of a fresh E: the first and half the second derivative of the same plain estimate along Δθ
        entropy_at = lambda t: snis_entropy(*plain_statistics(model, {n: before[n] + t * (after[n] - before[n]) for n in before}, E), S0, T)
        eps = 1e-3
        plus, minus = entropy_at(eps), entropy_at(-eps)
        assert record["delta_h1"] == pytest.approx((plus - minus) / (2 * eps), rel=1e-5)
        assert record["delta_h2"] == pytest.approx((plus - 2 * entropy_at(0.0) + minus) / (2 * eps**2), rel=1e-3)


def test_fixed_eval_batch_is_importance_weighted_from_its_sampler(tmp_path):
    """resample=False: E is drawn at the first probed step and reused; later estimates weight by
    exp(S(θ) − S(θ_sampler)). Checked against the plain SNIS from the saved parameters, δH₁ against a
    central finite difference of that plain estimate along Δθ."""
    trainer, _ = make_trainer(tmp_path, "dapo", steps=3)
    keep = KeepParameters(trainer.model)
    trainer.add_callback(keep)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=12, resample=False, second_order=True, ess_threshold=0.01)
    trainer.train()
    model = eval_model(trainer)
    assert [r["eval_sampled_at"] for r in probe.records] == [1, 1, 1]
    assert probe.eval_batches[3] is probe.eval_batches[1]
    E = probe.eval_batches[1]
    T = E.lengths.double()
    S_sampler, _ = plain_statistics(model, keep.before[1], E)
    entropy_at = lambda params: snis_entropy(*plain_statistics(model, params, E), S_sampler, T)
    for record in probe.records[1:]:
        k = record["step"]
        before, after = keep.before[k], keep.after[k]
        expected = entropy_at(after) - entropy_at(before)
        assert abs(record["delta_h_true"] - expected) <= 1e-12
        S_k, _ = plain_statistics(model, before, E)
        w = torch.exp(S_k - S_sampler - (S_k - S_sampler).max())
        assert record["sampler_ess_fraction"] == pytest.approx(float(w.sum() ** 2 / (w**2).sum()) / len(w), rel=1e-6)
        assert record["sampler_ess_fraction"] < 1.0
        eps = 1e-3
        along = lambda t: {n: before[n] + t * (after[n] - before[n]) for n in before}
        central = (entropy_at(along(eps)) - entropy_at(along(-eps))) / (2 * eps)
        assert record["delta_h1"] == pytest.approx(central, rel=1e-4, abs=1e-8)
        second = (entropy_at(along(eps)) - 2 * entropy_at(before) + entropy_at(along(-eps))) / (2 * eps**2)
        assert record["delta_h2"] == pytest.approx(second, rel=1e-2, abs=1e-7)


def test_given_eval_batch_is_weighted_from_the_model_at_attach_and_resampled_when_ess_falls(tmp_path):
    trainer, _ = make_trainer(tmp_path, "grpo", steps=3)
    initial = trainable(trainer.model)
    with modes_kept(trainer.model):
        policy = fprobe.Policy(trainer.model)
        E, _ = fprobe.sample(policy, TOKENIZER, toy.make_prompts(20, 1), n_eval=10, n_update_prompts=1, group_size=1,
                             reward="toy", max_new_tokens=MAX_COMPLETION, seed=3)
    keep = KeepParameters(trainer.model)
    trainer.add_callback(keep)
    probe = fprobe.trl.attach(trainer, every=1, E=E, ess_threshold=1.0)  # any update makes the ESS fraction < 1
    trainer.train()
    model = eval_model(trainer)
    first = probe.records[0]
    assert probe.eval_batches[1] is E and first["eval_sampled_at"] == 0
    T = E.lengths.double()
    S_sampler, _ = plain_statistics(model, initial, E)
    entropy_at = lambda params: snis_entropy(*plain_statistics(model, params, E), S_sampler, T)
    # step 1 starts at the parameters E was sampled from: all weights 1 at θ_1, so E is reused
    assert first["sampler_ess_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert abs(first["delta_h_true"] - (entropy_at(keep.after[1]) - entropy_at(keep.before[1]))) <= 1e-12
    # from step 2 on, the weights from E's sampler to θ_k are not all 1, so a fresh E is drawn at each step
    assert [r["eval_sampled_at"] for r in probe.records[1:]] == [2, 3]
    assert probe.eval_batches[2] is not E


def test_per_sequence_contributions_against_plain_gradients(tmp_path):
    """contributions=True with SGD (weight decay 0.1 on transformers' decay group, clipping at 0.2 active, no
    momentum): Δθ = lr·(s Σ_j c_j A_j ∇S_j − wd θ_decay), so with u = ∇Ĥ(θ_k) on E the part of row j is
    lr·s·c_j·A_j·⟨u, ∇S_j⟩ and the decay part −lr·wd·⟨u, θ_decay⟩. All of it from plain autograd on a separate
    float64 model, from the micro-batch TRL's compute_loss saw (dr_grpo: c_j = 1 / (B · max_completion_length))
    and θ_k kept by a separate callback; s = 0.2 / (‖g‖ + 1e-6) (torch's clipping) from the plain gradient."""
    trainer, _ = make_trainer(tmp_path, "dr_grpo", steps=1, optim="sgd")
    seen, own = [], trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, *rest, **kw: (seen.append(dict(inputs)), own(model, inputs, *rest, **kw))[1]
    keep = KeepParameters(trainer.model)
    trainer.add_callback(keep)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=6, contributions=True)
    trainer.train()
    (record,) = probe.records
    (inputs,) = seen
    parts = record["contributions"]
    model = eval_model(trainer)
    theta = {n: p.clone().requires_grad_() for n, p in keep.before[1].items()}

    E = probe.eval_batches[1]
    S, H = plain_statistics(model, theta, E, grad=True)
    w = torch.exp(S - S.detach())  # SNIS weights from θ_k's sample: 1 in value, not in derivative
    u = torch.autograd.grad((w * H).sum() / (w * E.lengths.double()).sum(), list(theta.values()))

    prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
    U = fprobe.Rollouts(torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1), torch.cat([prompt_mask, completion_mask], 1),
                        torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1).bool())
    S_U, _ = plain_statistics(model, theta, U, grad=True)
    grads = [torch.autograd.grad(S_U[j], list(theta.values()), retain_graph=True) for j in range(len(S_U))]
    dot = lambda a, b: sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    c = 1.0 / (len(S_U) * MAX_COMPLETION)
    A = inputs["advantages"].double()
    g = [sum(c * float(A[j]) * grads[j][i] for j in range(len(grads))) for i in range(len(theta))]  # −∇loss
    norm = dot(g, g) ** 0.5
    assert norm == pytest.approx(logged(trainer, "grad_norm")[0], rel=1e-5) and norm > 0.2
    scale, lr, wd = 0.2 / (norm + 1e-6), record["lr"], trainer.args.weight_decay  # torch's clip_grad_norm_
    expected = [lr * scale * c * float(A[j]) * dot(u, grads[j]) for j in range(len(grads))]
    assert parts["per_sequence"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert max(map(abs, expected)) > 1e-4 and sum(a != 0 for a in A) >= 4

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = {names[id(p)] for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed and decayed != set(theta)  # biases and norms are not decayed
    decay = -lr * wd * sum(float((ui * theta[n]).detach().sum()) for n, ui in zip(theta, u) if n in decayed)
    assert parts["decay"] == pytest.approx(decay, rel=1e-9) and parts["momentum"] == 0
    assert parts["delta_h1"] == pytest.approx(record["delta_h1"], rel=1e-6)


def test_contributions_and_second_order_are_recorded(tmp_path):
    trainer, _ = make_trainer(tmp_path, "dr_grpo", steps=1)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=6, contributions=True, second_order=True)
    trainer.train()
    (record,) = probe.records
    parts = record["contributions"]
    assert len(parts["per_sequence"]) == 8  # one per completion of the step
    total = parts["momentum"] + parts["decay"] + sum(parts["per_sequence"])
    assert total == pytest.approx(parts["delta_h1"], rel=1e-9, abs=1e-15)
    # the parts decompose δH₁ of fprobe's replayed step, which equals TRL's up to step_rel_error
    assert parts["delta_h1"] == pytest.approx(record["delta_h1"], rel=1e-4)
    assert record["delta_h2"] is not None


# ---------------------------------------------------------------------------------------------
# exactly one update, skip reasons, logs and files


class ExtraUpdate(TrainerCallback):
    """At step 2 the optimizer updates a second time; at step 3 its update is skipped."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == 3:
            self.trainer.accelerator.gradient_state._set_sync_gradients(False)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == 2:
            optimizer.step()


def test_a_step_with_two_updates_or_none_gives_no_numbers_and_says_why(tmp_path):
    trainer, _ = make_trainer(tmp_path, "dapo", steps=3)
    trainer.add_callback(ExtraUpdate(trainer))
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4)
    trainer.train()
    first, twice, none = probe.records
    assert first["updates"] == 1 and "delta_h_true" in first and "skipped" not in first
    for record, count in ((twice, 2), (none, 0)):
        assert record["updates"] == count
        assert f"{count} optimizer updates" in record["skipped"]
        assert "delta_h_true" not in record and "delta_h1" not in record and record["step_rel_error"] is None
    probed_steps = {entry["step"] for entry in trainer.state.log_history if "entropy_probe/delta_h_true" in entry}
    assert probed_steps == {1}


class InterruptAt(TrainerCallback):
    """Ctrl-C at the end of step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_an_interrupt_inside_the_probe_leaves_whole_lines_and_a_clean_trainer_for_the_next_train(tmp_path, monkeypatch):
    """Ctrl-C while the probe measures step 2: the JSONL holds step 1's line, whole; the weights, the model's
    modes, the trainer's compute_loss and the optimizer's hooks are as the same interrupt leaves a run without
    the probe; after that and after a Ctrl-C outside the probe, training again counts one update per step (a
    hook left from an interrupted run would count two) and captures each micro-batch once."""
    out = tmp_path / "probe.jsonl"
    plain, _ = make_trainer(tmp_path, "dapo", steps=3)
    plain.add_callback(InterruptAt(2))
    with pytest.raises(KeyboardInterrupt):
        plain.train()
    trainer, _ = make_trainer(tmp_path, "dapo", steps=3)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4, out=out)
    measure = probe._measure

    def interrupted(captured, *rest):
        if captured.step == 2:
            raise KeyboardInterrupt
        return measure(captured, *rest)

    monkeypatch.setattr(probe, "_measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 2 and [r["step"] for r in probe.records] == [1]
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [1]
    assert "compute_loss" not in vars(trainer) and not trainer.optimizer.optimizer._optimizer_step_post_hooks
    assert model_state(trainer.model) == model_state(plain.model)  # as the same interrupt leaves a run without it
    new, old = trainable(trainer.model), trainable(plain.model)
    assert all(torch.equal(new[n], old[n]) for n in old)

    monkeypatch.setattr(probe, "_measure", measure)
    outside = InterruptAt(1)  # Ctrl-C outside the probe: its hooks stay until the next train() begins
    trainer.add_callback(outside)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.remove_callback(outside)
    captured = []
    capture = probe.capture._capture
    monkeypatch.setattr(probe.capture, "_capture", lambda inputs: (captured.append(len(inputs["advantages"])), capture(inputs)))
    trainer.train()  # from step 0 again (no checkpoint), with the weights the interrupted run left
    assert [r["step"] for r in probe.records] == [1, 1, 1, 2, 3] and captured == [8, 8, 8]
    assert all(r["updates"] == 1 and r["step_check"] == "ok" and r["step_rel_error"] <= 1e-3 for r in probe.records)
    assert "compute_loss" not in vars(trainer) and not trainer.optimizer.optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize("config, options, reason", [({"beta": 0.04}, {}, "beta"), ({}, {"check_step": False}, "check_step=False")])
def test_unmodelled_loss_terms_or_no_check_skip_the_replay_but_keep_the_numbers(tmp_path, config, options, reason):
    trainer, _ = make_trainer(tmp_path, "dapo", steps=1, **config)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4, **options)
    trainer.train()
    (record,) = probe.records
    assert record["step_check"].startswith("skipped:") and reason in record["step_check"]
    assert record["step_rel_error"] is None and record["delta_h_true"] != 0 and record["delta_h1"] != 0


def test_a_zero_update_has_no_relative_error_and_says_so(tmp_path):
    """Learning rate 0 (as a schedule's end gives; weight decay is scaled by it too): Δθ_TRL = 0, so there is no
    relative error to give; step_check says why instead of "ok", and the entropy numbers are exactly 0."""
    trainer, _ = make_trainer(tmp_path, "dapo", steps=1, learning_rate=0.0)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4)
    trainer.train()
    (record,) = probe.records
    assert record["delta_l2"] == 0 and record["delta_h_true"] == 0 and record["delta_h1"] == 0 and record["ratio"] is None
    assert record["step_rel_error"] is None and record["step_rel_error_worst"] is None
    assert record["step_check"] == "no relative error: TRL's update is 0 (fprobe's replay: ‖Δθ‖ = 0)"


def test_records_go_to_trainer_log_and_jsonl(tmp_path):
    out = tmp_path / "probe.jsonl"
    trainer, _ = make_trainer(tmp_path, "dapo", steps=4)
    probe = fprobe.trl.attach(trainer, every=2, n_eval=4, out=out)
    trainer.train()
    assert [r["step"] for r in probe.records] == [2, 4]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    for line, record in zip(lines, probe.records):
        assert line["delta_h_true"] == record["delta_h_true"] and line["step_rel_error"] == record["step_rel_error"]
    entries = {e["step"]: e for e in trainer.state.log_history if "entropy_probe/delta_h1" in e}
    assert sorted(entries) == [2, 4]
    for record in probe.records:
        entry = entries[record["step"]]
        for key in trl_probe.LOGGED:
            assert entry.get(f"entropy_probe/{key}") == record[key]  # absent where None (δH₂ not asked)
    assert logged(trainer, "loss") and all("loss" not in e for e in entries.values())


def test_trl_advantages_use_the_same_epsilon_as_group_advantages(tmp_path):
    """TRL's logged advantages (in generation order) against fprobe.group_advantages of TRL's logged rewards."""
    trainer, _ = make_trainer(tmp_path, "dapo", steps=1)
    trainer.train()
    rewards = torch.tensor(next(iter(trainer._logs["rewards"].values())), dtype=torch.float64)
    groups = torch.arange(len(rewards)) // trainer.num_generations
    expected = fprobe.group_advantages(rewards, groups)
    torch.testing.assert_close(torch.tensor(list(trainer._logs["advantages"]), dtype=torch.float64), expected, rtol=1e-6, atol=1e-6)
    assert bool((rewards.view(-1, 4).std(-1) > 0).any()), "a group with different rewards makes eps matter"


def test_eval_prompts_come_from_the_dataset_as_text_or_conversations():
    text = SimpleNamespace(train_dataset=Dataset.from_list([{"prompt": "1+2="}, {"prompt": "3+4="}]))
    assert trl_prompts.dataset_prompts(text) == ([{"prompt": "1+2="}, {"prompt": "3+4="}], False)
    chat = SimpleNamespace(train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "1+2="}]}]))
    assert trl_prompts.dataset_prompts(chat) == ([{"prompt": "1+2="}], True)
    # a system turn once needed prompts=, and E then lost the chat template
    turns = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]
    records, chat_template = trl_prompts.dataset_prompts(SimpleNamespace(train_dataset=Dataset.from_list([{"prompt": turns}])))
    assert chat_template and records == [{"prompt": turns}]
    structured = [{"role": "user", "content": [{"type": "text", "text": "1+2="}]}]
    with pytest.raises(ValueError, match="pass prompts="):
        trl_prompts.dataset_prompts(SimpleNamespace(train_dataset=Dataset.from_list([{"prompt": structured}])))
    with pytest.raises(ValueError, match="no 'prompt' column"):
        trl_prompts.dataset_prompts(SimpleNamespace(train_dataset=Dataset.from_list([{"question": "1+2="}])))


# ---------------------------------------------------------------------------------------------
# bad input: one clear error at attach, before training


def test_attach_rejects_bad_input_before_training(tmp_path):
    trainer, _ = make_trainer(tmp_path, steps=1)
    callbacks = list(trainer.callback_handler.callbacks)
    state = model_state(trainer.model)
    plain = Trainer(model=trainer.model, args=TrainingArguments(output_dir=str(tmp_path / "plain"), report_to=[], use_cpu=True))
    with pytest.raises(TypeError, match="needs a trl.GRPOTrainer, got Trainer"):
        fprobe.trl.attach(plain)
    for every in (0, -1, 1.5):
        with pytest.raises(ValueError, match="every must be a positive number of steps"):
            fprobe.trl.attach(trainer, every=every)
    foreign = fprobe.Rollouts(torch.tensor([[2, 40, 41]]), torch.ones(1, 3), torch.tensor([[0, 1, 1]]).bool())
    with pytest.raises(ValueError, match="vocabulary of 17"):
        fprobe.trl.attach(trainer, E=foreign)
    with pytest.raises(ValueError, match="contributions need a fresh E"):
        fprobe.trl.attach(trainer, resample=False, contributions=True)
    for prompts in ("1+2=", ["1+2=", 3], ["1+2=", ""]):  # one string would be its characters
        with pytest.raises((TypeError, ValueError), match="prompts must be"):
            fprobe.trl.attach(trainer, prompts=prompts)
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="FSDP shards the parameters"):
        fprobe.trl.attach(trainer)
    trainer.is_fsdp_enabled = False
    assert trainer.callback_handler.callbacks == callbacks and trainer.state.global_step == 0
    assert model_state(trainer.model) == state
    fprobe.trl.attach(trainer)
    with pytest.raises(ValueError, match="already attached"):
        fprobe.trl.attach(trainer)


def test_an_out_that_cannot_take_the_records_fails_at_attach(tmp_path):
    """``out`` is opened at attach, not first at the first probed step: a text file that is not JSONL, a
    folder, a path through a file, a place that cannot be created (/proc refuses even root) all fail there,
    leaving the trainer without the probe and the file as it was; a file with records of this run's
    output_dir (a rerun) gets a warning, since those steps are not written again."""
    trainer, _ = make_trainer(tmp_path, steps=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    callbacks = list(trainer.callback_handler.callbacks)
    for out, error in ((notes, "malformed JSON line"), (tmp_path, "is a folder"), (notes / "probe.jsonl", "not a folder"),
                       (Path("/proc/fprobe-test/probe.jsonl"), "out")):
        with pytest.raises(OSError if error != "malformed JSON line" else ValueError, match=error):
            fprobe.trl.attach(trainer, out=out)
    assert notes.read_text() == "hello\n" and trainer.callback_handler.callbacks == callbacks
    out = tmp_path / "new" / "probe.jsonl"
    fprobe.trl.attach(trainer, every=1, n_eval=4, out=out)
    assert out.read_text() == ""  # created at attach
    trainer.train()
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [1]
    again, _ = make_trainer(tmp_path, steps=1)  # the same output_dir
    with pytest.warns(UserWarning, match="already holds 1 probe record"):
        fprobe.trl.attach(again, every=1, n_eval=4, out=out)


class RaisingLogger(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if any(key.startswith("entropy_probe/") for key in logs or {}):
            raise RuntimeError("a reporting callback failed")


def test_a_record_reaches_out_even_when_another_callbacks_on_log_raises(tmp_path):
    # issue 19, case 3: the JSONL line was written after trainer.log, which runs the other callbacks first
    out = tmp_path / "probe.jsonl"
    trainer, _ = make_trainer(tmp_path, "dapo", steps=1)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4, out=out)
    trainer.add_callback(RaisingLogger())
    with pytest.raises(RuntimeError, match="a reporting callback failed"):
        trainer.train()
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [r["step"] for r in probe.records] == [1]


@pytest.mark.parametrize("device", ["/dev/full", "/dev/zero", "/dev/null"])
def test_an_out_that_is_a_device_is_refused_at_attach(tmp_path, device):
    # issue 19, case 4: attach read "existing records" from /dev/zero forever
    trainer, _ = make_trainer(tmp_path, steps=1)
    callbacks = list(trainer.callback_handler.callbacks)
    with pytest.raises(ValueError, match="need a regular file"):
        fprobe.trl.attach(trainer, out=device)
    assert trainer.callback_handler.callbacks == callbacks


def test_a_reused_eval_batch_whose_weights_degenerate_warns_at_the_users_line_and_flags_the_record(tmp_path):
    """A reused E (here given at attach) importance-weighted at θ_{k+1} with an ESS fraction under the threshold
    gives a LowESSWarning and ``ess_low`` in the record, like a fresh E; the warning points at this file's
    ``trainer.train()`` line, not inside transformers (issue 19, cases 2 and 9)."""
    trainer, _ = make_trainer(tmp_path, "grpo", steps=1, learning_rate=5e-2)
    with modes_kept(trainer.model):
        E, _ = fprobe.sample(fprobe.Policy(trainer.model), TOKENIZER, toy.make_prompts(20, 1), n_eval=10,
                             n_update_prompts=1, group_size=1, reward="toy", max_new_tokens=MAX_COMPLETION, seed=3)
    probe = fprobe.trl.attach(trainer, every=1, E=E, ess_threshold=1.0)  # any update makes the ESS fraction < 1
    with pytest.warns(fprobe.LowESSWarning) as caught:
        trainer.train()
    (record,) = probe.records
    assert record["eval_sampled_at"] == 0 and record["ess_fraction"] < 1.0 and record["ess_low"] is True
    assert {w.filename for w in caught if issubclass(w.category, fprobe.LowESSWarning)} == {__file__}


# ---------------------------------------------------------------------------------------------
# two processes under accelerate


@pytest.mark.slow
def test_two_processes_under_accelerate_compute_the_same_records_and_only_the_main_one_writes(tmp_path):
    worker = Path(__file__).parent / "workers" / "trl_two_process.py"
    # accelerate's --cpu launcher starts a single process unless mpirun is set up; --multi_gpu starts one per
    # rank through torch.distributed.run, and on a machine without a GPU accelerate runs them on CPU over gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(worker), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    main, other = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert main["world"] == other["world"] == 2
    timing = ("probe_seconds", "step_seconds")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]
    assert strip(main["records"]) == strip(other["records"]) and [r["step"] for r in main["records"]] == [1, 2]
    for step, ids in main["eval_ids"].items():
        assert torch.equal(ids, other["eval_ids"][step])
    for record in main["records"]:
        # the replay gathers both ranks' micro-batches and divides by the two processes as DDP averages
        assert record["step_check"] == "ok" and record["step_rel_error"] <= 1e-5, record
    assert [e["step"] for e in main["logged"]] == [1, 2] and other["logged"] == []
    lines = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]


def test_example_writes_its_records_and_figure(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("trl_grpo", Path(__file__).parents[1] / "examples" / "trl_grpo.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "4", "--every", "2", "--n-eval", "4", "--out-dir", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4] and all(line["step_check"] == "ok" for line in lines)
    assert (tmp_path / "entropy.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "× the training step it probed" in printed
    assert all(line["delta_h_true_se"] > 0 for line in lines) and printed.count("ΔH_true") >= 2 and " ± " in printed


def test_records_carry_standard_errors_and_an_imprecise_run_warns_once(tmp_path):
    """Each record has the standard errors of its estimates (logged as entropy_probe/..._se) from a fresh E of
    several responses per prompt (its units: the prompt draws); with a threshold no |E| = 4 can meet, the
    ImpreciseWarning comes once, after three records, with the |E| that would reach it."""
    trainer, _ = make_trainer(tmp_path, "dapo", steps=4)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=4, eval_group_size=2, rel_se_warning=1e-6)
    with pytest.warns(fprobe.ImpreciseWarning) as caught:
        trainer.train()
    imprecise = [w for w in caught if issubclass(w.category, fprobe.ImpreciseWarning)]
    needed = max(r["n_eval_for"] for r in probe.records[:3])
    assert len(imprecise) == 1 and f"(attach(..., n_eval={needed}))" in str(imprecise[0].message)
    assert imprecise[0].filename == __file__
    for record in probe.records:
        assert record["se_units"] == 2 and record["delta_h_true_se"] > 0 and record["ratio_se"] > 0
        assert record["n_eval_for"] == uncertainty.rows_for(1e-6, record["delta_h_true"], record["delta_h_true_se"], 4)
    assert all(probe.eval_batches[r["step"]].group_ids.tolist() == [0, 0, 1, 1] for r in probe.records)
    with pytest.raises(ValueError, match="eval_group_size=3"):
        fprobe.trl.attach(make_trainer(tmp_path / "b", "dapo", steps=1)[0], n_eval=4, eval_group_size=3)
