"""Ragged per-column output heads fused with the schedule-weighted cross entropy, and the
matching sampler: neither ever builds the [N, V] (or padded [N, L, Kmax]) logits.

Column l's head is rows offsets[l]:offsets[l+1] of head_weight [V, d] and head_bias [V]; the
logits of cell (n, l) are head_weight_l @ h[n, l] + head_bias_l. Only masked cells are
evaluated, so the work is sum over masked cells of K_l * d instead of N * L * Kmax * d.

The forward pass computes the loss only; backward runs the kernel again with the upstream
gradient folded into the cell weights, which gives the gradients (exact for any upstream
gradient) without ever building logits. Forming them in the forward pass instead (the
kernel holds each cell's softmax there) saves a logits pass, 9-23% of the head op, but only
for an upstream gradient that is the same for every row, and telling that costs a host
synchronisation per step (benchmarks/results/ragged_head.md, benchmarks/results/train_step.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INT_DTYPES, check_offsets, check_same_device, check_tensor, value_checks_enabled
from ._dispatch import select
from .reference import compute_dtype_of


@torch.library.custom_op("fastmdm::ragged_head_ce", mutates_args=())
def _ragged_head_ce(h: Tensor, head_weight: Tensor, head_bias: Tensor, offsets: Tensor,
                    targets: Tensor, weight: Tensor, mask: Tensor,
                    compute_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    backend = select("ragged_head_ce", h, head_weight, head_bias, offsets, targets, weight, mask)
    return tuple(backend.ragged_head_ce(h, head_weight, head_bias, offsets, targets, weight, mask,
                                        compute_grad))


@_ragged_head_ce.register_fake
def _(h, head_weight, head_bias, offsets, targets, weight, mask, compute_grad):
    dtype = compute_dtype_of(h.dtype)
    grads = [h.new_empty(t.shape if compute_grad else (0,), dtype=dtype) for t in (h, head_weight, head_bias)]
    return (h.new_empty(h.shape[0], dtype=dtype), h.new_empty(targets.shape, dtype=dtype), *grads)


def _setup(ctx, inputs, output):
    h, head_weight, head_bias, offsets, targets, weight, mask, _ = inputs
    ctx.mark_non_differentiable(*output[2:])
    ctx.save_for_backward(h, head_weight, head_bias, offsets, targets, weight, mask, output[1])


def _backward(ctx, grad_loss, grad_ce, *unused):
    h, head_weight, head_bias, offsets, targets, weight, mask, ce = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 8
    grad_h = grad_head_weight = grad_head_bias = None
    if any(ctx.needs_input_grad[:3]):
        # The upstream gradient folded into the cell weights: exact for any upstream gradient,
        # with no test of whether it is the same for every row (a host synchronisation).
        _, _, grad_h, grad_head_weight, grad_head_bias = _ragged_head_ce(
            h, head_weight, head_bias, offsets, targets, weight * grad_loss[:, None].to(weight.dtype), mask, True)
        grad_h, grad_head_weight, grad_head_bias = (
            grad_h.to(h.dtype), grad_head_weight.to(head_weight.dtype), grad_head_bias.to(head_bias.dtype))
    grad_weight = (ce * grad_loss[:, None].to(ce.dtype)).to(weight.dtype)
    return grad_h, grad_head_weight, grad_head_bias, None, None, grad_weight, None, None


_ragged_head_ce.register_autograd(_backward, setup_context=_setup)


def _check_heads(h: Tensor, head_weight: Tensor, head_bias: Tensor, offsets: Tensor,
                 validate: bool) -> None:
    """h [..., d] against head_weight [V, d], head_bias [V] and offsets [L+1]."""
    check_tensor("head_weight", head_weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("head_bias", head_bias, ndim=1, dtypes=FLOAT_DTYPES)
    if not h.dtype == head_weight.dtype == head_bias.dtype:
        raise TypeError(f"h, head_weight and head_bias must share a dtype, got {h.dtype}, "
                        f"{head_weight.dtype}, {head_bias.dtype}")
    if head_bias.shape[0] != head_weight.shape[0]:
        raise ValueError(f"head_bias has {head_bias.shape[0]} entries, head_weight {head_weight.shape[0]} rows")
    if h.shape[-1] != head_weight.shape[1]:
        raise ValueError(f"h has width {h.shape[-1]} but head_weight has {head_weight.shape[1]} columns")
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,))
    if validate:
        check_offsets(offsets, offsets.shape[0] - 1, head_weight.shape[0])


def ragged_head_ce(h: Tensor, head_weight: Tensor, head_bias: Tensor, offsets: Tensor,
                   targets: Tensor, weight: Tensor, mask: Tensor, *, validate: bool = True) -> Tensor:
    """Per-row sum_l mask * weight * -log softmax(head_l(h[:, l]))[targets], shape [N].

    h [N, L, d] (any strides), head_weight [V, d], head_bias [V], offsets [L+1] int64,
    targets [N, L] int, weight [N, L] float, mask [N, L] bool. Differentiable in h,
    head_weight, head_bias and weight (d loss / d weight = CE on masked cells). Equals
    `weighted_ce(logits, targets, weight, mask, offsets)` of the logits [N, V] the heads
    would produce, which it never builds. `validate=False` (or `fastmdm._checks.values_checked`)
    skips the value checks (targets in range, offsets well formed), which cost a device sync
    on GPU.
    """
    validate = validate and value_checks_enabled()
    check_tensor("h", h, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, ndim=2, dtypes=INT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    rows, num_columns, _ = h.shape
    for name, value in (("targets", targets), ("weight", weight), ("mask", mask)):
        if tuple(value.shape) != (rows, num_columns):
            raise ValueError(f"{name} must have shape {(rows, num_columns)} (h's first two), "
                             f"got {tuple(value.shape)}")
    if rows == 0:
        raise ValueError("no rows")
    check_same_device(h=h, head_weight=head_weight, head_bias=head_bias, offsets=offsets,
                      targets=targets, weight=weight, mask=mask)
    if offsets.shape[0] != num_columns + 1:
        raise ValueError(f"offsets must have L+1 = {num_columns + 1} entries, got {offsets.shape[0]}")
    _check_heads(h, head_weight, head_bias, offsets, validate)
    if validate:
        sizes = offsets[1:] - offsets[:-1]
        if bool(((targets < 0) | (targets >= sizes[None, :])).any()):
            raise ValueError("targets out of range: column l takes values in [0, offsets[l+1]-offsets[l])")
    loss, _, _, _, _ = _ragged_head_ce(h, head_weight, head_bias, offsets, targets.long(), weight, mask, False)
    return loss


@torch.library.custom_op("fastmdm::ragged_head_sample", mutates_args=())
def _ragged_head_sample(h: Tensor, columns: Tensor, head_weight: Tensor, head_bias: Tensor,
                        offsets: Tensor, log_weights: Tensor | None, restriction: Tensor | None,
                        temperature: float, seed: int) -> tuple[Tensor, Tensor]:
    backend = select("ragged_head_sample", h, columns, head_weight, head_bias, offsets, log_weights, restriction)
    return tuple(backend.ragged_head_sample(h, columns, head_weight, head_bias, offsets, temperature, seed,
                                            log_weights, restriction))


@_ragged_head_sample.register_fake
def _(h, columns, head_weight, head_bias, offsets, log_weights, restriction, temperature, seed):
    return (h.new_empty(h.shape[0], dtype=torch.int64),
            h.new_empty(h.shape[0], dtype=compute_dtype_of(h.dtype)))


def _check_restriction(log_weights: Tensor | None, restriction: Tensor | None, cells: int, vocab: int,
                       validate: bool) -> None:
    """log_weights [C, V] float32 (no NaN, no +inf) and restriction [M] int64 in -1..C-1, both or neither."""
    if (log_weights is None) != (restriction is None):
        raise ValueError("log_weights and restriction go together: pass both or neither")
    if log_weights is None:
        return
    check_tensor("log_weights", log_weights, ndim=2, dtypes=(torch.float32,))
    check_tensor("restriction", restriction, ndim=1, dtypes=(torch.int64,))
    if log_weights.shape[1] != vocab:
        raise ValueError(f"log_weights must have V = {vocab} columns (head_weight's rows), "
                         f"got {log_weights.shape[1]}")
    if restriction.shape[0] != cells:
        raise ValueError(f"restriction has {restriction.shape[0]} entries for {cells} cells")
    if not validate:
        return
    if bool((log_weights.isnan() | (log_weights == float("inf"))).any()):
        raise ValueError("log_weights must not hold NaN or +inf (-inf forbids a value, 0 keeps it)")
    if restriction.numel() and bool(((restriction < -1) | (restriction >= log_weights.shape[0])).any()):
        raise ValueError(f"restriction must lie in -1..{log_weights.shape[0] - 1} "
                         f"(a row of log_weights, or -1 for an unrestricted cell)")


def ragged_head_sample(h: Tensor, columns: Tensor, head_weight: Tensor, head_bias: Tensor,
                       offsets: Tensor, temperature: float, seed: int, *,
                       log_weights: Tensor | None = None, restriction: Tensor | None = None,
                       validate: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """One value per cell, drawn from softmax(head_{columns[m]}(h[m]) / temperature), shape [M].

    h [M, d] states of the cells to draw, columns [M] int their column ids. Gumbel-max over
    the column's values in chunks: no logits are kept. temperature 0 takes the argmax. The
    noise comes from `seed` (a different stream per backend, deterministic for each).

    Token restrictions, for conditional sampling: log_weights [C, V] float32 holds C patterns
    of per-value log weights in the ragged layout (column l's values at offsets[l]:offsets[l+1];
    -inf forbids a value, 0 keeps it, a negative value keeps the given share of it, such as the
    part of a bin inside a numeric range) and restriction [M] int64 picks cell m's pattern
    (-1: unrestricted). Cell m then draws from p_k exp(lw_k) normalised, p the tempered
    softmax, and the call returns (values, log_mass) with log_mass [M] = log sum_k p_k
    exp(lw_k) (float32; float64 for float64 states), the log of the probability the pattern
    let through, for importance weights: 0 for unrestricted cells, -inf (value 0) when every
    value of the column is forbidden. At temperature 0 the value is the argmax of the logits
    over the allowed values and log_mass 0 or -inf. The mass comes from the logsumexps of
    logits / T and of logits / T + lw, formed while the draw holds each chunk of logits (no
    logits are kept); the [C, V] table is read per cell, never expanded to [M, V]. A
    restricted call draws the same noise as an unrestricted one: a cell whose pattern keeps
    every value gets the unrestricted value. `validate=False` skips the value checks (column
    and restriction ranges, offsets, NaN or +inf log weights), which cost a device sync on GPU.
    """
    check_tensor("h", h, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("columns", columns, ndim=1, dtypes=INT_DTYPES)
    if columns.shape[0] != h.shape[0]:
        raise ValueError(f"columns has {columns.shape[0]} entries for {h.shape[0]} cells")
    check_same_device(h=h, columns=columns, head_weight=head_weight, head_bias=head_bias, offsets=offsets,
                      log_weights=log_weights, restriction=restriction)
    _check_heads(h, head_weight, head_bias, offsets, validate)
    _check_restriction(log_weights, restriction, h.shape[0], head_weight.shape[0], validate)
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if validate and columns.numel() and bool(((columns < 0) | (columns >= offsets.shape[0] - 1)).any()):
        raise ValueError(f"columns must lie in 0..{offsets.shape[0] - 2}")
    restricted = restriction is not None
    if h.shape[0] == 0:
        values = torch.empty(0, dtype=torch.int64, device=h.device)
        return (values, h.new_empty(0, dtype=compute_dtype_of(h.dtype))) if restricted else values
    # Draws are not differentiable: detached, so parameters that require grad can be passed.
    values, log_mass = _ragged_head_sample(
        h.detach(), columns.long(), head_weight.detach(), head_bias.detach(), offsets,
        None if log_weights is None else log_weights.detach(), restriction, float(temperature),
        int(seed) & ((1 << 63) - 1))
    return (values, log_mass) if restricted else values
