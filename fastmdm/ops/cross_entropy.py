"""Schedule-weighted NELBO reduction over ragged per-column logits, as a custom op.

loss_b = sum over masked columns l of weight_bl * CE(logits_b[offsets[l]:offsets[l+1]], target_bl).
The forward also produces d loss / d logits (Liger-style) so no softmax is kept for backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INT_DTYPES, check_offsets, check_same_device, check_tensor
from ._dispatch import select


@torch.library.custom_op("fastmdm::weighted_ce", mutates_args=())
def _weighted_ce(logits: Tensor, targets: Tensor, weight: Tensor, mask: Tensor, offsets: Tensor,
                 compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    backend = select("weighted_ce", logits, targets, weight, mask, offsets)
    return tuple(backend.weighted_ce(logits, targets, weight, mask, offsets, compute_grad))


@_weighted_ce.register_fake
def _(logits, targets, weight, mask, offsets, compute_grad):
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=loss_dtype),
            logits.new_empty(targets.shape, dtype=loss_dtype),
            logits.new_empty(logits.shape if compute_grad else (0,)))


def _setup(ctx, inputs, output):
    _, ce, dlogits = output
    ctx.save_for_backward(ce, dlogits)
    ctx.weight_dtype = inputs[2].dtype


def _backward(ctx, grad_loss, grad_ce, grad_dlogits):
    ce, dlogits = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None
    grad_rows = grad_loss[:, None]
    # A new tensor, never dlogits scaled in place: it is saved and backward may run twice.
    grad_logits = (dlogits * grad_rows.to(dlogits.dtype)) if dlogits.numel() else None
    grad_weight = (ce * grad_rows).to(ctx.weight_dtype)
    return grad_logits, None, grad_weight, None, None, None


_weighted_ce.register_autograd(_backward, setup_context=_setup)


def weighted_ce(logits: Tensor, targets: Tensor, weight: Tensor, mask: Tensor, offsets: Tensor,
                *, validate: bool = True) -> Tensor:
    """Per-row schedule-weighted cross-entropy over ragged per-column logits, shape [B].

    Differentiable in `logits` and `weight` (d/d weight_bl = CE_bl on masked positions).
    `validate=False` skips the value checks (targets in range, offsets well formed), which
    cost a device sync on GPU.
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, ndim=2, dtypes=INT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    rows, num_columns = targets.shape
    for name, value in (("weight", weight), ("mask", mask)):
        if value.shape != targets.shape:
            raise ValueError(f"{name} must have the shape of targets {tuple(targets.shape)}, got {tuple(value.shape)}")
    if logits.shape[0] != rows:
        raise ValueError(f"logits has {logits.shape[0]} rows but targets has {rows}")
    if rows == 0:
        raise ValueError("no rows")
    check_same_device(logits=logits, targets=targets, weight=weight, mask=mask, offsets=offsets)
    if validate:
        check_offsets(offsets, num_columns, logits.shape[1])
        sizes = offsets[1:] - offsets[:-1]
        if bool(((targets < 0) | (targets >= sizes[None, :])).any()):
            raise ValueError("targets out of range: column l takes values in [0, offsets[l+1]-offsets[l])")
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _, _ = _weighted_ce(logits, targets.long(), weight, mask, offsets, compute_grad)
    return loss
