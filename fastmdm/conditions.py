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
        dtypes = {n: codec._columns[codec.columns.index(names[n])].pandas_dtype for n in (left, right)}
        if (is_time_dtype(dtypes[left]) or is_time_dtype(dtypes[right])) and dtypes[left] != dtypes[right]:
            raise ValueError(f"rule {text!r} compares {dtypes[left]} with {dtypes[right]}; times compare only "
                             "with times of the same type")
        return cls(names[left], op, names[right])


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

    def __init__(self, codec: TableCodec, conditions: list[ColumnCondition], device: torch.device,
                 rules: list[Rule] = ()):
        vocab = int(codec.offsets[-1])
        self.rules = list(rules)
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
        if not rows:   # rules only: every cell's row is built when it is drawn
            rows.append(np.zeros(vocab))
        self.log_weights = torch.tensor(np.stack(rows), dtype=torch.float32, device=device)
        self._alone, self._partner, self._given = (torch.from_numpy(a).to(device)
                                                   for a in (self.alone, self.partner, self.given))
        self._bounds = {name: _ColumnBounds(codec, name, device)
                        for rule in self.rules for name in (rule.left, rule.right)}
        ruled = torch.zeros(columns, dtype=torch.bool)
        for bounds in self._bounds.values():
            ruled[bounds.span] = True
        self._ruled = ruled.to(device)
        self.restricted = torch.from_numpy(self.alone >= 0).to(device) | self._ruled
        self._offsets = codec.offsets.to(device)
        self._owner = [codec.columns[i] for i in codec.token_owner]

    def rows_of(self, x: Tensor, rows: Tensor, columns: Tensor, mask_id: Tensor) -> Tensor:
        """The table row of each cell (rows[i], columns[i]) given the row's tokens x [N, T]
        (mask ids where not drawn yet); -1 for unrestricted cells."""
        partner = self._partner[columns]
        has_partner = partner >= 0
        safe = partner.clamp(min=0)
        value = x[rows, safe]
        drawn = has_partner & (value != mask_id[safe])
        return torch.where(drawn, self._given[columns] + value, self._alone[columns])


    def cells(self, x: Tensor, rows: Tensor, columns: Tensor, mask_id: Tensor) -> tuple[Tensor, Tensor]:
        """(log-weight table, row of it per cell) for the cells (rows[i], columns[i]) about to be
        drawn, given the tokens drawn so far x [N, T] (mask ids elsewhere). Set and range
        conditions use their fixed rows (`rows_of`); a cell of a column under a rule gets a
        row of its own, which also forbids every token that leaves the rule unsatisfiable
        given what the other column's tokens drawn so far allow."""
        index = self.rows_of(x, rows, columns, mask_id)
        ruled = self._ruled[columns]
        if not bool(ruled.any()):
            return self.log_weights, index
        cells = ruled.nonzero(as_tuple=True)[0]
        extra = torch.where((index[cells] >= 0)[:, None], self.log_weights[index[cells].clamp(min=0)], 0.0)
        for column in columns[cells].unique().tolist():
            group = (columns[cells] == column).nonzero(as_tuple=True)[0]   # positions in `cells`
            tokens = x[rows[cells[group]]]                                # [m, T]
            name = self._owner[column]
            allowed = None
            for rule in self.rules:
                if name not in (rule.left, rule.right):
                    continue
                other = rule.right if name == rule.left else rule.left
                below = (rule.op == "<=") == (name == rule.left)   # this column must be <= the other
                low, high = self._bounds[name].candidates(column, tokens, mask_id)   # [m, K]
                other_low, other_high = self._bounds[other].interval(tokens, mask_id)   # [m]
                ok = low <= other_high[:, None] if below else high >= other_low[:, None]
                allowed = ok if allowed is None else allowed & ok
            start = int(self._offsets[column])
            width = allowed.shape[1]
            extra[group, start:start + width] = extra[group, start:start + width].masked_fill(~allowed,
                                                                                              float("-inf"))
        index = index.clone()
        index[cells] = self.log_weights.shape[0] + torch.arange(len(cells), device=index.device)
        return torch.cat([self.log_weights, extra]), index

    def enforce_rules(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows whose two ruled values were drawn inside one shared cell can break the rule
        by less than the cell's width: their two values are swapped, which the tokens allow."""
        for rule in self.rules:
            low, high = (rule.left, rule.right) if rule.op == "<=" else (rule.right, rule.left)
            broken = (frame[low] > frame[high]).to_numpy()
            if broken.any():
                frame.loc[broken, [low, high]] = frame.loc[broken, [high, low]].to_numpy()
        return frame


class _ColumnBounds:
    """The lowest and highest value a column under a rule can still decode to, given which of
    its token columns are drawn (`TableCodec` value bounds per (bin, fine level) cell)."""

    def __init__(self, codec: TableCodec, name, device: torch.device):
        column = codec._columns[codec.columns.index(name)]
        self.span = codec.token_columns_of(name)
        self.coarse, self.fine = self.span.start, (self.span.start + 1 if self.span.stop - self.span.start == 2 else None)
        low, high = (torch.tensor(b, dtype=torch.float64, device=device) for b in column.value_bounds())
        self.cell_low, self.cell_high = low, high                              # [coarse, fine or 1]
        self.coarse_low, self.coarse_high = low.min(1).values, high.max(1).values
        self.fine_low, self.fine_high = low.min(0).values, high.max(0).values  # any bin
        finite_low, finite_high = low[torch.isfinite(low)], high[torch.isfinite(high)]
        self.lowest, self.highest = finite_low.min(), finite_high.max()

    def _drawn(self, tokens: Tensor, mask_id: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(bin, bin drawn, fine level, fine level drawn) per row of tokens [m, T], indices clamped."""
        k = tokens[:, self.coarse]
        k_drawn = k != mask_id[self.coarse]
        if self.fine is None:
            return k.clamp(max=self.cell_low.shape[0] - 1), k_drawn, torch.zeros_like(k), torch.zeros_like(k_drawn)
        j = tokens[:, self.fine]
        j_drawn = j != mask_id[self.fine]
        return (k.clamp(max=self.cell_low.shape[0] - 1), k_drawn, j.clamp(max=self.cell_low.shape[1] - 1), j_drawn)

    def interval(self, tokens: Tensor, mask_id: Tensor) -> tuple[Tensor, Tensor]:
        """(low, high) [m] this column can still take in each row of tokens [m, T]."""
        k, k_drawn, j, j_drawn = self._drawn(tokens, mask_id)
        low = torch.where(k_drawn & j_drawn, self.cell_low[k, j],
                          torch.where(k_drawn, self.coarse_low[k], torch.where(j_drawn, self.fine_low[j], self.lowest)))
        high = torch.where(k_drawn & j_drawn, self.cell_high[k, j],
                           torch.where(k_drawn, self.coarse_high[k],
                                       torch.where(j_drawn, self.fine_high[j], self.highest)))
        return low, high

    def candidates(self, token_column: int, tokens: Tensor, mask_id: Tensor) -> tuple[Tensor, Tensor]:
        """(low, high) [m, K] per candidate token of one of this column's token columns, given
        the column's other token column in each row of tokens [m, T] if drawn."""
        k, k_drawn, j, j_drawn = self._drawn(tokens, mask_id)
        if token_column == self.coarse:
            given = j_drawn[:, None]
            return (torch.where(given, self.cell_low[:, j].T, self.coarse_low[None, :]),
                    torch.where(given, self.cell_high[:, j].T, self.coarse_high[None, :]))
        given = k_drawn[:, None]
        return (torch.where(given, self.cell_low[k], self.fine_low[None, :]),
                torch.where(given, self.cell_high[k], self.fine_high[None, :]))


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
