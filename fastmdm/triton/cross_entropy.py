"""Weighted cross-entropy over ragged per-column logits, loss and d loss / d logits in one launch.

Grid = (column, block of rows), columns fastest so that programs running together cover
whole rows of logits and each row is fetched from DRAM about once. Every program walks its
column's segment [offsets[l], offsets[l+1]) in BLOCK_K chunks with an online logsumexp (fp32
for any logits dtype), then, Liger-style, walks it again to write weight * (softmax - onehot),
so nothing is kept for backward. Unmasked positions read no logits and get ce = 0, dlogits = 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch


@triton.jit
def _weighted_ce_kernel(logits_ptr, stride_row, stride_col, targets_ptr, weight_ptr, mask_ptr,
                        offsets_ptr, ce_ptr, dlogits_ptr, B, L, V,
                        COMPUTE_GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    col = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)            # row * stride can pass 2^31 elements
    row_ok = rows < B
    cell = rows64 * L + col
    active = row_ok & (tl.load(mask_ptr + cell, mask=row_ok, other=0) != 0)
    start = tl.load(offsets_ptr + col)
    size = tl.load(offsets_ptr + col + 1) - start
    target = tl.load(targets_ptr + cell, mask=active, other=0)
    row_base = logits_ptr + rows64 * stride_row
    within = tl.arange(0, BLOCK_K)

    running_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, size, BLOCK_K):
        k = k0 + within
        load_ok = active[:, None] & (k < size)[None, :]
        x = tl.load(row_base[:, None] + (start + k)[None, :] * stride_col, mask=load_ok,
                    other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)   # rows with nothing loaded yet
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        running_max = new_max
    lse = tl.where(active, running_max + tl.log(tl.where(active, running_sum, 1.0)), 0.0)
    target_logit = tl.load(row_base + (start + target) * stride_col, mask=active, other=0.0).to(tl.float32)
    tl.store(ce_ptr + cell, tl.where(active, lse - target_logit, 0.0), mask=row_ok)

    if COMPUTE_GRAD:
        weight = tl.load(weight_ptr + cell, mask=active, other=0.0)
        out_base = dlogits_ptr + rows64 * V + start
        for k0 in range(0, size, BLOCK_K):
            k = k0 + within
            in_segment = k < size
            x = tl.load(row_base[:, None] + (start + k)[None, :] * stride_col,
                        mask=active[:, None] & in_segment[None, :], other=float("-inf")).to(tl.float32)
            onehot = tl.where(k[None, :] == target[:, None], 1.0, 0.0)
            grad = weight[:, None] * (tl.exp(x - lse[:, None]) - onehot)
            grad = tl.where(active[:, None], grad, 0.0)
            tl.store(out_base[:, None] + k[None, :], grad.to(dlogits_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & in_segment[None, :])


def ce_tiles(rows: int, num_columns: int, vocab: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_K): chunk width from the mean column width (known without a device sync),
    rows to fill 1,024 lanes, 8 a thread at 4 warps. 2,048 and 4,096 lanes spilled in some
    (width, dtype, grad, sm) corners: see benchmarks/results/triton_resources.md."""
    block_k = min(max(triton.next_power_of_2(triton.cdiv(vocab, num_columns)), 16), 1024)
    block_b = max(1, min(triton.next_power_of_2(rows), 64, 1024 // block_k))
    return block_b, block_k


def plan_weighted_ce(logits, targets, weight, mask, offsets, compute_grad):
    rows, vocab = logits.shape
    num_columns = targets.shape[1]
    weight = weight.contiguous()
    ce = torch.empty((rows, num_columns), dtype=torch.float32, device=logits.device)
    # Written in full by the kernel (zeros outside masked segments): no memset pass.
    dlogits = torch.empty((rows, vocab) if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    block_b, block_k = ce_tiles(rows, num_columns, vocab)
    launch = Launch(_weighted_ce_kernel, (num_columns, triton.cdiv(rows, block_b)), (
        logits, logits.stride(0), logits.stride(1), targets.contiguous(), weight,
        mask.contiguous().view(torch.uint8), offsets.contiguous(), ce, dlogits if compute_grad else ce,
        rows, num_columns, vocab), dict(COMPUTE_GRAD=compute_grad, BLOCK_B=block_b, BLOCK_K=block_k))
    return (weight, ce, dlogits), launch


def weighted_ce(logits, targets, weight, mask, offsets, compute_grad):
    (weight, ce, dlogits), launch = plan_weighted_ce(logits, targets, weight, mask, offsets, compute_grad)
    launch()
    # A second deterministic pass (no atomics); [B, L] is small next to the logits.
    loss = (weight * ce).sum(1)
    return loss, ce, dlogits
