"""RLOO score-function gradient: a two-stage column reduction, deterministic (no atomics).

Stage 1: program (part, column block) sums advantage * score over its slice of the B*K
sample rows into partial[part]; stage 2 sums the parts. The part count depends only on the
shape, so a given input gives bit-identical g on every run. The per-row gradient is stage 1
with one part per row (its K samples): partial is then g [B, L] times K. Parts are on grid
axis 0, which takes 2^31 - 1 programs (axis 1 takes only 65,535), so B is not limited.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch

_MAX_PARTS = 256


@triton.jit
def _rloo_partial_kernel(f_ptr, score_ptr, partial_ptr, R, L, K, rows_per_part,
                         BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    part = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < L
    first = part * rows_per_part
    last = tl.minimum(first + rows_per_part, R)   # a part's rows need not fill whole tiles
    acc = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    for r0 in range(first, first + rows_per_part, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)     # flat sample index b * K + k
        row_ok = r < last
        group = (r // K) * K
        f_own = tl.load(f_ptr + r, mask=row_ok, other=0.0)
        f_total = tl.zeros([BLOCK_R], tl.float32)
        for j in range(0, K):
            f_total += tl.load(f_ptr + group + j, mask=row_ok, other=0.0)
        advantage = f_own - (f_total - f_own) / (K - 1)
        s = tl.load(score_ptr + r.to(tl.int64)[:, None] * L + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += advantage[:, None] * s
    tl.store(partial_ptr + part.to(tl.int64) * L + cols, tl.sum(acc, axis=0), mask=col_ok)


def rloo_tiles(flat_rows: int, num_columns: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_L): column tiles up to 128 wide, sample rows to fill 4,096 lanes."""
    block_l = min(max(triton.next_power_of_2(num_columns), 16), 128)
    return max(1, min(triton.next_power_of_2(flat_rows), 4096 // block_l)), block_l


def plan_rloo_grad(f, score, per_row=False):
    """partial [parts, L] and the stage-1 launch; per_row: one part per row of K samples."""
    rows, samples, num_columns = score.shape
    flat_rows = rows * samples
    if per_row:
        block_r, block_l = rloo_tiles(samples, num_columns)
        num_parts, rows_per_part = rows, samples
    else:
        block_r, block_l = rloo_tiles(flat_rows, num_columns)
        num_parts = min(triton.cdiv(flat_rows, block_r), _MAX_PARTS)
        rows_per_part = triton.cdiv(triton.cdiv(flat_rows, num_parts), block_r) * block_r
    partial = torch.empty((num_parts, num_columns), dtype=torch.float32, device=score.device)
    launch = Launch(_rloo_partial_kernel, (num_parts, triton.cdiv(num_columns, block_l)), (
        f.contiguous(), score.contiguous(), partial, flat_rows, num_columns, samples, rows_per_part),
        dict(BLOCK_R=block_r, BLOCK_L=block_l))
    return partial, launch


def rloo_grad(f, score, per_row=False):
    partial, launch = plan_rloo_grad(f, score, per_row)
    launch()
    if per_row:
        return partial.div_(score.shape[1])
    return partial.sum(0) / (score.shape[0] * score.shape[1])
