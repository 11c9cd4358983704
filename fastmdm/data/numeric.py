"""Numeric columns: bins as tokens, decoded to the data's recurring values (atoms) or to new
numbers from a quantile sketch."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from .privacy import MIN_ROWS_PER_VALUE
from .types import KEY_MIN_VALUES, exact_values, examples, from_plain, is_time_dtype, to_plain

__all__ = ["NumericColumn", "DEFAULT_NUM_BINS"]

# Bin count of a column without a token per value. Decoding draws a number inside its bin
# independently of the other columns, so what a bin loses is dependence inside it. Round trip
# decode(encode(train)) on MAGIC, before atoms (a quantile sketch of every value):
#   num_bins                                16      32      64      128
#   max |Pearson corr drift|, MAGIC         .080    .038    .025    .018
#   max median |x - decoded| / IQR, MAGIC   .058    .029    .014    .007
# Finer bins need the denoiser to share what it learns between neighbouring bins (the ordered
# tokens of models.base.OrdinalTokens); with them, the default model on 10,000 training rows
# at the default budget, 32 / 64 / 128 bins, XGBoost C2ST (1 = indistinguishable):
#   diamonds .75 / .91 / .91, txhousing .73 / .87 / .81, MAGIC -- / .90 / .79, Adult -- / .97 / .97
# (benchmarks/numeric_columns.py); 128 bins spread each bin's data thinner and stopped early
# on Adult and MAGIC. Without the ordered tokens, 128 bins lost to 32 on txhousing.
DEFAULT_NUM_BINS = 64
# Equal-mass quantile levels of a column's residual values (those not atoms) stored for
# decoding inside a bin: 16 per default bin, so marginals stay within 1/1024 of the data's
# (less than a KS test detects below ~10^6 rows) at 8 KiB a column.
SKETCH_LEVELS = 1024
# Most decimals a float column is checked for; beyond it a column is continuous (MAGIC's).
MAX_DECIMALS = 10
# Most atoms a column may have to get a token per atom (see NumericColumn). A few hundred
# covers rates on a grid, round amounts and small counts; each token costs the denoiser's
# output head and embedding as much as a bin does.
MAX_VALUE_TOKENS = 256


class NumericColumn:
    """Bins [left_k, left_{k+1}) as tokens; a bin decodes to one of the column's atoms inside
    it or to a new number drawn from the column's quantile sketch inside it, at the column's
    observed precision.

    Atoms are the values at least `MIN_ROWS_PER_VALUE` training rows hold (round incomes,
    rates on a grid, common areas): stored with their counts, and emitted exactly. Every other
    value is residual: the sketch holds SKETCH_LEVELS + 1 equal-mass quantile levels of the
    residual values, each an interpolation between two neighbouring sorted residual values,
    and a level that would still equal a value held by fewer rows moves halfway to the next
    value of the column, so no stored or generated number is read off fewer than k rows.
    A bin holds a number of atoms and a share of the residual mass; decoding draws an atom with
    probability (its count) / (the bin's rows), else a residual number from the
    piecewise-linear distribution between the sketch's levels, restricted to the bin. So the
    marginal keeps the atoms exactly and the rest within 1 / SKETCH_LEVELS of the data.

    Bins: a column whose atoms hold all but at most one bin's worth (1 / num_bins) of its rows
    and number at most MAX_VALUE_TOKENS gets a token per atom, its bin running up to the next
    atom (rarer values between two atoms share the lower one's token). Any other column gets
    equal-mass bins, plus a bin of its own ([v, next float)) for an atom holding at least a
    bin's worth of rows.

    Precision: integer columns (datetimes and timedeltas as counts of their unit) decode to
    multiples of the greatest common divisor of their values (whole days stay whole days);
    float columns to the fewest decimals that hold every value (none when no count up to
    MAX_DECIMALS does).
    """

    is_numeric = True

    def __init__(self, name, dtype: str, has_missing: bool, lefts: torch.Tensor, sketch: torch.Tensor,
                 atoms: torch.Tensor, atom_counts: torch.Tensor, residual_rows: int, step: int | None,
                 decimals: int | None):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.lefts, self.sketch, self.step, self.decimals = lefts, sketch, step, decimals
        self.atoms, self.atom_counts, self.residual_rows = atoms, atom_counts, int(residual_rows)
        self._lefts_np, self._sketch_np = lefts.numpy(), sketch.numpy()
        self._atom_values = atoms.numpy()                       # exact: int64 for an integer column
        self._atoms_np = self._atom_values.astype(np.float64)   # for searching
        # Prefix sums of the atoms' counts: atoms [i, j) hold _atom_cum[j] - _atom_cum[i] rows.
        self._atom_cum = np.concatenate([[0.0], np.cumsum(atom_counts.numpy().astype(np.float64))])
        rights = np.append(self._lefts_np[1:], np.inf)
        # Each bin's atoms [first, end) and its residual share [start, end) in the residual
        # sketch's distribution function; bin 0 also holds what lies below its left edge.
        self._atom_span = np.stack([self._atoms_at_or_above(self._lefts_np), self._atoms_at_or_above(rights)], 1)
        self._residual_span = np.stack([self._residual_cdf(self._lefts_np), self._residual_cdf(rights)], 1)
        self._residual_span[0, 0] = 0.0
        mass = self._bin_mass(self._atom_span, self._residual_span)
        self._positions = (np.cumsum(mass) - mass / 2) / max(mass.sum(), 1e-300)
        self.pandas_dtype = pd.api.types.pandas_dtype(dtype)

    @classmethod
    def fit(cls, name, series: pd.Series, has_missing: bool, num_bins: int) -> "NumericColumn":
        exact = exact_values(to_plain(name, series, series.dtype))
        x = exact.astype(np.float64)  # monotone, so bins of x are bins of exact
        if (exact.dtype == np.int64 and not is_time_dtype(series.dtype) and len(x) >= KEY_MIN_VALUES
                and np.all(np.diff(exact) > 0)):
            warnings.warn(f"column {name!r} may be a unique key: its {len(x):,} integers are all distinct. "
                          "It is binned like any number, so synthetic rows get values drawn from its bins "
                          "and may repeat them; drop it before fitting if it is an identifier.", stacklevel=3)
        distinct, counts = np.unique(exact, return_counts=True)
        is_atom = counts >= MIN_ROWS_PER_VALUE
        exact_atoms, atom_counts = distinct[is_atom], counts[is_atom]
        residual = x[~np.isin(exact, exact_atoms)]
        values, atoms, rare = distinct.astype(np.float64), exact_atoms.astype(np.float64), \
            distinct[~is_atom].astype(np.float64)
        sketch = _generalise(_quantile_sketch(residual, SKETCH_LEVELS), rare, values) if len(residual) else \
            np.zeros(0)
        if len(atoms) <= MAX_VALUE_TOKENS and len(residual) * num_bins < len(x):
            lefts = atoms
        else:
            own_bin = atoms[atom_counts * num_bins >= len(x)]
            rest = x[~np.isin(x, own_bin)]
            lefts = np.union1d(own_bin, np.nextafter(own_bin, np.inf))
            if len(rest):
                continuous = max(1, round(num_bins * len(rest) / len(x)))
                edges = _generalise(_quantile_sketch(rest, continuous), rare, values)
                lefts = np.union1d(lefts, edges[:-1])
            lefts = _drop_empty_bins(lefts, x)
        if exact.dtype == np.int64:
            step, decimals = max(int(np.gcd.reduce(exact)), 1), None
        else:
            step, decimals = None, _decimals(x)
        return cls(name, str(series.dtype), has_missing, torch.from_numpy(np.asarray(lefts, dtype=np.float64)),
                   torch.from_numpy(sketch), torch.from_numpy(exact_atoms), torch.from_numpy(atom_counts.astype(np.int64)),
                   len(residual), step, decimals)

    @property
    def num_values(self) -> int:
        return len(self.lefts)

    def encode(self, series: pd.Series, missing: np.ndarray) -> np.ndarray:
        numbers = pd.to_numeric(series, errors="coerce") if series.dtype == object else series
        if not (pd.api.types.is_numeric_dtype(numbers) or pd.api.types.is_bool_dtype(numbers)):
            raise TypeError(f"column {self.name!r} is numeric but got dtype {series.dtype}")
        x = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(x) & ~missing
        if bad.any():
            raise TypeError(f"column {self.name!r} is numeric but holds non-numeric values: "
                            f"{examples(series.to_numpy(dtype=object)[bad])}")
        return self._bins(np.where(missing, self._lefts_np[0], x))

    def _bins(self, x: np.ndarray) -> np.ndarray:
        """Bin of each value: a value at a bin's left edge belongs to that bin; out-of-range
        values clip to the end bins."""
        return np.maximum(np.searchsorted(self._lefts_np, x, side="right") - 1, 0)

    def _residual_cdf(self, x: np.ndarray) -> np.ndarray:
        """The residual sketch's distribution function just below x (0 without residual values)."""
        x = np.asarray(x, dtype=np.float64)
        sketch, levels = self._sketch_np, len(self._sketch_np) - 1
        if levels < 1:
            return np.zeros(x.shape)
        k = np.searchsorted(sketch, x, side="left")   # sketch[k - 1] < x <= sketch[k]
        inside = (k > 0) & (k <= levels)
        lo, hi = sketch[np.clip(k - 1, 0, levels)], sketch[np.clip(k, 0, levels)]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(inside, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
        return np.where(k > levels, 1.0, np.where(inside, (k - 1 + frac) / levels, 0.0))

    def _residual_quantile(self, u: np.ndarray) -> np.ndarray:
        """Inverse of `_residual_cdf`: exact on flat runs of levels."""
        sketch, levels = self._sketch_np, len(self._sketch_np) - 1
        t = u * levels
        k = np.clip(np.floor(t).astype(np.int64), 0, levels - 1)
        return sketch[k] + (t - k) * (sketch[k + 1] - sketch[k])

    def _atoms_at_or_above(self, x: np.ndarray) -> np.ndarray:
        """Index of the first atom >= x."""
        return np.searchsorted(self._atoms_np, x, side="left")

    def _bin_mass(self, atom_span: np.ndarray, residual_span: np.ndarray) -> np.ndarray:
        """Training rows in [atoms first, end) plus the residual rows in the residual span."""
        first, end = atom_span[:, 0], np.maximum(atom_span[:, 1], atom_span[:, 0])
        return (self._atom_cum[end] - self._atom_cum[first]
                + self.residual_rows * np.maximum(residual_span[:, 1] - residual_span[:, 0], 0.0))

    def token_positions(self) -> list[float]:
        """Each bin's middle in the column's distribution function, [0, 1]; NaN for the
        missing token, which has no place in the order."""
        return [float(u) for u in self._positions] + [float("nan")] * int(self.has_missing)

    def _restricted_spans(self, bins: np.ndarray, low, high) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(atom span, residual span, grid low, grid high) of `bins` restricted to [low, high]
        (numbers, None or arrays of them, +-inf open): the atoms in the range and the residual
        mass that rounds into it. A number rounds to its grid value, so on a grid the residual
        span covers half a step beyond the range's first and last grid values."""
        low = np.atleast_1d(np.asarray(-np.inf if low is None else low, dtype=np.float64))
        high = np.atleast_1d(np.asarray(np.inf if high is None else high, dtype=np.float64))
        if self._grid() is None:
            grid_low, grid_high, half = low, high, 0.0
        else:
            grid_low = np.where(np.isfinite(low), self._grid_at_or_above(np.where(np.isfinite(low), low, 0.0)), low)
            grid_high = np.where(np.isfinite(high), self._grid_at_or_below(np.where(np.isfinite(high), high, 0.0)),
                                 high)
            half = (self.step if self.step is not None else 10.0 ** -self.decimals) / 2
        grid_low, grid_high = grid_low.astype(np.float64), grid_high.astype(np.float64)
        atom_span = self._atom_span[bins].copy()
        atom_span[:, 0] = np.maximum(atom_span[:, 0], self._atoms_at_or_above(grid_low))
        atom_span[:, 1] = np.minimum(atom_span[:, 1], np.searchsorted(self._atoms_np, grid_high, side="right"))
        start = self._residual_cdf(grid_low - half)
        end = self._residual_cdf(np.nextafter(grid_high + half, np.inf))
        residual_span = np.clip(self._residual_span[bins], start[:, None], end[:, None])
        empty = grid_low > grid_high   # no value at the column's precision
        atom_span[:, 1] = np.where(empty, atom_span[:, 0], atom_span[:, 1])
        residual_span[:, 1] = np.where(empty, residual_span[:, 0], residual_span[:, 1])
        return atom_span, residual_span, grid_low, grid_high

    def range_weights(self, low: float | None, high: float | None) -> np.ndarray:
        """[tokens]: the share of each bin's mass that decodes into [low, high] (None: open),
        0 for the missing token. Decoding with the same range draws inside it (`decode`), so
        these are the probabilities of landing in the range."""
        bins = np.arange(self.num_values)
        inside = self._bin_mass(*self._restricted_spans(bins, low, high)[:2])
        whole = self._bin_mass(self._atom_span, self._residual_span)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(whole > 0, np.clip(inside / whole, 0.0, 1.0), 0.0)
        return np.concatenate([share, np.zeros(int(self.has_missing))])

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) number each bin decodes to, [tokens]; the missing token's
        (+inf, -inf) satisfies no comparison."""
        first, end = self._atom_span[:, 0], self._atom_span[:, 1]
        has_atoms = end > first
        atoms = np.append(self._atoms_np, np.nan)
        has_residual = self._residual_span[:, 1] > self._residual_span[:, 0]
        low = np.fmin(np.where(has_atoms, atoms[first], np.nan),
                      np.where(has_residual, self._residual_quantile(self._residual_span[:, 0]), np.nan))
        high = np.fmax(np.where(has_atoms, atoms[np.maximum(end - 1, 0)], np.nan),
                       np.where(has_residual, self._residual_quantile(self._residual_span[:, 1]), np.nan))
        low, high = np.where(np.isnan(low), self._lefts_np, low), np.where(np.isnan(high), self._lefts_np, high)
        never = np.full(int(self.has_missing), np.inf)
        return np.concatenate([low, never]), np.concatenate([high, -never])

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator,
               value_range: tuple[float | None, float | None] | None = None) -> pd.Series:
        """Numbers drawn inside their bins: an atom of the bin or a residual number (see the
        class docstring); with `value_range` (low, high: numbers, None or per-row arrays),
        inside the part of the bin in that range (rows the range restricted when they were
        sampled); where that part holds no value, the range's nearest end."""
        bins = np.where(missing, 0, codes)
        u = torch.rand(len(bins), generator=generator, dtype=torch.float64).numpy()
        if value_range is None:
            atom_span, residual_span = self._atom_span[bins], self._residual_span[bins]
        else:
            atom_span, residual_span, grid_low, grid_high = self._restricted_spans(bins, *value_range)
        first, end = atom_span[:, 0], np.maximum(atom_span[:, 1], atom_span[:, 0])
        atom_rows = self._atom_cum[end] - self._atom_cum[first]
        residual_rows = self.residual_rows * np.maximum(residual_span[:, 1] - residual_span[:, 0], 0.0)
        t = u * (atom_rows + residual_rows)
        is_atom = t < atom_rows
        atom = np.clip(np.searchsorted(self._atom_cum, self._atom_cum[first] + t, side="right") - 1,
                       first, np.maximum(end - 1, first))
        atom = np.minimum(atom, max(len(self._atoms_np) - 1, 0))
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(residual_rows > 0, (t - atom_rows) / residual_rows, 0.0)
        if len(self._sketch_np):
            drawn = self._residual_quantile(residual_span[:, 0] + np.clip(v, 0.0, 1.0)
                                            * (residual_span[:, 1] - residual_span[:, 0]))
        else:
            drawn = np.zeros(len(bins))
        drawn = np.where(residual_rows > 0, drawn, self._lefts_np[bins])
        if len(self._atoms_np):
            drawn = np.where(is_atom, self._atoms_np[atom], drawn)
        values = self._on_grid(drawn, bins)
        if len(self._atoms_np):   # an atom comes back exactly as stored
            values = np.where(is_atom, self._atom_values[atom], values)
        if value_range is not None:   # rounding to the grid never leaves the range
            values = np.clip(values, grid_low, grid_high).astype(np.asarray(values).dtype)
        return from_plain(values, missing, self.pandas_dtype)

    def _grid(self):
        """(scale, to_value): grid index = value * scale; to_value(index) the grid value
        (exact integers for an integer column); None when the column has no grid."""
        if self.step is not None:
            return 1.0 / self.step, lambda k: k.astype(np.int64) * self.step
        if self.decimals is not None:
            return 10.0 ** self.decimals, lambda k: k / 10.0 ** self.decimals  # the nearest float to the decimal
        return None

    def _grid_at_or_above(self, x: np.ndarray) -> np.ndarray:
        scale, to_value = self._grid()
        first = np.ceil(x * scale)
        return to_value(first + (to_value(first).astype(np.float64) < x))

    def _grid_at_or_below(self, x: np.ndarray) -> np.ndarray:
        scale, to_value = self._grid()
        last = np.floor(x * scale)
        return to_value(last - (to_value(last).astype(np.float64) > x))

    def _on_grid(self, drawn: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """Drawn numbers rounded to the column's precision, kept inside their bins (a rounded
        value that leaves its bin takes the bin's first grid value; the bin holds a training
        value, so it has one)."""
        if self._grid() is None:
            return drawn
        scale, to_value = self._grid()
        values = to_value(np.round(drawn * scale))
        outside = self._bins(values.astype(np.float64)) != bins
        return np.where(outside, self._grid_at_or_above(self._lefts_np[bins]), values)

    def state_dict(self) -> dict:
        return {"kind": "numeric", "lefts": self.lefts, "sketch": self.sketch, "atoms": self.atoms,
                "atom_counts": self.atom_counts, "residual_rows": self.residual_rows, "step": self.step,
                "decimals": self.decimals}


def _quantile_sketch(x: np.ndarray, levels: int) -> np.ndarray:
    """levels + 1 equal-mass quantiles of sorted x, none of them a training value unless it is
    repeated: each interpolates between two neighbouring order statistics, and a level that
    would land exactly on one (or on an end) takes the midpoint with its neighbour."""
    n = len(x)
    if n == 1:
        return np.full(levels + 1, x[0])
    position = np.linspace(0.0, n - 1, levels + 1)
    below = np.minimum(np.floor(position).astype(np.int64), n - 2)
    frac = position - below
    on_value = (frac == 0.0) | (frac == 1.0)
    frac = np.where(on_value, 0.5, frac)
    return np.sort(x[below] + frac * (x[below + 1] - x[below]))


def _generalise(levels: np.ndarray, rare: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sorted `levels` where each level equal to a `rare` value (held by fewer than
    MIN_ROWS_PER_VALUE rows) moves halfway to the next of the column's distinct `values` (the
    one below for the largest), so no level is such a value. A column of one value keeps it."""
    hit = np.isin(levels, rare)
    if not hit.any() or len(values) < 2:
        return levels
    at = np.searchsorted(values, levels[hit])
    neighbour = values[np.where(at + 1 < len(values), at + 1, at - 1)]
    levels = levels.copy()
    levels[hit] = (levels[hit] + neighbour) / 2
    return np.sort(levels)


def _drop_empty_bins(lefts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Remove bins no value of sorted x falls in (bin 0 also holds the values below its left
    edge). An empty bin merges into the bin below it, except just above a point mass, where it
    merges into the bin above so the point mass keeps its own bin."""
    lefts = list(lefts)
    k = 0
    while k < len(lefts):
        start = 0 if k == 0 else np.searchsorted(x, lefts[k], side="left")
        end = np.searchsorted(x, lefts[k + 1], side="left") if k + 1 < len(lefts) else len(x)
        if end > start:
            k += 1
            continue
        below_is_point = k > 0 and lefts[k] == np.nextafter(lefts[k - 1], np.inf)
        del lefts[k + 1 if below_is_point and k + 1 < len(lefts) else k]
    return np.asarray(lefts, dtype=np.float64)


def _decimals(x: np.ndarray) -> int | None:
    """The fewest decimals (up to MAX_DECIMALS) that write every value exactly, or None."""
    for decimals in range(MAX_DECIMALS + 1):
        if np.array_equal(np.round(x, decimals), x):
            return decimals
    return None
