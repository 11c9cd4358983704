"""The causal learned-order denoiser (two streams, DESIGN.md section 8).

A row's columns are gathered in a generation order pi. Two streams run through the same
blocks; keys and values come from the content stream only:
- content token i = value(x_{pi_i}) + column(pi_i); it sees a learned start token and the
  content tokens up to and including i;
- query token i = column(pi_i) + a learned query vector; it sees the start token and the
  content tokens before i, so its output predicts x_{pi_i} from x_{pi_<i}.
Tokens carry their column's identity and no position in the order, so the model is
permutation-equivariant: relabelling the columns together with the order changes nothing.

One pass scores every conditional of an order: -log p(x | pi) = sum_i -log p(x_{pi_i} | x_{pi_<i}).
The conditionals depend on the order of the prefix, not only on its set, so the model is a
mixture over orders, p(x) = E_{pi ~ PL(w)} p(x | pi); E_pi[-log p(x | pi)] bounds -log p(x)
(Jensen) and is what training minimizes.

Everything runs through `extend`, which appends content tokens to a key/value cache and
answers query tokens against it. Training calls it once on an empty cache with the whole
order; sampling calls it once per step (see fastmdm.causal_decoding), so the two can
never disagree. Cache slot 0 is the start token, slot p + 1 is order position p, and the
last slot takes writes from padding tokens and is never attended to.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import TableDenoiser
from .layers import attend


class KVCache(NamedTuple):
    """Per-layer keys and values of the content stream: each [N, H, L + 2, d / H]."""
    keys: list[Tensor]
    values: list[Tensor]

    def select(self, rows: Tensor) -> "KVCache":
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values])


class CausalTransformer(TableDenoiser):
    """Two-stream causal denoiser: (x [N, L], order [N, L]) -> logits [N, V] of every
    p(x_{pi_i} | x_{pi_<i}), returned in column layout (column l at offsets[l]:offsets[l+1]).

    With `targets`, `weight`, `mask` it returns the per-row weighted cross entropy instead
    (training passes weight 1 and mask True everywhere: -log p(x | pi)).
    """

    causal = True

    def __init__(self, cardinalities: list[int], **options):
        super().__init__(cardinalities, **options)
        d_model = self._config["d_model"]
        self.start = nn.Parameter(torch.zeros(d_model))
        self.query_embedding = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.start, std=0.02)
        nn.init.normal_(self.query_embedding, std=0.02)

    @property
    def trash_slot(self) -> int:
        return self.num_columns + 1

    def empty_cache(self, rows: int) -> KVCache:
        """A cache holding only the start token, for `rows` rows (other slots are zero)."""
        keys, values = [], []
        slots = self.num_columns + 2
        h = self.start.view(1, 1, -1)
        for index, block in enumerate(self.blocks):
            _, k, v = block.project(h)
            keys.append(torch.zeros(rows, k.shape[1], slots, k.shape[3], dtype=k.dtype, device=k.device)
                        .index_copy(2, torch.zeros(1, dtype=torch.long, device=k.device), k.expand(rows, -1, -1, -1)))
            values.append(torch.zeros_like(keys[-1]).index_copy(
                2, torch.zeros(1, dtype=torch.long, device=v.device), v.expand(rows, -1, -1, -1)))
            if index + 1 < len(self.blocks):
                h = block.mix(h, attend(*block.project(h)))
        return KVCache(keys, values)

    def extend(self, cache: KVCache, values: Tensor, value_columns: Tensor, value_positions: Tensor,
               query_columns: Tensor, query_sees: Tensor) -> tuple[KVCache, Tensor]:
        """Append content tokens to the cache and answer query tokens; returns (cache, h).

        values, value_columns, value_positions [N, Tc]: tokens x_{pi_p} of column pi_p at
        order position p (position = L marks padding: written to the trash slot).
        query_columns, query_sees [N, Tq]: a query for column c that sees the content at
        order positions < query_sees (the start token always). h [N, Tq, d] are the final
        query states, ready for the heads. The returned cache replaces the given one (it is
        updated out of place, so autograd works through it in training).
        """
        slots = self.num_columns + 2
        content = self.embed_values(values, value_columns)
        query = self.query_embedding + self.column_embedding[query_columns]
        write = (value_positions + 1).clamp(max=self.trash_slot)          # [N, Tc]
        slot_ids = torch.arange(slots, device=values.device)
        # A content token at position p sees slots 0..p+1 (itself included); a query sees
        # slots 0..query_sees. Padding content sees only the start token.
        content_sees = torch.where(value_positions < self.num_columns, write, torch.zeros_like(write))
        allowed = slot_ids <= torch.cat([content_sees, query_sees], 1)[..., None]   # [N, T, S]
        allowed = allowed[:, None]                                         # [N, 1, T, S]
        split = content.shape[1]
        h = torch.cat([content, query.to(content.dtype)], 1)
        keys, vals = [], []
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            q_content, k, v = block.project(h[:, :split])
            q = torch.cat([q_content, block.query(h[:, split:])], 2)
            index_k = write[:, None, :, None].expand_as(k)
            keys.append(cache.keys[index].to(k.dtype).scatter(2, index_k, k))
            vals.append(cache.values[index].to(v.dtype).scatter(2, index_k, v))
            if index == last:   # the content stream's last outputs are never read
                h = h[:, split:]
                h = block.mix(h, attend(q[:, :, split:], keys[-1], vals[-1], allowed[:, :, split:]))
            else:
                h = block.mix(h, attend(q, keys[-1], vals[-1], allowed))
        if not self.blocks:
            h = h[:, split:]
        return KVCache(keys, vals), self.norm_out(h)

    def forward(self, x: Tensor, order: Tensor, targets: Tensor | None = None,
                weight: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        self.check_tokens("x", x, allow_mask=False)
        check_order(order, x.shape[0], self.num_columns)
        rows, length = x.shape
        positions = torch.arange(length, device=x.device).expand(rows, length)
        _, h = self.extend(self.empty_cache(rows), x.gather(1, order), order, positions, order, positions)
        h_by_column = torch.empty_like(h).scatter_(1, order[..., None].expand_as(h), h)
        return self.loss_or_logits(h_by_column, targets, weight, mask)


def check_order(order: Tensor, rows: int, num_columns: int) -> None:
    """order [rows, L] must hold a permutation of 0..L-1 in every row."""
    from .._checks import INT_DTYPES, check_tensor
    check_tensor("order", order, ndim=2, dtypes=INT_DTYPES)
    if tuple(order.shape) != (rows, num_columns):
        raise ValueError(f"order must have shape ({rows}, {num_columns}), got {tuple(order.shape)}")
    expected = torch.arange(num_columns, device=order.device)
    if not bool((order.sort(1).values == expected).all()):
        raise ValueError("every row of order must be a permutation of the column ids 0..L-1")
