"""Triton GPU backend: the four fused ops of `fastmdm.ops.reference`, same signatures and dtypes.

Importing this module imports triton; an ImportError makes dispatch fall back to the
reference. With TRITON_INTERPRET=1 (set before triton is imported) the kernels also run on
CPU tensors through Triton's interpreter, which is how the tests exercise them without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (a missing triton must raise here, at import)

from .elbo import weighted_ce
from .masking import MAX_ORDER_COLUMNS, mask_order, mask_tspace
from .rloo import rloo_grad

__all__ = ["mask_tspace", "mask_order", "weighted_ce", "rloo_grad", "supports"]

def _device_ok(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def supports(op_name: str, *tensors: torch.Tensor) -> bool:
    """True for CUDA (or interpreted CPU) tensors with float32 values, int64 indices, bool masks;
    weighted_ce's logits (its first tensor) may also be bfloat16. Anything else (float64,
    float16, int32) goes to the reference."""
    present = [t for t in tensors if t is not None]
    if not present or not all(_device_ok(t) for t in present):
        return False
    if op_name == "mask_order" and present[0].dim() == 2 and present[0].shape[1] > MAX_ORDER_COLUMNS:
        return False
    for position, tensor in enumerate(tensors):
        if tensor is None or tensor.dtype in (torch.int64, torch.bool, torch.float32):
            continue
        if not (op_name == "weighted_ce" and position == 0 and tensor.dtype == torch.bfloat16):
            return False
    return True
