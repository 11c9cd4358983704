"""Conditions on sampled rows: a value, a set of values or a range per column.

A condition maps a column to
- a value: `{"workclass": "Private"}`. Its tokens are known, as in imputation, and the value
  comes back exactly;
- a set, given as a list: `{"workclass": ["Private", "State-gov"]}` (categorical columns; a
  numeric column that is categorical, like a small count, takes sets too);
- a closed range, given as a 2-tuple with None for an open end: `{"age": (30, 40)}`,
  `{"price": (None, 500)}`, `{"date": ("2013-01-01", None)}` (numeric, datetime and timedelta
  columns; on a categorical column it is the set of its categories in the range, numbers
  compared as numbers and text alphabetically).
  A missing value lies in no range, so `(None, None)` asks for a value that is not missing.

Sets and ranges are enforced when the column's tokens are drawn, by restricting their support
(`TokenRestrictions`, used by the decoders through the fused sampler), so no row is rejected.
Each restricted token is drawn from the model's conditional times a weight in [0, 1]: 0 for a
token outside the condition, 1 inside, and for a numeric cell (a bin, or a bin's fine level)
that straddles a bound, the share of the cell's mass inside the range, since decoding then
draws the number inside the cell and the range (`fastmdm.data.TableCodec.decode`). A row's
importance weight is the product of the probabilities these restrictions let through; the
decoders draw the restricted columns first and resample rows by those weights before drawing
the rest (sequential Monte Carlo), which makes the rows follow the model's conditional
distribution exactly in the limit of many rows, and reports the effective sample size.
With a single restricted column drawn first from its own restricted conditional, the weights
are all equal and the draw is exact for any number of rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .data import TableCodec, to_plain

__all__ = ["ColumnCondition", "split_conditions", "TokenRestrictions", "parse_condition_text"]


@dataclass(frozen=True)
class ColumnCondition:
    """A set of values (`values`) or a closed range [low, high] (None: open) of one column, in
    the codec's plain units (datetimes and timedeltas as integer counts of their unit)."""
    column: object
    values: tuple | None = None
    low: float | None = None
    high: float | None = None


def _plain_bound(codec: TableCodec, name, bound):
    if bound is None:
        return None
    column = codec._columns[codec.columns.index(name)]
    plain = to_plain(name, pd.Series([bound], dtype=object), column.pandas_dtype)
    value = pd.to_numeric(plain, errors="coerce").iloc[0]
    if pd.isna(value):
        raise ValueError(f"condition on {name!r}: range bound {bound!r} is not a number")
    return float(value)


def split_conditions(codec: TableCodec, conditions: Mapping) -> tuple[dict, list[ColumnCondition]]:
    """({column: exact value}, [set or range conditions]) of a {column: condition} mapping.

    Raises ValueError for a column the model does not have, an empty range, a set or range
    that holds no value the column can take, and a range on a text column.
    """
    unknown = [c for c in conditions if c not in codec.columns]
    if unknown:
        raise ValueError(f"conditions name columns the model does not have: {unknown}")
    exact, restricted = {}, []
    for name, spec in conditions.items():
        column = codec._columns[codec.columns.index(name)]
        if isinstance(spec, (list, set, frozenset, np.ndarray, pd.Index, pd.Series)):
            values = list(spec)
            if not values:
                raise ValueError(f"condition on {name!r}: the set of values is empty")
            if len(values) == 1:
                exact[name] = values[0]
                continue
            if column.is_numeric:
                raise ValueError(f"condition on {name!r}: a numeric column takes a value or a range "
                                 "(low, high), not a set")
            restricted.append(ColumnCondition(name, values=tuple(values)))
        elif isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"condition on {name!r}: a range is a 2-tuple (low, high) with None for an "
                                 f"open end, got {spec!r} (give a list for a set of values)")
            low, high = spec
            if not column.is_numeric:
                restricted.append(_categories_in_range(column, name, low, high))
                continue
            low, high = _plain_bound(codec, name, low), _plain_bound(codec, name, high)
            if low is not None and high is not None and low > high:
                raise ValueError(f"condition on {name!r}: the range {spec!r} is empty (low > high)")
            restricted.append(ColumnCondition(name, low=low, high=high))
        else:
            exact[name] = spec
    return exact, restricted


def _categories_in_range(column, name, low, high) -> ColumnCondition:
    numbers = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in column.categories)
    if numbers:   # bounds given as text (the command line) compare as numbers
        low, high = (None if b is None else float(b) for b in (low, high))
    try:
        inside = [c for c in column.categories
                  if (low is None or c >= low) and (high is None or c <= high)]
    except TypeError as err:
        raise ValueError(f"condition on {name!r}: a range needs a column of numbers or times; {name!r} holds "
                         "categories (give a list for a set of them)") from err
    if not inside:
        raise ValueError(f"condition on {name!r}: no category of the column lies in the range ({low!r}, {high!r})")
    return ColumnCondition(name, values=tuple(inside))


class TokenRestrictions:
    """Which tokens each restricted token column may take, as rows of a log-weight table for
    the fused sampler (`fastmdm.ops.ragged_head_sample`'s log_weights and restriction).

    A column with one token column has one row. A numeric column with a fine level has a
    weight F[k, j] per (bin k, fine level j) pair, the share of that cell inside the range;
    whichever of its two token columns is drawn first takes the indicator of "some partner
    cell has weight > 0", and the second takes F's row or column given the first. The product
    of the two factors is F[k, j], the probability that the number decoded inside the cell
    lies in the range, so the importance weights are exact.
    """

    def __init__(self, codec: TableCodec, conditions: list[ColumnCondition], device: torch.device):
        vocab = int(codec.offsets[-1])
        rows: list[np.ndarray] = []
        columns = codec.num_token_columns
        self.alone = np.full(columns, -1)        # the row used while the partner is not drawn
        self.partner = np.full(columns, -1)      # the other token column of the same column
        self.given = np.full(columns, -1)        # first row of "given the partner's value" rows
        self.ranges: dict = {}                   # numeric columns: (low, high) for decoding
        self.choices: dict = {}                  # categorical columns: set values decoding "other" picks from

        def add_row(token_column: int, log_weight: np.ndarray) -> int:
            row = np.zeros(vocab)
            start = int(codec.offsets[token_column])
            row[start:start + len(log_weight)] = log_weight
            rows.append(row)
            return len(rows) - 1

        for condition in conditions:
            span = codec.token_columns_of(condition.column)
            column = codec._columns[codec.columns.index(condition.column)]
            if condition.values is not None:
                weights, others = column.set_weights(condition.values)
                if others:
                    self.choices[condition.column] = others
                self.alone[span.start] = add_row(span.start, _log(weights))
                continue
            self.ranges[condition.column] = (condition.low, condition.high)
            cells = column.range_weights(condition.low, condition.high)   # [coarse tokens, fine levels or 1]
            if not (cells > 0).any():
                raise ValueError(f"condition on {condition.column!r}: no value the model can generate lies in "
                                 f"the range ({condition.low}, {condition.high}) at the column's precision")
            if span.stop - span.start == 1:
                self.alone[span.start] = add_row(span.start, _log(cells[:, 0]))
                continue
            coarse, fine = span.start, span.start + 1
            self.alone[coarse] = add_row(coarse, _log((cells > 0).any(1)))
            self.alone[fine] = add_row(fine, _log((cells > 0).any(0)))
            self.partner[coarse], self.partner[fine] = fine, coarse
            self.given[fine] = len(rows)
            for k in range(cells.shape[0]):
                add_row(fine, _log(cells[k]))
            self.given[coarse] = len(rows)
            for j in range(cells.shape[1]):
                add_row(coarse, _log(cells[:, j]))
        self.log_weights = torch.tensor(np.stack(rows), dtype=torch.float32, device=device)
        self.restricted = torch.from_numpy(self.alone >= 0).to(device)
        self._alone, self._partner, self._given = (torch.from_numpy(a).to(device)
                                                   for a in (self.alone, self.partner, self.given))

    def rows_of(self, x: Tensor, rows: Tensor, columns: Tensor, mask_id: Tensor) -> Tensor:
        """The table row of each cell (rows[i], columns[i]) given the row's tokens x [N, T]
        (mask ids where not drawn yet); -1 for unrestricted cells."""
        partner = self._partner[columns]
        has_partner = partner >= 0
        safe = partner.clamp(min=0)
        value = x[rows, safe]
        drawn = has_partner & (value != mask_id[safe])
        return torch.where(drawn, self._given[columns] + value, self._alone[columns])


def _log(weights: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(weights, dtype=np.float64))


def parse_condition_text(text: str) -> tuple[str, object]:
    """A command-line condition -> (column, condition): `column=value`, `column=a|b|c` (a set),
    `column=low..high` (a range; either end may be empty). Values stay text; the codec parses
    them in the column's type."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise ValueError(f"a condition is column=value, column=a|b (a set) or column=low..high (a range), "
                         f"got {text!r}")
    if ".." in spec:
        low, _, high = spec.partition("..")
        return name, (low or None, high or None)
    if "|" in spec:
        return name, spec.split("|")
    return name, spec
