"""Precision: fprobe's passes never compute in bf16/fp16 (the weights the model holds, upcast exactly, no autocast),
eval_dtype=torch.float64 computes on a float64 copy, and every result's rounding floor bounds its observed rounding
error against an independent float64 evaluation of the same weights."""

import warnings

import pytest
import torch
from helpers import CONFIGS, make_batch, plain_entropy
from transformers import AutoModelForCausalLM

import fprobe
from fprobe import tree
from fprobe.model.numerics import exact_delta, perturbed_rounding


def tiny_model(arch: str, dtype: torch.dtype):
    """A tiny randomly initialised model without dropout, in ``dtype`` (the same weights for every dtype, rounded)."""
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def as_float(model, dtype: torch.dtype):
    """A copy of ``model`` holding exactly its weights in ``dtype``, and its buffers as they are (bf16/fp16 ones in
    float32: a bf16 model's rotary frequencies are bf16 values; float32 ones stay float32, as in a float64 model)."""
    copy = AutoModelForCausalLM.from_config(model.config).to(dtype).eval()
    copy.load_state_dict({name: x.to(dtype) for name, x in model.state_dict().items()})
    for name, buffer in model.named_buffers():
        owner, _, attribute = name.rpartition(".")
        wider = buffer.float() if buffer.dtype in (torch.bfloat16, torch.float16) else buffer.clone()
        copy.get_submodule(owner)._buffers[attribute] = wider
    return copy


def sgd_step(policy, U, lr):
    opt = fprobe.optim.sgd(lr=lr)
    return fprobe.rl_step(policy, policy.params, opt, opt.init(policy.params), U)


# ---------------------------------------------------------------------------------------------
# no pass in bf16


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_bf16_weights_compute_as_float32_copies_of_themselves(arch):
    """A bf16 model's logits are those of a float32 model holding the same (bf16) values, bit for bit; before,
    they were computed in bf16 (2e-2 apart here)."""
    model = tiny_model(arch, torch.bfloat16)
    E = make_batch(n=4, width=10, seed=1, with_advantages=False)
    ours = fprobe.Policy(model).apply(fprobe.Policy(model).params, E.input_ids, E.attention_mask)
    reference = fprobe.Policy(as_float(model, torch.float32))
    expected = reference.apply(reference.params, E.input_ids, E.attention_mask)
    mask = E.attention_mask.bool()
    assert ours.dtype == torch.float32 and fprobe.Policy(model).dtype == torch.float32
    assert torch.equal(ours[mask], expected[mask])
    with torch.no_grad():
        in_bf16 = model(E.input_ids, attention_mask=E.attention_mask).logits.float()
    assert (in_bf16[mask] - expected[mask]).abs().max() > 1e-3  # what computing in bf16 would have given


def test_frozen_bf16_base_of_a_lora_adapter_is_computed_in_float32():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("qwen2", torch.bfloat16)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    float_base = as_float(base, torch.float32)
    torch.manual_seed(1)
    lora = get_peft_model(base, config).eval()
    float_lora = get_peft_model(float_base, config).eval()
    float_lora.load_state_dict({k: v.float() for k, v in lora.state_dict().items()})
    E = make_batch(n=3, width=10, seed=2, with_advantages=False)
    policy, reference = fprobe.Policy(lora), fprobe.Policy(float_lora)
    assert all(p.dtype == torch.bfloat16 for n, p in lora.named_parameters() if "lora" not in n)
    ours = policy.apply(policy.params, E.input_ids, E.attention_mask)
    expected = reference.apply(reference.params, E.input_ids, E.attention_mask)
    mask = E.attention_mask.bool()
    assert torch.equal(ours[mask], expected[mask])


@pytest.fixture
def fresh_accelerator_state():
    """accelerate's process-wide state cleared for this test (an earlier trainer in the same process set its mixed
    precision, which a new ``Accelerator`` may not change) and put back after it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved = [(cls, dict(cls._shared_state)) for cls in (AcceleratorState, PartialState, GradientState)]
    for cls, _ in saved:
        cls._shared_state.clear()
    yield
    for cls, state in saved:
        cls._shared_state.clear()
        cls._shared_state.update(state)


def test_no_autocast_inside_fprobe_calls_neither_the_callers_nor_accelerates_forward_wrapper(fresh_accelerator_state):
    from accelerate import Accelerator

    model = tiny_model("qwen2", torch.float32)
    policy = fprobe.Policy(model)
    E = make_batch(n=3, width=10, seed=3, with_advantages=False)
    plain = policy.apply(policy.params, E.input_ids, E.attention_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = policy.apply(policy.params, E.input_ids, E.attention_mask)
    prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    wrapped = vars(prepared)["forward"]
    wrapped_policy = fprobe.Policy(prepared)
    inside_wrapper = wrapped_policy.apply(wrapped_policy.params, E.input_ids, E.attention_mask)
    mask = E.attention_mask.bool()
    assert torch.equal(under_autocast[mask], plain[mask]) and torch.equal(inside_wrapper[mask], plain[mask])
    assert vars(prepared)["forward"] is wrapped  # the trainer's mixed precision is put back
    with torch.no_grad():
        assert (prepared(E.input_ids, attention_mask=E.attention_mask).logits[mask] - plain[mask]).abs().max() > 1e-4


def test_exact_delta_is_the_float64_difference_of_bf16_weights():
    """Δθ of bf16 weights in float32 equals the float64 difference exactly; in bf16 it rounds (a weight crossing
    zero, one that doubles)."""
    old = {"w": torch.tensor([1.0, 0.00390625, -3.0e-3, 1.5], dtype=torch.bfloat16)}
    new = {"w": torch.tensor([1.0078125, -0.0107421875, 2.0e-1, 1.4921875], dtype=torch.bfloat16)}
    exact = new["w"].double() - old["w"].double()
    delta = exact_delta(new, old)["w"]
    assert delta.dtype == torch.float32 and torch.equal(delta.double(), exact)
    assert not torch.equal((new["w"] - old["w"]).double(), exact)


def test_exact_delta_into_reuses_only_matching_memory():
    """``into``: the difference lands in the given tensor where shape and dtype agree (the step's dead gradient), and
    equals the plain difference; a bf16 weight's float32 Δθ and a mismatched shape get fresh tensors."""
    g = torch.Generator().manual_seed(0)
    old = {"a": torch.randn(5, generator=g), "b": torch.randn(3, generator=g).bfloat16(), "c": torch.randn(2, generator=g)}
    new = {k: v + 0.1 for k, v in old.items()}
    into = {"a": torch.empty(5), "b": torch.empty(3, dtype=torch.bfloat16), "c": torch.empty(4)}
    delta = exact_delta(new, old, into=into)
    assert all(torch.equal(delta[k], exact_delta(new, old)[k]) for k in old)
    assert delta["a"].data_ptr() == into["a"].data_ptr()
    assert delta["b"].dtype == torch.float32 and delta["b"].data_ptr() != into["b"].data_ptr()
    assert delta["c"].data_ptr() != into["c"].data_ptr()


def test_eval_dtype_must_be_float32_or_float64_and_not_below_the_weights():
    model32, model64 = tiny_model("gpt2", torch.float32), tiny_model("gpt2", torch.float64)
    assert fprobe.Policy(model32, eval_dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="eval_dtype must be torch.float32 or torch.float64"):
        fprobe.Policy(model32, eval_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="narrower than the model's torch.float64 parameters"):
        fprobe.Policy(model64, eval_dtype=torch.float32)


def test_float64_evaluation_of_float32_weights_is_the_float64_models():
    """eval_dtype=torch.float64 on a float32 model computes what a float64 model holding the same values computes."""
    model = tiny_model("llama", torch.float32)
    E = make_batch(n=4, width=10, seed=4, with_advantages=False)
    policy = fprobe.Policy(model, eval_dtype=torch.float64)
    ours = policy.apply({n: p.double() for n, p in policy.params.items()}, E.input_ids, E.attention_mask)
    reference = fprobe.Policy(as_float(model, torch.float64))
    expected = reference.apply(reference.params, E.input_ids, E.attention_mask)
    mask = E.attention_mask.bool()
    assert ours.dtype == torch.float64 and torch.equal(ours[mask], expected[mask])


def test_perturbed_rounding_changes_results_by_a_few_unit_roundoffs():
    """Monte Carlo arithmetic: each floating result is perturbed by at most its unit roundoff, so the logits move by
    a few float32 roundoffs, and the same seed reproduces the same perturbation."""
    model = tiny_model("qwen2", torch.float32)
    policy = fprobe.Policy(model)
    E = make_batch(n=3, width=10, seed=5, with_advantages=False)
    mask = E.attention_mask.bool()
    plain = policy.apply(policy.params, E.input_ids, E.attention_mask)[mask]
    runs = []
    for _ in range(2):
        with perturbed_rounding(7):
            runs.append(policy.apply(policy.params, E.input_ids, E.attention_mask)[mask])
    relative = ((runs[0] - plain).abs().max() / plain.abs().max()).item()
    assert torch.equal(runs[0], runs[1]) and 1e-8 < relative < 1e-4


# ---------------------------------------------------------------------------------------------
# the rounding floor against float64 evaluations of the same weights


def float64_change(policy, params, delta, new_params, E):
    """ΔH_true and δH₁ of the same weights computed in float64 (``eval_dtype``), and, independently of fprobe's
    passes, ΔH_true from ``plain_entropy`` on a float64 copy of the model."""
    change = fprobe.entropy_change(policy, E, delta, params=params, new_params=new_params, eval_dtype=torch.float64)
    model = fprobe.Policy(as_float(policy.model, torch.float64))
    p0, p1 = ({n: x.double() for n, x in p.items()} for p in (params, new_params))
    plain = float(plain_entropy(model, p1, E, params0=p0) - plain_entropy(model, p0, E))
    return change, plain


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_rounding_floor_bounds_the_observed_rounding_error(arch):
    """float32 and bf16 weights (passes in float32), SGD steps over five orders of magnitude: |ΔH_true − ΔH_float64|
    and |δH₁ − δH₁_float64| stay below their floors (measured up to 0.32 and 0.98 of them on these and the built-in
    policy), and the floors are not vacuous (the largest error is at least 2% of its floor). The float64
    evaluation is itself checked against a plain float64 SNIS of the same weights."""
    E, U = make_batch(n=12, width=12, seed=11), make_batch(n=8, width=12, seed=12)
    ratios, ratios_h1 = [], []
    for dtype, lrs in ((torch.float32, (1e-6, 1e-4, 1e-2)), (torch.bfloat16, (1e-3, 1e-1))):
        policy = fprobe.Policy(tiny_model(arch, dtype))
        for lr in lrs:
            step = sgd_step(policy, U, lr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = fprobe.entropy_change(policy, E, step.delta, params=policy.params, new_params=step.params)
                exact, plain = float64_change(policy, policy.params, step.delta, step.params, E)
            assert exact.delta_h_true == pytest.approx(plain, rel=1e-9, abs=1e-15)
            assert ours.eval_dtype == "float32" and exact.eval_dtype == "float64"
            ratios.append(abs(ours.delta_h_true - exact.delta_h_true) / ours.rounding_floor)
            ratios_h1.append(abs(ours.delta_h1 - exact.delta_h1) / ours.rounding_floor_h1)
            assert exact.rounding_floor < 1e-6 * ours.rounding_floor
    print(f"{arch}: error / floor of ΔH_true {max(ratios):.3f}, of δH₁ {max(ratios_h1):.3f}")
    assert max(ratios) <= 1.0 and max(ratios_h1) <= 1.0
    assert max(ratios) >= 0.02 and max(ratios_h1) >= 0.02


def test_a_step_below_the_float32_floor_warns_and_float64_does_not():
    policy = fprobe.Policy(tiny_model("qwen2", torch.float32))
    E, U = make_batch(n=8, width=10, seed=13), make_batch(n=6, width=10, seed=14)
    opt = fprobe.optim.sgd(lr=1e-7)
    with pytest.warns(fprobe.PrecisionWarning, match="eval_dtype=torch.float64"):
        low = fprobe.probe(policy, E, U, opt)
    assert low.precision_low and abs(low.delta_h_true) < 10 * low.rounding_floor and "ROUNDING FLOOR" in repr(low)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.PrecisionWarning)
        exact = fprobe.probe(policy, E, U, opt, eval_dtype=torch.float64)
    assert not exact.precision_low and exact.to_dict()["settings"]["eval_dtype"] == "float64"
    assert exact.delta_h_true / exact.delta_h1 == pytest.approx(1.0, abs=1e-3)


def test_no_step_has_a_zero_floor_and_no_warning():
    policy = fprobe.Policy(tiny_model("qwen2", torch.float32))
    E = make_batch(n=6, width=10, seed=15, with_advantages=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fprobe.PrecisionWarning)
        change = fprobe.entropy_change(policy, E, tree.zeros_like(policy.params))
    assert change.delta_h_true == 0.0 and change.rounding_floor == 0.0 and not change.precision_low


def test_method_grad_has_a_floor_of_delta_h_true_only():
    policy = fprobe.Policy(tiny_model("gpt2", torch.float32))
    E, U = make_batch(n=6, width=10, seed=16), make_batch(n=6, width=10, seed=17)
    step = sgd_step(policy, U, 1e-2)
    by_grad = fprobe.entropy_change(policy, E, step.delta, new_params=step.params, method="grad")
    by_jvp = fprobe.entropy_change(policy, E, step.delta, new_params=step.params)
    assert by_grad.rounding_floor_h1 is None and by_jvp.rounding_floor_h1 > 0
    assert by_grad.rounding_floor == pytest.approx(by_jvp.rounding_floor, rel=0.5)


def test_eval_dtype_is_checked_before_any_pass():
    policy = fprobe.Policy(tiny_model("gpt2", torch.float64))
    E, U = make_batch(n=4, width=10, seed=18), make_batch(n=4, width=10, seed=19)
    before = tree.tree_map(torch.clone, policy.params)
    with pytest.raises(ValueError, match="eval_dtype must be torch.float32, torch.float64 or None"):
        fprobe.probe(policy, E, U, fprobe.optim.sgd(lr=1e-3), eval_dtype=torch.float16)
    with pytest.raises(ValueError, match="narrower than the model's torch.float64"):
        fprobe.entropy_change(policy, E, tree.zeros_like(policy.params), eval_dtype=torch.float32)
    assert all(torch.equal(before[n], p) for n, p in policy.params.items())


# ---------------------------------------------------------------------------------------------
# TRL runs against an independent float64 evaluation of the saved weights on each record's E


def trl_records_against_float64(tmp_path, dtype, lr, eval_dtype=None, bf16=False):
    """A two-step GRPOTrainer run of the built-in policy held in ``dtype`` (plain SGD at ``lr``, no clipping), probed
    at every step; per record, (record, ΔH_true of a plain float64 SNIS from θ_k and θ_{k+1} as saved by a separate
    callback, on the record's own E, with transformers' own attention)."""
    from test_trl import KeepParameters, eval_model, make_trainer, plain_statistics, snis_entropy

    trainer, _ = make_trainer(tmp_path, "dr_grpo", dtype=dtype, steps=2, optim="sgd", learning_rate=lr, weight_decay=0.0,
                              lr_scheduler_type="constant", max_grad_norm=0.0, bf16=bf16)
    keep = KeepParameters(trainer.model)
    trainer.add_callback(keep)
    probe = fprobe.trl.attach(trainer, every=1, n_eval=16, eval_dtype=eval_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fprobe.PrecisionWarning)
        trainer.train()
    model = eval_model(trainer)
    pairs = []
    for record in probe.records:
        k, E = record["step"], probe.eval_batches[record["step"]]
        before, after = ({n: x.double() for n, x in saved[k].items()} for saved in (keep.before, keep.after))
        S0, H0 = plain_statistics(model, before, E)
        S1, H1 = plain_statistics(model, after, E)
        T = E.lengths.double()
        pairs.append((record, snis_entropy(S1, H1, S0, T) - snis_entropy(S0, H0, S0, T)))
    assert [r["step"] for r, _ in pairs] == [1, 2] and any(expected != 0 for _, expected in pairs)
    return pairs


def within(value, reference, rel) -> bool:
    """|value − reference| ≤ rel·|reference| (a step that changed nothing, reference 0, must give exactly 0)."""
    return abs(value - reference) <= rel * abs(reference)


@pytest.mark.slow
def test_bf16_trl_run_is_measured_within_5_percent_and_to_1e_6_in_float64(tmp_path):
    """bf16 weights and bf16=True (accelerate's autocast around the model's forward): fprobe's passes compute in float32
    on the weights the model holds (before: in bf16, wrong signs), and with eval_dtype=torch.float64 in float64."""
    for record, expected in trl_records_against_float64(tmp_path, torch.bfloat16, 1e-2, bf16=True):
        assert record["eval_dtype"] == "float32" and not record["precision_low"]
        assert within(record["delta_h_true"], expected, 0.05), (record["delta_h_true"], expected)
        assert abs(record["delta_h_true"] - expected) <= record["rounding_floor"]
    for record, expected in trl_records_against_float64(tmp_path, torch.bfloat16, 1e-2, eval_dtype=torch.float64, bf16=True):
        assert record["eval_dtype"] == "float64"
        assert within(record["delta_h_true"], expected, 1e-6), (record["delta_h_true"], expected)


def test_float32_small_step_trl_run_is_within_5_percent_or_flagged(tmp_path):
    """SGD at 1e-7 on float32 weights: ΔH_true sits at float32's rounding floor; every record is within 5% of the
    float64 evaluation or flagged (``precision_low``), and this run is flagged; with eval_dtype=torch.float64 every
    record is within 1e-6."""
    pairs = trl_records_against_float64(tmp_path, torch.float32, 1e-7)
    for record, expected in pairs:
        assert record["precision_low"] or within(record["delta_h_true"], expected, 0.05), (record, expected)
        assert abs(record["delta_h_true"] - expected) <= record["rounding_floor"]
    assert any(record["precision_low"] for record, _ in pairs)
    for record, expected in trl_records_against_float64(tmp_path, torch.float32, 1e-7, eval_dtype=torch.float64):
        assert not record["precision_low"]
        assert within(record["delta_h_true"], expected, 1e-6), (record["delta_h_true"], expected)


def test_cli_eval_dtype(tmp_path):
    """``fprobe probe --dtype float32 --eval-dtype float64`` (the built-in policy): float32 weights measured in float64,
    the float64 floor recorded; a dtype other than float32/float64 is a usage error."""
    import json

    from fprobe.cli import command as cli

    out = tmp_path / "result.json"
    argv = ["probe", "--n-eval", "4", "--n-update-prompts", "2", "--group-size", "4", "--dtype", "float32",
            "--eval-dtype", "float64", "--lr", "1e-3", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())["result"]
    assert result["eval_dtype"] == "float64" and result["settings"]["eval_dtype"] == "float64"
    assert 0 < result["rounding_floor"] < 1e-12 < abs(result["delta_h_true"]) and not result["precision_low"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["probe", "--eval-dtype", "bfloat16"])


def test_a_float64_evaluation_of_a_float32_step_replays_and_decomposes_it():
    """probe(..., eval_dtype=torch.float64) on float32 weights: the step is the float32 one (replayed from the
    policy's own θ₀, not from the float64 copy), ⟨∇Ĥ, Δθ⟩ equals the float64 δH₁, and the parts sum to it up to the
    float32 rounding of the step's gradient (the parts differentiate U's log-probs in float64, the step took a float32
    gradient: 1.1e-6 relative measured with transformers 5.25, below 1e-6 with earlier versions)."""
    policy = fprobe.Policy(tiny_model("gpt2", torch.float32))
    E, U = make_batch(n=6, width=10, seed=20), make_batch(n=6, width=10, seed=21)
    res = fprobe.probe(policy, E, U, fprobe.optim.adamw(lr=1e-3), eval_dtype=torch.float64)
    step = res.replay_step()
    assert all(x.dtype == torch.float32 for x in step.params.values())
    parts = res.contributions()
    total = parts.momentum + parts.decay + float(parts.per_sequence.sum())
    assert parts.delta_h1_grad == pytest.approx(res.delta_h1, rel=1e-12)
    assert total == pytest.approx(res.delta_h1, rel=1e-5)
