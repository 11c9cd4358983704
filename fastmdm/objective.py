"""NELBO estimators (t-space and order-space) and the RLOO gradient for learned schedules.

Both estimators are unbiased for the same NELBO, which for a time-independent denoiser is
E_{pi ~ PL(w)} sum_i -log p(x_{pi_i} | x_{pi_<i}). The t-space one is the paper's (weights
w/t), with t drawn by importance so that its variance is finite for every w (see
`schedules.sample_tspace_times`); the order-space one samples a PL order and a prefix and
scores every hidden column with bounded weights L w_l / sum_{hidden} w.

A causal denoiser (fastmdm.models.causal) scores every prefix of an order in one pass, so
for it the order-space estimator takes all L prefixes at once: -log p(x | pi) with
pi ~ PL(w), no prefix noise (`causal_loss`). `model_loss` picks the right one.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import ops
from .schedules import (PowerSchedule, exponential_keys, order_from_keys, plackett_luce_prefix_score,
                        sample_tspace_times)

ESTIMATORS = ("order", "tspace")


class LossOutput(NamedTuple):
    loss: Tensor    # scalar to backpropagate: NELBO estimate (+ zero-valued RLOO surrogate for w)
    nelbo: Tensor   # [B] per-row NELBO estimate (mean over the K samples), detached
    samples: Tensor  # [B, K] per-sample NELBO estimates, detached


def draw_masks(x: Tensor, schedule: PowerSchedule, mask_id: Tensor, estimator: str,
               generator: torch.Generator | None = None) -> ops.MaskedBatch:
    """One random mask per row of x, with NELBO weights and scores, for the chosen estimator."""
    rows, num_columns = x.shape
    seed = int(torch.randint(0, 2**62, (), generator=generator).item())
    if estimator == "tspace":
        log_t, time_weight = sample_tspace_times(schedule.w, rows, generator)
        return ops.mask_tspace(x, log_t.to(x.device), schedule.w, mask_id, time_weight.to(x.device),
                               seed=seed)
    if estimator == "order":
        n_revealed = torch.randint(0, num_columns, (rows,), generator=generator).to(x.device)
        return ops.mask_order(x, schedule.w, mask_id, n_revealed, seed=seed)
    raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")


def diffusion_loss(denoiser: Callable[[Tensor], Tensor], x: Tensor, schedule: PowerSchedule,
                   mask_id: Tensor, offsets: Tensor, *, estimator: str = "order",
                   num_samples: int = 2, generator: torch.Generator | None = None) -> LossOutput:
    """Monte-Carlo NELBO of rows x [B, L] with `num_samples` masks per row.

    `denoiser(x_t)` maps masked tokens [N, L] to ragged logits [N, V] (column l in
    offsets[l]:offsets[l+1]). When the schedule is learnable and num_samples >= 2, the
    returned loss also carries the RLOO score-function gradient for w (its value is
    unchanged: the surrogate enters as s - s.detach()).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rows, num_columns = x.shape
    x_rep = x.repeat_interleave(num_samples, dim=0)
    masked = draw_masks(x_rep, schedule, mask_id, estimator, generator)
    logits = denoiser(masked.x_t)
    per_sample = ops.weighted_ce(logits, x_rep, masked.weight, masked.mask, offsets)
    return _with_rloo(per_sample, masked.score, schedule, rows, num_samples)


def causal_loss(denoiser: Callable[..., Tensor], x: Tensor, schedule: PowerSchedule, *,
                num_samples: int = 2, generator: torch.Generator | None = None) -> LossOutput:
    """-log p(x | pi) for `num_samples` orders pi ~ PL(w) per row, from a causal denoiser.

    An unbiased one-sample estimate of the same NELBO as the other estimators, with only
    the order random. `denoiser(x, order, targets=, weight=, mask=)` returns the per-row
    cross entropy summed over all L conditionals. With a learnable schedule and
    num_samples >= 2, w gets the RLOO gradient with the full-order Plackett-Luce score.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rows, num_columns = x.shape
    x_rep = x.repeat_interleave(num_samples, dim=0)
    w = schedule.w.detach()
    u = torch.rand(x_rep.shape, generator=generator).to(device=x.device, dtype=w.dtype)
    order, rank = order_from_keys(exponential_keys(w, u))
    everywhere = torch.ones(x_rep.shape, dtype=torch.bool, device=x.device)
    per_sample = denoiser(x_rep, order, targets=x_rep, weight=everywhere.to(w.dtype), mask=everywhere)
    score = plackett_luce_prefix_score(w, rank, torch.full((x_rep.shape[0],), num_columns, device=x.device))
    return _with_rloo(per_sample, score, schedule, rows, num_samples)


def model_loss(denoiser: Callable[..., Tensor], x: Tensor, schedule: PowerSchedule, mask_id: Tensor,
               offsets: Tensor, *, estimator: str = "order", num_samples: int = 2,
               generator: torch.Generator | None = None) -> LossOutput:
    """The NELBO estimate for this kind of denoiser: `causal_loss` for causal models (which
    accept only the order-space estimator), `diffusion_loss` otherwise."""
    if getattr(getattr(denoiser, "module", denoiser), "causal", False):  # seen through DDP
        if estimator != "order":
            raise ValueError("the causal denoiser is trained with the order-space estimator "
                             f"(whole orders), not {estimator!r}")
        return causal_loss(denoiser, x, schedule, num_samples=num_samples, generator=generator)
    return diffusion_loss(denoiser, x, schedule, mask_id, offsets, estimator=estimator,
                          num_samples=num_samples, generator=generator)


def _with_rloo(per_sample: Tensor, score: Tensor, schedule: PowerSchedule, rows: int,
               num_samples: int) -> LossOutput:
    """Mean loss plus, for a learnable schedule, the zero-valued RLOO surrogate for w."""
    loss = per_sample.mean()
    if schedule.learnable and num_samples >= 2:
        g = ops.rloo_grad(per_sample.detach().view(rows, num_samples),
                          score.view(rows, num_samples, -1))
        surrogate = (g.detach().to(schedule.w.dtype) * schedule.w).sum()
        loss = loss + (surrogate - surrogate.detach())
    samples = per_sample.detach().view(rows, num_samples)
    return LossOutput(loss, samples.mean(1), samples)
