"""Decoding with the causal denoiser: KV-cached chunks of the order, and contextual orders.

Every row draws its order pi from PL(w) with known columns first (`known_first_order`). The
known columns are encoded once, as tokens of the cache; after that each call of the model
(`CausalTransformer.extend`) writes the tokens that carry the values just revealed and asks
for the next columns, so a row costs O(L) tokens instead of the bidirectional model's O(L^2).

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

from ..models.causal import NO_TARGET
from .common import (ColumnLayout, DecodeStats, ImportanceWeights, chunk_of_position, conditions_first_order,
                     gumbel_noise, known_first_order)


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
    return order, n_known, ordered_values(order, known, known_mask, stats)


def ordered_values(order: Tensor, known: Tensor | None, known_mask: Tensor | None, stats: DecodeStats) -> Tensor:
    """x_ord: the known values placed at their order positions (other positions hold 0 until
    sampled); the order is recorded in stats.orders when it is a list."""
    if stats.orders is not None:
        stats.orders.append(order.cpu())
    x_ord = torch.zeros_like(order)
    if known is not None:
        x_ord = torch.where(known_mask.gather(1, order), known.gather(1, order), x_ord)
    return x_ord


def unorder(order: Tensor, x_ord: Tensor) -> Tensor:
    return torch.empty_like(x_ord).scatter_(1, order, x_ord)


def order_tokens(order: Tensor, x_ord: Tensor, targets: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The model's tokens (values, value columns, target columns, positions) that predict
    order position `targets` [N, T] (padding L) from the prefix before `positions` [N, T]:
    each carries the value and column at position - 1 and the column at its target."""
    last = order.shape[1] - 1
    before = (positions - 1).clamp(0, last)
    value_columns = order.gather(1, before).clamp(min=0)
    return x_ord.gather(1, before), value_columns, order.gather(1, targets.clamp(max=last)), positions


def sample_chunks(model, w: Tensor, layout: ColumnLayout, steps: int, temperature: float, num_rows: int,
                  known: Tensor | None, known_mask: Tensor | None, generator, stats: DecodeStats,
                  restrictions=None) -> Tensor:
    """Rows of tokens [num_rows, L]: each step queries one chunk of the order, from one prefix.

    A chunk [a, b) asks the token at position a (written: it is the next token of the order)
    and queries for positions a+1..b-1 at position a (not written); the same call writes the
    tokens between the previous chunk's start and a, whose values have been sampled since.
    At steps = L a step is one token.
    With `restrictions` (fastmdm.conditions.TokenRestrictions) the restricted columns follow
    the known ones, one per step, drawn from their restricted conditionals; then the rows
    are resampled by their importance weights (stats.effective_sizes gets the effective
    sample size).
    """
    num_columns = w.numel()
    num_restricted = 0
    if restrictions is None:
        order, n_known, x_ord = start_orders(model, w, known, known_mask, num_rows, generator, stats)
        step_of_position = chunk_of_position(n_known, num_columns, steps)
    else:
        order, step_of_position, num_restricted = conditions_first_order(w, num_rows, steps, known_mask,
                                                                         restrictions.restricted, generator)
        x_ord = ordered_values(order, known, known_mask, stats)
        weights = ImportanceWeights(restrictions, layout, num_rows, w.device)
    cache = model.empty_cache(num_rows)
    position = torch.arange(num_columns, device=w.device)
    unwritten = torch.zeros(num_rows, dtype=torch.long, device=w.device)   # positions >= this: not in the cache
    num_steps = int(step_of_position.max()) + 1
    for step in range(num_steps):
        if step == num_restricted and restrictions is not None:
            rows = weights.resample(generator, stats)
            order, x_ord, step_of_position, unwritten = order[rows], x_ord[rows], step_of_position[rows], unwritten[rows]
            cache = cache.select(rows)
        in_chunk = step_of_position == step
        has_chunk = in_chunk.any(1)
        first = torch.where(in_chunk, position, num_columns).amin(1)
        end = torch.where(in_chunk, position + 1, 0).amax(1)
        targets = pack(has_chunk[:, None] & (position >= unwritten[:, None]) & (position < end[:, None]))
        positions = torch.minimum(targets, first[:, None])
        written = (targets <= first[:, None]) & (targets < num_columns)
        cache, h, _ = model.extend(cache, *order_tokens(order, x_ord, targets, positions), written)
        rows, slots = ((targets >= first[:, None]) & (targets < num_columns)).nonzero(as_tuple=True)
        columns = order.gather(1, targets.clamp(max=num_columns - 1))
        if step < num_restricted:
            drawn = unorder(order, step_of_position < step)   # known columns (-1) and earlier steps
            x = torch.where(drawn, unorder(order, x_ord), layout.mask_id)
            x_ord[rows, targets[rows, slots]] = weights.draw(model.heads, h[rows, slots], rows, columns[rows, slots],
                                                             x, layout.mask_id, temperature, generator)
        else:
            x_ord[rows, targets[rows, slots]] = layout.draw(model.heads, h[rows, slots], columns[rows, slots],
                                                            temperature, generator)
        unwritten = torch.where(has_chunk, first + 1, unwritten)
    if restrictions is not None and num_restricted == num_steps:   # nothing but restricted columns to draw
        rows = weights.resample(generator, stats)
        order, x_ord = order[rows], x_ord[rows]
    return unorder(order, x_ord)


def sample_contextual(model, w: Tensor, layout: ColumnLayout, steps: int, temperature: float, num_rows: int,
                      known: Tensor | None, known_mask: Tensor | None, generator, stats: DecodeStats,
                      restrictions=None) -> Tensor:
    """Rows of tokens [num_rows, L] from a contextual model: the next column from the policy
    p_psi(. | values so far), then its value.

    Known columns come first, one per call, each drawn from the policy restricted to the
    known columns not yet placed (no value to sample). The unknown positions are then split
    into `steps` chunks as in `sample_chunks`: a chunk's columns are drawn from one policy
    state without replacement (Gumbel top-k, i.e. sequential PL sampling from the policy),
    queried from one prefix, then appended, and a policy query (a token with no target) at
    the next position gives the next policy state. steps = L is exact: each step is one
    policy draw and one value draw. A step costs two calls (the query needs the column,
    which needs the previous values' policy state). Orders are drawn at temperature 1
    whatever `temperature` (which applies to values). Set and range conditions and rules
    (`restrictions`) are not available: the policy, not PL(w), orders the columns.
    """
    if restrictions is not None:
        raise ValueError("set and range conditions and rules need a static order; this model's orders are "
                         "contextual (condition on exact values instead)")
    num_columns = w.numel()
    device = w.device
    log_prior = torch.log(w)
    offsets = torch.arange(num_columns, device=device)
    cache = model.empty_cache(num_rows)
    revealed = torch.zeros(num_rows, num_columns, dtype=torch.bool, device=device)
    state = model.start_state().expand(num_rows, -1)
    x_ord = torch.zeros(num_rows, num_columns, dtype=torch.long, device=device)
    order = torch.full((num_rows, num_columns), -1, dtype=torch.long, device=device)
    count = torch.zeros(num_rows, dtype=torch.long, device=device)   # positions placed (and written)

    def place(columns: Tensor, values: Tensor, valid: Tensor) -> Tensor:
        """Put columns [N, T] with their values (where valid) at the next positions; returns
        the positions [N, T] (L where not valid)."""
        positions = torch.where(valid, count[:, None] + offsets[:columns.shape[1]], num_columns)
        rows, slots = valid.nonzero(as_tuple=True)
        revealed[rows, columns[rows, slots]] = True
        order[rows, positions[rows, slots]] = columns[rows, slots]
        x_ord[rows, positions[rows, slots]] = values[rows, slots]
        return positions

    def append(targets: Tensor, sizes: Tensor) -> Tensor:
        """Write the tokens of target positions [N, T] (padding L), then count += sizes and
        return the policy state at the new count (a policy query, not written)."""
        nonlocal cache, count
        count = count + sizes
        policy_targets = torch.full_like(count[:, None], NO_TARGET)
        positions = torch.cat([targets, count[:, None]], 1)
        values, value_columns, target_columns, _ = order_tokens(order, x_ord, positions.clamp(max=num_columns), positions)
        target_columns = torch.cat([target_columns[:, :-1], policy_targets], 1)
        written = torch.cat([targets < num_columns, torch.zeros_like(policy_targets, dtype=torch.bool)], 1)
        cache, _, policy = model.extend(cache, values, value_columns, target_columns, positions, written,
                                        policy_states=True)
        return policy[:, -1]

    def draw_columns(allowed: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Up to max(sizes) distinct columns per row from the policy restricted to `allowed`."""
        log_probs = model.order_policy.log_probs(log_prior, state, ~allowed)
        keys = log_probs.float() + gumbel_noise(tuple(log_probs.shape), generator, device)
        width = int(sizes.max())
        columns = keys.topk(width, dim=1).indices
        return columns, offsets[None, :width] < sizes[:, None]

    if known is not None:
        for _ in range(int(known_mask.sum(1).max())):
            allowed = known_mask & ~revealed
            columns, valid = draw_columns(allowed, allowed.any(1).long())
            state = append(place(columns, known.gather(1, columns), valid), valid.sum(1))
    n_known = count.clone()
    step_of_position = chunk_of_position(n_known, num_columns, steps)
    for step in range(int(step_of_position.max()) + 1):
        columns, valid = draw_columns(~revealed, (step_of_position == step).sum(1))
        targets = place(columns, torch.zeros_like(columns), valid)
        # The chunk's first token is the order's next one (written); the rest are queries.
        positions = count[:, None].expand_as(targets)
        written = (targets == positions) & valid
        cache, h, _ = model.extend(cache, *order_tokens(order, x_ord, targets, positions), written)
        rows, slots = valid.nonzero(as_tuple=True)
        x_ord[rows, targets[rows, slots]] = layout.draw(model.heads, h[rows, slots], columns[rows, slots],
                                                        temperature, generator)
        state = append(torch.where(written, num_columns, targets), valid.sum(1))
    if stats.orders is not None:
        stats.orders.append(order.cpu())
    return unorder(order, x_ord)
