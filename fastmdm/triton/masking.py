"""Fused masking kernels: one pass draws (or reads) the uniforms and writes x_t, mask, weight, score.

Seeded draws use Triton's counter-based Philox (`tl.rand(seed, b * L + l)`), so a seed gives
the same mask on every launch configuration; it is a different stream from the reference's
torch generator, so only explicit-u calls match the reference bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Smallest normal float32, as in schedules.exponential_keys: keeps -log(u) finite at u = 0.
_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _uniforms(u_ptr, seed, cell, ok, HAS_U: tl.constexpr):
    """u[b, l] from memory, or Philox counter cell = b * L + l (int64: no overflow past 2^31)."""
    if HAS_U:
        u = tl.load(u_ptr + cell, mask=ok, other=0.5)
    else:
        u = tl.rand(seed, cell)
    return u


@triton.jit
def _expm1_ratio(a):
    """a / expm1(a) for a <= 0; tl has no expm1, so a Bernoulli series where exp(a) - 1 cancels."""
    a2 = a * a
    series = 1.0 - 0.5 * a + a2 * (1.0 / 12.0) - a2 * a2 * (1.0 / 720.0)
    direct = a / (tl.exp(tl.where(tl.abs(a) < 0.1, -1.0, a)) - 1.0)   # no 0/0 in the unused branch
    # |a| < 0.1: series error < a^6/30240 ~ 3e-11; beyond, exp(a) - 1 loses < 1e-6 relative.
    return tl.where(tl.abs(a) < 0.1, series, direct)


@triton.jit
def _mask_tspace_kernel(x_ptr, log_t_ptr, w_ptr, mask_id_ptr, time_weight_ptr, u_ptr, seed,
                        x_t_ptr, mask_ptr, weight_ptr, score_ptr, B, L,
                        HAS_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < B
    col_ok = cols < L
    ok = row_ok[:, None] & col_ok[None, :]
    cell = rows.to(tl.int64)[:, None] * L + cols[None, :]

    log_t = tl.load(log_t_ptr + rows, mask=row_ok, other=0.0)[:, None]
    time_weight = tl.load(time_weight_ptr + rows, mask=row_ok, other=1.0)[:, None]
    w = tl.load(w_ptr + cols, mask=col_ok, other=1.0)[None, :]
    a = w * log_t
    p = tl.exp(a)                                           # t^w, as the reference computes it
    u = _uniforms(u_ptr, seed, cell, ok, HAS_U)
    masked = u < p

    x = tl.load(x_ptr + cell, mask=ok, other=0)
    mask_id = tl.load(mask_id_ptr + cols, mask=col_ok, other=0)[None, :]
    tl.store(x_t_ptr + cell, tl.where(masked, mask_id, x), mask=ok)
    tl.store(mask_ptr + cell, masked.to(tl.uint8), mask=ok)
    tl.store(weight_ptr + cell, tl.where(masked, w * time_weight, 0.0), mask=ok)
    visible_score = p * _expm1_ratio(a) / w
    tl.store(score_ptr + cell, tl.where(masked, log_t, visible_score), mask=ok)


@triton.jit
def _mask_order_kernel(x_ptr, w_ptr, mask_id_ptr, u_ptr, n_ptr, seed, tiny,
                       x_t_ptr, mask_ptr, weight_ptr, score_ptr, B, L,
                       HAS_U: tl.constexpr, ROWS: tl.constexpr, BLOCK_L: tl.constexpr):
    """ROWS rows per program; all per-row order statistics come from [ROWS, L, L] comparisons.

    Axis 1 indexes the column l being computed, axis 2 the other column j. No sort is needed:
    rank_l counts the columns that precede l (smaller key, ties by index as a stable argsort).
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_L)
    row_ok = rows < B
    col_ok = cols < L
    ok = row_ok[:, None] & col_ok[None, :]
    cell = rows.to(tl.int64)[:, None] * L + cols[None, :]

    w = tl.load(w_ptr + cols, mask=col_ok, other=1.0)[None, :]            # [1, BL]
    u = _uniforms(u_ptr, seed, cell, ok, HAS_U)
    key = -tl.log(tl.maximum(u, tiny)) / w                                 # [R, BL]
    key = tl.where(col_ok[None, :], key, float("inf"))
    n = tl.load(n_ptr + rows, mask=row_ok, other=0)[:, None]              # [R, 1]

    key_l = key[:, :, None]
    key_j = key[:, None, :]
    l_idx = cols[None, :, None]
    j_idx = cols[None, None, :]
    j_ok = col_ok[None, None, :]
    before = ((key_j < key_l) | ((key_j == key_l) & (j_idx < l_idx))) & j_ok   # j precedes l
    rank = tl.sum(before.to(tl.int32), axis=2)                             # [R, BL]
    # D at step rank_l: total w over columns not preceding l (summed directly: no cancellation).
    w_j = w[:, None, :]
    d = tl.sum(tl.where(j_ok & ~before, w_j, 0.0), axis=2)
    d = tl.where(col_ok[None, :], d, 1.0)                                  # padding columns: no 1/0
    revealed = rank < n
    inv_d = tl.where(revealed, 1.0 / d, 0.0)
    # C_{rank_l} = sum of 1/D over revealed steps up to and including rank_l.
    upto = (before | (j_idx == l_idx)) & j_ok
    c = tl.sum(tl.where(upto, inv_d[:, None, :], 0.0), axis=2)
    score = tl.where(revealed, 1.0 / w, 0.0) - c

    hidden = (~revealed) & col_ok[None, :]
    hidden_total = tl.sum(tl.where(hidden, w, 0.0), axis=1)[:, None]
    weight = tl.where(hidden, (L * w) / hidden_total, 0.0)

    x = tl.load(x_ptr + cell, mask=ok, other=0)
    mask_id = tl.load(mask_id_ptr + cols, mask=col_ok, other=0)[None, :]
    tl.store(x_t_ptr + cell, tl.where(hidden, mask_id, x), mask=ok)
    tl.store(mask_ptr + cell, hidden.to(tl.uint8), mask=ok)
    tl.store(weight_ptr + cell, weight, mask=ok)
    tl.store(score_ptr + cell, score, mask=ok)


def _outputs(x: torch.Tensor, w: torch.Tensor):
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), mask,
            torch.empty(x.shape, dtype=w.dtype, device=x.device),
            torch.empty(x.shape, dtype=w.dtype, device=x.device))


def mask_tspace(x, log_t, w, mask_id, time_weight, u, seed):
    rows, num_columns = x.shape
    x_t, mask, weight, score = _outputs(x, w)
    block_l = min(triton.next_power_of_2(num_columns), 128)
    block_b = max(1, min(triton.next_power_of_2(rows), 2048 // block_l))
    grid = (triton.cdiv(rows, block_b), triton.cdiv(num_columns, block_l))
    has_u = u is not None
    _mask_tspace_kernel[grid](
        x.contiguous(), log_t.contiguous(), w.contiguous(), mask_id.contiguous(),
        time_weight.contiguous(), u.contiguous() if has_u else x_t, int(seed),
        x_t, mask.view(torch.uint8), weight, score, rows, num_columns,
        HAS_U=has_u, BLOCK_B=block_b, BLOCK_L=block_l)
    return x_t, mask, weight, score


def mask_order(x, w, mask_id, u, n_revealed, seed):
    rows, num_columns = x.shape
    x_t, mask, weight, score = _outputs(x, w)
    block_l = max(2, triton.next_power_of_2(num_columns))
    # Keep the [ROWS, L, L] comparison tile near 4096 elements (one row per program from L = 64).
    rows_per_program = max(1, min(triton.next_power_of_2(rows), 4096 // (block_l * block_l)))
    has_u = u is not None
    _mask_order_kernel[(triton.cdiv(rows, rows_per_program),)](
        x.contiguous(), w.contiguous(), mask_id.contiguous(),
        u.contiguous() if has_u else weight, n_revealed.contiguous(), int(seed), _TINY,
        x_t, mask.view(torch.uint8), weight, score, rows, num_columns,
        HAS_U=has_u, ROWS=rows_per_program, BLOCK_L=block_l,
        num_warps=8 if block_l >= 128 else 4)
    return x_t, mask, weight, score
