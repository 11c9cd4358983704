"""The causal learned-order denoiser (one stream of L tokens; docs/design.md).

A row's columns are gathered in a generation order pi. Token p (p = 0..L-1) predicts x_{pi_p}:
it carries the value and column of pi_{p-1} (token 0 carries a learned start vector instead)
plus a target embedding of the column pi_p it predicts, the "double positional encoding" of
sigma-GPT (Pannatier et al. 2024). It attends to a learned start token (cache slot 0), to the
tokens before it (slots 1..p) and to itself, so its output depends on x_{pi_<p} only. A
training pass is the start token and the L tokens under a causal mask, one token more than
the bidirectional model's pass. Tokens carry their column's identity
and no position in the order, so the model is permutation-equivariant: relabelling the
columns together with the order changes nothing.

One pass scores every conditional of an order: -log p(x | pi) = sum_i -log p(x_{pi_i} | x_{pi_<i}).
The conditionals depend on the order of the prefix, not only on its set, so the model is a
mixture over orders, p(x) = E_{pi ~ PL(w)} p(x | pi); E_pi[-log p(x | pi)] bounds -log p(x)
(Jensen) and is what training minimizes.

Everything runs through `extend`, which runs tokens against a key/value cache, writing some of
them into it. Training calls it once on an empty cache with the whole order; sampling calls it
once per step (see fastmdm.decoding.causal), so the two can never disagree. Cache slot 0 is
the start token, slot p + 1 is the token at order position p, and the last slot takes the
tokens that are not written (queries, padding) and is never attended to. A token that is not
written is a query: several of them at one position ask for several columns from one prefix
(chunked and speculative sampling).

With order="contextual" the model also chooses its orders: a policy head reads token p's
state at `policy_depth`, where the target embedding has not been added yet (it enters before
that block), so that state has seen exactly x_{pi_<p}; an order posterior reads the clean row
for training (fastmdm.models.orders).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import INT_DTYPES, check_tensor, value_checks_enabled
from ..ops import cached_attention
from .base import TableDenoiser
from .layers import attend
from .orders import OrderPolicy, OrderPosterior

ORDERS = ("static", "contextual")
#: The target column of a token that predicts nothing: a contextual model's policy query.
NO_TARGET = -1


class KVCache(NamedTuple):
    """Per-layer keys and values of the written tokens: each [N, H, L + 2, d / H]."""
    keys: list[Tensor]
    values: list[Tensor]

    def select(self, rows: Tensor) -> "KVCache":
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values])


class Extension(NamedTuple):
    """What `extend` returns: the cache, the tokens' final states [N, T, d] (ready for the
    heads) and, when asked for, their states at `policy_depth` [N, T, d] (what the order
    policy reads; None otherwise)."""
    cache: KVCache
    states: Tensor
    policy_states: Tensor | None


class CausalTransformer(TableDenoiser):
    """Causal denoiser: (x [N, L], order [N, L]) -> logits [N, V] of every
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
        # Its own table, not column_embedding: a token carries two columns (its value's and
        # its target's), and one shared table would make their sum symmetric.
        self.target_embedding = nn.Parameter(torch.zeros(self.num_columns, d_model))
        nn.init.normal_(self.start, std=0.02)
        nn.init.normal_(self.target_embedding, std=0.02)
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
        """The block before which tokens get their target embedding; a contextual model's
        order policy reads the states there.

        Static models: 0, every block sees the target. Contextual models: the last block
        (after the only one, for a one-block model): before it a token's state has seen the
        prefix and not the column it predicts, which is what the policy chooses, so one pass
        of L tokens serves the policy and the conditionals
        (benchmarks/results/contextual_step.md).
        """
        num_layers = len(self.blocks)
        return max(1, num_layers - 1) if self.contextual and num_layers else 0

    @property
    def trash_slot(self) -> int:
        return self.num_columns + 1

    def _start_states(self) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Keys and values [1, H, 1, d / H] of the start token in every layer (it sees only
        itself), and its state at `policy_depth` [d] (what the order policy reads before any
        value)."""
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
        """A cache of L + 2 slots per row holding only the start token (slot 0).

        Slots are zero until written: the reference attention multiplies masked slots by a
        zero weight, which a NaN from uninitialized memory would turn into NaN. Zeros with
        slot 0 filled in: one pass over the memory, where a concatenation took three.
        """
        keys, values, _ = self._start_states()

        def slots(start: Tensor) -> Tensor:
            cache = start.new_zeros(rows, start.shape[1], self.num_columns + 2, start.shape[3])
            cache[:, :, :1] = start
            return cache
        return KVCache([slots(k) for k in keys], [slots(v) for v in values])

    def _embed(self, values: Tensor, value_columns: Tensor, positions: Tensor) -> Tensor:
        """Token inputs before the target: value(x) + column(c) of the previous order
        position, the start vector at position 0."""
        content = self.embed_values(values, value_columns)
        return torch.where((positions == 0)[..., None], self.start.to(content.dtype), content)

    def _embed_targets(self, target_columns: Tensor) -> Tensor:
        embedded = F.embedding(target_columns.clamp(min=0), self.target_embedding)
        return embedded.masked_fill((target_columns == NO_TARGET)[..., None], 0)

    def extend(self, cache: KVCache | None, values: Tensor, value_columns: Tensor, target_columns: Tensor,
               positions: Tensor, written: Tensor, policy_states: bool = False) -> Extension:
        """Run tokens [N, T] against the cache, writing those marked `written` into it.

        A token at order position p ([N, T] or [T]) carries values, value_columns: x_{pi_{p-1}}
        and pi_{p-1} (ignored at p = 0, which carries the start vector), and target_columns:
        pi_p, the column it predicts (NO_TARGET: none, a policy query). It sees the start
        token, the tokens at positions < p and itself. A written token goes to slot p + 1; the others
        (queries; padding, at position L) to the trash slot. Written tokens of one call are
        seen by the call's later positions. cache=None is an empty cache whose tokens arrive
        at positions 0..T-1 in this call, all written (training): the start token then runs
        as the pass's first token, under SDPA's causal mask, and no cache is scattered. The returned cache replaces the given one; without
        autograd the given one is updated in place.
        """
        h = self._embed(values, value_columns, positions)
        targets = self._embed_targets(target_columns).to(h.dtype)
        if cache is None:
            h = torch.cat([self.start.to(h.dtype).expand(h.shape[0], 1, -1), h], 1)
            targets = torch.cat([torch.zeros_like(targets[:, :1]), targets], 1)
        else:
            slots = torch.where(written & (positions < self.num_columns), positions + 1, self.trash_slot)
            slots = slots.expand(h.shape[0], -1)
        keys, vals = [], []
        policy = None
        for index, block in enumerate(self.blocks):
            if index == self.policy_depth:
                policy, h = h, h + targets
            q, k, v = block.project(h)
            if cache is None:
                keys.append(k)
                vals.append(v)
                attended = attend(q, k, v, causal=True)
            else:
                attended, layer_keys, layer_values = cached_attention(
                    q, k, v, cache.keys[index].to(k.dtype), cache.values[index].to(v.dtype), positions, slots)
                keys.append(layer_keys)
                vals.append(layer_values)
            h = block.mix(h, attended)
        if self.policy_depth == len(self.blocks):
            policy, h = h, h + targets
        if cache is None:                       # the start token's states
            h, policy = h[:, 1:], policy[:, 1:]
        policy = self.norm_out(policy) if policy_states else None
        return Extension(KVCache(keys, vals), self.norm_out(h), policy)

    def forward(self, x: Tensor, order: Tensor, targets: Tensor | None = None,
                weight: Tensor | None = None, mask: Tensor | None = None,
                order_prior: Tensor | None = None) -> Tensor:
        """Logits [N, V], or with targets the per-row loss -log p(x | order). Given
        `order_prior` (the schedule's w: the policy's prior scores), a contextual model adds
        -log p_psi(order | x), so that the loss is -log p(x, order)."""
        self.check_tokens("x", x, allow_mask=False)
        check_order(order, x.shape[0], self.num_columns)
        positions = torch.arange(x.shape[1], device=x.device)
        scores_order = self.contextual and targets is not None and order_prior is not None
        # Token p carries x_{pi_{p-1}}; token 0's slot (the wrapped-around last value) is
        # replaced by the start vector.
        previous = order.roll(1, 1)
        _, h, policy = self.extend(None, x.gather(1, previous), previous, order, positions,
                                   torch.ones_like(positions, dtype=torch.bool), policy_states=scores_order)
        h_by_column = torch.empty_like(h).scatter_(1, order[..., None].expand_as(h), h)
        loss = self.loss_or_logits(h_by_column, targets, weight, mask)
        if scores_order:
            loss = loss - self.order_log_prob(order_prior, policy, order).to(loss.dtype)
        return loss

    def order_log_prob(self, order_prior: Tensor, policy_states: Tensor, order: Tensor) -> Tensor:
        """log p_psi(order | x) per row from the policy states [N, L, d] of one pass: step i
        reads token i's, which has seen x_{pi_<i}."""
        rows, length = order.shape
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand_as(order))
        steps = torch.arange(length, device=order.device)
        revealed = rank[:, None, :] < steps[None, :, None]                   # [N, step, column]
        log_probs = self.order_policy.log_probs(torch.log(order_prior), policy_states, revealed)
        return log_probs.gather(2, order[..., None]).squeeze(2).sum(1)


def check_order(order: Tensor, rows: int, num_columns: int) -> None:
    """order [rows, L] must hold a permutation of 0..L-1 in every row."""
    check_tensor("order", order, ndim=2, dtypes=INT_DTYPES)
    if tuple(order.shape) != (rows, num_columns):
        raise ValueError(f"order must have shape ({rows}, {num_columns}), got {tuple(order.shape)}")
    if not value_checks_enabled():
        return
    expected = torch.arange(num_columns, device=order.device)
    if not bool((order.sort(1).values == expected).all()):
        raise ValueError("every row of order must be a permutation of the column ids 0..L-1")
