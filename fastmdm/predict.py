"""The model as a predictor and a row scorer: p(target | a row's known cells), and log p(row).

The conditional is the one `impute` draws a cell from when that cell is the first of the
row's unknown cells to be revealed: every order places the known cells first, then the
target, then the cells left unknown, which come after the target and so are marginalised
exactly (the model never sees them before predicting it).

- The causal model reads an order: one pass of the known cells and the target gives
  p(target | known cells in that order). Its conditionals depend a little on the order of the
  prefix (the model is a mixture over orders), so `orders` orders of the known cells are drawn
  from PL(w), as impute draws them, and their conditionals averaged: the expectation impute's
  draws follow, estimated with a seeded draw. A contextual model's known cells are ordered by
  its prior PL(w) here, not by its policy.
- The bidirectional model sees the known cells as a set: one pass with the target and the
  unknown cells masked gives the conditional, whatever the order.

`log_prob` is the per-row form of `TabularMDM.nelbo` with its sign: the model's own NELBO
estimate (`fastmdm.train.row_nelbo`), whose expectation bounds log p(row) from below.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .data import OTHER_LABEL
from .data.numeric import NumericColumn
from .data.types import from_plain, is_time_dtype
from .decoding import known_first_order

#: The probability column (and prediction) of a categorical target's missing token.
MISSING_LABEL = "(missing)"
#: Orders of the known cells averaged by a causal model's predictions, when not given.
DEFAULT_ORDERS = 8


def check_target(codec, df: pd.DataFrame, target) -> None:
    """`target` must be one of the model's columns and df's columns the model's (the target
    among them or not); the model's columns df lacks are unknown cells."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if target not in codec.columns:
        raise ValueError(f"target {target!r} is not a column of the model; its columns are {codec.columns}")
    unknown = [c for c in df.columns if c not in codec.columns]
    if unknown:
        raise ValueError(f"df has columns the model was not fitted on: {unknown}; the model's columns are "
                         f"{codec.columns} (drop the others)")
    if len(df) == 0:
        raise ValueError("df has no rows to predict")


def feature_frame(codec, df: pd.DataFrame, target) -> pd.DataFrame:
    """df as the model's columns, the target and the columns df lacks unknown (NaN)."""
    frame = df.reindex(columns=codec.columns)
    frame[target] = np.nan
    return frame.astype({c: object for c in frame.columns if frame[c].isna().all()})


@torch.no_grad()
def target_probabilities(denoiser, w: Tensor, tokens: Tensor, known: Tensor, target: int, *, orders: int,
                         generator: torch.Generator) -> Tensor:
    """p(target token | the row's known cells), [N, K_target] float64, for token rows [N, L]
    with known [N, L] (the target's cell is not known). See the module docstring."""
    rows = tokens.shape[0]
    if denoiser.causal:
        repeats = orders
        tokens, known = tokens.repeat_interleave(repeats, 0), known.repeat_interleave(repeats, 0)
        order, n_known = known_first_order(w, rows * repeats, known, generator)
        # The target right after the known cells: a stable sort of the PL order by group.
        group = torch.where(known, 0, 2)
        group[:, target] = 1
        order = order.gather(1, torch.argsort(group.gather(1, order), dim=1, stable=True))
        length = int(n_known.max()) + 1      # tokens after the target's play no part
        order = order[:, :length]
        previous = order.roll(1, 1)
        positions = torch.arange(length, device=tokens.device)
        _, h, _ = denoiser.extend(None, tokens.gather(1, previous), previous, order, positions,
                                  torch.ones_like(positions, dtype=torch.bool))
        states = h[torch.arange(rows * repeats, device=h.device), n_known]
    else:
        repeats = 1
        x_t = torch.where(known, tokens, denoiser.mask_ids.expand_as(tokens))
        states = denoiser.states(x_t)[:, target]
    weight, bias = denoiser.heads.weight_and_bias()
    start, end = int(denoiser.offsets[target]), int(denoiser.offsets[target + 1])
    logits = states.double() @ weight[start:end].double().T + bias[start:end].double()
    return torch.softmax(logits, 1).view(rows, repeats, -1).mean(1)


def class_probabilities(column, probs: np.ndarray, rare_marker: bool) -> pd.DataFrame:
    """A categorical target's token probabilities [N, tokens] as a frame with a column per
    class, named by the class. The rare token is what sampling makes of it: with the marker
    (or in a column with no frequent category, which has nothing else) the class OTHER_LABEL;
    otherwise it is never drawn, so the other classes are renormalised without it, the
    conditional `impute` draws from. The missing token, where the column had missing values,
    is the class MISSING_LABEL."""
    frequent = len(column.categories)
    rare = probs[:, frequent]
    columns, parts = list(column.categories), [probs[:, :frequent]]
    if column.has_missing:
        columns.append(MISSING_LABEL)
        parts.append(probs[:, column.num_values][:, None])
    if rare_marker or not frequent:
        columns.insert(frequent, OTHER_LABEL)
        parts.insert(1, rare[:, None])
        shares = np.concatenate(parts, 1)
    else:
        shares = np.concatenate(parts, 1) / np.maximum(1.0 - rare, 1e-300)[:, None]
    return pd.DataFrame(shares, columns=pd.Index(columns, dtype=object))


def numeric_quantiles(column: NumericColumn, probs: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """[N, len(levels)] quantiles of a numeric target given its token probabilities [N, tokens]:
    the bins' mixture, renormalised over the bins (a missing value is not a number), each bin
    spread as decoding spreads it, by the column's quantile sketch (piecewise linear between
    equal-mass levels) between the bin's lowest and highest values; a point mass stays a point."""
    bins = probs[:, :column.num_values]
    bins = bins / bins.sum(1, keepdims=True)
    cumulative = np.cumsum(bins, 1)
    low, high = (bound[:column.num_values] for bound in column.value_bounds())
    sketch = column.sketch.numpy()
    if len(sketch) < 2:   # every value an atom: no residual distribution to spread a bin by
        sketch = np.array([low.min(), high.max()])
    grid = np.linspace(0.0, 1.0, len(sketch))
    u_low, u_high = np.interp(low, sketch, grid), np.interp(high, sketch, grid)
    out = np.empty((len(probs), len(levels)))
    for j, level in enumerate(levels):
        k = np.minimum((cumulative < level).sum(1), column.num_values - 1)   # the bin the level falls in
        mass = np.take_along_axis(bins, k[:, None], 1)[:, 0]
        before = np.take_along_axis(cumulative, k[:, None], 1)[:, 0] - mass
        share = np.clip((level - before) / np.maximum(mass, 1e-300), 0.0, 1.0)
        value = np.interp(u_low[k] + share * (u_high[k] - u_low[k]), grid, sketch)
        out[:, j] = np.where(high[k] > low[k], value, low[k])
    return out


def as_column_values(column: NumericColumn, values: np.ndarray) -> pd.Series:
    """Predicted numbers in the column's terms: times as times (rounded to their unit),
    other numbers as float64 (a median of integers need not be one)."""
    if is_time_dtype(column.pandas_dtype):
        return from_plain(np.round(values), np.zeros(len(values), dtype=bool), column.pandas_dtype)
    return pd.Series(values, dtype=np.float64)


def check_quantiles(quantiles) -> list[float]:
    levels = [float(q) for q in np.atleast_1d(np.asarray(quantiles, dtype=np.float64))]
    if not levels or not all(0.0 < q < 1.0 for q in levels):
        raise ValueError(f"quantiles must be numbers strictly between 0 and 1, got {quantiles!r}")
    return levels
