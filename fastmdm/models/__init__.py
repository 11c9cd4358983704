"""Denoisers: `bidirectional` (re-encodes the masked row every step) and `causal` (one
pass per order, KV-cached sampling; its order may be static or contextual, see orders).
Both share embeddings, blocks and ragged heads (base)."""
from .base import RaggedHeads, TableDenoiser
from .bidirectional import ColumnTransformer
from .causal import ORDERS, CausalTransformer

ARCHITECTURES = {"bidirectional": ColumnTransformer, "causal": CausalTransformer}


def build_denoiser(architecture: str, cardinalities: list[int], **options) -> TableDenoiser:
    """The denoiser named `architecture` for columns of the given cardinalities."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    return ARCHITECTURES[architecture](cardinalities, **options)


__all__ = ["ARCHITECTURES", "ORDERS", "CausalTransformer", "ColumnTransformer", "RaggedHeads", "TableDenoiser",
           "build_denoiser"]
