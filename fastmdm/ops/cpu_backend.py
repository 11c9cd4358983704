"""C++ CPU backend: the kernels of `fastmdm.ops.reference` running in fastmdm._C.

The extension takes numpy views of contiguous CPU tensors (zero copy) and writes into
outputs allocated here with torch, so nothing depends on the torch C++ ABI. It computes in
float32 (floats) and int64 (ints); `supports` declines anything else (float64, bfloat16,
int32, CUDA tensors) and dispatch then falls back to the reference. Importing this module
raises ImportError when the extension is not built, which dispatch also treats as "absent".

Seeded masking (u=None) draws uniforms from a counter-based hash of (seed, row * L + col):
deterministic for a seed, independent of the thread count, but a different stream from the
reference's torch generator.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (ImportError propagates: dispatch falls back to the reference)

_FLOATS = (torch.float32,)
_INTS = (torch.int64, torch.bool)
_SEED_MASK = (1 << 64) - 1


def supports(op_name: str, *tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is a CPU float32, int64 or bool tensor and the built
    extension has the op's kernel (one built from older sources may lack a newer op: it then
    runs the reference until `python setup.py build_ext --inplace` rebuilds it)."""
    if not hasattr(_C, op_name):
        return False
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            return False
        if tensor.dtype.is_floating_point:
            if tensor.dtype not in _FLOATS:
                return False
        elif tensor.dtype not in _INTS:
            return False
    return True


def _np(tensor: torch.Tensor, dtype: torch.dtype | None = None):
    """A C-contiguous numpy view (a copy only when the dtype or layout requires one)."""
    tensor = tensor.detach()
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.contiguous().resolve_conj().resolve_neg().numpy()


def _seed(seed: int) -> int:
    return int(seed) & _SEED_MASK


def _mask_outputs(x: torch.Tensor):
    return (torch.empty(x.shape, dtype=torch.int64), torch.empty(x.shape, dtype=torch.bool),
            torch.empty(x.shape, dtype=torch.float32), torch.empty(x.shape, dtype=torch.float32))


def uniforms(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The uniforms that the seeded masking ops draw for an input of this shape."""
    out = torch.empty(shape, dtype=torch.float32)
    _C.uniforms(_seed(seed), out.numpy())
    return out


def mask_tspace(x, log_t, w, mask_id, time_weight, u, seed):
    outputs = _mask_outputs(x)
    _C.mask_tspace(_np(x, torch.int64), _np(log_t, torch.float32), _np(w, torch.float32),
                   _np(mask_id, torch.int64), _np(time_weight, torch.float32),
                   None if u is None else _np(u, torch.float32), _seed(seed), *(o.numpy() for o in outputs))
    return outputs


def mask_order(x, w, mask_id, u, n_revealed, seed):
    outputs = _mask_outputs(x)
    _C.mask_order(_np(x, torch.int64), _np(w, torch.float32), _np(mask_id, torch.int64),
                  None if u is None else _np(u, torch.float32), _np(n_revealed, torch.int64),
                  _seed(seed), *(o.numpy() for o in outputs))
    return outputs


def weighted_ce(logits, targets, weight, mask, offsets, compute_grad):
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32)
    ce = torch.empty(targets.shape, dtype=torch.float32)
    # Uninitialized: the kernel writes every element (zeros outside masked segments).
    dlogits = torch.empty((rows, vocab) if compute_grad else (0,), dtype=torch.float32)
    _C.weighted_ce(_np(logits, torch.float32), _np(targets, torch.int64), _np(weight, torch.float32),
                   _np(mask, torch.bool), _np(offsets, torch.int64), bool(compute_grad),
                   loss.numpy(), ce.numpy(), dlogits.numpy())
    return loss, ce, dlogits


def rloo_grad(f, score, per_row=False):
    rows, _, num_columns = score.shape
    g = torch.empty((rows, num_columns) if per_row else (num_columns,), dtype=torch.float32)
    _C.rloo_grad(_np(f, torch.float32), _np(score, torch.float32), g.numpy(), per_row)
    return g


def ragged_head_ce(h, head_weight, head_bias, offsets, targets, weight, mask, compute_grad):
    rows, num_columns, _ = h.shape
    loss = torch.empty(rows, dtype=torch.float32)
    ce = torch.empty(rows, num_columns, dtype=torch.float32)
    # Zero-filled: the kernel adds into the heads' gradients and leaves unmasked cells alone.
    grads = [torch.zeros(t.shape if compute_grad else (0,), dtype=torch.float32)
             for t in (h, head_weight, head_bias)]
    _C.ragged_head_ce(_np(h), _np(head_weight), _np(head_bias), _np(offsets), _np(targets, torch.int64),
                      _np(weight, torch.float32), _np(mask, torch.bool), bool(compute_grad),
                      loss.numpy(), ce.numpy(), *(g.numpy() for g in grads))
    return (loss, ce, *grads)


def ragged_head_sample(h, columns, head_weight, head_bias, offsets, temperature, seed,
                       log_weights=None, restriction=None):
    values = torch.empty(h.shape[0], dtype=torch.int64)
    log_mass = torch.empty(h.shape[0], dtype=torch.float32)
    restricted = restriction is not None
    _C.ragged_head_sample(_np(h), _np(columns, torch.int64), _np(head_weight), _np(head_bias),
                          _np(offsets), float(temperature), _seed(seed),
                          _np(log_weights, torch.float32) if restricted else None,
                          _np(restriction, torch.int64) if restricted else None,
                          values.numpy(), log_mass.numpy())
    return values, log_mass


def cached_attention(q, k, v, cache_keys, cache_values, positions, slots):
    # The caches are written in place through zero-copy views (copies first if they are not
    # contiguous float32: the returned caches are then those copies).
    cache_keys, cache_values = cache_keys.contiguous(), cache_values.contiguous()
    rows, heads, tokens, width = q.shape
    out = torch.empty(rows, tokens, heads, width, dtype=torch.float32)
    _C.cached_attention(_np(q), _np(k), _np(v), cache_keys.numpy(), cache_values.numpy(),
                        _np(positions, torch.int64), _np(slots, torch.int64), out.numpy())
    return out.transpose(1, 2), cache_keys, cache_values
