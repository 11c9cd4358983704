"""Pick the implementation of a fused op: Triton on CUDA, C++ on CPU, torch reference otherwise.

Every backend module exposes functions with the same name and signature as the reference
kernels in `fastmdm.ops.reference` (plain functions, no autograd) plus
`supports(op_name, *tensors) -> bool`, which declines inputs it cannot handle (dtype,
device) so that dispatch falls back to the reference instead of failing. A backend may
leave an op out (Triton has no cached_attention): that op then runs the reference, even
when the backend is forced.

Force a backend with the environment variable FASTMDM_BACKEND=reference|cpp|triton, or
in code with `with fastmdm.ops.use_backend("reference"): ...` (benchmarks compare this way).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("reference", "cpp", "triton")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastmdm_backend", default=None)
_modules: dict[str, ModuleType | None] = {}


def _load(name: str) -> ModuleType | None:
    """Import a backend module once; None when it is not built or its toolkit is missing."""
    if name not in _modules:
        module_path = {"reference": "fastmdm.ops.reference",
                       "cpp": "fastmdm.ops.cpu_backend",
                       "triton": "fastmdm.triton"}[name]
        try:
            _modules[name] = importlib.import_module(module_path)
        except ImportError:
            _modules[name] = None
    return _modules[name]


def available_backends() -> list[str]:
    """The backends that import on this machine (the reference always does)."""
    return [b for b in BACKENDS if _load(b) is not None]


@contextlib.contextmanager
def use_backend(name: str):
    """Force one backend inside the block; an input it cannot take raises instead of falling back."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    if _load(name) is None:
        raise RuntimeError(f"backend {name!r} is not available here")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def select(op_name: str, *tensors: torch.Tensor) -> ModuleType:
    """The backend module that will run `op_name` on these inputs."""
    forced = _forced.get() or os.environ.get("FASTMDM_BACKEND") or None
    if forced is not None and forced != "auto":
        module = _load(forced)
        if module is None:
            raise RuntimeError(f"backend {forced!r} is not available here")
        if not hasattr(module, op_name):
            return _load("reference")
        if not module.supports(op_name, *tensors):
            raise RuntimeError(f"backend {forced!r} does not support {op_name} for these inputs "
                               f"(dtypes {[t.dtype for t in tensors if t is not None]})")
        return module
    device = next(t.device for t in tensors if t is not None)
    preferred = {"cuda": ("triton",), "cpu": ("cpp",)}.get(device.type, ())
    for name in preferred:
        module = _load(name)
        if module is not None and hasattr(module, op_name) and module.supports(op_name, *tensors):
            return module
    return _load("reference")
