"""Fused ops with a torch reference, a C++ CPU path and a Triton GPU path (see _dispatch)."""
from ._dispatch import available_backends, use_backend
from .attention import cached_attention
from .cross_entropy import weighted_ce
from .masking import MaskedBatch, mask_order, mask_tspace
from .ragged_head import ragged_head_ce, ragged_head_sample
from .rloo import rloo_grad

__all__ = ["available_backends", "use_backend", "cached_attention", "weighted_ce", "MaskedBatch", "mask_order",
           "mask_tspace", "ragged_head_ce", "ragged_head_sample", "rloo_grad"]
