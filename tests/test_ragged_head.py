"""Fused ragged heads + weighted CE (`ops.ragged_head_ce`) and the chunked sampler
(`ops.ragged_head_sample`, `RaggedHeads.sample`): reference semantics, every backend against
the reference, gradients, errors, and training equivalence with the padded-logits path.

Tolerances (float32 unless said otherwise). A logit is a d-term dot product plus a bias,
summed in a different order by each backend (blocked FMAs in C++, tensor-core tiles in
Triton), so it differs by a few ulp of the sum of |terms|; with states ~N(0, 1), weights
~N(0, 1/d) and |bias| <= 3 that is < 1e-6. CE = lse - logit inherits it (atol 1e-5, rtol
1e-5); the loss is a weighted sum of CEs (atol 1e-5 * sum of the row's weights). Gradients
are sums of weight * (softmax - onehot) times states or head rows, so their error is
bounded by 1e-5 times the sum of the |terms|: max weight * 2 * max|W| for grad_h, and
(sum of the column's cell weights) * max|h| for grad_W (and without the |h| for grad_b).
bfloat16 (Triton): both sides see the same bf16 inputs, but Triton also rounds the
gradient chunk G to bf16 before its two products (tensor cores), so the gradients get a
bf16 ulp (2^-8 relative) of those same bounds: 1e-2 instead of 1e-5; loss and CE keep 1e-5
relative to the logits' size, as the products accumulate in fp32 on both sides.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmdm import ops
from fastmdm.models import ColumnTransformer
from fastmdm.models.base import RaggedHeads
from fastmdm.ops import ragged_head as ragged_head_module
from fastmdm.ops import reference
from conftest import outputs_per_thread_count

try:
    from fastmdm.ops import cpu_backend as cpp
except ImportError:  # the extension is not built: its tests skip
    cpp = None
try:
    import fastmdm.triton as triton_backend
    from fastmdm.triton import ragged_head as triton_ragged_head
except ImportError:
    triton_backend = triton_ragged_head = None

needs_cpp = pytest.mark.skipif(cpp is None, reason="fastmdm._C is not built")
needs_triton = pytest.mark.skipif(
    triton_backend is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="triton missing, or no GPU and TRITON_INTERPRET is not 1")
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# derandomize: every run draws the same examples, so a failure reproduces.
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every problem here is small: a thread team costs more than it saves (far more when the
    cores are shared), and one thread keeps the tests' run time steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ problems
def offsets_of(sizes: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    return offsets


def head_problem(rows: int, sizes: list[int], d: int, *, seed: int = 0, mask_prob: float = 0.5,
                 weight_scale: float = 3.0, dtype=torch.float32, strided: bool = False):
    """(h, head_weight, head_bias, offsets, targets, weight, mask) for ragged_head_ce."""
    gen = torch.Generator().manual_seed(seed)
    num_columns, vocab = len(sizes), sum(sizes)
    if strided:  # the same values in a layout with no unit stride anywhere
        h = torch.randn(d, num_columns, 2 * rows, generator=gen)[:, :, ::2].permute(2, 1, 0)
        assert not h.is_contiguous() or min(h.shape) == 1
    else:
        h = torch.randn(rows, num_columns, d, generator=gen)
    head_weight = torch.randn(vocab, d, generator=gen) / math.sqrt(d)
    head_bias = 3 * (2 * torch.rand(vocab, generator=gen) - 1)
    targets = torch.stack([torch.randint(0, k, (rows,), generator=gen) for k in sizes], 1)
    weight = weight_scale * torch.rand(rows, num_columns, generator=gen)
    mask = torch.rand(rows, num_columns, generator=gen) < mask_prob
    return (h.to(dtype), head_weight.to(dtype), head_bias.to(dtype), offsets_of(sizes), targets,
            weight, mask)


def padded_logits(h, head_weight, head_bias, offsets):
    """Every column's head on its own state, concatenated to [N, V] (the pre-fusion logits)."""
    bounds = offsets.tolist()
    return torch.cat([h[:, l] @ head_weight[bounds[l]:bounds[l + 1]].T + head_bias[bounds[l]:bounds[l + 1]]
                      for l in range(h.shape[1])], 1)


def assert_matches_reference(got, problem, compute_grad, rtol=1e-5):
    """Backend output `got` against the reference on the same problem (bounds in the docstring)."""
    h, head_weight, _, offsets, _, weight, mask = problem
    want = reference.ragged_head_ce(*problem, compute_grad)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
    loss, ce, grad_h, grad_w, grad_b = (g.cpu() for g in got)
    torch.testing.assert_close(ce, want[1], rtol=1e-5, atol=1e-5)
    assert bool((ce[~mask] == 0).all())
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-5 * float(weight.sum(1).max()) + 1e-6)
    if not compute_grad:
        assert grad_h.numel() == grad_w.numel() == grad_b.numel() == 0
        return
    masked_weight = torch.where(mask, weight, torch.zeros_like(weight))
    column_weight = masked_weight.sum(0)                                  # [L]
    sizes = offsets[1:] - offsets[:-1]
    per_row = torch.repeat_interleave(column_weight, sizes)[:, None]      # [V, 1]
    max_h = float(h.float().abs().max())
    bound_h = rtol * 2 * float(head_weight.float().abs().max()) * float(masked_weight.max()) + 1e-7
    torch.testing.assert_close(grad_h, want[2], rtol=0, atol=bound_h)
    assert bool((grad_h[~mask] == 0).all())
    assert bool(((grad_w - want[3]).abs() <= rtol * per_row * max_h + 1e-7).all())
    assert bool(((grad_b - want[4]).abs() <= rtol * per_row[:, 0] + 1e-7).all())


# --------------------------------------------------------------------- reference semantics
def test_reference_equals_weighted_ce_of_the_padded_logits_and_its_autograd():
    """The reference's loss and hand-written gradients against weighted_ce of explicit logits,
    differentiated by autograd (float64: agreement to rounding)."""
    problem = head_problem(9, [3, 1, 40, 7, 2], 6, seed=1, dtype=torch.float64)
    h, head_weight, head_bias, offsets, targets, weight, mask = problem
    leaves = [t.clone().requires_grad_() for t in (h, head_weight, head_bias)]
    with ops.use_backend("reference"):
        expected = ops.weighted_ce(padded_logits(*leaves, offsets), targets, weight.double(), mask, offsets)
    expected.sum().backward()
    loss, ce, grad_h, grad_w, grad_b = reference.ragged_head_ce(*problem, True)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for got, leaf in zip((grad_h, grad_w, grad_b), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_public_op_equals_padded_path_for_any_upstream_gradient(backend):
    """Through the custom op: loss and the gradients for h, head weight, head bias and the
    cell weights equal those of weighted_ce(logits) for a uniform upstream gradient and a
    per-row one."""
    if backend == "cpp" and cpp is None:
        pytest.skip("fastmdm._C is not built")
    problem = head_problem(11, [5, 1, 300, 2], 8, seed=2)
    h, head_weight, head_bias, offsets, targets, weight, mask = problem
    weight[0, 0], mask[0, 0] = 0.0, True      # a masked cell with weight 0 still has d/dweight = CE
    for upstream in (torch.full((11,), 0.25), torch.linspace(-1, 2, 11)):
        results = []
        for fused in (True, False):
            leaves = [t.clone().requires_grad_() for t in (h, head_weight, head_bias, weight)]
            with ops.use_backend(backend):
                if fused:
                    loss = ops.ragged_head_ce(leaves[0], leaves[1], leaves[2], offsets, targets, leaves[3], mask)
                else:
                    loss = ops.weighted_ce(padded_logits(*leaves[:3], offsets), targets, leaves[3], mask, offsets)
            (loss * upstream).sum().backward()
            results.append([loss.detach()] + [leaf.grad for leaf in leaves])
        for name, got, want in zip(("loss", "h", "head_weight", "head_bias", "weight"), *results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=name)
    assert results[0][4][0, 0] != 0


def test_gradcheck_float64_uniform_and_per_row_upstream():
    """float64 gradcheck of h, head weight, head bias and cell weights, for a sum (uniform
    upstream gradient) and for a row-weighted sum."""
    h, head_weight, head_bias, offsets, targets, weight, mask = head_problem(
        4, [3, 1, 5], 3, seed=3, dtype=torch.float64, mask_prob=0.7)
    weight = weight.double()
    leaves = [t.clone().requires_grad_() for t in (h, head_weight, head_bias, weight)]
    scale = torch.arange(1.0, 5.0, dtype=torch.float64)

    def summed(*args):
        return ops.ragged_head_ce(args[0], args[1], args[2], offsets, targets, args[3], mask).sum()

    def row_weighted(*args):
        return ops.ragged_head_ce(args[0], args[1], args[2], offsets, targets, args[3], mask) * scale

    assert torch.autograd.gradcheck(summed, leaves)
    assert torch.autograd.gradcheck(row_weighted, leaves)


def test_backward_twice_does_not_corrupt_saved_gradients():
    problem = head_problem(4, [3, 5], 4, seed=4)
    h = problem[0].clone().requires_grad_()
    loss = ops.ragged_head_ce(h, *problem[1:]).sum()
    first = torch.autograd.grad(loss, h, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, h)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_gradients_are_computed_in_backward_and_only_for_inputs_that_need_them(monkeypatch):
    """The forward computes the loss alone; backward runs the kernel once more for the heads'
    gradients, and not at all when only the cell weights need one."""
    problem = list(head_problem(4, [3, 5], 4, seed=5))
    seen = []
    real = ragged_head_module._ragged_head_ce
    monkeypatch.setattr(ragged_head_module, "_ragged_head_ce",
                        lambda *args: seen.append(args[-1]) or real(*args))
    with torch.no_grad():
        ops.ragged_head_ce(problem[0].clone().requires_grad_(), *problem[1:])
    weight = problem[5].clone().requires_grad_()
    ops.ragged_head_ce(*problem[:5], weight, problem[6]).sum().backward()
    assert weight.grad is not None
    ops.ragged_head_ce(problem[0].clone().requires_grad_(), *problem[1:]).sum().backward()
    assert seen == [False, False, False, True]


def test_custom_ops_pass_opcheck():
    """Schemas, fake tensors and autograd registration (reference backend: float64 inputs)."""
    problem = list(head_problem(5, [3, 1, 6], 4, seed=6, dtype=torch.float64))
    problem[5] = problem[5].double().requires_grad_()
    for i in range(3):
        problem[i] = problem[i].requires_grad_()
    torch.library.opcheck(torch.ops.fastmdm.ragged_head_ce.default, (*problem, True))
    torch.library.opcheck(torch.ops.fastmdm.ragged_head_ce.default, (*problem, False))
    h, head_weight, head_bias, offsets = (t.detach() for t in problem[:4])
    torch.library.opcheck(torch.ops.fastmdm.ragged_head_sample.default,
                          (h[:, 0], torch.tensor([0, 2, 1, 2, 0]), head_weight, head_bias, offsets, None, None, 1.0, 7))
    log_weights = torch.tensor([[0.0, -1.0, float("-inf"), 0.0, -0.5, 0.0, 0.0, float("-inf"), 0.0, 0.0]])
    torch.library.opcheck(torch.ops.fastmdm.ragged_head_sample.default,
                          (h[:, 0], torch.tensor([0, 2, 1, 2, 0]), head_weight, head_bias, offsets, log_weights,
                           torch.tensor([0, -1, 0, 0, -1]), 1.0, 7))


@needs_cpp
def test_opcheck_with_cpp_backend():
    problem = list(head_problem(5, [3, 1, 6], 4, seed=7))
    for i in (0, 1, 2, 5):
        problem[i] = problem[i].requires_grad_()
    with ops.use_backend("cpp"):
        torch.library.opcheck(torch.ops.fastmdm.ragged_head_ce.default, (*problem, True))
        torch.library.opcheck(torch.ops.fastmdm.ragged_head_sample.default,
                              (problem[0][:, 1].detach(), torch.tensor([2, 2, 0, 1, 0]),
                               *(t.detach() for t in problem[1:4]), None, None, 0.5, 3))
        torch.library.opcheck(torch.ops.fastmdm.ragged_head_sample.default,
                              (problem[0][:, 1].detach(), torch.tensor([2, 2, 0, 1, 0]),
                               *(t.detach() for t in problem[1:4]), torch.zeros(2, 10).log(),
                               torch.tensor([1, -1, 0, 0, 1]), 0.5, 3))


# ---------------------------------------------------------------------------------- errors
def test_errors_are_clear():
    h, head_weight, head_bias, offsets, targets, weight, mask = head_problem(3, [2, 4], 5)
    call = ops.ragged_head_ce
    with pytest.raises(ValueError, match="h must have 3 dimension"):
        call(h[0], head_weight, head_bias, offsets, targets, weight, mask)
    with pytest.raises(TypeError, match="share a dtype"):
        call(h.double(), head_weight, head_bias, offsets, targets, weight, mask)
    with pytest.raises(ValueError, match="width 5 but head_weight has 4"):
        call(h, head_weight[:, :4], head_bias, offsets, targets, weight, mask)
    with pytest.raises(ValueError, match="head_bias has 5 entries"):
        call(h, head_weight, head_bias[:5], offsets, targets, weight, mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 2\)"):
        call(h, head_weight, head_bias, offsets, targets, weight, mask[:, :1])
    with pytest.raises(ValueError, match="offsets must start at 0 and end at the logits width 6"):
        call(h, head_weight, head_bias, torch.tensor([0, 2, 5]), targets, weight, mask)
    with pytest.raises(ValueError, match="L\\+1 = 3 entries"):
        call(h, head_weight, head_bias, torch.tensor([0, 6]), targets, weight, mask)
    bad = targets.clone()
    bad[1, 0] = 2
    with pytest.raises(ValueError, match="targets out of range"):
        call(h, head_weight, head_bias, offsets, bad, weight, mask)
    with pytest.raises(ValueError, match="no rows"):
        call(h[:0], head_weight, head_bias, offsets, targets[:0], weight[:0], mask[:0])
    sample = ops.ragged_head_sample
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        sample(h[:, 0], torch.tensor([0, 1, 1]), head_weight, head_bias, offsets, -1.0, 0)
    with pytest.raises(ValueError, match="columns must lie in 0..1"):
        sample(h[:, 0], torch.tensor([0, 2, 1]), head_weight, head_bias, offsets, 1.0, 0)
    with pytest.raises(ValueError, match="columns has 2 entries for 3 cells"):
        sample(h[:, 0], torch.tensor([0, 1]), head_weight, head_bias, offsets, 1.0, 0)
    assert sample(h[:0, 0], torch.tensor([], dtype=torch.int64), head_weight, head_bias, offsets, 1.0, 0).shape == (0,)


@needs_cpp
def test_cpp_errors_are_clear():
    h, head_weight, head_bias, offsets, targets, weight, mask = head_problem(3, [2, 4], 5, mask_prob=1.0)
    bad = targets.clone()
    bad[2, 1] = 4
    with pytest.raises(ValueError, match=r"targets\[2, 1\] = 4 is out of range for its column \(size 4\)"):
        cpp.ragged_head_ce(h, head_weight, head_bias, offsets, bad, weight, mask, True)
    with pytest.raises(ValueError, match="offsets must be strictly increasing"):
        cpp.ragged_head_ce(h, head_weight, head_bias, torch.tensor([0, 6, 6]), targets, weight, mask, False)
    with pytest.raises(ValueError, match=r"columns\[1\] = 5 is outside 0..1"):
        cpp.ragged_head_sample(h[:, 0], torch.tensor([0, 5, 1]), head_weight, head_bias, offsets, 1.0, 0)


# ------------------------------------------------------------------- C++ against reference
column_size = st.one_of(st.just(1), st.just(2), st.integers(1, 60), st.integers(1000, 3000),
                        st.integers(1, 50_000))


@needs_cpp
@settings(max_examples=40, **SETTINGS)
@given(rows=st.integers(1, 12), sizes=st.lists(column_size, min_size=1, max_size=6),
       d=st.sampled_from([1, 3, 16, 17, 48]), seed=st.integers(0, 2**31),
       mask_prob=st.sampled_from([0.0, 0.5, 1.0]), weight_scale=st.sampled_from([1e-4, 3.0, 1e4]),
       compute_grad=st.booleans(), strided=st.booleans())
def test_cpp_matches_reference(rows, sizes, d, seed, mask_prob, weight_scale, compute_grad, strided):
    problem = head_problem(rows, sizes, d, seed=seed, mask_prob=mask_prob, weight_scale=weight_scale,
                           strided=strided)
    assert_matches_reference(cpp.ragged_head_ce(*problem, compute_grad), problem, compute_grad)


@needs_cpp
def test_cpp_many_cells_of_a_wide_column_split_into_groups():
    """Enough work per column for several cell groups (their grad_W partials are summed)."""
    problem = head_problem(700, [3000, 2, 40], 32, seed=8, mask_prob=0.9)
    assert_matches_reference(cpp.ragged_head_ce(*problem, True), problem, True)


@needs_cpp
def test_cpp_results_do_not_depend_on_the_thread_count():
    problem = head_problem(600, [2500, 3, 70], 24, seed=9, mask_prob=0.8)
    x, columns = problem[0][:, 0], torch.arange(600) % 3
    log_weights = torch.where(torch.rand(2, 2573, generator=torch.Generator().manual_seed(1)) < 0.5,
                              float("-inf"), -0.5)
    restriction = torch.arange(600) % 3 - 1
    (one, draw_one, restricted_one), (two, draw_two, restricted_two) = outputs_per_thread_count(
        lambda: (cpp.ragged_head_ce(*problem, True), cpp.ragged_head_sample(x, columns, *problem[1:4], 1.0, 11),
                 cpp.ragged_head_sample(x, columns, *problem[1:4], 1.0, 11, log_weights, restriction)))
    for a, b in zip((*one, *draw_one, *restricted_one), (*two, *draw_two, *restricted_two)):
        assert torch.equal(a, b)


@needs_cpp
def test_cpp_extreme_logits_are_stable():
    h, head_weight, head_bias, offsets, targets, weight, mask = head_problem(4, [3, 700], 8, seed=10, mask_prob=1.0)
    head_bias = head_bias * 1e4
    got = cpp.ragged_head_ce(h, head_weight, head_bias, offsets, targets, weight, mask, True)
    want = reference.ragged_head_ce(h, head_weight, head_bias, offsets, targets, weight, mask, True)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-2)   # CE ~ 1e4: a few ulp
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- Triton against reference
def to_triton(problem):
    return [t.to(TRITON_DEVICE) for t in problem]


@needs_triton
@settings(max_examples=8, **SETTINGS)
@given(rows=st.integers(1, 40), sizes=st.lists(st.integers(1, 150), min_size=1, max_size=4),
       d=st.sampled_from([1, 5, 16, 20]), seed=st.integers(0, 2**16),
       mask_prob=st.sampled_from([0.0, 0.5, 1.0]), compute_grad=st.booleans(), strided=st.booleans())
def test_triton_matches_reference(rows, sizes, d, seed, mask_prob, compute_grad, strided):
    problem = head_problem(rows, sizes, d, seed=seed, mask_prob=mask_prob, strided=strided)
    assert_matches_reference(triton_backend.ragged_head_ce(*to_triton(problem), compute_grad), problem, compute_grad)


#: One width of every BLOCK_D class (16 to MAX_HEAD_WIDTH), most of them no power of two.
#: (d, odd layout) for every tile class: each BLOCK_D (16 to MAX_HEAD_WIDTH) with d % 16 == 0
#: and not; the latter with strided states and head weights whose data starts off a 16-byte
#: boundary (the Triton path copies both).
TILE_CLASSES = [(16, False), (32, False), (48, False), (128, False), (256, False),
                (9, True), (20, True), (40, True), (100, True), (200, True)]


def tiled_problem(d, dtype, mode, odd_layout, *, seed):
    """More cells than one tile of `mode` holds and a column wider than two of its vocabulary
    chunks, for the tile dispatch picks at width d and `dtype`."""
    tile = triton_backend.ragged_head_config(d, dtype, mode)
    h, head_weight, *rest = head_problem(tile.block_m + 3, [1, 2 * tile.block_k + 5, 3], d, seed=seed,
                                         mask_prob=0.9, dtype=dtype, strided=odd_layout)
    if odd_layout:
        head_weight = torch.empty(head_weight.numel() + 1, dtype=dtype)[1:].view_as(head_weight).copy_(head_weight)
        assert head_weight.data_ptr() % 16
    return (h, head_weight, *rest)


@needs_triton
@pytest.mark.parametrize("d, odd_layout", TILE_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compute_grad", [False, True])
def test_triton_dispatched_tiles_match_reference(d, odd_layout, dtype, compute_grad):
    """Every tile dispatch picks (they differ by width class, alignment, dtype and gradients),
    at the tolerances of the module docstring: the tile does not change the results beyond them."""
    problem = tiled_problem(d, dtype, "grad" if compute_grad else "loss", odd_layout, seed=d)
    got = triton_backend.ragged_head_ce(*to_triton(problem), compute_grad)
    assert_matches_reference(got, problem, compute_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@needs_triton
def test_triton_config_covers_every_width():
    for d, dtype, mode in itertools.product(range(1, triton_backend.MAX_HEAD_WIDTH + 1),
                                            (torch.float32, torch.bfloat16), triton_ragged_head.MODES):
        tile = triton_backend.ragged_head_config(d, dtype, mode)
        assert tile.block_d >= d and min(tile.block_m, tile.block_k, tile.block_d) >= 16
        assert tile.num_warps in (4, 8, 16) and tile.num_stages in (1, 2, 3)
    with pytest.raises(ValueError, match="d_model must lie in 1..256"):
        triton_backend.ragged_head_config(257)
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        triton_backend.ragged_head_config(16, torch.float16)
    with pytest.raises(ValueError, match="mode must be one of"):
        triton_backend.ragged_head_config(16, torch.float32, "backward")
    wide = torch.zeros(2, 3, triton_backend.MAX_HEAD_WIDTH + 1, device=TRITON_DEVICE)
    assert not triton_backend.supports("ragged_head_ce", wide)
    assert triton_backend.supports("ragged_head_ce", wide[..., :64].bfloat16())
    assert not triton_backend.supports("ragged_head_ce", wide[..., :64].half())


# ---------------------------------------------------------------------------------- sampling
def sample_backends():
    backends = ["reference"]
    if cpp is not None:
        backends.append("cpp")
    if triton_backend is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        backends.append("triton")
    return backends


def run_sample(backend, h, columns, head_weight, head_bias, offsets, temperature, seed):
    module = {"reference": reference, "cpp": cpp, "triton": triton_backend}[backend]
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    args = [t.to(device) for t in (h, columns, head_weight, head_bias, offsets)]
    return module.ragged_head_sample(*args, temperature, seed)[0].cpu()


@pytest.mark.parametrize("backend", sample_backends())
def test_sample_at_temperature_zero_is_the_argmax(backend):
    h, head_weight, head_bias, offsets, *_ = head_problem(30, [1, 7, 150, 2], 12, seed=14)
    states = h.reshape(-1, 12)[:60]
    columns = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(1))
    logits = padded_logits(states[:, None].expand(-1, 4, -1), head_weight, head_bias, offsets)
    bounds = offsets.tolist()
    expected = torch.stack([logits[m, bounds[c]:bounds[c + 1]].argmax() for m, c in enumerate(columns.tolist())])
    got = run_sample(backend, states, columns, head_weight, head_bias, offsets, 0.0, 5)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", sample_backends())
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sample_frequencies_follow_the_tempered_softmax(backend, temperature):
    """Many cells with the same state: value counts against softmax(logits / T) by a
    chi-square statistic (6 values, 5 degrees of freedom; the 0.9999 quantile is 25.7).
    Two columns sit in one call to check that each uses its own head."""
    draws = 3000 if backend == "triton" else 20000
    offsets = offsets_of([6, 3])
    head_weight = torch.tensor([[1.0], [0.5], [0.0], [-0.5], [-1.0], [2.0], [0.0], [0.0], [0.0]])
    head_bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, -5.0, 0.0])
    h = torch.ones(2 * draws, 1)
    columns = torch.tensor([0, 1]).repeat_interleave(draws)
    values = run_sample(backend, h, columns, head_weight, head_bias, offsets, temperature, 21)
    probs = torch.softmax((head_weight[:6, 0] + head_bias[:6]).double() / temperature, 0)
    counts = torch.bincount(values[:draws], minlength=6).double()
    chi2 = float(((counts - draws * probs) ** 2 / (draws * probs)).sum())
    assert chi2 < 25.7, (counts, draws * probs)
    second = values[draws:]
    assert bool((second < 3).all())
    p_second = torch.softmax(torch.tensor([5.0, -5.0, 0.0]).double() / temperature, 0)
    assert abs(float((second == 0).double().mean()) - float(p_second[0])) < 5 * math.sqrt(p_second[0] / draws) + 1e-3


@pytest.mark.parametrize("backend", sample_backends())
def test_sample_is_deterministic_for_a_seed(backend):
    h, head_weight, head_bias, offsets, *_ = head_problem(20, [40, 3], 6, seed=15)
    states, columns = h[:, 0], torch.arange(20) % 2
    first = run_sample(backend, states, columns, head_weight, head_bias, offsets, 1.0, 99)
    assert torch.equal(first, run_sample(backend, states, columns, head_weight, head_bias, offsets, 1.0, 99))
    assert not torch.equal(first, run_sample(backend, states, columns, head_weight, head_bias, offsets, 1.0, 100))


@needs_triton
@pytest.mark.parametrize("d, odd_layout", TILE_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sample_with_dispatched_tiles(d, odd_layout, dtype, monkeypatch):
    """The sampler's tile for every class and dtype: argmax at temperature 0, and at
    temperature 1 the same draws as the smallest tile (the noise is keyed by cell and value,
    not by tile), so the tile changes nothing. All but two cells draw from the wide column."""
    h, head_weight, head_bias, offsets, *_ = tiled_problem(d, dtype, "sample", odd_layout, seed=d + 1)
    states = h[:, 0]
    columns = torch.ones(states.shape[0], dtype=torch.int64)
    columns[:2] = torch.tensor([0, 2])
    args = (states, columns, head_weight, head_bias, offsets)
    greedy = run_sample("triton", *args, 0.0, 7)
    assert torch.equal(greedy, reference.ragged_head_sample(*args, 0.0, 7)[0])
    drawn = run_sample("triton", *args, 1.0, 7)
    for key in [k for k in triton_ragged_head._TILES if k[0] == "sample"]:
        monkeypatch.setitem(triton_ragged_head._TILES, key, (16, 16, 4, 3))
    assert torch.equal(drawn, run_sample("triton", *args, 1.0, 7))


def test_ragged_heads_sample_method():
    """The sampler's entry point: generator-seeded, in range, argmax at temperature 0."""
    sizes = [4, 1, 30, 2]
    heads = RaggedHeads(offsets_of(sizes), 8)
    with torch.no_grad():
        heads.bias.normal_()
    h = torch.randn(50, 8)
    columns = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(0))
    a = heads.sample(h, columns, 1.0, torch.Generator().manual_seed(3))
    b = heads.sample(h, columns, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert bool((a < torch.tensor(sizes)[columns]).all() and (a >= 0).all())
    greedy = heads.sample(h, columns, 0.0)
    logits = heads.logits(h[:, None].expand(-1, 4, -1)).detach()
    bounds = heads.offsets.tolist()
    expected = [int(logits[m, bounds[c]:bounds[c + 1]].argmax()) for m, c in enumerate(columns.tolist())]
    assert greedy.tolist() == expected


# ----------------------------------------------------------------------------------- model
def padded_loss(model, x_t, x, weight, mask):
    """The model's weighted cross entropy through its padded logits: weighted_ce(heads.logits(h))."""
    return ops.weighted_ce(model(x_t), x, weight, mask, model.heads.offsets)


def test_model_loss_equals_the_padded_path():
    sizes = [50, 9, 100, 2, 1, 16]
    model = ColumnTransformer(sizes, d_model=16, num_layers=1, num_heads=2, dim_feedforward=16)
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, k, (40,), generator=gen) for k in sizes], 1)
    mask = torch.rand(40, len(sizes), generator=gen) < 0.5
    x_t = torch.where(mask, model.mask_ids, x)
    weight = torch.rand(40, len(sizes), generator=gen)
    results = []
    for loss_of in (model, lambda *args: padded_loss(model, *args)):
        model.zero_grad()
        loss = loss_of(x_t, x, weight, mask)
        loss.sum().backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_on_adult_follows_the_padded_loss_curve():
    """200 Adam steps on Adult (order-space masks, batch 64, a small model): the fused heads
    give the padded path's loss curve. Both runs see the same masks and data, so they differ
    only in float32 rounding (measured: 2e-7 relative over 300 steps of a larger model);
    1e-4 leaves room for other CPUs and BLAS builds."""
    from fastmdm import datasets
    from fastmdm.data import TableCodec
    train, _ = datasets.load("adult")
    codec = TableCodec.fit(train)
    tokens = codec.encode(train)
    num_columns = tokens.shape[1]

    def curve(fused: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = ColumnTransformer(codec.cardinalities, d_model=16, num_layers=1, num_heads=2, dim_feedforward=32)
        loss_of = model if fused else (lambda *args: padded_loss(model, *args))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for step in range(200):
            x = tokens[torch.randint(0, tokens.shape[0], (64,), generator=gen)]
            n_revealed = torch.randint(0, num_columns, (64,), generator=gen)
            masked = ops.mask_order(x, torch.ones(num_columns), codec.mask_ids, n_revealed, seed=step)
            loss = loss_of(masked.x_t, x, masked.weight, masked.mask).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    fused, padded = curve(True), curve(False)
    assert float(padded[-20:].mean()) < 0.7 * float(padded[:5].mean())   # it did learn
    torch.testing.assert_close(fused, padded, rtol=1e-4, atol=0)


@pytest.mark.parametrize("architecture", ["bidirectional", "causal"])
def test_default_fit_score_and_sample_never_build_padded_logits(monkeypatch, architecture):
    """The public path (fit with validation, nelbo, sample) goes through the fused heads: the
    padded [N, V] logits of `RaggedHeads.logits` are never built. A 3,000-category column
    makes the padded tensor the largest thing a step would allocate."""
    import numpy as np
    import pandas as pd
    from fastmdm import TabularMDM
    from fastmdm.models.base import RaggedHeads

    def refuse(self, h):
        raise AssertionError("padded logits built on a default path")

    monkeypatch.setattr(RaggedHeads, "logits", refuse)
    rng = np.random.default_rng(0)
    wide = np.repeat(np.arange(3000), 2).astype(str)   # every value twice: not a unique key
    df = pd.DataFrame({"wide": wide, "small": rng.choice(["a", "b"], 6000), "x": rng.normal(size=6000)})
    model = TabularMDM(architecture=architecture, epochs=1, batch_size=1024, category_cap=None,
                       progress=False, model=dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=8))
    model.fit(df)
    assert np.isfinite(model.nelbo(df.head(50)))
    assert len(model.sample(20, seed=0)) == 20
