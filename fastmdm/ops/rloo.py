"""Batched RLOO (leave-one-out) score-function gradient for the schedule weights w."""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from ._dispatch import select


@torch.library.custom_op("fastmdm::rloo_grad", mutates_args=())
def _rloo_grad(f: Tensor, score: Tensor, per_row: bool = False) -> Tensor:
    return select("rloo_grad", f, score).rloo_grad(f, score, per_row)


@_rloo_grad.register_fake
def _(f, score, per_row=False):
    rows, _, num_columns = score.shape
    return score.new_empty((rows, num_columns) if per_row else (num_columns,))


def rloo_grad(f: Tensor, score: Tensor, per_row: bool = False) -> Tensor:
    """g = mean_{b,k} (f_bk - mean_{j!=k} f_bj) * score_bk, shape [L].

    f: [B, K] per-sample losses (treated as constants), K >= 2; score: [B, K, L]
    d/dw log q of each sample. Add (g.detach() * w).sum() to a loss to inject it.
    per_row: average over the K samples only, g [B, L]: the gradient for a w that differs
    per row (w_phi(x_b) of a contextual order posterior); g.mean(0) is the default result.
    """
    check_tensor("f", f, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("score", score, ndim=3, dtypes=FLOAT_DTYPES)
    if f.shape[1] < 2:
        raise ValueError(f"RLOO needs K >= 2 samples per row, got {f.shape[1]}")
    if score.shape[:2] != f.shape:
        raise ValueError(f"score must be [B, K, L] with [B, K] = {tuple(f.shape)}, got {tuple(score.shape)}")
    if f.shape[0] == 0:
        raise ValueError("no rows")
    check_same_device(f=f, score=score)
    check_finite("f", f)
    return _rloo_grad(f.detach(), score.detach(), per_row)
