"""Fused masking kernels: one pass draws (or reads) the uniforms and writes x_t, mask, weight, score.

Seeded draws use Triton's counter-based Philox (`tl.rand(seed, b * L + l)`), so a seed gives
the same mask on every launch configuration; it is a different stream from the reference's
torch generator, so only explicit-u calls match the reference bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, warps_for

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
    """ROWS rows per program, each sorted whole in registers (BLOCK_L >= L).

    Sorting (key bits << 32 | column) orders columns by key with ties broken by column index,
    as the reference's stable argsort. Axis 1 then runs over reveal steps k: step k reveals
    column order[k]; the per-step PL sums are scans, and results are stored at column order[k].
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_L)
    row_ok = rows < B
    col_ok = cols < L
    row_base = rows.to(tl.int64)[:, None] * L
    cell = row_base + cols[None, :]

    w = tl.load(w_ptr + cols, mask=col_ok, other=1.0)[None, :]            # [1, BL]
    u = _uniforms(u_ptr, seed, cell, row_ok[:, None] & col_ok[None, :], HAS_U)
    key = -tl.log(tl.maximum(u, tiny)) / w                                 # [R, BL], >= 0
    key = tl.where(col_ok[None, :], key, float("inf"))                     # padding sorts last
    # Non-negative floats order like their bit patterns, so one int64 sort orders (key, column).
    packed = (key.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols[None, :].to(tl.int64)
    order = (tl.sort(packed, dim=1) & 0xFFFFFFFF).to(tl.int32)             # [R, BL] column at step k
    real = order < L
    w_k = tl.load(w_ptr + order, mask=real, other=0.0)

    n = tl.load(n_ptr + rows, mask=row_ok, other=0)[:, None]              # [R, 1]
    revealed = cols[None, :] < n                                           # step k < n
    d = tl.cumsum(w_k, axis=1, reverse=True)                               # D_k = sum of w over steps >= k
    inv_d = tl.where(revealed, 1.0 / tl.where(real, d, 1.0), 0.0)
    c = tl.cumsum(inv_d, axis=1)                                           # C_k = sum_{k' <= k, k' < n} 1/D_k'
    score = tl.where(revealed, 1.0 / tl.where(real, w_k, 1.0), 0.0) - c
    hidden = (~revealed) & real
    hidden_total = tl.sum(tl.where(hidden, w_k, 0.0), axis=1)[:, None]
    weight = tl.where(hidden, (L * w_k) / hidden_total, 0.0)

    out = row_base + order
    ok = row_ok[:, None] & real
    x = tl.load(x_ptr + out, mask=ok, other=0)
    mask_id = tl.load(mask_id_ptr + order, mask=real, other=0)
    tl.store(x_t_ptr + out, tl.where(hidden, mask_id, x), mask=ok)
    tl.store(mask_ptr + out, hidden.to(tl.uint8), mask=ok)
    tl.store(weight_ptr + out, weight, mask=ok)
    tl.store(score_ptr + out, score, mask=ok)


def _outputs(x: torch.Tensor, w: torch.Tensor):
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), mask,
            torch.empty(x.shape, dtype=w.dtype, device=x.device),
            torch.empty(x.shape, dtype=w.dtype, device=x.device))


def tspace_tiles(rows: int, num_columns: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_L): column tiles up to 128 wide, rows to fill 1,024 elements (8 a thread at
    4 warps; 2,048 used all 255 registers and spilled on sm_90)."""
    block_l = min(triton.next_power_of_2(num_columns), 128)
    return max(1, min(triton.next_power_of_2(rows), 1024 // block_l)), block_l


def plan_mask_tspace(x, log_t, w, mask_id, time_weight, u, seed):
    rows, num_columns = x.shape
    x_t, mask, weight, score = _outputs(x, w)
    has_u = u is not None
    block_b, block_l = tspace_tiles(rows, num_columns)
    launch = Launch(_mask_tspace_kernel, (triton.cdiv(rows, block_b), triton.cdiv(num_columns, block_l)), (
        x.contiguous(), log_t.contiguous(), w.contiguous(), mask_id.contiguous(),
        time_weight.contiguous(), u.contiguous() if has_u else x_t, int(seed),
        x_t, mask.view(torch.uint8), weight, score, rows, num_columns),
        dict(HAS_U=has_u, BLOCK_B=block_b, BLOCK_L=block_l))
    return (x_t, mask, weight, score), launch


def mask_tspace(x, log_t, w, mask_id, time_weight, u, seed):
    outputs, launch = plan_mask_tspace(x, log_t, w, mask_id, time_weight, u, seed)
    launch()
    return outputs


#: mask_order sorts whole rows in registers: a 4,096-wide row fits one program without spilling.
MAX_ORDER_COLUMNS = 4096


def order_tiles(rows: int, num_columns: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_L, num_warps): whole rows, about 2,048 elements a program (one row from L = 1,025),
    8 per thread (the sort holds int64 pairs; 16 per thread spilled)."""
    if num_columns > MAX_ORDER_COLUMNS:
        raise ValueError(f"mask_order's Triton kernel takes at most {MAX_ORDER_COLUMNS} columns, "
                         f"got {num_columns}")
    block_l = max(2, triton.next_power_of_2(num_columns))
    rows_per_program = max(1, min(triton.next_power_of_2(rows), 2048 // block_l))
    return rows_per_program, block_l, warps_for(rows_per_program * block_l, per_thread=8)


def plan_mask_order(x, w, mask_id, u, n_revealed, seed):
    rows, num_columns = x.shape
    x_t, mask, weight, score = _outputs(x, w)
    rows_per_program, block_l, num_warps = order_tiles(rows, num_columns)
    has_u = u is not None
    launch = Launch(_mask_order_kernel, (triton.cdiv(rows, rows_per_program),), (
        x.contiguous(), w.contiguous(), mask_id.contiguous(),
        u.contiguous() if has_u else weight, n_revealed.contiguous(), int(seed), _TINY,
        x_t, mask.view(torch.uint8), weight, score, rows, num_columns),
        dict(HAS_U=has_u, ROWS=rows_per_program, BLOCK_L=block_l), num_warps)
    return (x_t, mask, weight, score), launch


def mask_order(x, w, mask_id, u, n_revealed, seed):
    outputs, launch = plan_mask_order(x, w, mask_id, u, n_revealed, seed)
    launch()
    return outputs
