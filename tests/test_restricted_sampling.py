"""Token restrictions in the fused sampler (`ops.ragged_head_sample(..., log_weights=,
restriction=)`, `RaggedHeads.sample`): every backend against the reference and a dense
computation, the drawn distribution, determinism, errors.

Tolerances. A backend's logits differ from the reference's by a few float32 ulp of the
d-term dot product (< 1e-6 here, see tests/test_ragged_head.py). log_mass = lse(x/T + lw)
- lse(x/T) moves by at most sum_k |q_k - p_k| / T <= 2 / T times the largest logit error
(p the tempered softmax, q its reweighted version), and each logsumexp adds float32
rounding of its sum (relative 1e-7 a term, a few hundred terms in the widest column here).
Against a dense float64 computation log_mass must agree to atol 5e-5 + rtol 1e-5: ten
times those bounds at T = 0.5. Which cells are -inf (nothing allowed) and which are 0
(unrestricted) must agree exactly. Values at temperature 0 are the argmax over allowed values
and must equal the reference's (continuous random logits: no ties); at T > 0 each backend
draws its own noise, so draws are checked for support (never a forbidden value, 0 when
nothing is allowed) and, on many draws, for their distribution by chi-square.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastmdm import ops
from fastmdm.models.base import RaggedHeads
from fastmdm.ops import reference

from test_ragged_head import TRITON_DEVICE, cpp, offsets_of, one_torch_thread, triton_backend  # noqa: F401 (fixture)

NEG_INF = float("-inf")


def backends():
    available = ["reference"]
    if cpp is not None:
        available.append("cpp")
    if triton_backend is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        available.append("triton")
    return available


def restricted_problem(cells: int, sizes: list[int], d: int, patterns: int, *, seed: int):
    """(h, columns, head_weight, head_bias, offsets, log_weights, restriction): log weights a
    mix of -inf (forbidden), 0 (kept) and log of a share in (0, 1) (a partly allowed bin);
    pattern 0 forbids all of column 0 and of every one-value column, and about a quarter of
    the cells are unrestricted."""
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_of(sizes)
    vocab = sum(sizes)
    h = torch.randn(cells, d, generator=gen)
    head_weight = torch.randn(vocab, d, generator=gen) / math.sqrt(d)
    head_bias = 3 * (2 * torch.rand(vocab, generator=gen) - 1)
    columns = torch.randint(0, len(sizes), (cells,), generator=gen)
    kind = torch.rand(patterns, vocab, generator=gen)
    share = torch.rand(patterns, vocab, generator=gen).clamp(min=1e-3).log()
    log_weights = torch.where(kind < 0.3, NEG_INF, torch.where(kind < 0.7, 0.0, share))
    bounds = offsets.tolist()
    for column, size in enumerate(sizes):
        if column == 0 or size == 1:
            log_weights[0, bounds[column]:bounds[column + 1]] = NEG_INF
    restriction = torch.randint(-1, patterns, (cells,), generator=gen)
    restriction[torch.rand(cells, generator=gen) < 0.25] = -1
    return h, columns, head_weight, head_bias, offsets, log_weights, restriction


def dense_log_mass(h, columns, head_weight, head_bias, offsets, log_weights, restriction, temperature):
    """log sum_k p_k exp(lw_k) per cell from explicit float64 logits (0 / -inf at temperature 0)."""
    bounds = offsets.tolist()
    out = torch.zeros(h.shape[0], dtype=torch.float64)
    for m, (column, row) in enumerate(zip(columns.tolist(), restriction.tolist())):
        if row < 0:
            continue
        lo, hi = bounds[column], bounds[column + 1]
        lw = log_weights[row, lo:hi].double()
        if temperature == 0:
            out[m] = 0.0 if bool((lw > NEG_INF).any()) else NEG_INF
            continue
        logits = (head_weight[lo:hi].double() @ h[m].double() + head_bias[lo:hi].double()) / temperature
        out[m] = torch.logsumexp(logits + lw, 0) - torch.logsumexp(logits, 0)
    return out


def allowed(columns, offsets, log_weights, restriction, values):
    """Whether each cell's value has a log weight > -inf (True for unrestricted cells; False
    for the value 0 of a cell whose pattern forbids its whole column)."""
    index = (offsets[columns] + values).clamp(max=log_weights.shape[1] - 1)
    lw = log_weights[restriction.clamp(min=0), index]
    return (restriction < 0) | (lw > NEG_INF)


def run(backend, h, columns, head_weight, head_bias, offsets, temperature, seed, log_weights=None,
        restriction=None):
    """The public op with one backend forced; outputs back on the CPU."""
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    with ops.use_backend(backend):
        out = ops.ragged_head_sample(move(h), move(columns), move(head_weight), move(head_bias), move(offsets),
                                     temperature, seed, log_weights=move(log_weights),
                                     restriction=move(restriction))
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def assert_log_mass_close(got, want):
    """See the module docstring: exact -inf and 0 pattern, else atol 5e-5 + rtol 1e-5."""
    assert got.shape == want.shape
    assert torch.equal(got == NEG_INF, want == NEG_INF)
    finite = want > NEG_INF
    assert bool((got[finite] <= 1e-6).all())        # a share of the probability: log <= 0
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=5e-5)


# ------------------------------------------------------------------- backends against the reference
# (cells, column sizes, d, patterns): one pattern; one-value columns; columns over several chunks
# of every backend (Triton's chunks are at most 128 values, C++ tiles of a 3000-value column
# hold 32 cells); a single cell.
PROBLEMS = [(40, [5, 3, 7], 8, 1), (60, [4, 1, 9, 1, 2], 5, 3), (50, [3, 3000, 300], 16, 4), (1, [6, 2], 3, 2)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", PROBLEMS)
def test_backend_matches_the_reference_and_the_dense_log_mass(backend, temperature, shape):
    problem = restricted_problem(*shape, seed=sum(shape[2:]) + len(shape[1]))
    h, columns, head_weight, head_bias, offsets, log_weights, restriction = problem
    values, log_mass = run(backend, *problem[:5], temperature, 3, log_weights, restriction)
    assert values.dtype == torch.int64 and log_mass.dtype == torch.float32
    assert_log_mass_close(log_mass, dense_log_mass(*problem, temperature))
    assert bool((log_mass[restriction < 0] == 0).all())
    sizes = (offsets[1:] - offsets[:-1])[columns]
    assert bool(((values >= 0) & (values < sizes)).all())
    possible = log_mass > NEG_INF
    assert bool(allowed(columns, offsets, log_weights, restriction, values)[possible].all())
    assert bool((values[~possible] == 0).all())
    if temperature == 0:
        want, _ = reference.ragged_head_sample(*problem[:5], 0.0, 3, log_weights, restriction)
        assert torch.equal(values, want)


@pytest.mark.parametrize("backend", backends())
def test_a_pattern_that_keeps_everything_draws_what_an_unrestricted_call_draws(backend):
    """All-zero log weights add nothing to the Gumbel scores: the same noise, the same value,
    and a log mass of exactly 0; the same for restriction -1 everywhere."""
    h, columns, head_weight, head_bias, offsets, _, _ = restricted_problem(80, [4, 200, 1, 9], 6, 1, seed=5)
    for temperature in (0.0, 0.5):
        plain = run(backend, h, columns, head_weight, head_bias, offsets, temperature, 17)
        for log_weights, restriction in ((torch.zeros(1, 214), torch.zeros(80, dtype=torch.int64)),
                                         (torch.full((2, 214), NEG_INF), torch.full((80,), -1))):
            values, log_mass = run(backend, h, columns, head_weight, head_bias, offsets, temperature, 17,
                                   log_weights, restriction)
            assert torch.equal(values, plain)
            assert bool((log_mass == 0).all())


@pytest.mark.parametrize("backend", backends())
def test_no_cells(backend):
    h, columns, head_weight, head_bias, offsets, log_weights, _ = restricted_problem(3, [2, 3], 4, 2, seed=1)
    values, log_mass = run(backend, h[:0], columns[:0], head_weight, head_bias, offsets, 1.0, 0, log_weights,
                           torch.zeros(0, dtype=torch.int64))
    assert values.shape == log_mass.shape == (0,) and values.dtype == torch.int64


def test_float64_states_give_a_float64_log_mass():
    problem = restricted_problem(30, [4, 60], 5, 2, seed=2)
    h, columns, head_weight, head_bias, offsets, log_weights, restriction = problem
    values, log_mass = ops.ragged_head_sample(h.double(), columns, head_weight.double(), head_bias.double(),
                                              offsets, 0.5, 4, log_weights=log_weights, restriction=restriction)
    assert log_mass.dtype == torch.float64
    want = dense_log_mass(*problem, 0.5)
    assert torch.equal(log_mass == NEG_INF, want == NEG_INF)
    torch.testing.assert_close(log_mass[want > NEG_INF], want[want > NEG_INF], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("triton" not in backends(), reason="triton missing, or no GPU and TRITON_INTERPRET is not 1")
@pytest.mark.parametrize("d", [16, 20, 48, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_restricted_tiles(d, dtype):
    """The restricted sampler's tile at several width classes, in float32 and bfloat16 (products
    accumulated in fp32 on both sides, so the reference on the same rounded inputs is held to
    the float32 tolerances): more cells than a tile, a column wider than two chunks."""
    tile = triton_backend.ragged_head_config(d, dtype, "restricted")
    problem = list(restricted_problem(tile.block_m + 3, [1, 2 * tile.block_k + 5, 3], d, 3, seed=d))
    problem[1][: tile.block_m] = 1          # most cells in the wide column: a full tile of it
    for i in (0, 2, 3):
        problem[i] = problem[i].to(dtype)
    for temperature in (0.0, 0.5):
        values, log_mass = run("triton", *problem[:5], temperature, 8, *problem[5:])
        want_values, want_mass = reference.ragged_head_sample(*problem[:5], temperature, 8, *problem[5:])
        if temperature == 0:
            assert torch.equal(values, want_values)
        assert_log_mass_close(log_mass, want_mass.double())


# ------------------------------------------------------------------------------- distribution
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_restricted_draws_follow_the_reweighted_softmax(backend, temperature):
    """Many cells with one state in a 7-value column under a pattern that forbids two values,
    keeps three and keeps a quarter and a tenth of two others (bins cut by a range). Value counts
    against p exp(lw) normalised: chi-square with 4 degrees of freedom below 23.5 (its 0.9999
    quantile). Power: the same counts against the softmax merely cut to the allowed values
    (the shares ignored) give a statistic above 23.5, so the test can tell them apart."""
    draws = 4000 if backend == "triton" else 20000
    offsets = offsets_of([7, 2])
    head_weight = torch.tensor([[1.0], [0.5], [0.0], [-0.5], [0.8], [0.3], [0.2], [1.0], [0.0]])
    head_bias = torch.zeros(9)
    log_weights = torch.tensor([[0.0, NEG_INF, math.log(0.25), 0.0, NEG_INF, math.log(0.1), 0.0, 0.0, 0.0]])
    h = torch.ones(draws + 10, 1)
    columns = torch.cat([torch.zeros(draws, dtype=torch.int64), torch.ones(10, dtype=torch.int64)])
    restriction = torch.cat([torch.zeros(draws, dtype=torch.int64), torch.full((10,), -1)])
    values, log_mass = run(backend, h, columns, head_weight, head_bias, offsets, temperature, 23, log_weights,
                           restriction)
    p = torch.softmax(head_weight[:7, 0].double() / temperature, 0)
    lw = log_weights[0, :7].double()
    mass = float((p * lw.exp()).sum())
    torch.testing.assert_close(log_mass[:draws], torch.full((draws,), math.log(mass), dtype=torch.float32),
                               rtol=0, atol=1e-6)
    assert bool((log_mass[draws:] == 0).all())
    counts = torch.bincount(values[:draws], minlength=7).double()
    keep = lw > NEG_INF
    assert bool((counts[~keep] == 0).all())
    target = p * lw.exp() / mass
    assert chi_square(counts[keep], target[keep]) < 23.5, (counts, draws * target)
    cut = torch.where(keep, p, 0.0)
    cut = cut / cut.sum()
    assert chi_square(counts[keep], cut[keep]) > 23.5


@pytest.mark.parametrize("backend", backends())
def test_draws_are_deterministic_for_a_seed(backend):
    problem = restricted_problem(60, [30, 3, 200], 6, 3, seed=12)
    first = run(backend, *problem[:5], 1.0, 99, *problem[5:])
    again = run(backend, *problem[:5], 1.0, 99, *problem[5:])
    other = run(backend, *problem[:5], 1.0, 100, *problem[5:])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[1], other[1])          # the mass does not depend on the noise


def test_ragged_heads_sample_passes_restrictions_through():
    sizes = [4, 1, 30]
    heads = RaggedHeads(offsets_of(sizes), 8)
    h = torch.randn(40, 8)
    columns = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    log_weights = torch.zeros(2, 35)
    log_weights[0, :2] = NEG_INF
    log_weights[0, 4] = NEG_INF        # all of the one-value column
    log_weights[1, 5:20] = math.log(0.5)
    restriction = torch.randint(-1, 2, (40,), generator=torch.Generator().manual_seed(1))
    a = heads.sample(h, columns, 1.0, torch.Generator().manual_seed(3), log_weights=log_weights,
                     restriction=restriction)
    b = heads.sample(h, columns, 1.0, torch.Generator().manual_seed(3), log_weights=log_weights,
                     restriction=restriction)
    assert isinstance(a, tuple) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    possible = a[1] > NEG_INF
    assert bool(allowed(columns, heads.offsets, log_weights, restriction, a[0])[possible].all())
    assert bool((a[0][~possible] == 0).all()) and bool((~possible).any())
    assert isinstance(heads.sample(h, columns, 1.0), torch.Tensor)


# ------------------------------------------------------------------------------------ errors
def test_errors_are_clear():
    h, columns, head_weight, head_bias, offsets, log_weights, restriction = restricted_problem(5, [2, 3], 4, 2, seed=0)
    call = lambda **kw: ops.ragged_head_sample(h, columns, head_weight, head_bias, offsets, 1.0, 0, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="pass both or neither"):
        call(log_weights=log_weights)
    with pytest.raises(ValueError, match="pass both or neither"):
        call(restriction=restriction)
    with pytest.raises(TypeError, match="log_weights must have dtype in \\(float32\\)"):
        call(log_weights=log_weights.double(), restriction=restriction)
    with pytest.raises(TypeError, match="restriction must have dtype in \\(int64\\)"):
        call(log_weights=log_weights, restriction=restriction.int())
    with pytest.raises(ValueError, match="log_weights must have 2 dimension"):
        call(log_weights=log_weights[0], restriction=restriction)
    with pytest.raises(ValueError, match="log_weights must have V = 5 columns"):
        call(log_weights=log_weights[:, :4], restriction=restriction)
    with pytest.raises(ValueError, match="restriction has 4 entries for 5 cells"):
        call(log_weights=log_weights, restriction=restriction[:4])
    for bad in (2, -2):
        out_of_range = restriction.clone()
        out_of_range[3] = bad
        with pytest.raises(ValueError, match="restriction must lie in -1..1"):
            call(log_weights=log_weights, restriction=out_of_range)
    for bad in (float("nan"), float("inf")):
        table = log_weights.clone()
        table[1, 2] = bad
        with pytest.raises(ValueError, match="log_weights must not hold NaN or \\+inf"):
            call(log_weights=table, restriction=restriction)
    with pytest.raises(ValueError, match="same device"):
        call(log_weights=log_weights.to("meta"), restriction=restriction)


@pytest.mark.skipif(cpp is None, reason="fastmdm._C is not built")
def test_cpp_errors_are_clear():
    """The extension checks what it reads even when the op's validation is skipped."""
    h, columns, head_weight, head_bias, offsets, log_weights, restriction = restricted_problem(5, [2, 3], 4, 2, seed=0)
    args = (h, columns, head_weight, head_bias, offsets, 1.0, 0)
    bad = restriction.clone()
    bad[2] = 7
    with pytest.raises(ValueError, match=r"restriction\[2\] = 7 is outside -1..1"):
        cpp.ragged_head_sample(*args, log_weights, bad)
    with pytest.raises(ValueError, match=r"log_weights must be \[C, V = 5\]"):
        cpp.ragged_head_sample(*args, log_weights[:, :3], restriction)
