"""Exact speculative decoding with the causal denoiser (any-subset speculative decoding,
Guo & Ermon 2025).

Draft the next k columns from the current prefix in one pass (q_j), append them and verify
in a second pass (p_j, the true conditionals given the drafts before j), accept draft j while
u < min(1, p_j / q_j), draw the first rejected column from normalize(max(p_j - q_j, 0)), or a
bonus column from p when all drafts pass. The first draft has q = p, so every round reveals
at least one column, and the rows follow the model's joint exactly (the same as steps = L),
whatever k.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .causal import order_tokens, pack, start_orders, unorder
from .common import ColumnLayout, DecodeStats, uniforms


def cell_logits(model, layout: ColumnLayout, h: Tensor, columns: Tensor) -> Tensor:
    """Logits [..., Kmax] (padding at -inf) of column columns[...] from query states h [..., d].

    Speculative decoding needs whole distributions (p, q and max(p - q, 0)); the other
    samplers draw through the heads' chunked Gumbel-max and never build these. Each cell is
    scored against its own column's head only, one matrix product per column present: the
    work is K_l * d per cell, and nothing as wide as the vocabulary V = sum_l K_l is built.
    The layout's never-drawn tokens are at -inf, like padding.
    """
    flat_h, flat_columns = h.reshape(-1, h.shape[-1]), columns.reshape(-1)
    weight, bias = (t.to(h.dtype) for t in model.heads.weight_and_bias())
    offsets = model.heads.offsets.tolist()
    width = layout.pad_index.shape[1]
    logits = flat_h.new_full((flat_h.shape[0], width), float("-inf"))
    by_column = torch.argsort(flat_columns, stable=True)
    counts = torch.bincount(flat_columns, minlength=len(offsets) - 1).tolist()
    for column, cells in enumerate(torch.split(by_column, counts)):
        if cells.numel():
            start, stop = offsets[column], offsets[column + 1]
            logits[cells, :stop - start] = torch.addmm(bias[start:stop], flat_h[cells], weight[start:stop].T)
    return logits.masked_fill_(layout.pad_invalid[flat_columns], float("-inf")).view(*columns.shape, width)


def _probabilities(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T) in float32; T = 0 gives the one-hot argmax (greedy decoding)."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, -1)


def _categorical(probs: Tensor, generator) -> Tensor:
    """One draw per distribution probs [..., K] (not necessarily normalized), by inverse CDF."""
    cumulative = probs.cumsum(-1)
    target = uniforms(tuple(probs.shape[:-1]) + (1,), generator, probs.device) * cumulative[..., -1:]
    return (cumulative < target).sum(-1).clamp(max=probs.shape[-1] - 1)


def sample_speculative(model, w: Tensor, layout: ColumnLayout, draft: int, temperature: float,
                       num_rows: int, known: Tensor | None, known_mask: Tensor | None, generator,
                       stats: DecodeStats) -> Tensor:
    """Rows of tokens [num_rows, L] from the model's exact joint, `draft` columns drafted a round."""
    num_columns = w.numel()
    full_order, n_known, x_ord = start_orders(model, w, known, known_mask, num_rows, generator, stats)
    order, out = full_order, x_ord.clone()
    alive = torch.arange(num_rows, device=w.device)   # rows still decoding, indices into out
    revealed = n_known.clone()                        # positions 0..revealed-1 hold values
    unwritten = torch.zeros_like(revealed)            # positions >= this have no token in the cache
    cache = model.empty_cache(num_rows)
    offsets = torch.arange(draft, device=w.device)
    positions = torch.arange(num_columns, device=w.device)
    while True:
        done = revealed >= num_columns
        if bool(done.any()):
            out[alive[done]] = x_ord[done]
            keep = ~done
            alive, order, x_ord, revealed, unwritten = alive[keep], order[keep], x_ord[keep], revealed[keep], unwritten[keep]
            cache = cache.select(keep)
        if alive.numel() == 0:
            break
        # Draft: the tokens of the positions revealed since the last round (written), then k
        # queries for positions revealed .. revealed+k-1 that all see the current prefix; the
        # first is the order's next token, so it is written too.
        pending = pack((positions >= unwritten[:, None]) & (positions < revealed[:, None]))
        draft_positions = revealed[:, None] + offsets
        in_table = draft_positions < num_columns
        draft_positions = draft_positions.masked_fill(~in_table, num_columns)
        draft_columns = order.gather(1, draft_positions.clamp(max=num_columns - 1))
        targets = torch.cat([pending, draft_positions], 1)
        sources = torch.cat([pending, revealed[:, None].expand_as(draft_positions)], 1)
        written = torch.cat([pending < num_columns, (offsets == 0) & in_table], 1)
        cache, h, _ = model.extend(cache, *order_tokens(order, x_ord, targets, sources), written)
        q = _probabilities(cell_logits(model, layout, h[:, -draft:], draft_columns), temperature)    # [N, k, Kmax]
        drafts = _categorical(q, generator)
        # Verify: the tokens of positions revealed+1 .. revealed+k, each carrying the draft
        # before it; p_j for j >= 1 is the target of draft j; the last is a bonus.
        verify_positions = (draft_positions + 1).clamp(max=num_columns)
        verify_columns = order.gather(1, verify_positions.clamp(max=num_columns - 1))
        cache, h, _ = model.extend(cache, drafts, draft_columns, verify_columns, verify_positions,
                                   verify_positions < num_columns)
        p_next = _probabilities(cell_logits(model, layout, h, verify_columns), temperature)  # p of position j+1
        # Acceptance: draft 0 always (its q is p); draft j >= 1 with probability min(1, p/q).
        p_draft = torch.cat([q[:, :1], p_next[:, :-1]], 1)
        ratio = p_draft.gather(2, drafts[..., None]).squeeze(2) / q.gather(2, drafts[..., None]).squeeze(2)
        accept = uniforms(tuple(ratio.shape), generator, ratio.device) < ratio
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
        unwritten = revealed + accepted + 1      # the token after the last accepted draft carries it
        revealed = revealed + accepted + has_extra.long()
    return unorder(full_order, out)
