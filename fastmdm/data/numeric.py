"""Numeric columns: quantile bins as tokens, decoded to new numbers from a quantile sketch."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from .types import KEY_MIN_VALUES, exact_values, examples, from_plain, is_time_dtype, to_plain

__all__ = ["NumericColumn", "DEFAULT_NUM_BINS"]

# Bin count. Decoding draws a number inside its bin independently of the other columns, so
# what a bin loses is dependence inside it. Round trip decode(encode(train)) on MAGIC:
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
# Equal-mass quantile levels each numeric column stores for decoding inside a bin: 16 per
# default bin, so marginals stay within 1/1024 of the data's (less than a KS test detects
# below ~10^6 rows) at 8 KiB a column.
SKETCH_LEVELS = 1024
# Most decimals a float column is checked for; beyond it a column is continuous (MAGIC's).
MAX_DECIMALS = 10


class NumericColumn:
    """Quantile bins [left_k, left_{k+1}) as tokens; a bin decodes to a new number drawn from
    the column's quantile sketch inside the bin, at the column's observed precision.

    The sketch holds SKETCH_LEVELS + 1 equal-mass quantile levels, each an interpolation
    between two neighbouring sorted training values (never one of them, unless the two are
    equal: a value repeated across a level is a point mass and is kept exactly). Bin edges are
    levels of the sketch. Decoding draws from the piecewise-linear distribution between the
    levels, restricted to the bin: every marginal stays within 1 / SKETCH_LEVELS of the data,
    point masses come back exactly (a bin of its own for one filling a quantile step, flat runs
    of levels for smaller ones), and no stored or generated number is read off a training row.
    Precision: integer columns (datetimes and timedeltas as counts of their unit) decode to
    multiples of the greatest common divisor of their values (whole days stay whole days);
    float columns to the fewest decimals that hold every value (none when no count up to
    MAX_DECIMALS does).
    """

    is_numeric = True

    def __init__(self, name, dtype: str, has_missing: bool, lefts: torch.Tensor, sketch: torch.Tensor,
                 step: int | None, decimals: int | None):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.lefts, self.sketch, self.step, self.decimals = lefts, sketch, step, decimals
        self._lefts_np, self._sketch_np = lefts.numpy(), sketch.numpy()
        rights = np.append(self._lefts_np[1:], np.inf)
        self._point = rights == np.nextafter(self._lefts_np, np.inf)  # bins holding one value
        self._cdf_range = np.stack([self._cdf(self._lefts_np), self._cdf(rights)], axis=1)
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
        levels = max(SKETCH_LEVELS, num_bins)
        sketch = _quantile_sketch(x, levels)
        edges = sketch[np.round(np.linspace(0, levels, num_bins + 1)).astype(np.int64)]
        # A value that fills several quantile steps is a point mass: give it a bin of its own
        # by starting the next bin just above it. This never exceeds num_bins bins.
        repeated = np.unique(edges[:-1][edges[:-1] == edges[1:]])
        lefts = _drop_empty_bins(np.union1d(edges[:-1], np.nextafter(repeated, np.inf)), x)
        if exact.dtype == np.int64:
            step, decimals = max(int(np.gcd.reduce(exact)), 1), None
        else:
            step, decimals = None, _decimals(x)
        return cls(name, str(series.dtype), has_missing, torch.from_numpy(lefts), torch.from_numpy(sketch),
                   step, decimals)

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

    def _cdf(self, x: np.ndarray) -> np.ndarray:
        """The sketch's distribution function just below x (a point mass at x excluded)."""
        sketch, levels = self._sketch_np, len(self._sketch_np) - 1
        k = np.searchsorted(sketch, x, side="left")   # sketch[k - 1] < x <= sketch[k]
        inside = (k > 0) & (k <= levels)
        lo, hi = sketch[np.clip(k - 1, 0, levels)], sketch[np.clip(k, 0, levels)]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(inside, (x - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
        return np.where(k > levels, 1.0, np.where(inside, (k - 1 + frac) / levels, 0.0))

    def _quantile(self, u: np.ndarray) -> np.ndarray:
        """Inverse of `_cdf`: exact on flat runs of levels (point masses)."""
        sketch, levels = self._sketch_np, len(self._sketch_np) - 1
        t = u * levels
        k = np.clip(np.floor(t).astype(np.int64), 0, levels - 1)
        return sketch[k] + (t - k) * (sketch[k + 1] - sketch[k])

    def token_positions(self) -> list[float]:
        """Each bin's middle in the column's distribution function, [0, 1]; NaN for the
        missing token, which has no place in the order."""
        return [float(u) for u in self._cdf_range.mean(axis=1)] + [float("nan")] * int(self.has_missing)

    def range_weights(self, low: float | None, high: float | None) -> np.ndarray:
        """[tokens]: the share of each bin's mass that decodes into [low, high] (None: open),
        0 for the missing token. Decoding with the same range draws inside it (`decode`), so
        these are the probabilities of landing in the range."""
        start_of_range, end_of_range, grid_low, grid_high = (float(v[0]) for v in self._range_cdf(low, high))
        if grid_low > grid_high:   # no value at the column's precision
            return np.zeros(self.num_values + int(self.has_missing))
        start, end = self._cdf_range[:, 0], self._cdf_range[:, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.clip((np.minimum(end, end_of_range) - np.maximum(start, start_of_range)) / (end - start),
                            0.0, 1.0)
        point = self._point | (end <= start)
        share = np.where(point, ((self._lefts_np >= grid_low) & (self._lefts_np <= grid_high)).astype(np.float64),
                         share)
        return np.concatenate([share, np.zeros(int(self.has_missing))])

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) number each bin decodes to, [tokens]; the missing token's
        (+inf, -inf) satisfies no comparison."""
        start, end = self._cdf_range[:, 0], self._cdf_range[:, 1]
        point = self._point | (end <= start)
        low = np.where(point, self._lefts_np, self._quantile(start))
        high = np.where(point, self._lefts_np, self._quantile(end))
        never = np.full(int(self.has_missing), np.inf)
        return np.concatenate([low, never]), np.concatenate([high, -never])

    def _range_cdf(self, low, high) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(start, end) of [low, high] in the sketch's distribution function, and the range's
        first and last values at the column's precision, as arrays (low and high: numbers,
        None or arrays of them, +-inf open). A number rounds to its grid value, so on a grid
        the range covers half a step beyond its first and last grid values."""
        low = np.atleast_1d(np.asarray(-np.inf if low is None else low, dtype=np.float64))
        high = np.atleast_1d(np.asarray(np.inf if high is None else high, dtype=np.float64))
        if self._grid() is None:
            grid_low, grid_high, half = low, high, 0.0
        else:
            grid_low = np.where(np.isfinite(low), self._grid_at_or_above(np.where(np.isfinite(low), low, 0.0)), low)
            grid_high = np.where(np.isfinite(high), self._grid_at_or_below(np.where(np.isfinite(high), high, 0.0)),
                                 high)
            half = (self.step if self.step is not None else 10.0 ** -self.decimals) / 2
        start = self._cdf(grid_low - half)
        end = self._cdf(np.nextafter(grid_high + half, np.inf))
        return start, end, grid_low.astype(np.float64), grid_high.astype(np.float64)

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator,
               value_range: tuple[float | None, float | None] | None = None) -> pd.Series:
        """Numbers drawn inside their bins; with `value_range` (low, high: numbers, None or
        per-row arrays), inside the part of the bin in that range (rows the range restricted
        when they were sampled); where that part holds no value, the range's nearest end."""
        bins = np.where(missing, 0, codes)
        u = torch.rand(len(bins), generator=generator, dtype=torch.float64).numpy()
        start, end = self._cdf_range[bins, 0], self._cdf_range[bins, 1]
        if value_range is not None:
            start_of_range, end_of_range, grid_low, grid_high = self._range_cdf(*value_range)
            start, end = np.clip(start, start_of_range, end_of_range), np.clip(end, start_of_range, end_of_range)
        drawn = self._quantile(start + u * np.maximum(end - start, 0.0))
        lefts = self._lefts_np[bins]
        drawn = np.where(self._point[bins] | (end <= start), lefts, drawn)
        values = self._on_grid(drawn, bins)
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
        return {"kind": "numeric", "lefts": self.lefts, "sketch": self.sketch, "step": self.step,
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
