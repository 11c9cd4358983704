"""Transformer pieces shared by the denoisers: a pre-norm block split into its two halves.

Splitting a block into `project` (norm + q/k/v) and `mix` (output projection + MLP) lets the
bidirectional model run it as usual and the causal model put its keys and values into a
cache between the two, with start-token keys that no token of the pass computes.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) | allowed) v for [N, H, T, dh] queries and [N, H, S, dh] keys.

    `allowed` is boolean, True = may attend, broadcastable to [N, H, T, S]; every query must
    be allowed at least one key. `causal` (without `allowed`): query t sees keys 0..t, the
    causal model's training pass; SDPA's own causal path is faster than the same boolean
    mask (about 0.7x its time, forward and backward, on one CPU thread at Adult's training
    shapes). torch's SDPA against explicit batched matmuls, on CPU for
    15 and 60 columns (`python benchmarks/attention.py`, benchmarks/results/attention.md):
    SDPA is 1.2-2.7x faster for training, forward and backward, and within 11% either way
    for a masked KV-cached decoding step at that benchmark's batch. SDPA serves every full
    pass; the causal model's KV-cached decoding steps use `fastmdm.ops.cached_attention`.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal)


class Block(nn.Module):
    """Pre-norm transformer block (attention, then a GELU MLP), used in two halves."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(),
                                nn.Linear(dim_feedforward, d_model))
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        """[N, T, d] -> [N, H, T, d / H]."""
        rows, length, width = x.shape
        return x.view(rows, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of h [N, T, d], each [N, H, T, d / H]."""
        q, k, v = self.qkv(self.norm_attn(h)).chunk(3, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def mix(self, h: Tensor, attended: Tensor) -> Tensor:
        """Residual update of h [N, T, d] with attention output [N, H, T, d / H], then the MLP."""
        rows, length, width = h.shape
        h = h + self.drop(self.proj(attended.transpose(1, 2).reshape(rows, length, width)))
        return h + self.drop(self.ff(self.norm_ff(h)))

    def forward(self, h: Tensor, allowed: Tensor | None = None) -> Tensor:
        q, k, v = self.project(h)
        return self.mix(h, attend(q, k, v, allowed))
