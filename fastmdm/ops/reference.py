"""Torch reference kernels: the source of truth every fast path (C++, Triton) is tested against.

These are plain functions (no autograd wiring); `fastmdm.ops.masking`, `.elbo` and `.rloo`
wrap whichever backend dispatch picks into torch.library custom ops with gradients.
The C++ (`fastmdm.ops.cpu_backend`) and Triton (`fastmdm.triton`) backends implement the
same four functions with the same signatures and return dtypes:

mask_tspace(x, log_t, w, mask_id, time_weight, u, seed) -> (x_t, mask, weight, score)
    x [B,L] int64 tokens, log_t [B] float log-times (finite, <= 0), w [L] float, mask_id [L]
    int64, time_weight [B] float, u [B,L] float uniforms or None (then drawn from `seed`).
    Column l of row b is masked iff u < exp(w_l log_t). weight = w_l * time_weight on masked
    positions, 0 elsewhere (time_weight = 1 / (t p(t)) for t drawn from density p; 1/t for
    uniform t); score = d/dw_l log q(mask | t) (see `fastmdm.schedules.tspace_score`).
mask_order(x, w, mask_id, u, n_revealed, seed) -> (x_t, mask, weight, score)
    the order-space estimator: order pi ~ PL(w) from keys -log(u)/w (smallest first), the
    first n_revealed[b] columns of pi visible, the rest masked; weight = L w_l / sum_{hidden} w
    on hidden columns, 0 elsewhere; score = d/dw log P(revealed prefix).
weighted_ce(logits, targets, weight, mask, offsets, compute_grad) -> (loss, ce, dlogits)
    logits [B,V] with column l's logits in [offsets[l], offsets[l+1]); loss [B] float32 =
    sum over masked l of weight * CE_l; ce [B,L] float32 = CE on masked positions, 0 elsewhere;
    dlogits [B,V] (logits dtype) = d loss / d logits = weight * (softmax - onehot) on masked
    segments, 0 elsewhere; an empty tensor when compute_grad is False.
rloo_grad(f, score) -> g [L] float32
    f [B,K] per-sample losses, score [B,K,L]; g = mean_{b,k} (f_bk - mean_{j!=k} f_bj) s_bk,
    the leave-one-out score-function gradient for w.
"""
from __future__ import annotations

import torch

from ..schedules import (exponential_keys, order_from_keys,
                         plackett_luce_prefix_score, tspace_score)


def supports(op_name: str, *tensors: torch.Tensor) -> bool:
    """The reference takes every device and floating dtype."""
    return True


def uniforms(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1) drawn from a torch generator seeded with `seed` (reference RNG)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device)


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, mask_id: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, mask_id[None, :].to(x.dtype), x)


def mask_tspace(x, log_t, w, mask_id, time_weight, u, seed):
    if u is None:
        u = uniforms(tuple(x.shape), seed, x.device)
    log_t = log_t.to(w.dtype)
    mask = u.to(w.dtype) < torch.exp(w[None, :] * log_t[:, None])
    weight = torch.where(mask, w[None, :] * time_weight.to(w.dtype)[:, None],
                         torch.zeros((), dtype=w.dtype, device=w.device))
    return _apply_mask(x, mask, mask_id), mask, weight, tspace_score(w, log_t, mask)


def mask_order(x, w, mask_id, u, n_revealed, seed):
    if u is None:
        u = uniforms(tuple(x.shape), seed, x.device)
    num_columns = x.shape[1]
    _, rank = order_from_keys(exponential_keys(w, u.to(w.dtype)))
    mask = rank >= n_revealed[:, None]
    hidden_w = torch.where(mask, w[None, :], torch.zeros((), dtype=w.dtype, device=w.device))
    weight = num_columns * hidden_w / hidden_w.sum(1, keepdim=True)
    score = plackett_luce_prefix_score(w, rank, n_revealed)
    return _apply_mask(x, mask, mask_id), mask, weight, score


def segment_layout(offsets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index [L, Kmax] of every column's logits in the flat [V] axis, and which are real."""
    sizes = offsets[1:] - offsets[:-1]
    width = int(sizes.max())
    within = torch.arange(width, device=offsets.device)
    valid = within[None, :] < sizes[:, None]
    index = (offsets[:-1, None] + within[None, :]).clamp(max=vocab - 1)
    return index, valid


def weighted_ce(logits, targets, weight, mask, offsets, compute_grad):
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    index, valid = segment_layout(offsets, logits.shape[1])
    padded = logits.to(compute_dtype)[:, index].masked_fill(~valid, float("-inf"))  # [B,L,Kmax]
    log_probs = torch.log_softmax(padded, dim=-1)
    target_log_prob = log_probs.gather(2, targets[:, :, None].long()).squeeze(2)
    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    ce = torch.where(mask, -target_log_prob, zero)
    loss = (weight.to(compute_dtype) * ce).sum(1)
    if not compute_grad:
        return loss, ce, logits.new_empty(0)
    grad = log_probs.exp().masked_fill(~valid, 0.0)
    grad.scatter_add_(2, targets[:, :, None].long(), torch.full_like(grad[:, :, :1], -1.0))
    grad = grad * torch.where(mask, weight.to(compute_dtype), zero)[:, :, None]
    dlogits = torch.zeros(logits.shape, dtype=compute_dtype, device=logits.device)
    dlogits[:, index[valid]] = grad[:, valid]
    return loss, ce, dlogits.to(logits.dtype)


def rloo_grad(f, score):
    num_samples = f.shape[1]
    baseline = (f.sum(1, keepdim=True) - f) / (num_samples - 1)
    advantage = f - baseline
    return (advantage[:, :, None] * score).mean(dim=(0, 1))
