"""Fused forward masking, t-space and order-space, as torch.library custom ops.

One pass over the [B, L] tokens draws the mask, writes the masked tokens, the NELBO weight
of every position and the score d/dw log q(mask) that RLOO needs. The weight is
differentiable in w (the pathwise part of the w-gradient) and in the t-space time weight;
the score is a constant.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INT_DTYPES, check_finite, check_positive_weights, check_same_device, check_tensor
from ._dispatch import select


class MaskedBatch(NamedTuple):
    """Output of a masking op; every field is [B, L]."""
    x_t: Tensor      # tokens with masked positions replaced by their column's mask id
    mask: Tensor     # bool, True where masked (hidden from the denoiser)
    weight: Tensor   # NELBO weight of each masked position, 0 where visible
    score: Tensor    # d/dw_l log q(this mask), detached


# The custom ops return (weight, score, x_t, mask): float outputs first, because
# torch.library.opcheck's AOT test sums all outputs into the dtype of the first one.
def _float_first(x_t, mask, weight, score):
    return weight, score, x_t, mask


def _empty_outputs(x: Tensor, w: Tensor):
    return _float_first(torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device=x.device),
                        torch.empty(x.shape, dtype=w.dtype, device=x.device),
                        torch.empty(x.shape, dtype=w.dtype, device=x.device))


@torch.library.custom_op("fastmdm::mask_tspace", mutates_args=())
def _mask_tspace(x: Tensor, log_t: Tensor, w: Tensor, mask_id: Tensor, time_weight: Tensor,
                 u: Optional[Tensor], seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    backend = select("mask_tspace", x, log_t, w, time_weight, u)
    return _float_first(*backend.mask_tspace(x, log_t, w, mask_id, time_weight, u, seed))


@_mask_tspace.register_fake
def _(x, log_t, w, mask_id, time_weight, u, seed):
    return _empty_outputs(x, w)


def _mask_tspace_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[4], output[3])


def _mask_tspace_backward(ctx, grad_weight, grad_score, grad_x_t, grad_mask):
    w, time_weight, mask = ctx.saved_tensors
    grad_w = grad_time_weight = None
    if grad_weight is not None:   # weight = mask * w_l * time_weight_b
        masked_grad = torch.where(mask, grad_weight, torch.zeros_like(grad_weight))
        grad_w = (masked_grad * time_weight.to(grad_weight.dtype)[:, None]).sum(0)
        grad_time_weight = (masked_grad * w.to(grad_weight.dtype)[None, :]).sum(1).to(time_weight.dtype)
    return None, None, grad_w, None, grad_time_weight, None, None


_mask_tspace.register_autograd(_mask_tspace_backward, setup_context=_mask_tspace_setup)


@torch.library.custom_op("fastmdm::mask_order", mutates_args=())
def _mask_order(x: Tensor, w: Tensor, mask_id: Tensor, u: Optional[Tensor], n_revealed: Tensor,
                seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _float_first(*select("mask_order", x, w, u, n_revealed).mask_order(x, w, mask_id, u, n_revealed, seed))


@_mask_order.register_fake
def _(x, w, mask_id, u, n_revealed, seed):
    return _empty_outputs(x, w)


def _mask_order_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], output[3], output[0])


def _mask_order_backward(ctx, grad_weight, grad_score, grad_x_t, grad_mask):
    w, mask, weight = ctx.saved_tensors
    grad_w = None
    if grad_weight is not None:
        # weight_bl = hidden_bl * L * w_l / W_b with W_b = sum_{j hidden} w_j, hence
        # d/dw_j sum_l g_bl weight_bl = hidden_bj / W_b * (L g_bj - sum_l g_bl weight_bl).
        num_columns = w.shape[0]
        hidden_total = torch.where(mask, w[None, :], torch.zeros_like(weight)).sum(1, keepdim=True)
        weighted_grad = (grad_weight * weight).sum(1, keepdim=True)
        per_row = (num_columns * grad_weight - weighted_grad) / hidden_total
        grad_w = torch.where(mask, per_row, torch.zeros_like(per_row)).sum(0)
    return None, grad_w, None, None, None, None


_mask_order.register_autograd(_mask_order_backward, setup_context=_mask_order_setup)


def _check_common(x: Tensor, w: Tensor, mask_id: Tensor, u: Tensor | None) -> None:
    check_positive_weights(w)
    check_tensor("x", x, ndim=2, dtypes=(torch.int64,))
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[1]} columns but w has {w.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("x has no rows")
    check_tensor("mask_id", mask_id, ndim=1, dtypes=(torch.int64,))
    if mask_id.shape[0] != w.shape[0]:
        raise ValueError(f"mask_id has {mask_id.shape[0]} entries but w has {w.shape[0]}")
    if u is not None:
        check_tensor("u", u, ndim=2, dtypes=FLOAT_DTYPES)
        if u.shape != x.shape:
            raise ValueError(f"u must have the shape of x {tuple(x.shape)}, got {tuple(u.shape)}")
        if bool(((u < 0) | (u >= 1) | torch.isnan(u)).any()):
            raise ValueError("u must lie in [0, 1)")
    check_same_device(x=x, w=w, mask_id=mask_id, u=u)


def _default_seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    return int(seed)


def mask_tspace(x: Tensor, log_t: Tensor, w: Tensor, mask_id: Tensor, time_weight: Tensor, *,
                u: Tensor | None = None, seed: int | None = None) -> MaskedBatch:
    """Mask column l of row b with probability t_b^{w_l}, t_b = exp(log_t[b]) (t-space estimator).

    The NELBO weight of a masked position is w_l * time_weight[b]: pass time_weight =
    1 / (t p(t)) for t drawn from density p (`schedules.sample_tspace_times` draws both;
    exp(-log_t) is the paper's uniform t, whose estimate has infinite variance when w <= 1).
    Times are taken as log t so that t far below float32's range stays exact. Pass `u`
    (uniforms, [B, L]) to fix the draw, else the backend draws from `seed` (default: from
    torch's global generator).
    """
    _check_common(x, w, mask_id, u)
    for name, per_row in (("log_t", log_t), ("time_weight", time_weight)):
        check_tensor(name, per_row, ndim=1, dtypes=FLOAT_DTYPES)
        if per_row.shape[0] != x.shape[0]:
            raise ValueError(f"{name} has {per_row.shape[0]} entries but x has {x.shape[0]} rows")
        check_finite(name, per_row)
    if bool((log_t > 0).any()):
        raise ValueError("log_t must be <= 0 (t in (0, 1])")
    if bool((time_weight <= 0).any()):
        raise ValueError("time_weight must be positive")
    check_same_device(x=x, log_t=log_t, time_weight=time_weight)
    weight, score, x_t, mask = _mask_tspace(x, log_t, w, mask_id, time_weight, u, _default_seed(seed))
    return MaskedBatch(x_t, mask, weight, score)


def mask_order(x: Tensor, w: Tensor, mask_id: Tensor, n_revealed: Tensor, *,
               u: Tensor | None = None, seed: int | None = None) -> MaskedBatch:
    """Reveal the first n_revealed[b] columns of an order pi ~ Plackett-Luce(w), mask the rest.

    The order-space estimator: n_revealed ~ Uniform{0..L-1} gives an unbiased NELBO
    with bounded weights L w_l / sum_{hidden} w.
    """
    _check_common(x, w, mask_id, u)
    check_tensor("n_revealed", n_revealed, ndim=1, dtypes=INT_DTYPES)
    if n_revealed.shape[0] != x.shape[0]:
        raise ValueError(f"n_revealed has {n_revealed.shape[0]} entries but x has {x.shape[0]} rows")
    if bool(((n_revealed < 0) | (n_revealed >= x.shape[1])).any()):
        raise ValueError(f"n_revealed must lie in [0, {x.shape[1] - 1}] (at least one column hidden)")
    check_same_device(x=x, n_revealed=n_revealed)
    weight, score, x_t, mask = _mask_order(x, w, mask_id, u, n_revealed.long(), _default_seed(seed))
    return MaskedBatch(x_t, mask, weight, score)
