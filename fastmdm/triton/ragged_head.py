"""Ragged output heads fused with the weighted cross entropy, and the Gumbel-max sampler.

The selected cells (masked ones for the loss, requested ones for sampling) are sorted by
column and cut into tiles of BLOCK_M cells of one column; one program takes one tile. It
holds the tile's states [BLOCK_M, d] and walks its column's vocabulary in BLOCK_K chunks:
logits = states @ W_chunk^T + b on tensor cores (fp32 accumulation, bf16 or fp32 inputs),
an online logsumexp (or a running Gumbel max), never more than one [BLOCK_M, BLOCK_K] chunk
of logits. A restricted draw reads each cell's row of the [C, V] log-weight table chunk by
chunk alongside and keeps two more online logsumexps for the mass the row lets through.
With gradients, a second walk forms G = weight * (softmax - onehot) per chunk and
accumulates grad_h = G W in registers and grad_W += G^T states, grad_b += sum G with fp32
atomics (tiles of one column add into the same rows, so their order is not fixed).

States are read with unit feature stride (the ops copy h when its features are not
contiguous). Triton compiles a variant per specialization of the launch arguments (integers
equal to 1 or divisible by 16, 16-byte aligned pointers); the kernels opt out for the
arguments whose specialization cannot change their code (strides of the states, counts,
seeds, pointers read at data-dependent offsets), and the ops pass W with its data 16-byte
aligned, which leaves d (a multiple of 16 or not, or 1, a constant): each tile of
`ragged_head_config` compiles to one variant (two for d <= 16), all checked ahead of time.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import Launch

#: Widest state the kernels keep in registers; wider models go to the reference.
MAX_HEAD_WIDTH = 256
_TINY = torch.finfo(torch.float32).tiny


class RaggedHeadTile(NamedTuple):
    """One program's share: BLOCK_M cells of one column, BLOCK_K vocabulary values a chunk,
    states padded to BLOCK_D features; and its launch options."""
    block_m: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


#: The kernels a tile is chosen for: the loss alone, the loss with its gradients, the sampler,
#: the sampler under token restrictions.
MODES = ("loss", "grad", "sample", "restricted")
_BLOCK_DS = (16, 32, 64, 128, 256)

#: (BLOCK_M, BLOCK_K, num_warps, num_stages) by (mode, dtype, BLOCK_D, d % 16 == 0), found by
#: benchmarks/ragged_head_tiles.py (see ragged_head_config; tests/test_triton_compile.py checks
#: that this table is what it found).
_TILES: dict[tuple[str, torch.dtype, int, bool], tuple[int, int, int, int]] = {
    (mode, dtype, block_d, multiple_of_16): tile
    for (mode, dtype, multiple_of_16), tiles in {
        # BLOCK_D:                    16                32                64                128               256
        ("loss", torch.float32, True): ((128, 64, 8, 3), (128, 64, 8, 3), (128, 16, 8, 3), (32, 64, 16, 3), (32, 64, 16, 2)),
        ("loss", torch.float32, False): ((128, 64, 8, 3), (128, 32, 4, 3), (128, 16, 8, 3), (32, 64, 16, 3), (32, 64, 16, 2)),
        ("loss", torch.bfloat16, True): ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 128, 16, 1)),
        ("loss", torch.bfloat16, False): ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3)),
        ("grad", torch.float32, True): ((128, 32, 8, 3), (128, 32, 8, 3), (128, 16, 16, 3), (64, 16, 16, 3), (32, 16, 16, 3)),
        ("grad", torch.float32, False): ((128, 32, 8, 3), (64, 32, 8, 3), (64, 16, 16, 3), (32, 16, 8, 3), (16, 16, 16, 3)),
        ("grad", torch.bfloat16, True): ((128, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (64, 16, 8, 2)),
        ("grad", torch.bfloat16, False): ((128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3), (32, 16, 8, 3)),
        ("sample", torch.float32, True): ((128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2)),
        ("sample", torch.float32, False): ((64, 128, 8, 3), (128, 32, 8, 3), (128, 32, 8, 3), (128, 32, 16, 3), (64, 32, 16, 2)),
        ("sample", torch.bfloat16, True): ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2)),
        ("sample", torch.bfloat16, False): ((128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3)),
    }.items()
    for block_d, tile in zip(_BLOCK_DS, tiles)
}


def ragged_head_config(d_model: int, dtype: torch.dtype = torch.float32, mode: str = "loss") -> RaggedHeadTile:
    """The tile for states of width d_model <= MAX_HEAD_WIDTH in `dtype` (float32 or bfloat16),
    for one of MODES.

    BLOCK_D is d_model rounded up to a power of two (at least 16, tl.dot's minimum). A program
    keeps its states, one chunk of W and of logits (with gradients also grad_h and the chunk's
    grad_W) in registers, so the tile that fits shrinks as d grows, with gradients, in float32
    (full-precision products run on FMA units, each thread holding whole rows of the operands,
    not on tensor cores) and for widths that are not multiples of 16 (W's rows are then not
    16-byte aligned and its loads go element by element). Each tile is the largest (cells x
    values a chunk, then the most cells, then the fewest warps) that compiles for sm_80 and
    sm_90 with no spills and at most 99 KiB of shared memory, found by compiling candidates:
    benchmarks/ragged_head_tiles.py, whose results (benchmarks/results/ragged_head_tiles.md)
    give each tile's registers and the larger tiles that lost. The restricted sampler's tile
    is derived from the sampler's (see below).
    """
    if not 1 <= d_model <= MAX_HEAD_WIDTH:
        raise ValueError(f"d_model must lie in 1..{MAX_HEAD_WIDTH}, got {d_model}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    if mode == "restricted":
        # A restricted draw also holds a chunk of log weights (with its 64-bit addresses) and two
        # more running logsumexps. The sampler's tile spills with them at every width class, and
        # so do half its cells, or half its cells and half its chunk at some; half its cells and
        # a quarter of its chunk compile without spills (benchmarks/triton_resources.py).
        tile = ragged_head_config(d_model, dtype, "sample")
        return tile._replace(block_m=max(16, tile.block_m // 2), block_k=max(16, tile.block_k // 4))
    block_d = max(16, triton.next_power_of_2(d_model))
    block_m, block_k, num_warps, num_stages = _TILES[mode, dtype, block_d, d_model % 16 == 0]
    return RaggedHeadTile(block_m, block_k, block_d, num_warps, num_stages)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST multiplies the (already rounded) operands in fp32:
    the same products as bf16 tensor cores, for Triton's interpreter, whose bf16 dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_states(h_ptr, stride_cell, cells, ok, d, BLOCK_D: tl.constexpr):
    """The tile's states [BLOCK_M, BLOCK_D] (zeros past d and for padding cells)."""
    feature = tl.arange(0, BLOCK_D)
    return tl.load(h_ptr + cells[:, None] * stride_cell + feature[None, :],
                   mask=ok[:, None] & (feature < d)[None, :], other=0.0)


@triton.jit
def _logits_chunk(states, w_ptr, b_ptr, start, k, size, d, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Logits [BLOCK_M, BLOCK_K] of values k of the column starting at row `start` (fp32, -inf
    past the column), and the weight chunk [BLOCK_K, BLOCK_D] they were computed from."""
    feature = tl.arange(0, BLOCK_D)
    in_column = k < size
    w = tl.load(w_ptr + (start + k)[:, None] * d + feature[None, :],
                mask=in_column[:, None] & (feature < d)[None, :], other=0.0)
    bias = tl.load(b_ptr + start + k, mask=in_column, other=0.0).to(tl.float32)
    logits = _dot(states, tl.trans(w), PRECISION, UPCAST) + bias[None, :]
    return tl.where(in_column[None, :], logits, float("-inf")), w


@triton.jit
def _tile(tile_column_ptr, tile_start_ptr, tile_stop_ptr, cells_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """This program's column, its first vocabulary row and size, its cells and which are real."""
    tile = tl.program_id(0)
    column = tl.load(tile_column_ptr + tile)
    index = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    ok = index < tl.load(tile_stop_ptr + tile)
    cells = tl.load(cells_ptr + index, mask=ok, other=0)
    start = tl.load(offsets_ptr + column)
    size = tl.load(offsets_ptr + column + 1) - start
    return column, start, size, cells, ok


@triton.jit(do_not_specialize=["stride_row", "stride_column", "L"],
            do_not_specialize_on_alignment=["h_ptr", "b_ptr", "offsets_ptr", "targets_ptr", "weight_ptr"])
def _ragged_head_ce_kernel(h_ptr, stride_row, stride_column, w_ptr, b_ptr,
                           offsets_ptr, rows_ptr, tile_column_ptr, tile_start_ptr, tile_stop_ptr,
                           targets_ptr, weight_ptr, ce_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr,
                           L, d, COMPUTE_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    column, start, size, rows, ok = _tile(tile_column_ptr, tile_start_ptr, tile_stop_ptr, rows_ptr,
                                          offsets_ptr, BLOCK_M)
    states = _load_states(h_ptr + column * stride_column, stride_row, rows, ok, d, BLOCK_D)
    cell = rows * L + column
    target = tl.load(targets_ptr + cell, mask=ok, other=0)
    within = tl.arange(0, BLOCK_K)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, size, BLOCK_K):
        k = k0 + within
        logits, w = _logits_chunk(states, w_ptr, b_ptr, start, k, size, d, BLOCK_D, PRECISION, UPCAST)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))   # finite: every chunk has a value
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(k[None, :] == target[:, None], logits, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    tl.store(ce_ptr + cell, lse - target_logit, mask=ok)

    if COMPUTE_GRAD:
        weight = tl.load(weight_ptr + cell, mask=ok, other=0.0)
        feature = tl.arange(0, BLOCK_D)
        grad_h = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for k0 in range(0, size, BLOCK_K):
            k = k0 + within
            logits, w = _logits_chunk(states, w_ptr, b_ptr, start, k, size, d, BLOCK_D, PRECISION, UPCAST)
            onehot = tl.where(k[None, :] == target[:, None], 1.0, 0.0)
            g = weight[:, None] * (tl.exp(logits - lse[:, None]) - onehot)   # 0 past the column
            g_in = g.to(w.dtype)
            grad_h += _dot(g_in, w, PRECISION, UPCAST)
            in_column = k < size
            tl.atomic_add(grad_w_ptr + (start + k)[:, None] * d + feature[None, :],
                          _dot(tl.trans(g_in), states, PRECISION, UPCAST),
                          mask=in_column[:, None] & (feature < d)[None, :], sem="relaxed")
            tl.atomic_add(grad_b_ptr + start + k, tl.sum(g, axis=0), mask=in_column, sem="relaxed")
        tl.store(grad_h_ptr + cell[:, None] * d + feature[None, :], grad_h,
                 mask=ok[:, None] & (feature < d)[None, :])


@triton.jit
def _logsumexp_update(running_max, running_sum, scores):
    """Online logsumexp over chunks of scores [BLOCK_M, BLOCK_K] that may be all -inf for a
    row: such a row keeps max -inf and sum 0 (a plain update would give NaN)."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(scores - shift[:, None]), axis=1)
    return new_max, running_sum


@triton.jit(do_not_specialize=["stride_cell", "V", "seed"],
            do_not_specialize_on_alignment=["h_ptr", "b_ptr", "offsets_ptr", "log_weights_ptr", "restriction_ptr"])
def _ragged_head_sample_kernel(h_ptr, stride_cell, w_ptr, b_ptr, offsets_ptr,
                               cells_ptr, tile_column_ptr, tile_start_ptr, tile_stop_ptr, out_ptr,
                               log_weights_ptr, restriction_ptr, log_mass_ptr,
                               inv_temperature, seed, tiny, V, d, GREEDY: tl.constexpr,
                               RESTRICTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    column, start, size, cells, ok = _tile(tile_column_ptr, tile_start_ptr, tile_stop_ptr, cells_ptr,
                                           offsets_ptr, BLOCK_M)
    states = _load_states(h_ptr, stride_cell, cells, ok, d, BLOCK_D)
    within = tl.arange(0, BLOCK_K)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_M], tl.int64)
    if RESTRICTED:
        row = tl.load(restriction_ptr + cells, mask=ok, other=-1)
        restricted = row >= 0
        # Online logsumexps of logits / T over all values (_f) and with the log weights (_r).
        max_f = tl.full([BLOCK_M], float("-inf"), tl.float32)
        sum_f = tl.zeros([BLOCK_M], tl.float32)
        max_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
        sum_r = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, size, BLOCK_K):
        k = k0 + within
        logits, w = _logits_chunk(states, w_ptr, b_ptr, start, k, size, d, BLOCK_D, PRECISION, UPCAST)
        if not GREEDY:
            logits = logits * inv_temperature
        if RESTRICTED:
            # 0 for unrestricted cells; -inf past the column comes from the logits.
            lw = tl.load(log_weights_ptr + row[:, None] * V + (start + k)[None, :],
                         mask=restricted[:, None] & (k < size)[None, :], other=0.0)
            if GREEDY:
                logits = tl.where(lw == float("-inf"), float("-inf"), logits)
            else:
                max_f, sum_f = _logsumexp_update(max_f, sum_f, logits)
                logits = logits + lw
                max_r, sum_r = _logsumexp_update(max_r, sum_r, logits)
        if not GREEDY:
            # Philox counter per (cell, vocabulary row): the same draw for any tiling.
            u = tl.rand(seed, cells[:, None] * V + (start + k)[None, :])
            logits = logits - tl.log(-tl.log(tl.maximum(u, tiny)))
        chunk_best = tl.max(logits, axis=1)
        chunk_index = tl.argmax(logits, axis=1).to(tl.int64)
        better = chunk_best > best
        best_index = tl.where(better, k0 + chunk_index, best_index)
        best = tl.where(better, chunk_best, best)
    tl.store(out_ptr + cells, best_index, mask=ok)
    if RESTRICTED:
        # Every value forbidden: best stays -inf (logits are finite), value 0, mass -inf.
        if GREEDY:
            log_mass = tl.where(best == float("-inf"), float("-inf"), 0.0)
        else:
            # (max_r - max_f) + log(sum_r / sum_f): a mass near 1 stays accurate to rounding.
            none_allowed = max_r == float("-inf")
            log_mass = tl.where(none_allowed, float("-inf"),
                                (max_r - max_f) + tl.log(tl.where(none_allowed, 1.0, sum_r / sum_f)))
        tl.store(log_mass_ptr + cells, tl.where(restricted, log_mass, 0.0), mask=ok)


def _tiles(sorted_columns: torch.Tensor, num_columns: int, block_m: int):
    """Tiles of at most block_m consecutive cells of one column, for cells sorted by column:
    (column, first cell, end) per tile, int64 on the cells' device."""
    device = sorted_columns.device
    counts = torch.bincount(sorted_columns, minlength=num_columns)
    column_start = counts.cumsum(0) - counts
    tiles_per_column = (counts + block_m - 1) // block_m
    tile_column = torch.repeat_interleave(torch.arange(num_columns, device=device), tiles_per_column)
    first_tile = tiles_per_column.cumsum(0) - tiles_per_column
    rank = torch.arange(tile_column.numel(), device=device) - first_tile[tile_column]
    tile_start = column_start[tile_column] + rank * block_m
    tile_stop = torch.minimum(tile_start + block_m, (column_start + counts)[tile_column])
    return tile_column, tile_start, tile_stop


def _dot_options(tensor: torch.Tensor) -> dict:
    """float32 inputs keep full float32 products, as torch's matmul does by default (no TF32);
    on CPU tensors (the interpreter) products are formed in float32, see `_dot`."""
    return dict(PRECISION="ieee" if tensor.dtype == torch.float32 else "tf32",
                UPCAST=tensor.device.type == "cpu")


def _unit_feature_stride(h: torch.Tensor) -> torch.Tensor:
    return h if h.stride(-1) == 1 else h.contiguous()


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous, with its data on a 16-byte boundary (a view may start off one; a fresh
    allocation never does): the alignment the tiles were chosen for."""
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def _loss_mode(compute_grad: bool) -> str:
    return "grad" if compute_grad else "loss"


def _sample_mode(restriction) -> str:
    return "sample" if restriction is None else "restricted"


def plan_ragged_head_ce(h, head_weight, head_bias, offsets, cell_rows, tiles, targets, weight32, compute_grad):
    """Outputs (ce, grad_h, grad_W, grad_b) and the launch over `tiles` (see `_tiles`)."""
    rows, num_columns, d = h.shape
    h, head_weight, head_bias = _unit_feature_stride(h), _aligned(head_weight), head_bias.contiguous()
    tile = ragged_head_config(d, h.dtype, _loss_mode(compute_grad))
    ce = torch.zeros(rows, num_columns, dtype=torch.float32, device=h.device)
    grads = [torch.zeros(t.shape if compute_grad else (0,), dtype=torch.float32, device=h.device)
             for t in (h, head_weight, head_bias)]
    launch = Launch(_ragged_head_ce_kernel, (tiles[0].numel(),), (
        h, h.stride(0), h.stride(1), head_weight, head_bias, offsets.contiguous(),
        cell_rows.contiguous(), *tiles, targets.contiguous(), weight32, ce,
        *(g if compute_grad else ce for g in grads), num_columns, d),
        dict(COMPUTE_GRAD=compute_grad, **_dot_options(h), BLOCK_M=tile.block_m, BLOCK_K=tile.block_k,
             BLOCK_D=tile.block_d),
        tile.num_warps, tile.num_stages)
    return (ce, *grads), launch


def ragged_head_ce(h, head_weight, head_bias, offsets, targets, weight, mask, compute_grad):
    cell_columns, cell_rows = mask.t().nonzero(as_tuple=True)      # sorted by column, then row
    tile = ragged_head_config(h.shape[2], h.dtype, _loss_mode(compute_grad))
    tiles = _tiles(cell_columns, h.shape[1], tile.block_m)
    weight32 = weight.to(torch.float32).contiguous()
    (ce, *grads), launch = plan_ragged_head_ce(h, head_weight, head_bias, offsets, cell_rows, tiles, targets,
                                               weight32, compute_grad)
    if tiles[0].numel():
        launch()
    loss = (weight32 * ce).sum(1)
    return (loss, ce, *grads)


def plan_ragged_head_sample(h, order, tiles, head_weight, head_bias, offsets, temperature, seed,
                            log_weights=None, restriction=None):
    """Output (values, log_mass) and the launch over `tiles` of the cells in `order` (sorted by
    column). Without a restriction log_mass stays 0 and the kernel skips the log weights."""
    h, head_weight, head_bias = _unit_feature_stride(h), _aligned(head_weight), head_bias.contiguous()
    tile = ragged_head_config(h.shape[1], h.dtype, _sample_mode(restriction))
    values = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
    log_mass = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    restricted = restriction is not None
    launch = Launch(_ragged_head_sample_kernel, (tiles[0].numel(),), (
        h, h.stride(0), head_weight, head_bias, offsets.contiguous(), order, *tiles, values,
        log_weights.contiguous() if restricted else log_mass, restriction.contiguous() if restricted else values,
        log_mass, 1.0 / temperature if temperature > 0 else 1.0, int(seed), _TINY, head_weight.shape[0],
        h.shape[1]),
        dict(GREEDY=temperature == 0, RESTRICTED=restricted, **_dot_options(h), BLOCK_M=tile.block_m,
             BLOCK_K=tile.block_k, BLOCK_D=tile.block_d),
        tile.num_warps, tile.num_stages)
    return (values, log_mass), launch


def ragged_head_sample(h, columns, head_weight, head_bias, offsets, temperature, seed,
                       log_weights=None, restriction=None):
    order = torch.argsort(columns, stable=True)
    tile = ragged_head_config(h.shape[1], h.dtype, _sample_mode(restriction))
    tiles = _tiles(columns[order], offsets.shape[0] - 1, tile.block_m)
    outputs, launch = plan_ragged_head_sample(h, order, tiles, head_weight, head_bias, offsets, temperature,
                                              seed, log_weights, restriction)
    if tiles[0].numel():
        launch()
    return outputs
