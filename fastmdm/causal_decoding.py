"""Decoding with the causal denoiser: KV-cached chunks of the order, and exact speculative decoding.

Every row draws its order pi from PL(w) with known columns first (`known_first_order`). The
known columns are encoded once, as content tokens of the cache; after that each call of the
model (`CausalTransformer.extend`) appends the columns just revealed and asks query tokens
for the next ones, so a row costs O(L) tokens instead of the bidirectional model's O(L^2).

- `sample_chunks`: the unknown positions are split into `steps` chunks of ranks; a chunk's
  queries all see the same prefix. steps = L is exact learned-order AR; fewer steps are
  approximate, as with the bidirectional model.
- `sample_speculative` (any-subset speculative decoding, Guo & Ermon 2025): draft the next k
  columns from the current prefix in one pass (q_j), append them and verify in a second pass
  (p_j, the true conditionals given the drafts before j), accept draft j while
  u < min(1, p_j / q_j), draw the first rejected column from normalize(max(p_j - q_j, 0)), or
  a bonus column from p when all drafts pass. The first draft has q = p, so every round
  reveals at least one column, and the rows follow the model's joint exactly (the same as
  steps = L), whatever k.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sample import ColumnLayout, DecodeStats, _uniform, chunk_of_position, gumbel_noise, known_first_order


def _pack(selected: Tensor) -> Tensor:
    """Positions [N, T] of the True entries of selected [N, L], ascending, padded with L."""
    rows, length = selected.shape
    width = int(selected.sum(1).max()) if rows else 0
    slot = torch.where(selected, selected.cumsum(1) - 1, torch.full_like(selected, width, dtype=torch.long))
    packed = torch.full((rows, width + 1), length, dtype=torch.long, device=selected.device)
    positions = torch.arange(length, device=selected.device).expand(rows, length)
    return packed.scatter_(1, slot, positions)[:, :width]


def _cell_logits(model, layout: ColumnLayout, h: Tensor, columns: Tensor) -> Tensor:
    """Logits [..., Kmax] (padding at -inf) of column columns[...] from query states h [..., d].

    Speculative decoding needs whole distributions (p, q and max(p - q, 0)); the other
    samplers draw through the heads' chunked Gumbel-max and never build these. Each cell is
    scored against its own column's head only, one matrix product per column present: the
    work is K_l * d per cell, and nothing as wide as the vocabulary V = sum_l K_l is built.
    """
    flat_h, flat_columns = h.reshape(-1, h.shape[-1]), columns.reshape(-1)
    heads = model.heads
    weight, bias = heads.weight.to(h.dtype), heads.bias.to(h.dtype)
    offsets = heads.offsets.tolist()
    width = layout.pad_index.shape[1]
    logits = flat_h.new_full((flat_h.shape[0], width), float("-inf"))
    by_column = torch.argsort(flat_columns, stable=True)
    counts = torch.bincount(flat_columns, minlength=len(offsets) - 1).tolist()
    for column, cells in enumerate(torch.split(by_column, counts)):
        if cells.numel():
            start, stop = offsets[column], offsets[column + 1]
            logits[cells, :stop - start] = torch.addmm(bias[start:stop], flat_h[cells], weight[start:stop].T)
    return logits.view(*columns.shape, width)


def _start(model, w: Tensor, known: Tensor | None, known_mask: Tensor | None, num_rows: int,
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


def _unorder(order: Tensor, x_ord: Tensor) -> Tensor:
    return torch.empty_like(x_ord).scatter_(1, order, x_ord)


def _content(order: Tensor, x_ord: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Values, columns and positions of content tokens at `positions` (padding L stays L)."""
    safe = positions.clamp(max=order.shape[1] - 1)
    return x_ord.gather(1, safe), order.gather(1, safe), positions


def sample_chunks(model, w: Tensor, layout: ColumnLayout, steps: int, temperature: float, num_rows: int,
                  known: Tensor | None, known_mask: Tensor | None, generator, stats: DecodeStats) -> Tensor:
    """Rows of tokens [num_rows, L]: each step queries one chunk of the order, from one prefix."""
    num_columns = w.numel()
    order, n_known, x_ord = _start(model, w, known, known_mask, num_rows, generator, stats)
    step_of_position = chunk_of_position(n_known, num_columns, steps)
    cache = model.empty_cache(num_rows)
    pending = _pack(step_of_position == -1)           # known columns: encoded in the first call
    for step in range(int(step_of_position.max()) + 1):
        positions = _pack(step_of_position == step)   # [N, T], ascending, padded with L
        valid = positions < num_columns
        columns = order.gather(1, positions.clamp(max=num_columns - 1))
        sees = positions[:, :1].expand_as(positions)  # the chunk's first position: one prefix
        cache, h = model.extend(cache, *_content(order, x_ord, pending), columns, sees)
        rows, slots = valid.nonzero(as_tuple=True)
        x_ord[rows, positions[rows, slots]] = model.heads.sample(h[rows, slots], columns[rows, slots],
                                                                 temperature, generator)
        pending = positions
    return _unorder(order, x_ord)


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


def _probabilities(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T) in float32; T = 0 gives the one-hot argmax (greedy decoding)."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, -1)


def _categorical(probs: Tensor, generator) -> Tensor:
    """One draw per distribution probs [..., K] (not necessarily normalized), by inverse CDF."""
    cumulative = probs.cumsum(-1)
    target = _uniform(tuple(probs.shape[:-1]) + (1,), generator, probs.device) * cumulative[..., -1:]
    return (cumulative < target).sum(-1).clamp(max=probs.shape[-1] - 1)


def sample_speculative(model, w: Tensor, layout: ColumnLayout, draft: int, temperature: float,
                       num_rows: int, known: Tensor | None, known_mask: Tensor | None, generator,
                       stats: DecodeStats) -> Tensor:
    """Rows of tokens [num_rows, L] from the model's exact joint, `draft` columns drafted a round."""
    num_columns = w.numel()
    full_order, n_known, x_ord = _start(model, w, known, known_mask, num_rows, generator, stats)
    order, out = full_order, x_ord.clone()
    alive = torch.arange(num_rows, device=w.device)   # rows still decoding, indices into out
    revealed = n_known.clone()                        # positions 0..revealed-1 hold values
    cached = torch.zeros_like(revealed)               # positions 0..cached-1 are in the cache
    cache = model.empty_cache(num_rows)
    offsets = torch.arange(draft, device=w.device)
    while True:
        done = revealed >= num_columns
        if bool(done.any()):
            out[alive[done]] = x_ord[done]
            keep = ~done
            alive, order, x_ord, revealed, cached = alive[keep], order[keep], x_ord[keep], revealed[keep], cached[keep]
            cache = cache.select(keep)
        if alive.numel() == 0:
            break
        positions = torch.arange(num_columns, device=w.device)
        pending = _pack((positions >= cached[:, None]) & (positions < revealed[:, None]))
        # Draft: k queries that all see the current prefix.
        draft_positions = revealed[:, None] + offsets
        in_table = draft_positions < num_columns
        draft_positions = draft_positions.masked_fill(~in_table, num_columns)
        draft_columns = order.gather(1, draft_positions.clamp(max=num_columns - 1))
        cache, h = model.extend(cache, *_content(order, x_ord, pending), draft_columns,
                                revealed[:, None].expand_as(draft_positions))
        q = _probabilities(_cell_logits(model, layout, h, draft_columns), temperature)    # [N, k, Kmax]
        drafts = _categorical(q, generator)
        # Verify: append the drafts; query positions revealed+1 .. revealed+k, each seeing
        # the drafts before it. p_j for j >= 1 is the target of draft j; the last is a bonus.
        verify_positions = (draft_positions + 1).clamp(max=num_columns)
        verify_columns = order.gather(1, verify_positions.clamp(max=num_columns - 1))
        cache, h = model.extend(cache, drafts, draft_columns, draft_positions, verify_columns, verify_positions)
        p_next = _probabilities(_cell_logits(model, layout, h, verify_columns), temperature)  # p of position j+1
        # Acceptance: draft 0 always (its q is p); draft j >= 1 with probability min(1, p/q).
        p_draft = torch.cat([q[:, :1], p_next[:, :-1]], 1)
        ratio = p_draft.gather(2, drafts[..., None]).squeeze(2) / q.gather(2, drafts[..., None]).squeeze(2)
        accept = _uniform(tuple(ratio.shape), generator, ratio.device) < ratio
        accept[:, 0] = True
        accept &= in_table
        accepted = accept.to(torch.int64).cumprod(1).sum(1)                 # J: drafts kept
        valid_drafts = in_table.sum(1)
        rejected = accepted < valid_drafts
        # The extra column at position revealed + J: a residual draw after a rejection, else
        # a bonus draw from p when the row is not complete.
        j = accepted.clamp(max=draft - 1)
        residual = (p_draft.gather(1, j[:, None, None].expand(-1, 1, q.shape[2])).squeeze(1)
                    - q.gather(1, j[:, None, None].expand(-1, 1, q.shape[2])).squeeze(1)).clamp(min=0)
        bonus = p_next.gather(1, (valid_drafts - 1).clamp(min=0)[:, None, None].expand(-1, 1, q.shape[2])).squeeze(1)
        extra_probs = torch.where(rejected[:, None], residual, bonus)
        extra = _categorical(extra_probs, generator)
        has_extra = rejected | (revealed + valid_drafts < num_columns)
        keep_draft = offsets[None, :] < accepted[:, None]
        rows, slots = keep_draft.nonzero(as_tuple=True)
        x_ord[rows, draft_positions[rows, slots]] = drafts[rows, slots]
        extra_rows = has_extra.nonzero(as_tuple=True)[0]
        x_ord[extra_rows, (revealed + accepted)[extra_rows]] = extra[extra_rows]
        stats.rounds += int(alive.numel())
        stats.columns += int((accepted + has_extra.long()).sum())
        cached = revealed + accepted
        revealed = revealed + accepted + has_extra.long()
    return _unorder(full_order, out)
