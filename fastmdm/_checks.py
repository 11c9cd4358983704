"""Input validation shared by every public function: clear errors instead of silent garbage.

Checks of shapes and dtypes are free. Checks of values (ranges, NaN, permutations, offsets)
read a device value on the host: on a GPU each is a synchronisation that costs more than a
training step's arithmetic. Inside `values_checked()` they are skipped: the training loop
checks its token table once before the first step and runs every step inside it
(fastmdm.train).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable

import torch

_value_checks: contextvars.ContextVar[bool] = contextvars.ContextVar("fastmdm_value_checks", default=True)


@contextlib.contextmanager
def values_checked():
    """Skip the value checks inside the block: the caller has checked the values where they
    were made (the token table before training; the model's offsets when it was built; the
    orders the objective draws are permutations by construction)."""
    token = _value_checks.set(False)
    try:
        yield
    finally:
        _value_checks.reset(token)


def value_checks_enabled() -> bool:
    """False inside `values_checked()`, and while torch.compile traces (a value read on the
    host would break the graph): a check that reads tensor values should then skip it."""
    return not torch.compiler.is_compiling() and _value_checks.get()

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value, *, ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """Raise TypeError/ValueError unless `value` is a tensor of the given rank and dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({allowed}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Raise ValueError unless every given tensor lives on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    unique = set(devices.values())
    if len(unique) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")
    return next(iter(unique))


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise ValueError if `value` holds NaN or infinity (a value check)."""
    if value_checks_enabled() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_positive_weights(w: torch.Tensor) -> None:
    """Schedule weights w must be finite and strictly positive (they are Plackett-Luce scores)."""
    check_tensor("w", w, ndim=1, dtypes=FLOAT_DTYPES)
    if w.numel() == 0:
        raise ValueError("w must have at least one column")
    check_finite("w", w)
    if value_checks_enabled() and not bool((w > 0).all()):
        raise ValueError("w must be strictly positive")


def check_tokens(name: str, x: torch.Tensor, num_columns: int) -> None:
    """Token ids: an integer [rows, columns] tensor with at least one row."""
    check_tensor(name, x, ndim=2, dtypes=INT_DTYPES)
    if x.shape[1] != num_columns:
        raise ValueError(f"{name} has {x.shape[1]} columns but the schedule has {num_columns}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no rows")


def check_offsets(offsets: torch.Tensor, num_columns: int, vocab: int) -> None:
    """offsets [L+1]: 0 = offsets[0] < offsets[1] < ... < offsets[L] = V."""
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,))
    if offsets.shape[0] != num_columns + 1:
        raise ValueError(f"offsets must have L+1 = {num_columns + 1} entries, got {offsets.shape[0]}")
    if not value_checks_enabled():
        return
    if int(offsets[0]) != 0 or int(offsets[-1]) != vocab:
        raise ValueError(f"offsets must start at 0 and end at the logits width {vocab}")
    if bool((offsets[1:] <= offsets[:-1]).any()):
        raise ValueError("offsets must be strictly increasing (every column needs >= 1 value)")
