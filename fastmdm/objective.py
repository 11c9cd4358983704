"""NELBO estimators (t-space and order-space) and the RLOO gradient for learned schedules.

Both estimators are unbiased for the same NELBO, which for a time-independent denoiser is
E_{pi ~ PL(w)} sum_i -log p(x_{pi_i} | x_{pi_<i}). The t-space one is the paper's (weights
w/t), with t drawn by importance so that its variance is finite for every w (see
`schedules.sample_tspace_times`); the order-space one samples a PL order and a prefix and
scores every hidden column with bounded weights L w_l / sum_{hidden} w.

A causal denoiser (fastmdm.models.causal) scores every prefix of an order in one pass, so
for it the order-space estimator takes all L prefixes at once: -log p(x | pi) with
pi ~ PL(w), no prefix noise (`causal_loss`). Which loss a model trains on is its kind's
choice (fastmdm.kinds).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import ops
from .schedules import (PowerSchedule, exponential_keys, order_from_keys, plackett_luce_log_prob,
                        plackett_luce_prefix_score, sample_tspace_times)

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

    `denoiser(x_t, targets=, weight=, mask=)` returns the per-row weighted cross entropy
    sum_l mask * weight * -log p(targets_l | x_t) of masked tokens x_t [N, L]; the model's
    fused heads compute it without building the padded [N, V] logits. When the schedule is
    learnable and num_samples >= 2, the returned loss also carries the RLOO score-function
    gradient for w (its value is unchanged: the surrogate enters as s - s.detach()).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rows, num_columns = x.shape
    x_rep = x.repeat_interleave(num_samples, dim=0)
    masked = draw_masks(x_rep, schedule, mask_id, estimator, generator)
    per_sample = denoiser(masked.x_t, targets=x_rep, weight=masked.weight, mask=masked.mask)
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


def contextual_loss(denoiser: Callable[..., Tensor], x: Tensor, schedule: PowerSchedule, *,
                    num_samples: int = 2, generator: torch.Generator | None = None) -> LossOutput:
    """Negative LoMDM bound (docs/design.md) of a contextual causal model, K orders per row.

    Orders come from the model's posterior q_phi(pi | x) = PL(w * r_phi(x)); each sample's
    value is f = -log p_theta(x | pi) - log p_psi(pi | x) + log q_phi(pi | x), whose mean
    bounds -log p(x). theta and psi learn pathwise; the posterior's scores w * r_phi(x) learn
    by RLOO over the K orders with the per-row Plackett-Luce score, through the fused op
    (w gets both: it is the policy's prior and the posterior's base). With r = 1 and the
    policy's context at zero, q = p_psi = PL(w), the order terms cancel and this is
    `causal_loss`.
    """
    if num_samples < 2:
        raise ValueError(f"the contextual order posterior learns by RLOO: num_samples must be >= 2, got {num_samples}")
    model = getattr(denoiser, "module", denoiser)   # seen through DDP
    rows, num_columns = x.shape
    w_rows = model.posterior_scores(x, schedule.w)                           # [B, L]: q's scores
    x_rep = x.repeat_interleave(num_samples, dim=0)
    w_rep = w_rows.detach().repeat_interleave(num_samples, dim=0)
    u = torch.rand(x_rep.shape, generator=generator).to(device=x.device, dtype=w_rep.dtype)
    order, rank = order_from_keys(exponential_keys(w_rep, u))
    everywhere = torch.ones(x_rep.shape, dtype=torch.bool, device=x.device)
    joint = denoiser(x_rep, order, targets=x_rep, weight=everywhere.to(w_rep.dtype), mask=everywhere,
                     order_prior=schedule.w)                                 # -log p(x, pi), pathwise
    log_q = plackett_luce_log_prob(w_rep, order).to(joint.dtype)
    per_sample = joint + log_q
    score = plackett_luce_prefix_score(w_rep, rank, torch.full((x_rep.shape[0],), num_columns, device=x.device))
    surrogate = _rloo_surrogate(per_sample.detach().view(rows, num_samples),
                                score.view(rows, num_samples, -1), w_rows)
    samples = per_sample.detach().view(rows, num_samples)
    return LossOutput(joint.mean() + log_q.mean() + surrogate, samples.mean(1), samples)


def order_search_loss(denoiser: Callable[..., Tensor], x: Tensor, schedule: PowerSchedule, *,
                      num_samples: int = 2, generator: torch.Generator | None = None) -> LossOutput:
    """Reweighted wake-sleep over orders: a contextual model's first `order_search_epochs`.

    Of the K orders per row, ceil(K/2) come from the posterior q_phi(pi | x) and the rest are
    uniform. With r = their mixture and weights wbar_k = p(x, pi_k) / r(pi_k) normalized over
    the row's K, the denoiser, the policy and w minimize sum_k wbar_k (-log p(x, pi_k)) and the
    posterior minimizes sum_k wbar_k (-log q(pi_k | x)): as K grows, the gradients of -log p(x)
    and of KL(p(pi | x) || q). The bound's RLOO moves q toward the orders the denoiser already
    scores best, and the denoiser then trains on those, so an early, arbitrary preference can
    lock in (on the switch table, the wrong group first). Here the uniform orders keep the
    denoiser learning every direction, in proportion to how well each explains the row, until
    it tells them apart; q follows the posterior rather than its own samples. `nelbo` and
    `samples` are the bound's, from the posterior's orders.
    """
    if num_samples < 2:
        raise ValueError(f"the order search mixes posterior and uniform orders: num_samples must be >= 2, got {num_samples}")
    model = getattr(denoiser, "module", denoiser)   # seen through DDP
    rows, num_columns = x.shape
    from_posterior = (num_samples + 1) // 2
    w_rows = model.posterior_scores(x, schedule.w)                                # [B, L]
    u = torch.rand((rows, from_posterior, num_columns), generator=generator).to(device=x.device, dtype=w_rows.dtype)
    posterior_orders, _ = order_from_keys(exponential_keys(w_rows.detach()[:, None], u).flatten(0, 1))
    uniform_keys = torch.rand((rows * (num_samples - from_posterior), num_columns), generator=generator)
    uniform_orders = torch.argsort(uniform_keys.to(x.device), dim=1)
    order = torch.cat([posterior_orders.view(rows, from_posterior, -1),
                       uniform_orders.view(rows, num_samples - from_posterior, -1)], 1).flatten(0, 1)
    x_rep = x.repeat_interleave(num_samples, dim=0)
    everywhere = torch.ones(x_rep.shape, dtype=torch.bool, device=x.device)
    joint = denoiser(x_rep, order, targets=x_rep, weight=everywhere.to(w_rows.dtype), mask=everywhere,
                     order_prior=schedule.w).view(rows, num_samples)           # -log p(x, pi)
    log_q = plackett_luce_log_prob(w_rows.repeat_interleave(num_samples, dim=0), order).view(rows, num_samples)
    share = from_posterior / num_samples
    log_uniform = -math.lgamma(num_columns + 1)
    log_r = torch.logaddexp(log_q.detach() + math.log(share),
                            torch.full_like(log_q, log_uniform + math.log1p(-share)))
    weights = torch.softmax(-joint.detach() - log_r.to(joint.dtype), dim=1)
    loss = (weights * joint).sum(1).mean() - (weights.to(log_q.dtype) * log_q).sum(1).mean()
    samples = (joint[:, :from_posterior] + log_q[:, :from_posterior].to(joint.dtype)).detach()
    return LossOutput(loss, samples.mean(1), samples)


def _with_rloo(per_sample: Tensor, score: Tensor, schedule: PowerSchedule, rows: int,
               num_samples: int) -> LossOutput:
    """Mean loss plus, for a learnable schedule, the zero-valued RLOO surrogate for w: each
    sample's baseline is the mean of its row's other samples, or with one sample a row, of
    the batch's other rows."""
    loss = per_sample.mean()
    groups = (rows, num_samples) if num_samples >= 2 else (1, rows)
    if schedule.learnable and groups[1] >= 2:
        loss = loss + _rloo_surrogate(per_sample.detach().view(groups), score.view(*groups, -1), schedule.w)
    samples = per_sample.detach().view(rows, num_samples)
    return LossOutput(loss, samples.mean(1), samples)


def _rloo_surrogate(f: Tensor, score: Tensor, w: Tensor) -> Tensor:
    """A zero-valued term whose gradient is the RLOO estimate of d/dw mean_rows E[f].

    f [B, K] per-sample losses, score [B, K, L] = d/dw log q of each sample, w the scores
    they were drawn with: shared [L] (a schedule) or one row each [B, L] (a posterior).
    """
    if w.dim() == 1:
        g = ops.rloo_grad(f, score)
    else:
        g = ops.rloo_grad(f, score, per_row=True) / f.shape[0]
    surrogate = (g.detach().to(w.dtype) * w).sum()
    return surrogate - surrogate.detach()
