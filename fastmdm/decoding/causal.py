"""Decoding with the causal denoiser: KV-cached chunks of the order, and contextual orders.

Every row draws its order pi from PL(w) with known columns first (`known_first_order`). The
known columns are encoded once, as content tokens of the cache; after that each call of the
model (`CausalTransformer.extend`) appends the columns just revealed and asks query tokens
for the next ones, so a row costs O(L) tokens instead of the bidirectional model's O(L^2).

- `sample_chunks`: the unknown positions are split into `steps` chunks of ranks; a chunk's
  queries all see the same prefix. steps = L is exact learned-order AR; fewer steps are
  approximate, as with the bidirectional model.
- `sample_contextual`: the next column comes from the model's order policy, given the values
  so far.
Exact speculative decoding, which reuses this module's helpers, is in
`fastmdm.decoding.speculative`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import ColumnLayout, DecodeStats, chunk_of_position, gumbel_noise, known_first_order


def pack(selected: Tensor) -> Tensor:
    """Positions [N, T] of the True entries of selected [N, L], ascending, padded with L."""
    rows, length = selected.shape
    width = int(selected.sum(1).max()) if rows else 0
    slot = torch.where(selected, selected.cumsum(1) - 1, torch.full_like(selected, width, dtype=torch.long))
    packed = torch.full((rows, width + 1), length, dtype=torch.long, device=selected.device)
    positions = torch.arange(length, device=selected.device).expand(rows, length)
    return packed.scatter_(1, slot, positions)[:, :width]


def start_orders(model, w: Tensor, known: Tensor | None, known_mask: Tensor | None, num_rows: int,
           generator, stats: DecodeStats) -> tuple[Tensor, Tensor, Tensor]:
    """(order, n_known, x_ord): orders with known columns first (recorded in stats.orders when
    it is a list), and the known values placed at their order positions (other positions
    hold 0 until sampled)."""
    order, n_known = known_first_order(w, num_rows, known_mask, generator)
    if stats.orders is not None:
        stats.orders.append(order.cpu())
    x_ord = torch.zeros_like(order)
    if known is not None:
        x_ord = torch.where(known_mask.gather(1, order), known.gather(1, order), x_ord)
    return order, n_known, x_ord


def unorder(order: Tensor, x_ord: Tensor) -> Tensor:
    return torch.empty_like(x_ord).scatter_(1, order, x_ord)


def content_tokens(order: Tensor, x_ord: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Values, columns and positions of content tokens at `positions` (padding L stays L)."""
    safe = positions.clamp(max=order.shape[1] - 1)
    return x_ord.gather(1, safe), order.gather(1, safe), positions


def sample_chunks(model, w: Tensor, layout: ColumnLayout, steps: int, temperature: float, num_rows: int,
                  known: Tensor | None, known_mask: Tensor | None, generator, stats: DecodeStats) -> Tensor:
    """Rows of tokens [num_rows, L]: each step queries one chunk of the order, from one prefix."""
    num_columns = w.numel()
    order, n_known, x_ord = start_orders(model, w, known, known_mask, num_rows, generator, stats)
    step_of_position = chunk_of_position(n_known, num_columns, steps)
    cache = model.empty_cache(num_rows)
    pending = pack(step_of_position == -1)           # known columns: encoded in the first call
    for step in range(int(step_of_position.max()) + 1):
        positions = pack(step_of_position == step)   # [N, T], ascending, padded with L
        valid = positions < num_columns
        columns = order.gather(1, positions.clamp(max=num_columns - 1))
        sees = positions[:, :1].expand_as(positions)  # the chunk's first position: one prefix
        cache, h = model.extend(cache, *content_tokens(order, x_ord, pending), columns, sees)
        rows, slots = valid.nonzero(as_tuple=True)
        x_ord[rows, positions[rows, slots]] = model.heads.sample(h[rows, slots], columns[rows, slots],
                                                                 temperature, generator)
        pending = positions
    return unorder(order, x_ord)


def sample_contextual(model, w: Tensor, layout: ColumnLayout, steps: int, temperature: float, num_rows: int,
                      known: Tensor | None, known_mask: Tensor | None, generator, stats: DecodeStats) -> Tensor:
    """Rows of tokens [num_rows, L] from a contextual model: the next column from the policy
    p_psi(. | values so far), then its value.

    Known columns come first, one per call, each drawn from the policy restricted to the
    known columns not yet placed (no value to sample). The unknown positions are then split
    into `steps` chunks as in `sample_chunks`: a chunk's columns are drawn from one policy
    state without replacement (Gumbel top-k, i.e. sequential PL sampling from the policy),
    queried from one prefix, then appended as content, whose last state gives the next
    policy. steps = L is exact: each step is one policy draw and one value draw. A step costs
    two calls (the query needs the column, which needs the previous content's state).
    Orders are drawn at temperature 1 whatever `temperature` (which applies to values).
    """
    num_columns = w.numel()
    device = w.device
    log_prior = torch.log(w)
    arange = torch.arange(num_columns, device=device)
    no_tokens = torch.zeros(num_rows, 0, dtype=torch.long, device=device)
    cache = model.empty_cache(num_rows)
    revealed = torch.zeros(num_rows, num_columns, dtype=torch.bool, device=device)
    state = model.start_state().expand(num_rows, -1)
    x = torch.zeros(num_rows, num_columns, dtype=torch.long, device=device)
    order = torch.full((num_rows, num_columns), -1, dtype=torch.long, device=device)
    count = torch.zeros(num_rows, dtype=torch.long, device=device)

    def append(columns: Tensor, values: Tensor, valid: Tensor) -> Tensor:
        """Write values of columns [N, T] (where valid) as content at the next positions;
        returns the state after the last valid one (unchanged for rows with none)."""
        nonlocal cache, count
        sizes = valid.sum(1)
        positions = torch.where(valid, count[:, None] + valid.cumsum(1) - 1, num_columns)
        cache, h = model.extend(cache, values, columns, positions, no_tokens, no_tokens, content_states=True)
        rows, slots = valid.nonzero(as_tuple=True)
        revealed[rows, columns[rows, slots]] = True
        x[rows, columns[rows, slots]] = values[rows, slots]
        order[rows, positions[rows, slots]] = columns[rows, slots]
        count = count + sizes
        last = h.gather(1, (sizes - 1).clamp(min=0)[:, None, None].expand(-1, 1, h.shape[2])).squeeze(1)
        return torch.where((sizes > 0)[:, None], last, state)

    def draw_columns(allowed: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Up to max(sizes) distinct columns per row from the policy restricted to `allowed`."""
        log_probs = model.order_policy.log_probs(log_prior, state, ~allowed)
        keys = log_probs.float() + gumbel_noise(tuple(log_probs.shape), generator, device)
        width = int(sizes.max())
        columns = keys.topk(width, dim=1).indices
        return columns, torch.arange(width, device=device)[None, :] < sizes[:, None]

    if known is not None:
        for _ in range(int(known_mask.sum(1).max())):
            allowed = known_mask & ~revealed
            columns, valid = draw_columns(allowed, allowed.any(1).long())
            state = append(columns, known.gather(1, columns), valid)
    n_known = count.clone()
    step_of_position = chunk_of_position(n_known, num_columns, steps)
    for step in range(int(step_of_position.max()) + 1):
        columns, valid = draw_columns(~revealed, (step_of_position == step).sum(1))
        sees = count[:, None].expand_as(columns)
        cache, h = model.extend(cache, no_tokens, no_tokens, no_tokens, columns, sees)
        rows, slots = valid.nonzero(as_tuple=True)
        values = torch.zeros_like(columns)
        values[rows, slots] = model.heads.sample(h[rows, slots], columns[rows, slots], temperature, generator)
        state = append(columns, values, valid)
    if stats.orders is not None:
        stats.orders.append(order.cpu())
    return x
