"""The causal learned-order denoiser (two streams; docs/design.md).

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
order; sampling calls it once per step (see fastmdm.decoding.causal), so the two can
never disagree. Cache slot 0 is the start token, slot p + 1 is order position p, and the
last slot takes writes from padding tokens and is never attended to.

With order="contextual" the model also chooses its orders: a policy head reads the content
stream's final states (the state at position i - 1 has seen exactly the prefix), and an order
posterior reads the clean row for training (fastmdm.models.orders).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._checks import INT_DTYPES, check_tensor
from .base import TableDenoiser
from .layers import attend, attend_cached
from .orders import OrderPolicy, OrderPosterior

ORDERS = ("static", "contextual")


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
    architecture = "causal"

    def __init__(self, cardinalities: list[int], order: str = "static", **options):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        super().__init__(cardinalities, **options)
        d_model = self._config["d_model"]
        self.start = nn.Parameter(torch.zeros(d_model))
        self.query_embedding = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.start, std=0.02)
        nn.init.normal_(self.query_embedding, std=0.02)
        self._config.update(order=order)
        if order == "contextual":
            self.order_policy = OrderPolicy(d_model, self.num_columns)
            self.order_posterior = OrderPosterior(self.cardinalities)

    @property
    def order(self) -> str:
        """How orders arise: "static" (drawn from PL(w)) or "contextual" (they depend on the values)."""
        return self._config["order"]

    @property
    def contextual(self) -> bool:
        """True when the generation order depends on the values (fastmdm.models.orders)."""
        return self.order == "contextual"

    def order_parameters(self) -> list[nn.Parameter]:
        """The order policy's and posterior's parameters (contextual models; static: none)."""
        if not self.contextual:
            return []
        return [*self.order_policy.parameters(), *self.order_posterior.parameters()]

    @property
    def policy_depth(self) -> int:
        """How many blocks the content stream has passed where the order policy reads it.

        The second-to-last block's output (the last block's, for a one-block model): it has
        seen the whole prefix, and the last block then runs the query stream only, as a
        static model's does, so a contextual training step costs little more than a static
        one (benchmarks/results/contextual_step.md). Static models: the last block (unused).
        """
        num_layers = len(self.blocks)
        return max(1, num_layers - 1) if self.contextual and num_layers else num_layers

    @property
    def trash_slot(self) -> int:
        return self.num_columns + 1

    def _start_states(self) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Keys and values [1, H, 1, d / H] of the start token in every layer (it sees only
        itself), and its state at `policy_depth` [d] (what the order policy reads before any value)."""
        keys, values = [], []
        h = self.start.view(1, 1, -1)
        policy_state = h
        for index, block in enumerate(self.blocks):
            q, k, v = block.project(h)
            keys.append(k)
            values.append(v)
            h = block.mix(h, attend(q, k, v))
            if index + 1 == self.policy_depth:
                policy_state = h
        return keys, values, self.norm_out(policy_state).view(-1)

    def start_state(self) -> Tensor:
        return self._start_states()[2]

    def posterior_scores(self, x: Tensor, w: Tensor) -> Tensor:
        """Plackett-Luce scores [B, L] of the order posterior q_phi(pi | x) = PL(w * r_phi(x))
        for clean rows x [B, L] (contextual models only; training and diagnostics)."""
        return w * self.order_posterior(x)

    def empty_cache(self, rows: int) -> KVCache:
        """A cache of L + 2 slots per row holding only the start token (slot 0)."""
        def slots(start: Tensor) -> Tensor:
            shape = (rows, start.shape[1], self.num_columns + 2, start.shape[3])
            return torch.cat([start.expand(rows, -1, -1, -1),
                              start.new_zeros(shape[0], shape[1], shape[2] - 1, shape[3])], 2)
        keys, values, _ = self._start_states()
        return KVCache([slots(k) for k in keys], [slots(v) for v in values])

    def extend(self, cache: KVCache | None, values: Tensor, value_columns: Tensor, value_positions: Tensor,
               query_columns: Tensor, query_sees: Tensor, content_states: bool = False) -> tuple[KVCache, Tensor]:
        """Append content tokens to the cache and answer query tokens; returns (cache, h).

        values, value_columns [N, Tc] and value_positions ([N, Tc] or [Tc]): tokens
        x_{pi_p} of column pi_p at order position p (position L marks padding, which is
        written to the trash slot). query_columns [N, Tq] and query_sees ([N, Tq] or [Tq]):
        a query for a column that sees the content at order positions < query_sees (and
        the start token). h [N, Tq, d] are the final query states, ready for the heads.
        cache=None is an empty cache whose content arrives at positions 0..Tc-1 in this
        call (training): keys are then concatenated, not scattered. The returned cache
        replaces the given one; without autograd the given one is updated in place.
        With `content_states`, h is [N, Tc + Tq, d]: the content tokens' states at
        `policy_depth` (which the order policy reads) come first.
        """
        content = self.embed_values(values, value_columns)
        query = self.query_embedding + self.embed_columns(query_columns)
        write = (value_positions + 1).clamp(max=self.trash_slot)
        # A content token at position p sees slots 0..p+1 (itself included); a query sees
        # slots 0..query_sees; padding content sees only the start token.
        content_sees = torch.where(value_positions < self.num_columns, write, torch.zeros_like(write))
        sees = torch.cat([content_sees.expand(*query_sees.shape[:-1], -1),
                          query_sees.expand(*content_sees.shape[:-1], -1)], -1)
        num_slots = self.num_columns + 2 if cache is not None else content.shape[1] + 1
        allowed = torch.arange(num_slots, device=values.device) <= sees[..., None]    # [(N,) T, S]
        allowed = allowed.unsqueeze(-3)                                               # heads axis
        if cache is None:
            start_keys, start_values, _ = self._start_states()
            attention = attend
            mask = allowed
        else:
            attention = attend_cached
            mask = torch.zeros(allowed.shape, dtype=content.dtype, device=content.device)
            mask.masked_fill_(~allowed, float("-inf"))
            slots = write.expand(content.shape[0], -1)
        split = content.shape[1]
        h = torch.cat([content, query.to(content.dtype)], 1)
        keys, vals = [], []
        last = len(self.blocks) - 1
        # The content stream's last outputs are used only when the policy reads them.
        content_through_last = content_states and self.policy_depth == len(self.blocks)
        policy_states, query_from = h[:, :split], split
        for index, block in enumerate(self.blocks):
            q_content, k, v = block.project(h[:, :split])
            q = torch.cat([q_content, block.query(h[:, split:])], 2)
            if cache is None:
                count = k.shape[0]
                keys.append(torch.cat([start_keys[index].expand(count, -1, -1, -1).to(k.dtype), k], 2))
                vals.append(torch.cat([start_values[index].expand(count, -1, -1, -1).to(v.dtype), v], 2))
            else:
                keys.append(write_slots(cache.keys[index].to(k.dtype), slots, k))
                vals.append(write_slots(cache.values[index].to(v.dtype), slots, v))
            if index == last and not content_through_last:
                h = block.mix(h[:, split:], attention(q[:, :, split:], keys[-1], vals[-1], mask[..., split:, :]))
                query_from = 0
            else:
                h = block.mix(h, attention(q, keys[-1], vals[-1], mask))
            if content_states and index + 1 == self.policy_depth:
                policy_states = h[:, :split]
        h = h[:, query_from:]
        if content_states:
            h = torch.cat([policy_states, h], 1)
        return KVCache(keys, vals), self.norm_out(h)

    def forward(self, x: Tensor, order: Tensor, targets: Tensor | None = None,
                weight: Tensor | None = None, mask: Tensor | None = None,
                order_prior: Tensor | None = None) -> Tensor:
        """Logits [N, V], or with targets the per-row loss -log p(x | order). Given
        `order_prior` (the schedule's w: the policy's prior scores), a contextual model adds
        -log p_psi(order | x), so that the loss is -log p(x, order)."""
        self.check_tokens("x", x, allow_mask=False)
        check_order(order, x.shape[0], self.num_columns)
        rows, length = x.shape
        positions = torch.arange(length, device=x.device)
        scores_order = self.contextual and targets is not None and order_prior is not None
        _, h = self.extend(None, x.gather(1, order), order, positions, order, positions,
                           content_states=scores_order)
        content, h = h[:, :-length], h[:, -length:]
        h_by_column = torch.empty_like(h).scatter_(1, order[..., None].expand_as(h), h)
        loss = self.loss_or_logits(h_by_column, targets, weight, mask)
        if scores_order:
            loss = loss - self.order_log_prob(order_prior, content, order).to(loss.dtype)
        return loss

    def order_log_prob(self, order_prior: Tensor, content: Tensor, order: Tensor) -> Tensor:
        """log p_psi(order | x) per row from the content states [N, L, d] of one pass: step i
        reads the state at position i - 1 (the start token's for i = 0)."""
        rows, length = order.shape
        before = torch.cat([self.start_state().to(content.dtype).expand(rows, 1, -1), content[:, :-1]], 1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand_as(order))
        steps = torch.arange(length, device=order.device)
        revealed = rank[:, None, :] < steps[None, :, None]                   # [N, step, column]
        log_probs = self.order_policy.log_probs(torch.log(order_prior), before, revealed)
        return log_probs.gather(2, order[..., None]).squeeze(2).sum(1)


def write_slots(cache: Tensor, slots: Tensor, tokens: Tensor) -> Tensor:
    """The cache [N, H, S, dh] with tokens [N, H, T, dh] written at slots [N, T]: in place
    when decoding (no autograd; the cache is the caller's to reuse), into a copy otherwise.
    One index_copy_ of dh-wide rows into the flat [N * H * S, dh] view (an indexed
    assignment cache[rows, :, slots] = ... costs several times more)."""
    rows, heads, num_slots, width = cache.shape
    flat = (torch.arange(rows * heads, device=cache.device).view(rows, heads, 1) * num_slots + slots[:, None, :])
    if torch.is_grad_enabled():
        cache = cache.clone()
    cache.view(-1, width).index_copy_(0, flat.reshape(-1), tokens.reshape(-1, width))
    return cache


def check_order(order: Tensor, rows: int, num_columns: int) -> None:
    """order [rows, L] must hold a permutation of 0..L-1 in every row."""
    check_tensor("order", order, ndim=2, dtypes=INT_DTYPES)
    if tuple(order.shape) != (rows, num_columns):
        raise ValueError(f"order must have shape ({rows}, {num_columns}), got {tuple(order.shape)}")
    expected = torch.arange(num_columns, device=order.device)
    if not bool((order.sort(1).values == expected).all()):
        raise ValueError("every row of order must be a permutation of the column ids 0..L-1")
