"""The C++ CPU backend (fastmdm._C via fastmdm.ops.cpu_backend) against the torch reference.

Tolerances (all float32 compute on both sides):
* masking: x_t and mask are compared exactly. The reference draws `u < exp(w log t)` with
  torch's vectorized exp/log and C++ with libm, which can differ by an ulp or two; the
  rounding of a = w log t is amplified by |a| (up to ~90 before t^w underflows), so
  positions with |u - t^w| <= 1e-4 t^w are excluded from the comparison (they are rare: the
  tests assert most positions are compared). Order-space rows whose float64 keys
  -log(u)/w have two neighbours within 1e-4 relative are excluded for the same reason
  (a near tie could rank either way); every other position is compared.
  weight (w * time_weight, L w / sum) and the t-space score: rtol 1e-5 (a few float32 ulps
  of exp/log).
  The order-space score 1/w - C_r cancels, so it is checked against a float64 evaluation
  of the same closed form with an error bound of 2e-5 times the size of its terms.
* weighted_ce: float32 logsumexp over at most ~1500 logits of scale ~3 is good to ~1e-6
  relative; ce rtol 1e-5 / atol 2e-5, loss the same scaled by sum(weight), dlogits (values
  in [-weight, weight]) atol 2e-6 * max weight.
* rloo_grad: compared with a float64 evaluation, error <= 1e-5 * mean |advantage * score|.
  Per row the mean is over the row's K samples, with |f_k| + |baseline_k| in place of
  |advantage_k|: a row's advantages can cancel far below its losses (averaged over rows they
  do not), and the float32 advantage is only good to a few ulps of the losses. The per-row
  gradient's mean over rows is the reduced gradient to the reduced tolerance.
* cached_attention: the caches are copies of the given floats, compared exactly; the
  attended values are convex combinations of values of scale ~1 with weights from float32
  dot products of at most 64 terms (the C++ exp is good to ~2e-7 relative): atol 1e-5,
  rtol 1e-5.
"""
from __future__ import annotations

import itertools
import math
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmdm.ops as ops
from fastmdm.ops import _dispatch
from fastmdm.ops import reference as ref
from conftest import order_uniforms, outputs_per_thread_count
from fastmdm.schedules import plackett_luce_prefix_score

cpu = pytest.importorskip("fastmdm.ops.cpu_backend", reason="fastmdm._C is not built")
from fastmdm import _C  # noqa: E402

# derandomize: every run draws the same examples, so a failure reproduces.
SETTINGS = dict(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------- helpers
def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as `t` in a non-contiguous view (transposed or sliced storage)."""
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]
    if t.dim() == 2:
        return t.t().contiguous().t()
    return t.transpose(0, 2).contiguous().transpose(0, 2)


def maybe_strided(t: torch.Tensor, flag: bool) -> torch.Tensor:
    out = strided(t) if flag else t
    if flag and t.numel() > 1 and t.dim() > 1 and min(t.shape) > 1:
        assert not out.is_contiguous()
    return out


def log_uniform_w(gen: torch.Generator, columns: int, low=1e-3, high=1e3) -> torch.Tensor:
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * torch.rand(columns, generator=gen))


def log_times(gen: torch.Generator, rows: int, mode: str) -> torch.Tensor:
    """log t per row: t uniform in (0, 1], tiny t, t far below float32's range, t = 1, or mixed."""
    log_t = torch.log1p(-torch.rand(rows, generator=gen))
    if mode == "tiny":
        log_t = log_t + math.log(1e-5)
    elif mode == "underflow":
        log_t = -3e4 * torch.rand(rows, generator=gen)   # t = e^-30000 at the far end
    elif mode == "one":
        log_t[::2] = 0.0
    elif mode == "mixed":
        log_t[0] = -3e4
        log_t[-1] = 0.0
    return log_t


def time_weights(gen: torch.Generator, rows: int) -> torch.Tensor:
    """Per-row NELBO time weights 1 / (t p(t)), log-uniform over [1e-3, 1e6]."""
    return torch.exp(math.log(1e-3) + math.log(1e9) * torch.rand(rows, generator=gen))


# ------------------------------------------------------------------------------- supports
def test_supports_declines_non_float32_and_non_cpu():
    f32, i64 = torch.zeros(2), torch.zeros(2, dtype=torch.int64)
    assert cpu.supports("weighted_ce", f32, i64, f32, torch.zeros(2, dtype=torch.bool), i64)
    assert cpu.supports("mask_tspace", i64, f32, f32, None)
    for bad in (torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.bfloat16),
                torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.int32)):
        assert not cpu.supports("rloo_grad", f32, bad)
    assert not cpu.supports("rloo_grad", torch.zeros(2, device="meta"))


def test_dispatch_picks_cpp_for_float32_and_reference_for_float64():
    f32 = torch.zeros(2, 3)
    assert _dispatch.select("rloo_grad", f32, torch.zeros(2, 2, 3)) is cpu
    assert _dispatch.select("rloo_grad", f32.double(), torch.zeros(2, 2, 3).double()) is ref
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="does not support"):
        ops.rloo_grad(f32.double(), torch.zeros(2, 3, 4, dtype=torch.float64))


# ---------------------------------------------------------------------------- mask_tspace
@settings(**SETTINGS)
@given(rows=st.integers(1, 24), columns=st.integers(1, 12), seed=st.integers(0, 2**31),
       t_mode=st.sampled_from(["uniform", "tiny", "underflow", "one", "mixed"]),
       noncontig=st.booleans())
def test_mask_tspace_matches_reference(rows, columns, seed, t_mode, noncontig):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 7, (rows, columns), generator=gen)
    w = log_uniform_w(gen, columns)
    mask_id = torch.randint(7, 10, (columns,), generator=gen)
    log_t, time_weight = log_times(gen, rows, t_mode), time_weights(gen, rows)
    u = torch.rand(rows, columns, generator=gen)
    expected = ref.mask_tspace(x, log_t, w, mask_id, time_weight, u, 0)
    got = cpu.mask_tspace(*(maybe_strided(v, noncontig) for v in (x, log_t, w, mask_id, time_weight, u)), 0)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape

    # Exclude near-ties of u with t^w (see module docstring).
    p = torch.exp(w.double()[None, :] * log_t.double()[:, None])
    ok = (u.double() - p).abs() > 1e-4 * p
    assert ok.float().mean() > 0.9
    assert torch.equal(got[1][ok], expected[1][ok])
    assert torch.equal(got[0][ok], expected[0][ok])
    torch.testing.assert_close(got[2][ok], expected[2][ok], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[3][ok], expected[3][ok], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- mask_order
def order_space_truth(w, u, n_revealed):
    """float64 keys/ranks and the float64 closed-form score, plus rows free of near ties."""
    keys = -torch.log(u.double().clamp(min=torch.finfo(torch.float32).tiny)) / w.double()[None, :]
    sorted_keys, _ = keys.sort(1)
    gaps = (sorted_keys[:, 1:] - sorted_keys[:, :-1]) / sorted_keys[:, 1:].clamp(min=1e-300)
    clean = (gaps > 1e-4).all(1) if keys.shape[1] > 1 else torch.ones(keys.shape[0], dtype=torch.bool)
    rank = torch.argsort(torch.argsort(keys, dim=1, stable=True), dim=1)
    score = plackett_luce_prefix_score(w.double(), rank, n_revealed)
    # Size of the terms of score_l = 1[rank<n]/w_l - C_rank (bounds its rounding error).
    scale = (1.0 / w.double())[None, :] * (rank < n_revealed[:, None]) + (score.abs() + 1.0 / w.double().min())
    return rank, score, scale, clean


@settings(**SETTINGS)
@given(rows=st.integers(1, 24), columns=st.integers(1, 40), seed=st.integers(0, 2**31),
       n_mode=st.sampled_from(["random", "zero", "last"]), noncontig=st.booleans(),
       w_range=st.sampled_from([(1e-3, 1e3), (0.5, 2.0)]))
def test_mask_order_matches_reference(rows, columns, seed, n_mode, noncontig, w_range):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 7, (rows, columns), generator=gen)
    w = log_uniform_w(gen, columns, *w_range)
    mask_id = torch.randint(7, 10, (columns,), generator=gen)
    u = torch.rand(rows, columns, generator=gen)
    n = {"random": torch.randint(0, columns, (rows,), generator=gen),
         "zero": torch.zeros(rows, dtype=torch.int64),
         "last": torch.full((rows,), columns - 1)}[n_mode]
    expected = ref.mask_order(x, w, mask_id, u, n, 0)
    got = cpu.mask_order(*(maybe_strided(v, noncontig) for v in (x, w, mask_id, u, n)), 0)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape

    rank, score64, scale, clean = order_space_truth(w, u, n)
    assert clean.float().mean() >= 0.5 or rows < 4
    c = clean
    assert torch.equal(got[1][c], expected[1][c])
    assert torch.equal(got[1][c], (rank >= n[:, None])[c])
    assert torch.equal(got[0][c], expected[0][c])
    torch.testing.assert_close(got[2][c], expected[2][c], rtol=1e-5, atol=0)
    err = (got[3][c].double() - score64[c]).abs()
    assert bool((err <= 2e-5 * scale[c]).all()), float((err / scale[c]).max())


@pytest.mark.parametrize("columns", [600, 4096, 10_000])
def test_mask_order_wide_rows(columns):
    """As wide as the Triton kernel takes (4,096) and wider: the C++ sort has no width limit.
    Keys are drawn 1e-4 apart (conftest.order_uniforms), so every position is compared."""
    gen = torch.Generator().manual_seed(columns)
    w = log_uniform_w(gen, columns)
    u = order_uniforms(6, w, gen)
    n = torch.tensor([0, 1, columns // 3, columns // 2, columns - 2, columns - 1])
    x, mask_id = torch.randint(0, 7, (6, columns), generator=gen), torch.full((columns,), 7)
    expected, got = ref.mask_order(x, w, mask_id, u, n, 0), cpu.mask_order(x, w, mask_id, u, n, 0)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=0)
    _, score64, scale, _ = order_space_truth(w, u, n)
    err = (got[3].double() - score64).abs()
    assert bool((err <= 2e-5 * scale).all()), float((err / scale).max())


# ---------------------------------------------------------------------------- weighted_ce
def _problem(gen, rows, sizes, mask_prob):
    sizes_t = torch.tensor(sizes)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes_t, 0)
    targets = (torch.rand(rows, len(sizes), generator=gen) * sizes_t).long()
    logits = 3 * torch.randn(rows, int(offsets[-1]), generator=gen)
    weight = 5 * torch.rand(rows, len(sizes), generator=gen)
    mask = torch.rand(rows, len(sizes), generator=gen) < mask_prob
    return logits, targets, weight, mask, offsets


column_size = st.one_of(st.just(1), st.just(2), st.integers(1, 60), st.integers(1000, 1500))


@settings(**SETTINGS)
@given(rows=st.integers(1, 12), sizes=st.lists(column_size, min_size=1, max_size=8),
       seed=st.integers(0, 2**31), mask_prob=st.sampled_from([0.0, 0.5, 1.0]),
       compute_grad=st.booleans(), noncontig=st.booleans())
def test_weighted_ce_matches_reference(rows, sizes, seed, mask_prob, compute_grad, noncontig):
    gen = torch.Generator().manual_seed(seed)
    logits, targets, weight, mask, offsets = _problem(gen, rows, sizes, mask_prob)
    loss_e, ce_e, dl_e = ref.weighted_ce(logits, targets, weight, mask, offsets, compute_grad)
    args = [maybe_strided(v, noncontig) for v in (logits, targets, weight, mask)]
    loss, ce, dl = cpu.weighted_ce(*args, offsets, compute_grad)
    assert (loss.dtype, ce.dtype, dl.dtype) == (loss_e.dtype, ce_e.dtype, dl_e.dtype)
    assert dl.shape == dl_e.shape
    torch.testing.assert_close(ce, ce_e, rtol=1e-5, atol=2e-5)
    assert bool((ce[~mask] == 0).all())
    loss_atol = 2e-5 * float(weight.sum(1).max()) + 1e-6
    torch.testing.assert_close(loss, loss_e, rtol=1e-5, atol=loss_atol)
    if compute_grad:
        torch.testing.assert_close(dl, dl_e, rtol=1e-5, atol=2e-6 * float(weight.max()) + 1e-12)
        # Unmasked segments are exactly zero.
        seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        assert bool((dl[~mask[:, seg]] == 0).all())
    else:
        assert dl.numel() == 0


def test_weighted_ce_extreme_logits_are_stable():
    """Huge-magnitude logits: the max subtraction keeps every value finite, like the reference."""
    gen = torch.Generator().manual_seed(3)
    logits, targets, weight, mask, offsets = _problem(gen, 4, [3, 1, 700], 1.0)
    logits = logits * 1e4
    loss_e, ce_e, dl_e = ref.weighted_ce(logits, targets, weight, mask, offsets, True)
    loss, ce, dl = cpu.weighted_ce(logits, targets, weight, mask, offsets, True)
    assert bool(torch.isfinite(ce).all() and torch.isfinite(dl).all())
    torch.testing.assert_close(ce, ce_e, rtol=1e-5, atol=1e-2)  # ce ~ 1e5: a few ulps
    torch.testing.assert_close(dl, dl_e, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ rloo_grad
@pytest.mark.parametrize("per_row", [False, True])
@settings(**SETTINGS)
@given(rows=st.integers(1, 30), samples=st.sampled_from([2, 3, 5]), columns=st.integers(1, 20),
       seed=st.integers(0, 2**31), noncontig=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_rloo_grad_matches_reference(per_row, rows, samples, columns, seed, noncontig, scale):
    gen = torch.Generator().manual_seed(seed)
    f = scale * torch.randn(rows, samples, generator=gen)
    score = torch.randn(rows, samples, columns, generator=gen) * log_uniform_w(gen, columns, 1e-2, 1e2)
    f_in, score_in = maybe_strided(f, noncontig), maybe_strided(score, noncontig)
    got = cpu.rloo_grad(f_in, score_in, per_row)
    expected = ref.rloo_grad(f, score, per_row)
    assert got.dtype == expected.dtype == torch.float32
    assert got.shape == ((rows, columns) if per_row else (columns,))
    truth = ref.rloo_grad(f.double(), score.double(), per_row)
    f64 = f.double()
    baseline = (f64.sum(1, keepdim=True) - f64) / (samples - 1)
    terms = (f64 - baseline).abs()[:, :, None] * score.double().abs()
    size = (f64.abs() + baseline.abs())[:, :, None] * score.double().abs() if per_row else terms
    magnitude = size.mean(1 if per_row else (0, 1))
    assert bool(((got.double() - truth).abs() <= 1e-5 * magnitude + 1e-30).all())
    assert bool(((expected.double() - truth).abs() <= 1e-5 * magnitude + 1e-30).all())
    if per_row:
        reduced = cpu.rloo_grad(f_in, score_in)
        assert bool(((got.double().mean(0) - reduced).abs() <= 1e-5 * terms.mean((0, 1)) + 1e-30).all())


@pytest.mark.parametrize("per_row", [False, True])
def test_rloo_grad_is_deterministic_across_thread_counts(per_row):
    gen = torch.Generator().manual_seed(0)
    # Large enough (B K L >= 2^18) for the kernel to use its OpenMP team.
    f, score = torch.randn(8000, 2, generator=gen), torch.randn(8000, 2, 17, generator=gen)
    one, two = outputs_per_thread_count(lambda: cpu.rloo_grad(f, score, per_row))
    assert torch.equal(one, two)


# -------------------------------------------------------------------- seeded (u = None) path
def test_seeded_masking_is_deterministic_and_thread_independent():
    gen = torch.Generator().manual_seed(1)
    rows = 20200  # rows * L >= 2^18: the kernels use their OpenMP team when it has 2 threads
    x = torch.randint(0, 5, (rows, 13), generator=gen)
    w, log_t = log_uniform_w(gen, 13, 0.2, 5.0), log_times(gen, rows, "uniform")
    time_weight = time_weights(gen, rows)
    mask_id, n = torch.full((13,), 9), torch.randint(0, 13, (rows,), generator=gen)
    runs = outputs_per_thread_count(lambda: (cpu.mask_tspace(x, log_t, w, mask_id, time_weight, None, 123),
                                             cpu.mask_order(x, w, mask_id, None, n, 123)))
    for a, b in zip(runs[0], runs[1]):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)
    other_t = cpu.mask_tspace(x, log_t, w, mask_id, time_weight, None, 124)
    other_o = cpu.mask_order(x, w, mask_id, None, n, 124)
    assert not torch.equal(other_t[1], runs[0][0][1])
    assert not torch.equal(other_o[1], runs[0][1][1])
    # The seeded path equals the explicit-u path on the uniforms it documents.
    u = cpu.uniforms((rows, 13), 123)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    for a, b in zip(cpu.mask_order(x, w, mask_id, u, n, 0), runs[0][1]):
        assert torch.equal(a, b)
    # Large and negative seeds are accepted (taken modulo 2^64).
    cpu.mask_tspace(x, log_t, w, mask_id, time_weight, None, -5)
    cpu.mask_tspace(x, log_t, w, mask_id, time_weight, None, 2**62 + 17)


def test_seeded_mask_rate_matches_t_pow_w():
    """Per column, the number of masked rows is Binomial-like with mean sum_b t_b^w_l: within 5 sigma."""
    rows = 20000
    gen = torch.Generator().manual_seed(2)
    w = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0])
    log_t = log_times(gen, rows, "uniform")
    x = torch.zeros(rows, 5, dtype=torch.int64)
    _, mask, _, _ = cpu.mask_tspace(x, log_t, w, torch.ones(5, dtype=torch.int64), torch.ones(rows), None, 77)
    p = torch.exp(w.double()[None, :] * log_t.double()[:, None])
    mean, sd = p.sum(0), (p * (1 - p)).sum(0).sqrt()
    z = (mask.double().sum(0) - mean) / sd
    assert bool((z.abs() < 5).all()), z


def test_seeded_order_frequencies_match_plackett_luce():
    """L = 3, n_revealed = L - 1: the ranks give the whole order; its 6 frequencies within 5 sigma."""
    rows = 30000
    w = torch.tensor([0.5, 1.0, 2.5])
    x = torch.zeros(rows, 3, dtype=torch.int64)
    n = torch.full((rows,), 2)
    _, mask, _, score = cpu.mask_order(x, w, torch.ones(3, dtype=torch.int64), None, n, 2024)
    assert bool((mask.sum(1) == 1).all())
    # Recover ranks from the score: revealed columns have score 1/w - C_rank, so sort instead
    # by recomputing with explicit uniforms from the documented stream.
    u = cpu.uniforms((rows, 3), 2024)
    keys = -torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)) / w[None, :]
    order = torch.argsort(keys, dim=1, stable=True)
    hidden = mask.float().argmax(1)
    assert torch.equal(hidden, order[:, 2])  # the kernel's hidden column is the last in order
    codes = order[:, 0] * 3 + order[:, 1]
    for perm in itertools.permutations(range(3)):
        a, b, _ = perm
        prob = float(w[a] / w.sum() * w[b] / (w.sum() - w[a]))
        count = int((codes == a * 3 + b).sum())
        sigma = math.sqrt(rows * prob * (1 - prob))
        assert abs(count - rows * prob) < 5 * sigma, (perm, count, rows * prob)


# ---------------------------------------------------------------- public API and autograd
def _grads_through_api(backend, x, log_t, time_weight, w, mask_id, u, logits, offsets, n):
    with ops.use_backend(backend):
        w1 = w.clone().requires_grad_()
        lg = logits.clone().requires_grad_()
        mb = ops.mask_tspace(x, log_t, w1, mask_id, time_weight, u=u)
        mo = ops.mask_order(x, w1, mask_id, n, u=u)
        rows = ops.weighted_ce(lg, x, mb.weight, mb.mask, offsets)
        rows_o = ops.weighted_ce(lg, x, mo.weight, mo.mask, offsets)
        f = torch.stack([rows, rows_o], 1).detach()
        g = ops.rloo_grad(f, torch.stack([mb.score, mo.score], 1))
        (rows.sum() + 0.5 * rows_o.sum() + (g * w1).sum()).backward()
        return rows.detach(), rows_o.detach(), g, w1.grad, lg.grad


def test_public_api_gradients_match_reference_backend():
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 1, 40, 7, 250]
    rows, columns = 33, len(sizes)
    logits, targets, _, _, offsets = _problem(gen, rows, sizes, 0.5)
    w = log_uniform_w(gen, columns, 0.3, 3.0)
    log_t, time_weight = log_times(gen, rows, "uniform"), time_weights(gen, rows)
    u = torch.rand(rows, columns, generator=gen)
    mask_id = torch.tensor(sizes) - 1  # any id; targets are the tokens
    n = torch.randint(0, columns, (rows,), generator=gen)
    p = torch.exp(w.double()[None, :] * log_t.double()[:, None])
    u = torch.where((u.double() - p).abs() < 1e-3, (p + 2e-3).clamp(max=0.999).float(), u)  # no near ties
    args = (targets, log_t, time_weight, w, mask_id, u, logits, offsets, n)
    got = _grads_through_api("cpp", *args)
    expected = _grads_through_api("reference", *args)
    for name, a, b in zip(("loss_t", "loss_o", "g", "w.grad", "logits.grad"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def _opcheck_args():
    gen = torch.Generator().manual_seed(9)
    sizes = [3, 5, 2]
    logits, targets, weight, mask, offsets = _problem(gen, 6, sizes, 0.5)
    w = torch.tensor([0.5, 1.0, 2.0])
    log_t, time_weight = log_times(gen, 6, "mixed"), time_weights(gen, 6)
    u = torch.rand(6, 3, generator=gen)
    mask_id = torch.tensor(sizes)
    n = torch.randint(0, 3, (6,), generator=gen)
    f, score = torch.randn(6, 2, generator=gen), torch.randn(6, 2, 3, generator=gen)
    return {
        "mask_tspace": (targets, log_t, w.clone().requires_grad_(), mask_id, time_weight.requires_grad_(), u, 0),
        "mask_order": (targets, w.clone().requires_grad_(), mask_id, u, n, 0),
        "weighted_ce": (logits.clone().requires_grad_(), targets, weight.clone().requires_grad_(),
                        mask, offsets, True),
        "rloo_grad": (f, score),
        "rloo_grad per row": (f, score, True),
    }


@pytest.mark.parametrize("case", ["mask_tspace", "mask_order", "weighted_ce", "rloo_grad", "rloo_grad per row"])
def test_opcheck_with_cpp_backend(case):
    args, op = _opcheck_args()[case], case.split()[0]
    with ops.use_backend("cpp"):
        assert _dispatch.select(op, *[a for a in args if isinstance(a, torch.Tensor)]) is cpu
        torch.library.opcheck(getattr(torch.ops.fastmdm, op).default, args)


# ------------------------------------------------------------------------- cached attention
def _decode_step(generator, rows, heads, tokens, slots, width, strided_inputs):
    """A random KV-cached attention step: q, k, v (transposed views of [N, T, H, dh], as the
    model's projection gives them, when `strided_inputs`), caches, per-query positions with
    the edges 0 and S - 2, and per-row slots where the written tokens are distinct and the
    others go to the trash slot S - 1."""
    def states():
        t = torch.randn(rows, tokens, heads, width, generator=generator)
        return t.transpose(1, 2) if strided_inputs else t.transpose(1, 2).contiguous()
    q, k, v = states(), states(), states()
    keys, values = (torch.randn(rows, heads, slots, width, generator=generator) for _ in range(2))
    positions = torch.randint(0, slots - 1, (rows, tokens), generator=generator)
    positions[0, 0] = 0
    positions[-1, -1] = slots - 2
    written = torch.rand(rows, tokens, generator=generator) < 0.5
    distinct = torch.stack([torch.randperm(slots - 1, generator=generator)[:tokens] for _ in range(rows)])
    return q, k, v, keys, values, positions, torch.where(written, distinct, slots - 1)


@settings(**SETTINGS)
@given(rows=st.integers(1, 9), heads=st.integers(1, 4), tokens=st.integers(1, 4), extra_slots=st.integers(0, 14),
       width=st.sampled_from([1, 5, 12, 64]), seed=st.integers(0, 2**31 - 1), strided_inputs=st.booleans())
def test_cached_attention_matches_reference(rows, heads, tokens, extra_slots, width, seed, strided_inputs):
    generator = torch.Generator().manual_seed(seed)
    step = _decode_step(generator, rows, heads, tokens, tokens + 1 + extra_slots, width, strided_inputs)
    expected = ref.cached_attention(*[t.clone() for t in step])
    got = cpu.cached_attention(*[t.clone() for t in step])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for cache_got, cache_expected in zip(got[1:], expected[1:]):
        assert torch.equal(cache_got, cache_expected)


def test_cached_attention_writes_in_place_and_dispatches_to_cpp():
    generator = torch.Generator().manual_seed(0)
    q, k, v, keys, values, positions, slots = _decode_step(generator, 3, 2, 2, 9, 4, True)
    assert _dispatch.select("cached_attention", q, keys) is cpu
    with torch.no_grad():
        attended, new_keys, new_values = ops.cached_attention(q, k, v, keys, values, positions, slots)
    assert new_keys.data_ptr() == keys.data_ptr() and new_values.data_ptr() == values.data_ptr()
    # Non-contiguous caches are written as contiguous copies, which the op returns.
    strided_keys = strided(keys)
    _, copy, _ = cpu.cached_attention(q, k, v, strided_keys, values.clone(), positions, slots)
    assert copy.data_ptr() != strided_keys.data_ptr() and torch.equal(copy, keys)


def test_an_op_a_backend_lacks_runs_the_reference_even_when_forced(monkeypatch):
    """Triton has no cached_attention: forcing it must not break decoding on the GPU."""
    without_the_op = types.SimpleNamespace(supports=lambda op_name, *tensors: True, rloo_grad=ref.rloo_grad)
    monkeypatch.setitem(_dispatch._modules, "triton", without_the_op)
    q = torch.zeros(1, 1, 1, 1)
    with ops.use_backend("triton"):
        assert _dispatch.select("cached_attention", q) is ref
        assert _dispatch.select("rloo_grad", q) is without_the_op


def test_an_extension_built_without_an_op_leaves_it_to_the_reference(monkeypatch):
    monkeypatch.delattr(_C, "cached_attention")
    assert _dispatch.select("cached_attention", torch.zeros(1, 1, 1, 1)) is ref


def test_cached_attention_is_the_same_on_every_thread_count():
    # Enough rows (N H T S dh >= 2^18) for the kernel to use its OpenMP team.
    step = _decode_step(torch.Generator().manual_seed(1), 2048, 4, 1, 17, 12, True)
    one, two = outputs_per_thread_count(lambda: cpu.cached_attention(*[t.clone() for t in step]))
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_cached_attention_refuses_positions_and_slots_outside_the_cache():
    q, k, v, keys, values, positions, slots = _decode_step(torch.Generator().manual_seed(2), 2, 1, 1, 5, 3, False)
    with pytest.raises(ValueError, match=r"positions\[1\] = 4 is outside 0..3"):
        cpu.cached_attention(q, k, v, keys, values, torch.tensor([[0], [4]]), slots)
    with pytest.raises(ValueError, match=r"slots\[0\] = 5 is outside 0..4"):
        cpu.cached_attention(q, k, v, keys, values, positions, torch.tensor([[5], [0]]))


# ---------------------------------------------------------------------------------- errors
def test_extension_errors_are_clear():
    x = torch.zeros(2, 3, dtype=torch.int64)
    w = torch.ones(3)
    out = [torch.empty(2, 3, dtype=d).numpy() for d in (torch.int64, torch.bool, torch.float32, torch.float32)]
    with pytest.raises(ValueError, match="w has dtype float64, expected float32"):
        _C.mask_order(x.numpy(), w.double().numpy(), x[0].numpy(), None,
                      torch.zeros(2, dtype=torch.int64).numpy(), 0, *out)
    with pytest.raises(ValueError, match="n_revealed\\[1\\] = 3 is outside \\[0, 2\\]"):
        _C.mask_order(x.numpy(), w.numpy(), x[0].numpy(), None, torch.tensor([0, 3]).numpy(), 0, *out)
    with pytest.raises(ValueError, match="must be C-contiguous"):
        _C.rloo_grad(torch.zeros(3, 2).t().numpy(), torch.zeros(2, 3, 1).numpy(), torch.zeros(1).numpy())
    with pytest.raises(ValueError, match="K >= 2"):
        _C.rloo_grad(torch.zeros(2, 1).numpy(), torch.zeros(2, 1, 4).numpy(), torch.zeros(4).numpy())
    with pytest.raises(ValueError, match="g has 4 elements, expected 8"):
        _C.rloo_grad(torch.zeros(2, 2).numpy(), torch.zeros(2, 2, 4).numpy(), torch.zeros(4).numpy(), True)
    logits, targets, weight, mask, offsets = _problem(torch.Generator().manual_seed(0), 3, [2, 4], 1.0)
    targets[1, 0] = 2
    with pytest.raises(ValueError, match=r"targets\[1, 0\] = 2 is out of range for its column \(size 2\)"):
        cpu.weighted_ce(logits, targets, weight, mask, offsets, True)
    with ops.use_backend("cpp"), pytest.raises(ValueError, match="out of range"):
        ops.weighted_ce(logits, targets, weight, mask, offsets, validate=False)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        cpu.weighted_ce(logits, targets.clamp(max=1), weight, mask, offsets + 1, False)
