"""Name-keyed tree ops (fprobe.tree) against per-leaf torch computations; key checks and their errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fprobe
from fprobe import tree
from helpers import make_batch

SHAPES = {"embed.weight": (5, 3), "layer.bias": (3,), "head.scale": ()}


def random_tree(seed: int, dtype=torch.float64, shapes=SHAPES) -> tree.Params:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for name, shape in shapes.items()}


def assert_leafwise(result: tree.Params, expected: dict) -> None:
    assert list(result) == list(expected), "key order must follow the first tree"
    for name in expected:
        assert torch.equal(result[name], expected[name]), name


seeds = st.integers(0, 2**16)


@settings(max_examples=20, deadline=None)
@given(seeds, seeds, st.floats(-3, 3, allow_nan=False))
def test_add_sub_scale_axpy_are_leafwise(sa, sb, alpha):
    a, b = random_tree(sa), random_tree(sb)
    assert_leafwise(tree.add(a, b), {n: a[n] + b[n] for n in a})
    assert_leafwise(tree.sub(a, b), {n: a[n] - b[n] for n in a})
    assert_leafwise(tree.scale(a, alpha), {n: a[n] * alpha for n in a})
    assert_leafwise(tree.axpy(alpha, a, b), {n: torch.add(b[n], a[n], alpha=alpha) for n in a})
    assert_leafwise(tree.zeros_like(a), {n: torch.zeros_like(a[n]) for n in a})


def test_ops_keep_the_first_trees_key_order():
    a = random_tree(0)
    b = {name: a[name].clone() for name in reversed(list(a))}  # same names, other insertion order
    assert list(tree.add(a, b)) == list(a)
    assert_leafwise(tree.add(a, b), {n: a[n] + b[n] for n in a})


@settings(max_examples=20, deadline=None)
@given(seeds, seeds)
def test_vdot_and_norm_accumulate_in_float64(sa, sb):
    a, b = random_tree(sa, torch.float32), random_tree(sb, torch.float32)
    expected_dot = math.fsum(float(x) * float(y) for n in a for x, y in zip(a[n].flatten(), b[n].flatten()))
    dot = tree.vdot(a, b)
    assert dot.dtype == torch.float64
    assert abs(float(dot) - expected_dot) <= 1e-14 * max(1.0, abs(expected_dot))
    expected_norm = math.sqrt(math.fsum(float(x) ** 2 for n in a for x in a[n].flatten()))
    norm = tree.norm(a)
    assert norm.dtype == torch.float64
    assert abs(float(norm) - expected_norm) <= 1e-14 * expected_norm
    for name, value in tree.leaf_norms(a).items():
        assert abs(float(value) - math.sqrt(math.fsum(float(x) ** 2 for x in a[name].flatten()))) <= 1e-14 * float(value)


def test_vdot_of_float32_trees_keeps_float64_precision():
    # 1 + 2^-30 is exact in float64 but rounds to 1 in float32: a float32 accumulation would lose it.
    a = {"w": torch.tensor([1.0, 2.0**-30], dtype=torch.float32)}
    assert float(tree.vdot(a, {"w": torch.ones(2, dtype=torch.float32)})) == 1.0 + 2.0**-30


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float32),
                                    (torch.float64, torch.float64)])
def test_dot64_over_several_chunks_is_the_exactly_rounded_dot_to_float64_precision(dtypes):
    """Tensors of three chunks and a partial fourth (each chunk upcast into a reused buffer, or read in place when
    float64): ⟨x, y⟩ and ‖x‖² against math.fsum of the exact float64 products."""
    g = torch.Generator().manual_seed(0)
    n = 3 * tree._CHUNK + 1234
    x, y = (torch.randn(n, generator=g, dtype=torch.float64).to(d).reshape(-1, 2) for d in dtypes)
    exact = lambda a, b: math.fsum((a.double() * b.double()).flatten().tolist())
    for value, expected in ((tree.dot64(x, y), exact(x, y)), (tree.dot64(x, x), exact(x, x))):
        assert value.dtype == torch.float64
        assert abs(float(value) - expected) <= 1e-13 * max(1.0, abs(expected))
    assert torch.equal(tree.dot64(x, y), tree.dot64(x.double(), y.double()))  # the upcast chunks are the float64 ones


def test_dot64_refuses_tensors_of_different_sizes_and_a_gradient():
    """Chunks of two tensors of different sizes would be zipped silently, the longer one's tail dropped: an error instead;
    the reduction is for reporting, so its result carries no graph (its chunk buffer is reused)."""
    with pytest.raises(ValueError, match="65541 and 65536 entries"):
        tree.dot64(torch.ones(tree._CHUNK + 5), torch.ones(tree._CHUNK))
    x = torch.ones(2 * tree._CHUNK, requires_grad=True)
    assert not tree.dot64(x, x).requires_grad


def test_empty_tree_reductions_are_float64_zeros():
    assert float(tree.vdot({}, {})) == 0.0 and tree.vdot({}, {}).dtype == torch.float64
    assert float(tree.norm({})) == 0.0 and tree.norm({}).dtype == torch.float64


def test_top_k_lists_the_largest_leaf_norms_first():
    t = {"small": torch.full((4,), 0.1), "big": torch.full((2,), 3.0), "mid": torch.tensor([1.0, -1.0])}
    top = tree.top_k(t, 2)
    assert [name for name, _ in top] == ["big", "mid"]
    assert top[0][1] == pytest.approx(math.sqrt(18.0), rel=1e-15)
    assert top[1][1] == pytest.approx(math.sqrt(2.0), rel=1e-15)
    assert [name for name, _ in tree.top_k(t, 10)] == ["big", "mid", "small"]


def test_detach_drops_the_graph():
    w = torch.ones(3, requires_grad=True)
    detached = tree.detach({"w": w * 2})
    assert not detached["w"].requires_grad and torch.equal(detached["w"], torch.full((3,), 2.0))


def test_check_like_returns_a_plain_dict_in_reference_order():
    ref = random_tree(0)
    other = {name: ref[name] + 1 for name in reversed(list(ref))}
    result = tree.check_like(ref, other, "delta")
    assert type(result) is dict and list(result) == list(ref)
    assert all(result[n] is other[n] for n in ref)


@pytest.mark.parametrize("what", ["delta", "grads", "params"])
def test_check_like_names_missing_names(what):
    ref = random_tree(0)
    bad = {n: x for n, x in ref.items() if n != "layer.bias"}
    with pytest.raises(ValueError, match=rf"^{what}: names do not match.*missing \['layer.bias'\] \(1\), unexpected \[\] \(0\)"):
        tree.check_like(ref, bad, what)


@pytest.mark.parametrize("what", ["delta", "grads", "params"])
def test_check_like_names_unexpected_names(what):
    ref = random_tree(0)
    bad = {**ref, "extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=rf"^{what}: names do not match.*missing \[\] \(0\), unexpected \['extra.weight'\] \(1\)"):
        tree.check_like(ref, bad, what)


@pytest.mark.parametrize("what", ["delta", "grads", "params"])
def test_check_like_names_the_wrong_shape(what):
    ref = random_tree(0)
    bad = {**ref, "embed.weight": torch.zeros(3, 5)}
    with pytest.raises(ValueError, match=rf"{what}\['embed.weight'\] has shape \(3, 5\), the parameter has \(5, 3\)"):
        tree.check_like(ref, bad, what)


def test_check_like_truncates_long_name_lists_but_counts_them_all():
    ref = {f"p{i}": torch.zeros(1) for i in range(20)}
    with pytest.raises(ValueError, match=r"missing \['p0', .*'p7'\]\.\.\. \(20\)"):
        tree.check_like(ref, {}, "delta")


def test_check_like_changes_nothing_when_it_raises():
    ref, bad = random_tree(0), {**random_tree(1), "extra": torch.zeros(1)}
    ref_before, bad_before = {n: x.clone() for n, x in ref.items()}, {n: x.clone() for n, x in bad.items()}
    with pytest.raises(ValueError):
        tree.check_like(ref, bad)
    assert list(bad) == list(bad_before) and all(torch.equal(bad[n], bad_before[n]) for n in bad)
    assert list(ref) == list(ref_before) and all(torch.equal(ref[n], ref_before[n]) for n in ref)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_first_offending_leaf(bad_value):
    t = random_tree(0)
    t["layer.bias"][1] = bad_value
    t["head.scale"].fill_(bad_value)
    assert tree.first_nonfinite(t) == "layer.bias"
    with pytest.raises(FloatingPointError, match=r"the gradient of parameter 'layer.bias' is not finite"):
        tree.check_finite(t, "the gradient")
    assert tree.first_nonfinite(random_tree(0)) is None
    tree.check_finite(random_tree(0), "the gradient")


# --- check_like: Δθ of another dtype, device or type than the parameters


@pytest.mark.parametrize(
    ("model_dtype", "delta_dtype", "device"),
    [(torch.float64, torch.float32, "cpu"), (torch.bfloat16, torch.float64, "cpu"), (torch.float64, torch.float64, "meta")],
)
def test_delta_of_another_dtype_or_device_is_rejected_naming_the_parameter(load_policy, model_dtype, delta_dtype, device):
    policy = load_policy("gpt2", model_dtype)
    delta = {n: torch.zeros(p.shape, dtype=delta_dtype, device=device) for n, p in policy.params.items()}
    first = next(iter(policy.params))
    attribute, mine, theirs = (
        ("device", "meta", "cpu") if device == "meta" else ("dtype", delta_dtype, model_dtype)
    )
    with pytest.raises(ValueError) as error:
        fprobe.entropy_change(policy, make_batch(with_advantages=False), delta)
    assert str(error.value) == f"delta[{first!r}] has {attribute} {mine}, the parameter has {theirs}"


def test_check_like_accepts_a_matching_tree_and_names_a_non_tensor():
    ref = {"w": torch.zeros(2, dtype=torch.float64)}
    assert tree.check_like(ref, {"w": torch.ones(2, dtype=torch.float64)})["w"].sum() == 2
    with pytest.raises(TypeError, match=r"delta\['w'\] is a list, not a tensor"):
        tree.check_like(ref, {"w": [1.0, 1.0]}, "delta")


@settings(max_examples=40, deadline=None)
@given(seeds, st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       st.lists(st.tuples(st.sampled_from(list(SHAPES)), st.sampled_from([math.nan, math.inf, -math.inf, "max"])), max_size=3))
def test_the_cheap_finiteness_check_agrees_with_the_entrywise_one(seed, dtype, planted):
    """``first_nonfinite`` (per-leaf sums first) against ``torch.isfinite`` entry by entry, with NaN/±Inf planted
    anywhere (an Inf and a −Inf in one leaf sum to NaN) and leaves of the dtype's largest values, whose sum
    overflows although every entry is finite."""
    t = random_tree(seed, dtype)
    g = torch.Generator().manual_seed(seed)
    for name, value in planted:
        flat = t[name].view(-1)
        if value == "max":
            t[name] = torch.full_like(t[name], torch.finfo(dtype).max)
        else:
            flat[int(torch.randint(flat.numel(), (), generator=g))] = value
    expected = next((n for n, x in t.items() if not bool(torch.isfinite(x).all())), None)
    assert tree.first_nonfinite(t) == expected
    assert tree.all_finite(t.values()) == (expected is None) or any(v == "max" for _, v in planted)
