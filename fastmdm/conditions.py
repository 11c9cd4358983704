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
token outside the condition, 1 inside, and for a numeric bin that straddles a bound, the share
of the bin's mass inside the range, since decoding then draws the number inside the bin and
the range (`fastmdm.data.TableCodec.decode`). A row's
importance weight is the product of the probabilities these restrictions let through; the
decoders draw the restricted columns first and resample rows by those weights before drawing
the rest (sequential Monte Carlo), which makes the rows follow the model's conditional
distribution exactly in the limit of many rows, and reports the effective sample size.
With a single restricted column drawn first from its own restricted conditional, the weights
are all equal and the draw is exact for any number of rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .data import TableCodec, is_time_dtype, to_plain

__all__ = ["ColumnCondition", "Rule", "split_conditions", "TokenRestrictions", "parse_condition_text"]


@dataclass(frozen=True)
class ColumnCondition:
    """A set of values (`values`) or a closed range [low, high] (None: open) of one column, in
    the codec's plain units (datetimes and timedeltas as integer counts of their unit)."""
    column: object
    values: tuple | None = None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Rule:
    """`left <= right` (op "<=") or `left >= right` (op ">=") between two columns of numbers or
    times, in every sampled row."""
    left: object
    op: str
    right: object

    @classmethod
    def parse(cls, text: str, codec: TableCodec) -> "Rule":
        """A rule from text such as "check_in <= check_out" (also >=), checked against the codec."""
        match = re.fullmatch(r"\s*(.+?)\s*(<=|>=)\s*(.+?)\s*", text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"a rule is 'column <= column' or 'column >= column', got {text!r}")
        names = {str(c): c for c in codec.columns}
        left, op, right = match.groups()
        unknown = [n for n in (left, right) if n not in names]
        if unknown:
            raise ValueError(f"rule {text!r} names columns the model does not have: {unknown}")
        if left == right:
            raise ValueError(f"rule {text!r} compares a column with itself")
        dtypes = {n: codec.column(names[n]).pandas_dtype for n in (left, right)}
        if (is_time_dtype(dtypes[left]) or is_time_dtype(dtypes[right])) and dtypes[left] != dtypes[right]:
            raise ValueError(f"rule {text!r} compares {dtypes[left]} with {dtypes[right]}; times compare only "
                             "with times of the same type")
        return cls(names[left], op, names[right])


def _plain_bound(codec: TableCodec, name, bound):
    if bound is None:
        return None
    column = codec.column(name)
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
        column = codec.column(name)
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
    """Which tokens each restricted column may take, as rows of a log-weight table for the
    fused sampler (`fastmdm.ops.ragged_head_sample`'s log_weights and restriction): one row
    per set or range condition, and for a column under a rule a row per cell, built when the
    cell is drawn (`cells`)."""

    def __init__(self, codec: TableCodec, conditions: list[ColumnCondition], device: torch.device,
                 rules: list[Rule] = ()):
        vocab = int(codec.offsets[-1])
        self.rules = list(rules)
        rows: list[np.ndarray] = []
        self.row_of = np.full(codec.num_columns, -1)   # each column's row, -1: none
        self.ranges: dict = {}                         # numeric columns: (low, high) for decoding
        self.choices: dict = {}                        # categorical columns: set values decoding "other" picks from
        for condition in conditions:
            l = codec.columns.index(condition.column)
            column = codec.column(condition.column)
            if condition.values is not None:
                weights, others = column.set_weights(condition.values)
                if others:
                    self.choices[condition.column] = others
            else:
                self.ranges[condition.column] = (condition.low, condition.high)
                weights = column.range_weights(condition.low, condition.high)
                if not (weights > 0).any():
                    raise ValueError(f"condition on {condition.column!r}: no value the model can generate lies in "
                                     f"the range ({condition.low}, {condition.high}) at the column's precision")
            row = np.zeros(vocab)
            start = int(codec.offsets[l])
            row[start:start + len(weights)] = _log(weights)
            rows.append(row)
            self.row_of[l] = len(rows) - 1
        if not rows:   # rules only: every cell's row is built when it is drawn
            rows.append(np.zeros(vocab))
        self.log_weights = torch.tensor(np.stack(rows), dtype=torch.float32, device=device)
        self._row_of = torch.from_numpy(self.row_of).to(device)
        self._bounds = {codec.columns.index(name): _ColumnBounds(codec, name, device)
                        for rule in self.rules for name in (rule.left, rule.right)}
        self._rules = [(codec.columns.index(r.left), r.op, codec.columns.index(r.right)) for r in self.rules]
        ruled = torch.zeros(codec.num_columns, dtype=torch.bool)
        ruled[list(self._bounds)] = True
        self._ruled = ruled.to(device)
        self.restricted = (self._row_of >= 0) | self._ruled
        self._offsets = codec.offsets.to(device)

    def cells(self, x: Tensor, rows: Tensor, columns: Tensor, mask_id: Tensor) -> tuple[Tensor, Tensor]:
        """(log-weight table, row of it per cell) for the cells (rows[i], columns[i]) about to be
        drawn, given the tokens drawn so far x [N, L] (mask ids elsewhere); row -1 leaves a
        cell unrestricted. A cell of a column under a rule gets a row of its own, which also
        forbids every token whose values cannot satisfy the rule against the values the other
        column can still take (any, or its drawn bin's)."""
        index = self._row_of[columns]
        ruled = self._ruled[columns]
        if not bool(ruled.any()):
            return self.log_weights, index
        cells = ruled.nonzero(as_tuple=True)[0]
        extra = torch.where((index[cells] >= 0)[:, None], self.log_weights[index[cells].clamp(min=0)], 0.0)
        for column in columns[cells].unique().tolist():
            group = (columns[cells] == column).nonzero(as_tuple=True)[0]   # positions in `cells`
            tokens = x[rows[cells[group]]]                                # [m, L]
            low, high = self._bounds[column].low, self._bounds[column].high   # [K] per candidate token
            allowed = torch.ones(len(group), low.numel(), dtype=torch.bool, device=x.device)
            for left, op, right in self._rules:
                if column not in (left, right):
                    continue
                other = right if column == left else left
                below = (op == "<=") == (column == left)   # this column must be <= the other
                other_low, other_high = self._bounds[other].interval(tokens[:, other], mask_id[other])
                allowed &= (low[None, :] <= other_high[:, None]) if below else (high[None, :] >= other_low[:, None])
            start = int(self._offsets[column])
            width = low.numel()
            extra[group, start:start + width] = extra[group, start:start + width].masked_fill(~allowed,
                                                                                              float("-inf"))
        index = index.clone()
        index[cells] = self.log_weights.shape[0] + torch.arange(len(cells), device=index.device)
        return torch.cat([self.log_weights, extra]), index

    def enforce_rules(self, codec: TableCodec, tokens: Tensor, frame: pd.DataFrame,
                      generator: torch.Generator | None) -> pd.DataFrame:
        """Rows whose two ruled values were decoded inside bins whose ranges overlap can break
        the rule by less than a bin's width. There the number of the larger side (or, if it is
        categorical, of the smaller) is drawn again inside its bin, bounded by the other value
        and by the column's range condition if any."""
        tokens = tokens.cpu()
        for rule in self.rules:
            low, high = (rule.left, rule.right) if rule.op == "<=" else (rule.right, rule.left)
            broken = (frame[low] > frame[high]).to_numpy()
            if not broken.any():
                continue
            redrawn, bound = (high, low) if codec.is_numeric[codec.columns.index(high)] else (low, high)
            bounds = to_plain(bound, frame[bound][broken], frame[bound].dtype)
            bounds = bounds.to_numpy(dtype=np.float64)
            range_low, range_high = self.ranges.get(redrawn, (None, None))
            if redrawn == high:
                limits = (np.maximum(bounds, -np.inf if range_low is None else range_low), range_high)
            else:
                limits = (range_low, np.minimum(bounds, np.inf if range_high is None else range_high))
            l = codec.columns.index(redrawn)
            values = codec.redraw(redrawn, tokens[torch.from_numpy(broken), l], *limits, generator)
            frame.loc[broken, redrawn] = values.to_numpy()
        return frame


class _ColumnBounds:
    """The lowest and highest value each token of a column under a rule decodes to (the
    codec's value bounds), and what the column can still take in a row."""

    def __init__(self, codec: TableCodec, name, device: torch.device):
        column = codec.column(name)
        self.low, self.high = (torch.tensor(b, dtype=torch.float64, device=device) for b in column.value_bounds())
        self.lowest = self.low[torch.isfinite(self.low)].min()
        self.highest = self.high[torch.isfinite(self.high)].max()

    def interval(self, tokens: Tensor, mask_id: Tensor) -> tuple[Tensor, Tensor]:
        """(low, high) [m] the column can still take given its tokens [m] (mask id: not drawn)."""
        drawn = tokens != mask_id
        safe = tokens.clamp(max=self.low.numel() - 1)
        return (torch.where(drawn, self.low[safe], self.lowest), torch.where(drawn, self.high[safe], self.highest))


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
