"""Torch reference kernels: the source of truth every fast path (C++, Triton) is tested against.

These are plain functions (no autograd wiring); `fastmdm.ops.masking`, `.cross_entropy` and `.rloo`
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
rloo_grad(f, score, per_row) -> g [L] float32, or [B,L] with per_row
    f [B,K] per-sample losses, score [B,K,L]; g = mean_{b,k} (f_bk - mean_{j!=k} f_bj) s_bk,
    the leave-one-out score-function gradient for w. per_row keeps the rows apart (mean over
    k only): the gradient for a w that differs per row, such as a contextual order posterior.
ragged_head_ce(h, head_weight, head_bias, offsets, targets, weight, mask, compute_grad)
        -> (loss, ce, grad_h, grad_head_weight, grad_head_bias)
    weighted_ce of the ragged heads' logits without the [B,V] logits: h [B,L,d] column states,
    head_weight [V,d] and head_bias [V] (column l's head is rows offsets[l]:offsets[l+1]).
    logits_bl = head_weight_l @ h_bl + head_bias_l, evaluated for masked cells only; loss [B]
    and ce [B,L] as in weighted_ce (float32, float64 for float64 inputs). With compute_grad
    the gradients of sum(loss) w.r.t. h, head_weight, head_bias, in that same compute dtype
    (zero for unmasked cells and for columns nothing is masked in); else empty tensors.
ragged_head_sample(h, columns, head_weight, head_bias, offsets, temperature, seed,
                   log_weights=None, restriction=None) -> (values [M], log_mass [M])
    one value per cell from softmax(logits / temperature) of cell m's column columns[m]
    (h [M,d]), by Gumbel-max with noise drawn from `seed`; temperature 0 takes the argmax.
    int64 values in 0..K_l-1. Backends draw different noise streams for the same seed.
    Restricted cells (restriction[m] = r >= 0) draw from p_k exp(lw_k) normalised, with
    p = softmax(logits / temperature) and lw = log_weights[r] [V] float32 read over the
    column's range (-inf forbids a value); log_mass[m] = log sum_k p_k exp(lw_k) in the
    compute dtype, -inf (and value 0) when every value is forbidden. Temperature 0 takes the
    argmax of the logits over the values with lw > -inf, and log_mass is 0 or -inf.
    Unrestricted cells (restriction -1, or no restriction) draw as above with log_mass 0.
cached_attention(q, k, v, cache_keys, cache_values, positions, slots)
        -> (attended, cache_keys, cache_values)
    one KV-cached attention step: q, k, v [N,H,T,dh] the step's queries, keys and values,
    cache_keys and cache_values [N,H,S,dh], positions [N,T] int64 in 0..S-2, slots [N,T]
    int64 in 0..S-1. Writes k, v at their slots (in place: the returned caches are the given
    ones, or contiguous copies where a backend needs them), then query (n, t) attends to the
    cache slots 0..positions[n, t] (after the writes) and to its own key and value: softmax
    over those of q . key / sqrt(dh), times the values. attended [N,H,T,dh] in q's dtype.
    A slot several tokens of a row are written to holds any one of them, so it must not be
    attended (the model sends queries and padding to a trash slot that no position reaches).
    The reference is differentiable; under autograd it writes into copies of the caches.
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


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute (and return losses) in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_layout(offsets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index [L, Kmax] of every column's logits in the flat [V] axis, and which are real."""
    sizes = offsets[1:] - offsets[:-1]
    width = int(sizes.max())
    within = torch.arange(width, device=offsets.device)
    valid = within[None, :] < sizes[:, None]
    index = (offsets[:-1, None] + within[None, :]).clamp(max=vocab - 1)
    return index, valid


def weighted_ce(logits, targets, weight, mask, offsets, compute_grad):
    compute_dtype = compute_dtype_of(logits.dtype)
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


def rloo_grad(f, score, per_row=False):
    num_samples = f.shape[1]
    baseline = (f.sum(1, keepdim=True) - f) / (num_samples - 1)
    advantage = f - baseline
    return (advantage[:, :, None] * score).mean(dim=1 if per_row else (0, 1))


def ragged_head_ce(h, head_weight, head_bias, offsets, targets, weight, mask, compute_grad):
    compute_dtype = compute_dtype_of(h.dtype)
    rows, num_columns, _ = h.shape
    ce = torch.zeros(rows, num_columns, dtype=compute_dtype, device=h.device)
    grads = [torch.zeros(t.shape, dtype=compute_dtype, device=h.device) if compute_grad
             else t.new_empty(0, dtype=compute_dtype) for t in (h, head_weight, head_bias)]
    grad_h, grad_head_weight, grad_head_bias = grads
    bounds = offsets.tolist()
    for column in range(num_columns):
        cells = mask[:, column].nonzero().squeeze(1)
        if cells.numel() == 0:
            continue
        lo, hi = bounds[column], bounds[column + 1]
        states = h[cells, column].to(compute_dtype)                                   # [M, d]
        column_weight = head_weight[lo:hi].to(compute_dtype)                         # [K, d]
        logits = states @ column_weight.T + head_bias[lo:hi].to(compute_dtype)      # [M, K]
        log_probs = torch.log_softmax(logits, 1)
        target = targets[cells, column].long()[:, None]
        ce[cells, column] = -log_probs.gather(1, target).squeeze(1)
        if compute_grad:
            dlogits = log_probs.exp().scatter_add_(1, target, torch.full_like(logits[:, :1], -1.0))
            dlogits = dlogits * weight[cells, column].to(compute_dtype)[:, None]
            grad_h[cells, column] = dlogits @ column_weight
            grad_head_weight[lo:hi] = dlogits.T @ states
            grad_head_bias[lo:hi] = dlogits.sum(0)
    loss = (weight.to(compute_dtype) * ce).sum(1)
    return loss, ce, grad_h, grad_head_weight, grad_head_bias


def ragged_head_sample(h, columns, head_weight, head_bias, offsets, temperature, seed,
                       log_weights=None, restriction=None):
    compute_dtype = compute_dtype_of(h.dtype)
    generator = torch.Generator(device=h.device)
    generator.manual_seed(seed)
    values = torch.empty(h.shape[0], dtype=torch.int64, device=h.device)
    log_mass = torch.zeros(h.shape[0], dtype=compute_dtype, device=h.device)
    bounds = offsets.tolist()
    for column in columns.unique().tolist():
        cells = (columns == column).nonzero().squeeze(1)
        lo, hi = bounds[column], bounds[column + 1]
        logits = h[cells].to(compute_dtype) @ head_weight[lo:hi].to(compute_dtype).T
        logits = logits + head_bias[lo:hi].to(compute_dtype)
        if temperature > 0:
            logits = logits / temperature
        # Unrestricted cells get the zero row: their draws equal those of an unrestricted call.
        lw = torch.zeros_like(logits)
        if restriction is not None:
            rows = restriction[cells]
            restricted = rows >= 0
            lw[restricted] = log_weights[rows[restricted], lo:hi].to(compute_dtype)
            if temperature > 0:
                log_mass[cells] = torch.logsumexp(logits + lw, 1) - torch.logsumexp(logits, 1)
            else:
                log_mass[cells] = torch.where((lw == float("-inf")).all(1), float("-inf"), 0.0).to(compute_dtype)
        if temperature > 0:
            u = torch.rand(logits.shape, generator=generator, dtype=compute_dtype, device=h.device)
            gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(compute_dtype).tiny)))
            scores = logits + lw + gumbel
        else:
            scores = logits.masked_fill(lw == float("-inf"), float("-inf"))
        # Every value forbidden: value 0 (argmax of an all -inf row is not defined by torch).
        values[cells] = torch.where(log_mass[cells] == float("-inf"), 0, scores.argmax(1))
    return values, log_mass


def cached_attention(q, k, v, cache_keys, cache_values, positions, slots):
    cache_keys = _write_slots(cache_keys, slots, k)
    cache_values = _write_slots(cache_values, slots, v)
    allowed = torch.arange(cache_keys.shape[2], device=q.device) <= positions[..., None]   # [N, T, S]
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill_(~allowed, float("-inf")).unsqueeze(1)                          # heads axis
    # Two batched matmuls and an additive mask: at a few queries per row against L + 2 slots
    # SDPA pays an overhead per (row, head); the matmuls are 2.7x faster on one CPU thread
    # for Adult's shapes (4,096 rows, 4 heads, 2 tokens, 17 slots, d_h = 12).
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, cache_keys.transpose(-1, -2)).mul_(scale).add_(bias)
    own = (q * k).sum(-1, keepdim=True).mul_(scale)
    weights = torch.cat([scores, own], -1).softmax(-1)
    attended = torch.matmul(weights[..., :-1], cache_values).addcmul_(weights[..., -1:], v)
    return attended, cache_keys, cache_values


def _write_slots(cache, slots, tokens):
    """The cache [N, H, S, dh] with tokens [N, H, T, dh] written at slots [N, T]: in place
    without autograd, into a copy with it. One index_copy_ of dh-wide rows into the flat
    [N * H * S, dh] view (an indexed assignment cache[rows, :, slots] = ... costs several
    times more)."""
    rows, heads, num_slots, width = cache.shape
    flat = torch.arange(rows * heads, device=cache.device).view(rows, heads, 1) * num_slots + slots[:, None, :]
    if torch.is_grad_enabled():
        cache = cache.clone()
    cache.view(-1, width).index_copy_(0, flat.reshape(-1), tokens.reshape(-1, width))
    return cache
