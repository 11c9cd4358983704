"""One KV-cached attention step of the causal decoder: write the step's keys and values into
the cache, then attend each query to the cache slots before its position and to itself.

A decoding step asks one or a few queries per row against L + 2 cache slots. As torch ops
that is a batched matmul per (row, head) of a 1 x dh by dh x S product, a mask, a softmax
and a second matmul, each a pass over the cache; the fused C++ kernel reads each row's
slots once, only those its queries may see, and writes the result in the layout the
block's output projection reads (benchmarks/results/decode_speed.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INT_DTYPES, check_same_device, check_tensor
from . import reference
from ._dispatch import select


def cached_attention(q: Tensor, k: Tensor, v: Tensor, cache_keys: Tensor, cache_values: Tensor,
                     positions: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(attended [N, H, T, dh], cache_keys, cache_values) of queries q [N, H, T, dh] whose
    keys and values k, v [N, H, T, dh] go to cache slots `slots` [N, T] of cache_keys and
    cache_values [N, H, S, dh]; query (n, t) sees slots 0..positions[n, t] ([N, T] or [T],
    at most S - 2) and its own key (see fastmdm.ops.reference).

    The caches are updated in place and returned; under autograd (the reference, the only
    differentiable path) they are copies.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v), ("cache_keys", cache_keys), ("cache_values", cache_values)):
        check_tensor(name, tensor, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("positions", positions, dtypes=INT_DTYPES)
    check_tensor("slots", slots, ndim=2, dtypes=INT_DTYPES)
    rows, heads, tokens, width = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if cache_values.shape != cache_keys.shape or cache_keys.shape[:2] != (rows, heads) or cache_keys.shape[3] != width:
        raise ValueError(f"the caches must be [{rows}, {heads}, S, {width}], got {tuple(cache_keys.shape)}, "
                         f"{tuple(cache_values.shape)}")
    if not q.dtype == k.dtype == v.dtype == cache_keys.dtype == cache_values.dtype:
        raise TypeError("q, k, v and the caches must share a dtype")
    positions = positions.long().expand(rows, tokens)
    if tuple(slots.shape) != (rows, tokens):
        raise ValueError(f"slots must have shape {(rows, tokens)}, got {tuple(slots.shape)}")
    check_same_device(q=q, cache_keys=cache_keys, positions=positions, slots=slots)
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, cache_keys, cache_values))
    backend = reference if differentiable else select("cached_attention", q, k, v, cache_keys, cache_values)
    return backend.cached_attention(q, k, v, cache_keys, cache_values, positions, slots.long())
