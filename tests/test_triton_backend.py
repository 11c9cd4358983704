"""The Triton backend against the torch reference, called directly (and once through dispatch).

Without a GPU the kernels run through Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), which is slow, so shapes are small and hypothesis draws few examples.

Tolerances (float32 unless said otherwise):
* x_t and mask are compared exactly: explicit uniforms are kept at least 1e-3 away from the
  t-space threshold t^w (ulp-level differences between torch's and Triton's exp/log could
  otherwise flip a comparison) and order-space keys are kept 1e-4 apart relatively (so the
  order cannot flip on a rounding difference).
* weights, scores, CE, RLOO: rtol 1e-5. Every value is a short sum or quotient of float32
  terms computed in a different order than torch (tiles instead of cumsum / log_softmax), so
  a few ulp (~1e-7 each) accumulate; 1e-5 leaves room for the GPU's approximate exp/log/div.
  Where a result is a difference of larger terms (PL score = 1/w - C, RLOO advantages that sum
  to zero per row, softmax - onehot) the absolute tolerance is 1e-5 times those terms' size
  (for the per-row RLOO gradient, the size of that row's terms).
* bfloat16 logits: both sides upcast to float32 and compute in float32, so loss and CE keep
  the float32 tolerance; only dlogits is rounded to bfloat16 at the end, where the two fp32
  values may straddle a rounding boundary: one bf16 ulp, rtol 2^-7 ~ 7.8e-3 (we use 1e-2).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastmdm.triton as tb  # noqa: E402
from conftest import order_uniforms, ragged_problem  # noqa: E402
from fastmdm import ops  # noqa: E402
from fastmdm.ops import reference  # noqa: E402
from fastmdm.triton.rloo import plan_rloo_grad  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (it must be set before triton is imported)",
                allow_module_level=True)

FEW = settings(max_examples=20, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-5


def gen(seed):
    return torch.Generator().manual_seed(seed)


def log_uniform_w(num_columns, generator, low=1e-3, high=1e3):
    """w spread over [low, high] on a log scale, the range a learned schedule can reach."""
    log_w = torch.empty(num_columns).uniform_(torch.log(torch.tensor(low)).item(),
                                              torch.log(torch.tensor(high)).item(), generator=generator)
    return log_w.exp()


def tspace_uniforms(log_t, w, generator):
    """Uniforms at least 1e-3 from the threshold t^w: (u + 1/2) mod 1 is far from it."""
    p = torch.exp(w[None, :].double() * log_t.double()[:, None])
    u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
    u = torch.where((u - p).abs() < 1e-3, (u + 0.5) % 1.0, u)
    return u.float()


def to_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def assert_close_scaled(actual, expected, scale, rtol=RTOL):
    """|actual - expected| <= rtol * scale elementwise: scale bounds the terms that cancel."""
    error = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = rtol * scale.double().cpu() + 1e-30
    assert bool((error <= bound).all()), f"max error/bound {float((error / bound).max()):.3g}"


# ---------------------------------------------------------------- masking, t-space

@FEW
@given(rows=st.integers(1, 9), cols=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_mask_tspace_matches_reference(rows, cols, seed):
    generator = gen(seed)
    w = log_uniform_w(cols, generator)
    # log t includes the edges: far below float32's range of t, tiny t, t = 1 and just below 1.
    edges = torch.tensor([-3e4, -1e3, -16.0, -1e-7, 0.0, -1e-3])
    log_t = torch.where(torch.rand(rows, generator=generator) < 0.4,
                        edges[torch.randint(0, len(edges), (rows,), generator=generator)],
                        torch.log1p(-torch.rand(rows, generator=generator)))
    time_weight = torch.exp(torch.empty(rows).uniform_(-7.0, 14.0, generator=generator))
    x = torch.randint(0, 5, (rows, cols), generator=generator)
    mask_id = torch.randint(5, 9, (cols,), generator=generator)
    u = tspace_uniforms(log_t, w, generator)
    args = to_device(x, log_t, w, mask_id, time_weight, u)
    got = tb.mask_tspace(*args, 0)
    want = reference.mask_tspace(*args, 0)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=RTOL, atol=0)
    torch.testing.assert_close(got[3], want[3], rtol=RTOL, atol=0)


def test_mask_tspace_several_tiles():
    """300 x 140: several row tiles and two column tiles of the t-space grid."""
    generator = gen(9)
    w, log_t = log_uniform_w(140, generator, 0.1, 10), torch.log1p(-torch.rand(300, generator=generator))
    x, mask_id = torch.randint(0, 5, (300, 140), generator=generator), torch.full((140,), 7)
    time_weight = torch.rand(300, generator=generator) + 0.5
    args = to_device(x, log_t, w, mask_id, time_weight, tspace_uniforms(log_t, w, generator))
    got, want = tb.mask_tspace(*args, 0), reference.mask_tspace(*args, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=RTOL, atol=0)
    torch.testing.assert_close(got[3], want[3], rtol=RTOL, atol=0)


def test_tspace_score_across_series_switch():
    """Visible score t^w log t / (t^w - 1) on both sides of |w log t| = 0.1 (series / direct)
    and up to t -> 1, against float64 truth rather than the float32 reference."""
    a = torch.cat([-torch.logspace(-7, 0.5, 80), torch.tensor([-0.0999999, -0.1, -0.1000001])])
    u = torch.full((a.shape[0], 1), 1 - 2**-24)        # largest float32 below 1: visible iff t^w < u
    x, mask_id = torch.zeros(a.shape[0], 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    for w in (0.001, 1.0, 1000.0):
        log_t = a / w                                    # so that w log t = a
        time_weight = torch.ones_like(log_t)
        _, mask, _, score = tb.mask_tspace(*to_device(x, log_t, torch.tensor([w]), mask_id, time_weight, u), 0)
        a64 = w * log_t.double()
        visible = torch.where(a64 == 0, 1 / w, torch.exp(a64) * log_t.double() / torch.expm1(a64))  # 1/w at t = 1
        truth = torch.where(mask[:, 0].cpu(), log_t.double(), visible)
        assert int((~mask).sum()) > 40     # t^w rounds to >= u only for |a| < ~1e-7
        torch.testing.assert_close(score[:, 0].cpu().double(), truth, rtol=RTOL, atol=0)


# ---------------------------------------------------------------- masking, order space

def check_mask_order(x, w, mask_id, u, n):
    args = to_device(x, w, mask_id, u, n)
    got, want = tb.mask_order(*args, 0), reference.mask_order(*args, 0)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=RTOL, atol=0)
    # score = 1[revealed]/w - C with C >= 0: 2*1[revealed]/w - score = 1[revealed]/w + C bounds both terms.
    assert_close_scaled(got[3], want[3], 2 * (~want[1]) / args[1][None, :] - want[3])


@FEW
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_mask_order_matches_reference(rows, cols, seed):
    generator = gen(seed)
    w = log_uniform_w(cols, generator)
    x = torch.randint(0, 5, (rows, cols), generator=generator)
    mask_id = torch.randint(5, 9, (cols,), generator=generator)
    n = torch.randint(0, cols, (rows,), generator=generator)
    n[0] = 0
    n[-1] = cols - 1                     # both ends of n_revealed in every example
    check_mask_order(x, w, mask_id, order_uniforms(rows, w, generator), n)


def test_mask_order_single_column():
    """L = 1: all hidden, weight 1, score 0."""
    w = torch.tensor([2.5])
    got = tb.mask_order(*to_device(torch.tensor([[3], [4]]), w, torch.tensor([9]), None,
                                   torch.tensor([0, 0])), 1)
    assert got[1].all() and torch.equal(got[0].cpu(), torch.tensor([[9], [9]]))
    torch.testing.assert_close(got[2].cpu(), torch.ones(2, 1))
    torch.testing.assert_close(got[3].cpu(), torch.zeros(2, 1))


@pytest.mark.parametrize("cols, n_revealed", [(200, [0, 199]), (600, [1, 400]), (tb.MAX_ORDER_COLUMNS, [2731])],
                         ids=["L200", "L600", "Lmax"])
def test_mask_order_wide_rows(cols, n_revealed):
    """Wide rows, one program each (a 256-, 1,024- and 4,096-wide sort), w over 1e-3..1e3.
    The interpreter runs Triton's sort slowly (~15 s a 4,096-wide row), hence so few rows."""
    generator = gen(cols)
    w = log_uniform_w(cols, generator)
    n = torch.tensor(n_revealed)
    x = torch.randint(0, 5, (n.shape[0], cols), generator=generator)
    check_mask_order(x, w, torch.randint(5, 9, (cols,), generator=generator),
                     order_uniforms(n.shape[0], w, generator), n)


def test_mask_order_ties_break_by_column_index():
    """Equal keys (equal u and w) order by column index, as the reference's stable argsort."""
    u = torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0], [0.3, 0.7, 0.3, 0.7, 0.3]])
    args = to_device(torch.zeros(2, 5, dtype=torch.int64), torch.ones(5), torch.ones(5, dtype=torch.int64),
                     u, torch.tensor([2, 3]))
    got, want = tb.mask_order(*args, 0), reference.mask_order(*args, 0)
    assert torch.equal(got[1], want[1])
    assert_close_scaled(got[3], want[3], 2 * (~want[1]) / args[1][None, :] - want[3])


# ---------------------------------------------------------------- seeded draws

def test_seeded_masks_are_deterministic_and_seed_dependent():
    x = torch.zeros(64, 10, dtype=torch.int64)
    w, mask_id, log_t = torch.linspace(0.5, 2, 10), torch.ones(10, dtype=torch.int64), torch.full((64,), -0.7)
    n, time_weight = torch.full((64,), 5), torch.ones(64)
    args_t, args_o = to_device(x, log_t, w, mask_id, time_weight), to_device(x, w, mask_id)
    (n,) = to_device(n)
    for draw in (lambda s: tb.mask_tspace(*args_t, None, s),
                 lambda s: tb.mask_order(*args_o, None, n, s)):
        first, again, other = draw(7), draw(7), draw(2**40 + 7)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        assert not torch.equal(first[1], other[1])
    # Counter-based: row b's draw does not depend on the batch size (or the launch tiling).
    small = tb.mask_tspace(*to_device(x[:3], log_t[:3], w, mask_id, time_weight[:3]), None, 7)
    assert torch.equal(small[1], tb.mask_tspace(*args_t, None, 7)[1][:3])


def test_seeded_mask_rate_is_t_to_the_w():
    """P(masked) = t^w: 4000 rows per (t, w) cell, each rate within 5 binomial sigmas."""
    rows = 4000
    w = torch.tensor([0.3, 1.0, 3.0, 10.0])
    x, mask_id = torch.zeros(rows, 4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    for t_value in (0.2, 0.5, 0.9):
        log_t = torch.full((rows,), t_value).log()
        _, mask, _, _ = tb.mask_tspace(*to_device(x, log_t, w, mask_id, torch.ones(rows)), None, 123)
        p = t_value ** w
        sigma = torch.sqrt(p * (1 - p) / rows)
        assert bool(((mask.float().mean(0).cpu() - p).abs() <= 5 * sigma + 1e-12).all())


def test_seeded_first_revealed_is_plackett_luce():
    """With n_revealed = 1, column l is the visible one with probability w_l / sum(w)."""
    rows = 4000
    w = torch.tensor([0.5, 1.0, 2.0, 4.5])
    x, mask_id = torch.zeros(rows, 4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    _, mask, _, _ = tb.mask_order(*to_device(x, w, mask_id), None, *to_device(torch.ones(rows, dtype=torch.int64)), 99)
    assert bool(((~mask).sum(1) == 1).all())
    p = w / w.sum()
    sigma = torch.sqrt(p * (1 - p) / rows)
    assert bool((((~mask).float().mean(0).cpu() - p).abs() <= 5 * sigma).all())


# ---------------------------------------------------------------- weighted CE

def ce_problem(rows, sizes, seed, dtype=torch.float32, layout="contiguous"):
    targets, logits, offsets = ragged_problem(rows, sizes, seed=seed, dtype=dtype)
    if layout == "slice":           # a column slice of a wider tensor: row stride > width
        wide = torch.randn(rows, logits.shape[1] + 5, generator=gen(seed)).to(dtype)
        wide[:, 2:2 + logits.shape[1]] = logits
        logits = wide[:, 2:2 + logits.shape[1]]
    elif layout == "column_major":  # column stride = rows
        logits = logits.t().contiguous().t()
    generator = gen(seed + 1)
    mask = torch.rand(targets.shape, generator=generator) < 0.6
    weight = torch.where(mask, 3 * torch.rand(targets.shape, generator=generator), torch.zeros(()))
    return to_device(logits, targets, weight, mask, offsets)


def check_ce(problem, compute_grad=True, grad_rtol=RTOL):
    logits, _, weight, _, _ = problem
    got = tb.weighted_ce(*problem, compute_grad)
    want = reference.weighted_ce(*problem, compute_grad)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(got[1], want[1], rtol=RTOL, atol=RTOL)
    if compute_grad:
        # weight * (softmax - onehot): the cancellation near the target is bounded by the weight.
        torch.testing.assert_close(got[2].float(), want[2].float(), rtol=grad_rtol,
                                   atol=RTOL * float(weight.max()))


@FEW
@given(rows=st.integers(1, 80), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       seed=st.integers(0, 2**16), layout=st.sampled_from(["contiguous", "slice", "column_major"]),
       compute_grad=st.booleans())
def test_weighted_ce_matches_reference(rows, sizes, seed, layout, compute_grad):
    check_ce(ce_problem(rows, sizes, seed, layout=layout), compute_grad)


def test_weighted_ce_vocab_one_and_wide_column():
    """A 1-value column (CE 0, gradient 0) next to a 1000-value one, split into 128-wide chunks
    by the online logsumexp (the chunk width follows the mean column width)."""
    problem = ce_problem(3, [1, 1000, 3, 4, 2, 5, 1, 8], seed=5)
    check_ce(problem)
    _, ce, dlogits = tb.weighted_ce(*problem, True)
    assert bool((ce[:, 0] == 0).all()) and bool((dlogits[:, 0] == 0).all())


def test_weighted_ce_online_logsumexp_with_large_logits():
    """Logits near 1e4 (exp overflows without the running max), spread over several chunks."""
    logits, targets, weight, mask, offsets = ce_problem(2, [300, 7], seed=3)
    logits = logits + 1e4 * torch.sign(torch.randn(logits.shape, generator=gen(4), device="cpu")).to(DEVICE)
    mask = torch.ones_like(mask)
    weight = torch.ones_like(weight)
    got = tb.weighted_ce(logits, targets, weight, mask, offsets, True)
    want = reference.weighted_ce(logits, targets, weight, mask, offsets, True)
    assert bool(torch.isfinite(got[0]).all())
    # x - lse carries an absolute rounding error of ~ulp(1e4) = 1e-3 on both sides, hence atol
    # 1e-3 on the loss and on softmax = exp(x - lse) <= 1 (relative error 1e-3).
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=1e-3)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "slice", "column_major"])
def test_weighted_ce_bfloat16_logits(layout):
    check_ce(ce_problem(5, [2, 30, 1, 200, 9], seed=11, dtype=torch.bfloat16, layout=layout),
             grad_rtol=1e-2)


def test_weighted_ce_nothing_masked():
    logits, targets, weight, mask, offsets = ce_problem(3, [4, 2], seed=0)
    loss, ce, dlogits = tb.weighted_ce(logits, targets, weight, torch.zeros_like(mask), offsets, True)
    assert not loss.any() and not ce.any() and not dlogits.any()


# ---------------------------------------------------------------- RLOO

@pytest.mark.parametrize("per_row", [False, True])
@FEW
@given(rows=st.integers(1, 40), samples=st.integers(2, 5), cols=st.integers(1, 20), seed=st.integers(0, 2**16),
       magnitude=st.sampled_from([1e-3, 1.0, 1e3]), noncontig=st.booleans())
def test_rloo_grad_matches_reference(per_row, rows, samples, cols, seed, magnitude, noncontig):
    generator = gen(seed)
    f = (torch.randn(rows, samples, generator=generator) * 10 + 50) * magnitude  # large common offset cancels
    score = torch.randn(rows, samples, cols, generator=generator) / magnitude
    f, score = to_device(f, score)
    if noncontig:                                   # the same values in transposed storage
        f, score = f.t().contiguous().t(), score.transpose(0, 2).contiguous().transpose(0, 2)
    got, want = tb.rloo_grad(f, score, per_row), reference.rloo_grad(f, score, per_row)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    # The advantages cancel per row; the error scales with the mean |f| |score| of the terms.
    if per_row:
        scale = f.abs().mean(1, keepdim=True) * score.abs().mean(1)
        assert_close_scaled(got.mean(0), tb.rloo_grad(f, score), scale.mean(0))
    else:
        scale = (f.abs().mean() * score.abs().mean()).expand_as(want)
    assert_close_scaled(got, want, scale)


def test_rloo_grad_per_row_spans_tiles():
    """K = 40 samples per row: two row tiles of 32 (the second part-masked), two column blocks."""
    generator = gen(5)
    f, score = to_device(torch.randn(3, 40, generator=generator), torch.randn(3, 40, 130, generator=generator))
    got = tb.rloo_grad(f, score, per_row=True)
    assert plan_rloo_grad(f, score, per_row=True)[1].constexprs == dict(BLOCK_R=32, BLOCK_L=128)
    assert_close_scaled(got, reference.rloo_grad(f, score, per_row=True), f.abs().mean() * score.abs().mean(1))


def test_rloo_grad_many_rows_is_deterministic():
    """More rows than one part takes (several partial sums); two runs agree bit for bit."""
    generator = gen(3)
    f, score = to_device(torch.randn(3000, 2, generator=generator), torch.randn(3000, 2, 5, generator=generator))
    got = tb.rloo_grad(f, score)
    assert torch.equal(got, tb.rloo_grad(f, score))
    assert_close_scaled(got, reference.rloo_grad(f, score), torch.ones(5))


# ---------------------------------------------------------------- supports and dispatch

def test_supports_declines_what_it_cannot_run(monkeypatch):
    f32 = torch.zeros(2, 3, device=DEVICE)
    assert tb.supports("rloo_grad", f32, torch.zeros(2, 3, 4, device=DEVICE))
    assert not tb.supports("rloo_grad", f32.double(), torch.zeros(2, 3, 4, device=DEVICE))
    ints = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    assert tb.supports("weighted_ce", f32.bfloat16(), ints, f32, ints.bool(), ints[0])
    assert not tb.supports("weighted_ce", f32.half(), ints, f32, ints.bool(), ints[0])
    assert not tb.supports("weighted_ce", f32, ints.int(), f32, ints.bool(), ints[0])
    assert not tb.supports("mask_tspace", ints, f32[:, 0], f32[0].bfloat16(), f32[:, 0], None)
    assert tb.supports("mask_order", ints, f32[0], None, ints[:, 0])
    wide = torch.zeros(1, tb.MAX_ORDER_COLUMNS + 1, dtype=torch.int64, device=DEVICE)
    assert not tb.supports("mask_order", wide, torch.ones(wide.shape[1], device=DEVICE), None, wide[:, 0])
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not tb.supports("rloo_grad", f32, torch.zeros(2, 3, 4))


def test_forced_backend_gradients_match_reference():
    """Through the custom ops: weighted_ce's logits/weight gradients with the Triton backend."""
    logits, targets, weight, mask, offsets = ce_problem(4, [3, 1, 17], seed=2)
    results = []
    for backend in ("triton", "reference"):
        leaf_logits, leaf_weight = logits.clone().requires_grad_(), weight.clone().requires_grad_()
        with ops.use_backend(backend):
            loss = ops.weighted_ce(leaf_logits, targets, leaf_weight, mask, offsets)
        (loss * torch.arange(1.0, 5.0, device=DEVICE)).sum().backward()
        results.append((loss.detach(), leaf_logits.grad, leaf_weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * 4 * float(weight.max()))
