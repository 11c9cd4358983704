"""Learned-order decoding: sampling and imputation of token rows with any denoiser.

- `common`: orders with known columns first, chunks of ranks, Gumbel noise, the column layout;
- `bidirectional`: the bidirectional decoder (re-encodes the row every step);
- `causal`: the causal denoiser's KV-cached chunk decoder and the contextual-order decoder;
- `speculative`: exact speculative decoding with the causal denoiser;
- `sampler`: `sample_tokens` and `impute_tokens`, which check, batch and dispatch.
"""
from .common import ColumnLayout, DecodeStats, chunk_of_position, known_first_order, reveal_steps
from .sampler import impute_tokens, sample_tokens

__all__ = ["ColumnLayout", "DecodeStats", "chunk_of_position", "impute_tokens", "known_first_order",
           "reveal_steps", "sample_tokens"]
