"""Adversarial cases of the lean ProbeResult, the predictors, the step options and the command line: each
failed before its fix (a silently wrong number, a NaN token in JSON, a lost record, or an error only after
the whole computation), and each is checked against an independent computation."""

import dataclasses
import json
import math
import os
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import fprobe
from fprobe.cli import command as cli
from fprobe.model import passes
from fprobe.entropy import predictors
from fprobe import records
from fprobe import tree
from helpers import CONFIGS, make_batch


def strict_json(text: str):
    """json.loads that refuses the NaN/Infinity tokens Python's json writes by default."""
    return json.loads(text, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(f"non-JSON token {token}")))


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    return fprobe.Policy(AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).double().eval())


@pytest.fixture
def batches():
    return make_batch(6, seed=1, with_advantages=False), make_batch(6, seed=2)


# --- a result refers to θ₀ = policy.params, which are views of the model's weights ---


@pytest.mark.parametrize("keep_step", [False, True])
def test_a_result_refuses_to_be_reused_after_the_model_was_changed_in_place(gpt2, batches, keep_step):
    E, U = batches
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=1e-4), keep_step=keep_step)
    lr = 1e-4 * (1 + 1e-7)
    before = res.sweep([lr]).delta_h_true[0]
    assert before == pytest.approx(res.delta_h_true, rel=1e-3)  # (η/η₀ − 1) = 1e-7: nearly the step itself
    with torch.no_grad():  # the user trains the model further, in place
        for p in gpt2.model.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    # Before the fix the sweep evaluated Ĥ at the *new* weights + Δθ against H(θ₀): ΔH_true off by 20×.
    for use in (lambda: res.sweep([lr]), res.predictors, res.contributions, res.replay_step):
        with pytest.raises(RuntimeError, match="changed in place"):
            use()


def test_a_result_on_params_the_model_does_not_share_survives_training(gpt2, batches):
    E, U = batches
    theta0 = tree.tree_map(torch.clone, gpt2.params)
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), theta0)
    change = fprobe.entropy_change(gpt2, E, delta, params=theta0, lr=1e-4)
    expected = change.sweep([2e-4]).delta_h_true[0]
    with torch.no_grad():
        for p in gpt2.model.parameters():
            p.add_(1e-3)
    assert change.sweep([2e-4]).delta_h_true[0] == expected  # θ₀ is the clone: nothing mixed, nothing refused


# --- step options are checked before any pass ---


def no_pass(*args, **kwargs):
    raise AssertionError("a pass ran before the options were checked")


def other_state(opt, params):
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(CONFIGS["llama"]()).double()
    return opt.init(fprobe.Policy(other).params)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),  # was: clip coefficient −1.65, the step reversed
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),  # was: a zero step (HF's 0 means "no clipping")
        (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
        (dict(lr=-1e-3), ValueError, "learning rate"),  # was: gradient ascent, accepted
        (dict(lr=float("nan")), ValueError, "learning rate"),
        (dict(clip=-1.0), ValueError, "clip"),  # was: δH₁ changed 4×
        (dict(clip=float("nan")), ValueError, "clip"),
        (dict(state=lambda opt, p: opt.init({k: v[..., :1] for k, v in p.items()})), ValueError, r"exp_avg\[.*shape"),
        (dict(state=lambda opt, p: opt.init({k: v.float() for k, v in p.items()})), ValueError, r"exp_avg\[.*dtype"),
        (dict(state=other_state), ValueError, "not the policy's parameters"),  # was: KeyError after the gradient
        (dict(state=lambda opt, p: opt.init(p)._replace(exp_avg={k: v + float("nan") for k, v in opt.init(p).exp_avg.items()})),
         FloatingPointError, r"opt_state.exp_avg of parameter .* not finite"),  # was: "the updated value" after the gradient
        (dict(state=lambda opt, p: fprobe.optim.sgd(lr=1e-3, momentum=0.9).init(p)), TypeError, "SGDState"),
    ],
)
def test_bad_step_options_are_refused_before_any_pass(gpt2, batches, monkeypatch, kw, error, match):
    E, U = batches
    opt = kw.pop("opt", fprobe.optim.adamw(lr=1e-3))
    state = kw.pop("state")(opt, gpt2.params) if "state" in kw else None
    for name in ("gradient", "forward", "jet"):
        monkeypatch.setattr(passes, name, no_pass)
    with pytest.raises(error, match=match):
        fprobe.probe(gpt2, E, U, opt, state, **kw)


def test_a_real_optimizer_state_is_still_accepted(gpt2, batches):
    E, U = batches
    opt = fprobe.optim.adamw(lr=1e-3)
    first = fprobe.rl_step(gpt2, gpt2.params, opt, opt.init(gpt2.params), U)
    second = fprobe.rl_step(gpt2, gpt2.params, opt, first.opt_state, U)
    res = fprobe.probe(gpt2, E, U, opt, first.opt_state, max_grad_norm=1e3, clip=0.0)
    assert res.delta_l2 == second.delta_l2  # the same step, taken independently by rl_step


# --- predictors ---


def plain_sign_agreement(p, t):
    return sum(a != 0 and (a > 0) == (b > 0) and (a < 0) == (b < 0) for a, b in zip(p, t)) / len(p)


def test_a_zero_prediction_is_a_wrong_sign_even_where_the_truth_is_zero():
    p, t = [0.0, 0.0, 1.0, -1.0, 2.0], [0.0, 1.0, 1.0, 1.0, 3.0]
    got = predictors.sign_agreement(torch.tensor(p, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
    assert got == plain_sign_agreement(p, t) == 0.4  # was 0.6: 0 = 0 counted as a right sign


def test_a_zero_step_scores_no_predictor_as_right_and_writes_strict_json(gpt2, batches):
    E, U = batches
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=0.0))
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


# --- JSON of tensors ---


def test_non_finite_tensor_fields_become_null_in_json():
    @dataclasses.dataclass(frozen=True)
    class Record:
        scalar: torch.Tensor
        vector: torch.Tensor

    record = Record(torch.tensor(float("nan")), torch.tensor([1.0, float("inf"), -float("inf")]))
    assert strict_json(records.to_json(record)) == {"scalar": None, "vector": [1.0, None, None]}


# --- command line: a zero learning rate and a sweep or plot ---

SMALL = ["--n-eval", "2", "--n-update-prompts", "1", "--group-size", "2", "--max-new-tokens", "2", "--quiet"]


def test_cli_refuses_lr_zero_with_a_sweep_or_plot_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_policy", no_pass)
    for argv in (["probe", "--lr", "0", "--plot", str(tmp_path / "p.png")], ["sweep", "--lr", "0"]):
        assert cli.main([*argv, "--out", str(tmp_path / "r.json")]) == cli.EXIT_ERROR
        assert "--lr 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_keeps_the_record_when_the_optimizer_states_rate_is_zero(tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(str(fprobe.sampling.toy.DEFAULT_MODEL_PATH))
    torch.save(torch.optim.AdamW(list(model.parameters()), lr=0.0).state_dict(), tmp_path / "state.pt")
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    argv = ["probe", *SMALL, "--optimizer-state", str(tmp_path / "state.pt"), "--out", str(out), "--plot", str(plot)]
    assert cli.main(argv) == 0  # was: exit 2 after the whole run, no record written
    record = strict_json(out.read_text())
    assert record["result"]["lr_used"] == 0.0 and record["result"]["delta_l2"] == 0.0
    assert "sweep" not in record and "plot" not in record and not plot.exists()
    assert "learning rate is 0" in capsys.readouterr().err


# --- predictors.compare and sweep: inputs checked before any pass ---


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
def test_compare_checks_its_inputs_before_any_pass(gpt2, batches, monkeypatch, change, error, match):
    _, U = batches
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), gpt2.params)
    args = change(delta, U)
    for name in ("forward", "jet"):
        monkeypatch.setattr(passes, name, no_pass)
    with pytest.raises(error, match=match):
        predictors.compare(gpt2, gpt2.params, *args)


def test_spearman_of_a_side_with_nan_is_nan():
    x = torch.tensor([1.0, float("nan"), 3.0, 4.0], dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert math.isnan(predictors.spearman(x, y)) and math.isnan(predictors.spearman(y, x))  # was 0.4 and 0.4
    assert math.isnan(predictors.pearson(x, y))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-4])
def test_sweep_refuses_a_non_finite_or_negative_rate_before_any_pass(gpt2, batches, monkeypatch, bad):
    E, U = batches
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    monkeypatch.setattr(passes, "forward", no_pass)
    with pytest.raises(ValueError, match="finite and >= 0"):  # was: nan/inf → an error about importance weights
        res.sweep([1e-4, bad])  # after a forward pass; −1e-4: evaluated as if a step at a negative rate existed


def test_a_closed_stderr_loses_no_record(tmp_path, monkeypatch):
    """``fprobe probe 2>&1 | head -c5``: head gone, a warning written to stderr raised BrokenPipeError inside
    the run, which ended with no results file (and exit 1, from printing the error to the same pipe)."""
    record = {"key": {"model": "stub"}, "result": {"delta_h1": 1.5}}

    def probe_model(args, model, pool, reward, key, plot):
        import warnings

        warnings.warn("a warning on the way")
        return record, None, "report"

    monkeypatch.setattr(cli, "probe_model", probe_model)
    read, write = os.pipe()
    os.close(read)  # the reader went away
    with os.fdopen(write, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        assert cli.main(["probe", "--quiet", "--out", str(tmp_path / "r.json")]) == 0
        absent = ["probe", "--quiet", "--prompts", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "s.json")]
        assert cli.main(absent) == cli.EXIT_ERROR  # the error line to the closed pipe: no BrokenPipeError out of main
    assert strict_json((tmp_path / "r.json").read_text()) == record


# --- Rollouts: masks and advantages that were read as something else ---


def test_a_non_binary_attention_mask_is_refused_not_reread(gpt2):
    E = make_batch(6, seed=1, with_advantages=False)
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), gpt2.params)
    reference = fprobe.entropy_change(gpt2, E, delta)
    as_bool = fprobe.Rollouts(E.input_ids, E.attention_mask.bool(), E.response_mask)  # 0/1 in another dtype: fine
    assert fprobe.entropy_change(gpt2, as_bool, delta).delta_h1 == reference.delta_h1
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


# --- warnings point at the caller's line ---


def test_a_low_ess_warning_from_a_sweep_points_at_the_callers_line(gpt2, batches):
    E, U = batches
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    with pytest.warns(fprobe.LowESSWarning) as caught:
        res.sweep([10.0])  # 1e5 × the step: the weights degenerate
    assert [w.filename for w in caught] == [__file__]


def test_a_decomposition_warning_points_at_the_callers_line(gpt2, batches, monkeypatch):
    from fprobe.entropy import decompose

    E, U = batches
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    monkeypatch.setattr(decompose, "RESIDUAL_WARNING", -1.0)  # every residual warns
    with pytest.warns(fprobe.DecompositionWarning) as caught:
        res.contributions()
    assert [w.filename for w in caught] == [__file__]  # was fprobe/probe.py


def test_contributions_write_strict_json_and_check_their_arguments(gpt2, batches, monkeypatch):
    E, U = batches
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    parts = res.contributions()
    data = strict_json(parts.to_json())
    assert data["per_sequence"] == parts.per_sequence.tolist() and "token_ids" not in data
    assert [r["row"] for r in parts.top(len(U))] == sorted(range(len(U)), key=lambda j: -abs(float(parts.per_sequence[j])))
    with pytest.raises(ValueError, match="k >= 0"):
        parts.top(-1)  # was: every row but the last
    monkeypatch.setattr(fprobe.model.passes, "gradient", no_pass)
    with pytest.raises(ValueError, match="micro_batch"):
        res.contributions(micro_batch=0)  # was: refused only after replaying the step


def test_a_result_refuses_to_be_reused_after_a_batch_was_changed_in_place(gpt2):
    E, U = make_batch(6, seed=1, with_advantages=False), make_batch(6, seed=2)
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=1e-4))
    comparison = res.predictors()
    U.advantages.mul_(-1.0)  # a buffer reused for the next batch
    # was: every predictor's per-token values flipped sign against the same truth
    with pytest.raises(RuntimeError, match=r"changed in place .*U\['advantages'\]"):
        res.predictors()
    U.advantages.mul_(-1.0)  # the values are back, but the result cannot know: still refused
    with pytest.raises(RuntimeError, match="changed in place"):
        res.contributions()
    res2 = fprobe.probe(gpt2, E, make_batch(6, seed=2), fprobe.optim.adamw(lr=1e-4))
    assert res2.predictors().scores == comparison.scores  # an untouched batch: the same comparison as before
    E.input_ids[:, -1] = 5  # E's last column rewritten in place
    with pytest.raises(RuntimeError, match=r"changed in place .*E\['input_ids'\]"):
        res2.sweep([2e-4])  # was: Ĥ at θ₀+Δθ on the new tokens against H(θ₀) on the old ones


@pytest.mark.parametrize("bad", [float("nan"), -1e-4, float("inf")])
def test_entropy_change_refuses_a_bad_learning_rate_before_any_pass(gpt2, batches, monkeypatch, bad):
    E, _ = batches
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), gpt2.params)
    for name in ("forward", "jet"):
        monkeypatch.setattr(passes, name, no_pass)
    with pytest.raises(ValueError, match="lr"):  # was: accepted; its sweep then scaled Δθ by NaN or flipped it
        fprobe.entropy_change(gpt2, E, delta, lr=bad)


@pytest.mark.parametrize("lrs", [[], [0.0], [0.0, 0.0]])
def test_a_sweep_without_a_positive_rate_is_refused(gpt2, batches, lrs):
    E, U = batches
    res = fprobe.probe(gpt2, E, U, fprobe.optim.adamw(lr=1e-5))
    with pytest.raises(ValueError, match="at least one learning rate > 0"):  # was: a sweep whose plot raised
        res.sweep(lrs)  # matplotlib's "cannot be log-scaled"


def test_cli_lrs_without_a_positive_rate_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:  # was: the run, the record, then exit 2 from the plot
        cli.main(["sweep", "--lrs", "0,0"])
    assert exit_.value.code == cli.EXIT_ERROR and "at least one > 0" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
def test_narrow_integer_token_ids_give_the_same_numbers_as_long_ones(gpt2, dtype):
    E = make_batch(6, seed=1, with_advantages=False)
    delta = tree.tree_map(lambda p: 1e-4 * torch.randn_like(p), gpt2.params)
    reference = fprobe.entropy_change(gpt2, E, delta)
    narrow = fprobe.Rollouts(E.input_ids.to(dtype), E.attention_mask, E.response_mask)
    got = fprobe.entropy_change(gpt2, narrow, delta)  # was: torch's "Expected ... indices ... Long, Int" at the pass
    assert (got.h_orig, got.delta_h_true, got.delta_h1) == (reference.h_orig, reference.delta_h_true, reference.delta_h1)


def test_a_stderr_closed_from_the_start_sends_no_warning_to_stdout(tmp_path, monkeypatch, capsys):
    """``fprobe probe --out /dev/stdout 2>&-``: Python sets sys.stderr to None; the warnings must not land in stdout."""

    def probe_model(args, model, pool, reward, key, plot):
        import warnings

        warnings.warn("a warning on the way")
        return {"key": {"model": "stub"}}, None, "report"

    monkeypatch.setattr(cli, "probe_model", probe_model)
    monkeypatch.setattr(sys, "stderr", None)
    assert cli.main(["probe", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "report" in out and "warning" not in out


def test_contributions_refuse_a_starting_optimizer_state_changed_in_place(gpt2, batches):
    E, U = batches
    opt = fprobe.optim.adamw(lr=1e-4)
    first = fprobe.rl_step(gpt2, gpt2.params, opt, opt.init(gpt2.params), U)
    res = fprobe.probe(gpt2, E, U, opt, first.opt_state, keep_step=True)
    parts = res.contributions()
    assert parts.momentum + parts.decay + float(parts.per_sequence.sum()) == pytest.approx(res.delta_h1, rel=1e-9)
    for m in first.opt_state.exp_avg.values():
        m.mul_(4.0)  # the caller's state object, reused
    # was: parts missing δH₁ by 1.4× of its size, with a warning blaming the policy's precision (float64 here)
    with pytest.raises(RuntimeError, match=r"changed in place .*opt_state.exp_avg\["):
        res.contributions()


def test_a_custom_optimizer_whose_init_needs_parameters_is_still_accepted(gpt2, batches):
    E, U = batches
    sgd = fprobe.optim.sgd(lr=1e-3)

    def init(params):
        next(iter(params))  # fails on the empty tree
        return sgd.init(params)

    custom = sgd._replace(init=init)
    state = custom.init(gpt2.params)
    res = fprobe.probe(gpt2, E, U, custom, state)
    assert res.delta_l2 == fprobe.rl_step(gpt2, gpt2.params, sgd, sgd.init(gpt2.params), U).delta_l2


@pytest.mark.parametrize(
    "group,match",
    [
        (dict(betas=(1.0, 0.999)), "beta1=1.0 must be"),  # was: ZeroDivisionError after the gradient pass
        (dict(weight_decay=-5.0), "weight_decay=-5.0 must be"),  # was: accepted (torch refuses it)
        (dict(eps=float("nan")), "eps=nan must be"),
        (dict(lr=-1e-3), "lr=-0.001 must be"),
    ],
)
def test_an_imported_state_with_hyperparameters_torch_refuses_is_refused(gpt2, group, match):
    state_dict = adamw_state_dict(gpt2)
    state_dict["param_groups"][0].update(group)
    with pytest.raises(ValueError, match=match):
        fprobe.optim.from_torch(state_dict, list(gpt2.params), gpt2.params)


@pytest.mark.parametrize("make", [lambda: fprobe.optim.adamw(lr=-1e-3), lambda: fprobe.optim.adamw(betas=(0.9, 1.0)),
                                  lambda: fprobe.optim.sgd(momentum=-0.5), lambda: fprobe.optim.sgd(groups={"w": {"lr": float("inf")}})])
def test_an_optimizer_with_an_out_of_range_hyperparameter_is_refused_when_made(make):
    with pytest.raises(ValueError, match="must be a finite number"):
        make()


def test_an_imported_state_with_negative_second_moments_is_refused(gpt2):
    state_dict = adamw_state_dict(gpt2)
    name = list(gpt2.params)[2]
    state_dict["state"][2]["exp_avg_sq"][0] = -1.0  # was: "updated value not finite" after the gradient pass
    with pytest.raises(ValueError, match=rf"{re.escape(name)}.*negative"):
        fprobe.optim.from_torch(state_dict, list(gpt2.params), gpt2.params)


def adamw_state_dict(policy):
    """A real torch.optim.AdamW state_dict after one step on a plain quadratic of the parameters."""
    params = [p.detach().clone().requires_grad_() for p in policy.params.values()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum((p * p).sum() for p in params).backward()
    opt.step()
    return opt.state_dict()
