"""Triton GPU backend: the fused ops of `fastmdm.ops.reference`, same signatures and dtypes.

Importing this module imports triton; an ImportError makes dispatch fall back to the
reference. With TRITON_INTERPRET=1 (set before triton is imported) the kernels also run on
CPU tensors through Triton's interpreter, which is how the tests exercise them without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (a missing triton must raise here, at import)

from .cross_entropy import weighted_ce
from .masking import MAX_ORDER_COLUMNS, mask_order, mask_tspace
from .ragged_head import MAX_HEAD_WIDTH, ragged_head_ce, ragged_head_config, ragged_head_sample
from .rloo import rloo_grad

__all__ = ["mask_tspace", "mask_order", "weighted_ce", "ragged_head_ce", "ragged_head_sample",
           "ragged_head_config", "rloo_grad", "supports"]

#: Positions of the tensors that may be bfloat16 (logits; states and head parameters).
_BFLOAT16_INPUTS = {"weighted_ce": (0,), "ragged_head_ce": (0, 1, 2), "ragged_head_sample": (0, 2, 3)}


def _device_ok(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def supports(op_name: str, *tensors: torch.Tensor) -> bool:
    """True for CUDA (or interpreted CPU) tensors with float32 values, int64 indices, bool masks;
    weighted_ce's logits and the ragged heads' states and parameters may also be bfloat16.
    Anything else (float64, float16, int32, states wider than MAX_HEAD_WIDTH) goes to the
    reference."""
    present = [t for t in tensors if t is not None]
    if not present or not all(_device_ok(t) for t in present):
        return False
    if op_name == "mask_order" and present[0].dim() == 2 and present[0].shape[1] > MAX_ORDER_COLUMNS:
        return False
    if op_name.startswith("ragged_head") and present[0].shape[-1] > MAX_HEAD_WIDTH:
        return False
    for position, tensor in enumerate(tensors):
        if tensor is None or tensor.dtype in (torch.int64, torch.bool, torch.float32):
            continue
        if not (position in _BFLOAT16_INPUTS.get(op_name, ()) and tensor.dtype == torch.bfloat16):
            return False
    return True
