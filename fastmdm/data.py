"""TableCodec: pandas DataFrame <-> token ids, one discrete token per column.

Masked diffusion works on discrete tokens, so every column becomes a small vocabulary:
categorical columns map each category to an id, numeric columns map each value to a
quantile bin. Decoding a bin draws a new number inside the bin from the column's quantile
sketch, at the column's observed precision; point masses (capital-gain = 0) come back
exactly. The codec stores quantile levels, never training rows' values (see `_Numeric`).
A column that had missing values when fitted gets one extra token for "missing".

Every categorical column has an "other" token, after its categories: values it has no token
for, that is, categories first seen after fitting (a held-out split's) and, in a column with
more than `category_cap` values, the rare ones beyond the cap. So any split of a table
encodes, and the model scores an unseen category by the probability it gives "other" (learnt
from the rare values' share in a capped column; in other columns the model never sees the
token in training, so an unseen value costs what a never-seen token costs, typically several
nats). See `_Categorical` for what "other" decodes to: the codec keeps no list of rare
values to copy.

Datetimes (naive or tz-aware) and timedeltas are numbers here: integer counts of their unit
(tz-aware ones in UTC), binned like any number and decoded back to the fitted dtype, unit
and timezone.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ._checks import INT_DTYPES, check_tensor

__all__ = ["TableCodec", "infer_categorical", "DEFAULT_NUM_BINS", "DEFAULT_MAX_CATEGORIES",
           "DEFAULT_CATEGORY_CAP", "OTHER_LABEL"]

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
# Integer-valued numeric columns with at most this many distinct values are categorical
# (Adult's education-num): a bin per value is exact and costs no more tokens.
DEFAULT_MAX_CATEGORIES = 20
# Most tokens a categorical column gets (its "other" token included). The denoiser's
# embedding and output head grow with every token and each training step scores all of them,
# so a column with thousands of rare values (flights' 4,043 tail numbers) would dominate the
# model's size and cost while each rare value is seen too seldom to learn.
DEFAULT_CATEGORY_CAP = 1000
# Equal-mass quantile levels each numeric column stores for decoding inside a bin: 16 per
# default bin, so marginals stay within 1/1024 of the data's (less than a KS test detects
# below ~10^6 rows) at 8 KiB a column.
SKETCH_LEVELS = 1024
# Most decimals a float column is checked for; beyond it a column is continuous (MAGIC's).
MAX_DECIMALS = 10
# What the "other" token of a text column decodes to.
OTHER_LABEL = "(other)"
# A column with at least this many distinct values can be flagged as a unique key (below it,
# a table is too small to tell a key from a coincidence): text most of whose rows hold a value
# seen once is refused (it cannot be modelled), all-distinct integers get a warning (they are
# binned like any number, which works but may repeat identifiers).
KEY_MIN_VALUES = 100
_STATE_VERSION = 3


def _python_scalar(value):
    """numpy scalars -> Python scalars, so a state dict loads with torch.load(weights_only=True)."""
    value = value.item() if isinstance(value, np.generic) else value
    if not isinstance(value, (str, int, float, bool)):
        raise TypeError(f"categorical values must be str, int, float or bool, got {type(value).__name__}")
    return value


def _examples(values, limit: int = 5) -> str:
    unique = list(dict.fromkeys(values.tolist()))
    more = f" (and {len(unique) - limit} more)" if len(unique) > limit else ""
    return ", ".join(repr(v) for v in unique[:limit]) + more


# ----------------------------------------------------------------------------- dtypes
def is_time_dtype(dtype) -> bool:
    """datetime64 (naive or tz-aware) and timedelta64 dtypes."""
    return isinstance(dtype, pd.DatetimeTZDtype) or getattr(dtype, "kind", None) in ("M", "m")


def to_plain(name, series: pd.Series, dtype) -> pd.Series:
    """The column as the codec sees it: datetimes and timedeltas as nullable Int64 counts of
    their unit (tz-aware ones in UTC), every other column unchanged.

    `dtype` is the column's fitted dtype (its own when fitting): time input in another unit
    or timezone is converted to it, and text (a CSV, a condition) is parsed first.
    """
    if not is_time_dtype(dtype):
        return series
    missing = series.isna().to_numpy()
    counts = np.zeros(len(series), dtype=np.int64)
    if not missing.all():  # (an all-NaN column of a condition frame has nothing to convert)
        present = series[~missing]
        try:
            if not is_time_dtype(present.dtype):
                present = (pd.to_datetime(present, format="ISO8601") if dtype.kind == "M"
                           else pd.to_timedelta(present))
            present = present.astype(dtype)
        except (TypeError, ValueError) as err:
            raise TypeError(f"column {name!r} was fitted as {dtype} and cannot take {series.dtype} values "
                            f"({_examples(series.to_numpy(dtype=object)[~missing])}): "
                            f"{str(err).splitlines()[0]}") from err
        if isinstance(dtype, pd.DatetimeTZDtype):
            present = present.dt.tz_convert("UTC").dt.tz_localize(None)
        counts[~missing] = present.to_numpy().view(np.int64)
    return pd.Series(pd.arrays.IntegerArray(counts, missing), index=series.index)


def _from_plain(values: np.ndarray, missing: np.ndarray, dtype) -> pd.Series:
    """Inverse of to_plain: values in the codec's representation -> a Series of `dtype`."""
    if is_time_dtype(dtype):
        counts = np.asarray(values).astype(np.int64)
        if isinstance(dtype, pd.DatetimeTZDtype):
            series = pd.Series(counts.view(f"M8[{dtype.unit}]")).dt.tz_localize("UTC").dt.tz_convert(dtype.tz)
        else:
            series = pd.Series(counts.view(dtype))
    else:
        series = pd.Series(values).astype(dtype)
    return series.mask(missing) if missing.any() else series


def _exact_values(plain: pd.Series) -> np.ndarray:
    """Non-missing values, sorted, as int64 for integer columns (exact beyond 2**53) else float64."""
    integer = pd.api.types.is_signed_integer_dtype(plain.dtype) or (
        pd.api.types.is_unsigned_integer_dtype(plain.dtype) and plain.dtype.itemsize < 8)
    return np.sort(plain.dropna().to_numpy(dtype=np.int64 if integer else np.float64))


def _is_numeric_plain(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _check_supported(name, dtype) -> None:
    textual = (pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)
               or isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(dtype))
    if not (textual or _is_numeric_plain(dtype) or is_time_dtype(dtype)):
        raise TypeError(f"column {name!r} has unsupported dtype {dtype} (supported: numbers, text, bool, "
                        "category, datetime64 with or without timezone, timedelta64)")


def infer_categorical(series: pd.Series, max_categories: int = DEFAULT_MAX_CATEGORIES) -> bool:
    """The codec's typing rule: text, bool and category columns are categorical; so are
    integer-valued numbers (datetimes as counts of their unit) with <= max_categories distinct
    values. Everything else is numeric. Also decides classification vs regression in metrics.
    """
    _check_supported(series.name, series.dtype)
    plain = to_plain(series.name, series, series.dtype)
    if not _is_numeric_plain(plain.dtype):
        return True
    x = _exact_values(plain)
    return bool(np.all(x == np.round(x))) and len(np.unique(x)) <= max_categories


class _Categorical:
    """One token per category (sorted when comparable, else in first-seen order; a category
    dtype's declared order), then the "other" token for every value without one (rare
    values beyond the cap, values first seen after fitting).

    Decoding "other": in a capped column it stands for the rare values, and becomes
    OTHER_LABEL (missing where the dtype cannot hold text). In an uncapped column no training
    row holds it, so a model generates it only by error (an undertrained model now and then);
    it becomes a category drawn by the training counts, so synthetic rows hold only the
    column's categories.
    """

    is_numeric = False

    def __init__(self, name, dtype: str, has_missing: bool, categories: list, counts: list[int], capped: bool,
                 domain: list | None = None, ordered: bool = False):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.categories, self.counts, self.capped = categories, counts, capped
        self.domain, self.ordered = domain, ordered  # a category dtype's declared categories
        self._index = pd.Index(categories, dtype=object)
        self.pandas_dtype = (pd.CategoricalDtype(domain, ordered=ordered) if dtype == "category"
                             else pd.api.types.pandas_dtype(dtype))

    @classmethod
    def fit(cls, name, series: pd.Series, has_missing: bool, cap: int | None) -> "_Categorical":
        is_category = isinstance(series.dtype, pd.CategoricalDtype)
        plain = to_plain(name, series, series.dtype).dropna()
        if is_category:
            values = list(series.cat.categories)  # the declared domain, used or not
        else:
            values = list(pd.unique(plain))
            try:
                values = sorted(values)
            except TypeError:
                pass
        counts = plain.value_counts().reindex(values, fill_value=0)
        if len(plain) and (counts == 1).sum() > len(plain) / 2 and len(values) >= KEY_MIN_VALUES:
            raise ValueError(f"column {name!r} looks like a unique key ({len(values):,} distinct values; "
                             f"{(counts == 1).sum() / len(plain):.0%} of the rows hold a value seen only once): "
                             "a generator can only copy such values, not learn them. Drop it before fitting, "
                             "and number the synthetic rows yourself if you need a key.")
        capped = cap is not None and len(values) > cap
        if capped:
            # Most frequent first; ties keep the category order (a stable sort).
            kept = set(counts.sort_values(ascending=False, kind="stable").index[:cap - 1])
            values = [v for v in values if v in kept]
        domain = [_python_scalar(v) for v in series.cat.categories] if is_category else None
        return cls(name, str(series.dtype), has_missing, [_python_scalar(v) for v in values],
                   [int(counts[v]) for v in values], capped, domain,
                   bool(series.cat.ordered) if is_category else False)

    @property
    def num_values(self) -> int:
        return len(self.categories) + 1  # the categories, then "other"

    def encode(self, series: pd.Series, missing: np.ndarray) -> np.ndarray:
        codes = self._index.get_indexer(series.to_numpy(dtype=object))
        codes[(codes < 0) & ~missing] = len(self.categories)
        return codes

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(value, value) of each category token, for comparisons between columns; "other" and missing are (+inf, -inf), which satisfy no comparison. Only a
        column of numbers compares."""
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.categories):
            raise ValueError(f"column {self.name!r} holds categories that are not numbers; a rule compares numbers "
                             "or times")
        values = np.array(self.categories, dtype=np.float64)
        never = np.full(self.num_values + int(self.has_missing) - len(values), np.inf)
        return np.concatenate([values, never]), np.concatenate([values, -never])

    def set_weights(self, values) -> tuple[np.ndarray, tuple]:
        """(1 for the tokens of `values`, else 0, over the column's tokens; the values that
        have no token of their own). Text matches a category by its printed form, so a
        command line's "9" finds the category 9. Values without a token take the "other"
        token of a capped column (they may be its rare values); in an uncapped column the
        table never had them, which is an error."""
        weights = np.zeros(self.num_values + int(self.has_missing))
        printed = {str(c): i for i, c in enumerate(self.categories)}
        others = []
        for value in values:
            if value is None or (isinstance(value, float) and np.isnan(value)):
                if not self.has_missing:
                    raise ValueError(f"condition on {self.name!r}: the column had no missing values")
                weights[self.num_values] = 1.0
                continue
            i = int(self._index.get_indexer([value])[0])
            i = printed.get(value, -1) if i < 0 and isinstance(value, str) else i
            if i >= 0:
                weights[i] = 1.0
            else:
                others.append(value)
        if others:
            if not self.capped:
                raise ValueError(f"condition on {self.name!r}: the table never had {_examples(np.array(others, dtype=object))}")
            weights[len(self.categories)] = 1.0
        return weights, tuple(others)

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator, choices: tuple = ()) -> pd.Series:
        """Categories of the tokens; "other" as the class docstring says, or, with `choices`
        (a set condition's values without a token), one of them drawn uniformly."""
        codes = np.where(missing, 0, codes)
        other = codes == len(self.categories)
        u = torch.rand(len(codes), generator=generator, dtype=torch.float64).numpy()
        if choices:
            values = np.empty(len(codes), dtype=object)
            values[~other] = np.array(self.categories, dtype=object)[codes[~other]]
            values[other] = np.array(choices, dtype=object)[np.minimum((u[other] * len(choices)).astype(np.int64),
                                                                       len(choices) - 1)]
            return _from_plain(values, missing, self.pandas_dtype)
        if not self.capped:
            cumulative = np.cumsum(self.counts)
            drawn = np.minimum(np.searchsorted(cumulative, u * cumulative[-1], side="right"), len(self.categories) - 1)
            codes, other = np.where(other, drawn, codes), np.zeros(len(codes), dtype=bool)
        values = np.empty(len(codes), dtype=object)
        values[~other] = np.array(self.categories, dtype=object)[codes[~other]]
        if pd.api.types.is_object_dtype(self.pandas_dtype) or pd.api.types.is_string_dtype(self.pandas_dtype):
            values[other] = OTHER_LABEL
        else:
            values[other] = self.categories[0]  # a placeholder of the right type, masked below
            missing = missing | other
        return _from_plain(values, missing, self.pandas_dtype)

    def state_dict(self) -> dict:
        return {"kind": "categorical", "categories": list(self.categories), "counts": list(self.counts),
                "capped": self.capped, "domain": self.domain, "ordered": self.ordered}


class _Numeric:
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
    def fit(cls, name, series: pd.Series, has_missing: bool, num_bins: int) -> "_Numeric":
        exact = _exact_values(to_plain(name, series, series.dtype))
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
                            f"{_examples(series.to_numpy(dtype=object)[bad])}")
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
        return _from_plain(values, missing, self.pandas_dtype)

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


class TableCodec:
    """Maps a table's rows to int64 tokens [N, L] and back.

    Column l has cardinalities[l] = K_l values (categories or bins, plus a final "missing"
    token if the column had missing values when fitted); its mask token is K_l, one past
    the last real value. offsets[l] is where column l starts in a flat [sum K_l] vocabulary.
    Build with TableCodec.fit(df).
    """

    def __init__(self, columns: Sequence[_Categorical | _Numeric]):
        self._columns = list(columns)
        self.columns = [c.name for c in self._columns]
        self.num_columns = len(self._columns)
        self.is_numeric = [c.is_numeric for c in self._columns]
        self.cardinalities = [c.num_values + int(c.has_missing) for c in self._columns]
        self.mask_ids = torch.tensor(self.cardinalities, dtype=torch.int64)
        self.offsets = torch.zeros(self.num_columns + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.mask_ids, 0)

    def token_positions(self) -> list[list[float] | None]:
        """Per column, where each token sits in the column's order (numbers: the bin's middle
        quantile; NaN for a missing token), or None for a column of categories: the
        denoiser shares what it learns between neighbouring bins through these."""
        return [column.token_positions() if column.is_numeric else None for column in self._columns]

    @classmethod
    def fit(cls, df: pd.DataFrame, *, num_bins: int = DEFAULT_NUM_BINS,
            categorical: Sequence[str] | None = None,
            max_categories: int = DEFAULT_MAX_CATEGORIES,
            category_cap: int | None = DEFAULT_CATEGORY_CAP) -> "TableCodec":
        """Learn each column's vocabulary from `df`.

        categorical=None detects types (`infer_categorical`): object/string/category/bool
        columns and integer-valued numeric columns with <= max_categories distinct values are
        categorical, other numeric columns (datetimes and timedeltas included) get up to
        num_bins quantile bins. A list names exactly the categorical columns.
        A categorical column with more than `category_cap` values keeps a token for the
        category_cap - 1 most frequent ones; the rest share the "other" token every categorical
        column has for values it has no token for (None: no cap).
        A categorical column that looks like a unique key (most rows hold a value seen once) is
        refused with a message naming it; all-distinct integers (row ids) get a warning.
        """
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
        if df.shape[1] == 0:
            raise ValueError("cannot fit a codec on a table with no columns")
        if len(df) == 0:
            raise ValueError("cannot fit a codec on a table with no rows")
        if df.columns.duplicated().any():
            raise ValueError(f"duplicate column names: {_examples(df.columns[df.columns.duplicated()])}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        if isinstance(max_categories, bool) or not isinstance(max_categories, int) or max_categories < 0:
            raise ValueError(f"max_categories must be an integer >= 0, got {max_categories!r}")
        if category_cap is not None and (isinstance(category_cap, bool) or not isinstance(category_cap, int)
                                         or category_cap < 2):
            raise ValueError(f"category_cap must be None or an integer >= 2, got {category_cap!r}")
        if isinstance(categorical, str):
            raise TypeError("categorical must be a list of column names, not a single string")
        if categorical is not None:
            categorical = list(categorical)
            unknown = [c for c in categorical if c not in df.columns]
            if unknown:
                raise ValueError(f"categorical names columns not in the table: {unknown}")

        columns = []
        for name in df.columns:
            if not isinstance(name, (str, int)) or isinstance(name, bool):
                raise TypeError(f"column names must be str or int, got {name!r}")
            series = df[name]
            missing = series.isna()
            if missing.all():
                raise ValueError(f"column {name!r} has only missing values; drop it before fitting")
            is_categorical = cls._is_categorical(name, series, categorical, max_categories)
            if is_categorical:
                columns.append(_Categorical.fit(name, series, bool(missing.any()), category_cap))
            else:
                columns.append(_Numeric.fit(name, series, bool(missing.any()), num_bins))
        return cls(columns)

    @staticmethod
    def _is_categorical(name, series: pd.Series, categorical, max_categories: int) -> bool:
        _check_supported(name, series.dtype)
        if categorical is None:
            return infer_categorical(series, max_categories)
        if not (_is_numeric_plain(series.dtype) or is_time_dtype(series.dtype)) and name not in categorical:
            raise TypeError(f"column {name!r} has dtype {series.dtype} but is not listed in categorical")
        return name in categorical

    # ----------------------------------------------------------------------------- encode
    def _check_frame(self, df: pd.DataFrame) -> None:
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
        missing = [c for c in self.columns if c not in df.columns]
        extra = [c for c in df.columns if c not in self.columns]
        if missing or extra:
            raise ValueError(f"table does not match the codec's schema: missing columns {missing}, "
                             f"unexpected columns {extra}")
        if len(df) == 0:
            raise ValueError("cannot encode a table with no rows")

    def _encode(self, df: pd.DataFrame, nan_is_unknown: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_frame(df)
        tokens = np.zeros((len(df), self.num_columns), dtype=np.int64)
        known = np.ones((len(df), self.num_columns), dtype=bool)
        for l, column in enumerate(self._columns):
            series = df[column.name].reset_index(drop=True)
            if isinstance(series.dtype, pd.CategoricalDtype):
                series = series.astype(object)
            series = to_plain(column.name, series, column.pandas_dtype)
            missing = series.isna().to_numpy()
            tokens[:, l] = column.encode(series, missing)
            if nan_is_unknown:
                tokens[missing, l] = 0
                known[:, l] = ~missing
            elif missing.any():
                if not column.has_missing:
                    raise ValueError(f"column {column.name!r} has {int(missing.sum())} missing value(s) but "
                                     "had none when the codec was fitted (use encode_partial to impute them)")
                tokens[missing, l] = column.num_values
        return torch.from_numpy(tokens), torch.from_numpy(known)

    def encode(self, df: pd.DataFrame) -> torch.Tensor:
        """Tokens int64 [N, L] in codec column order; NaN becomes the column's missing token."""
        return self._encode(df, nan_is_unknown=False)[0]

    def encode_partial(self, df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N, L], known bool [N, L]) for imputation: NaN marks a value to fill in.

        Unknown positions hold token 0 and known=False (callers replace them with mask_ids).
        """
        return self._encode(df, nan_is_unknown=True)

    # ----------------------------------------------------------------------------- decode
    def keep_given(self, given: pd.DataFrame, decoded: pd.DataFrame) -> pd.DataFrame:
        """`decoded` with every known (non-NaN) cell of `given` put back as given, in the
        fitted dtype (text parsed as encoding does). A token is a numeric bin or the shared
        "other" token, and decoding draws a number inside the bin or writes OTHER_LABEL, so
        the tokens alone would not return a conditioned or imputed row's known values."""
        self._check_frame(given)
        if len(given) != len(decoded):
            raise ValueError(f"given has {len(given)} rows but decoded has {len(decoded)}")
        out = decoded.copy()
        for column in self._columns:
            series = given[column.name].reset_index(drop=True)
            if isinstance(series.dtype, pd.CategoricalDtype):
                series = series.astype(object)
            plain = to_plain(column.name, series, column.pandas_dtype)
            if column.is_numeric and plain.dtype == object:
                plain = pd.to_numeric(plain, errors="coerce")
            known = plain.notna().to_numpy()
            if not known.any():
                continue
            values = plain.to_numpy(dtype=object)
            values[~known] = values[known][0]   # placeholders: those cells keep the decoded value
            restored = _from_plain(values, np.zeros(len(values), dtype=bool), column.pandas_dtype)
            drawn = decoded[column.name].reset_index(drop=True)
            out[column.name] = restored.where(known, drawn).set_axis(decoded.index)
        return out

    def decode(self, tokens: torch.Tensor, generator: torch.Generator | None = None, *,
               ranges: dict | None = None, choices: dict | None = None) -> pd.DataFrame:
        """DataFrame with the fitted column names, order and dtypes.

        Numeric bins decode to a number drawn inside the bin (random via `generator`, a CPU
        torch.Generator; see `_Numeric`); missing tokens decode to NaN; "other" tokens as
        `_Categorical` says. Rows sampled under set or range conditions
        (`fastmdm.conditions`) pass them: `ranges` {numeric column: (low, high)} draws the
        numbers inside the range, `choices` {column: values} decodes "other" to one of a set's
        values that have no token.
        """
        check_tensor("tokens", tokens, ndim=2, dtypes=INT_DTYPES)
        if tokens.shape[1] != self.num_columns:
            raise ValueError(f"tokens has {tokens.shape[1]} columns but the codec has {self.num_columns}")
        tokens = tokens.detach().to("cpu", torch.int64)
        out = {}
        for l, column in enumerate(self._columns):
            codes = tokens[:, l].numpy()
            bad = (codes < 0) | (codes >= self.cardinalities[l])
            if bad.any():
                hint = " (mask tokens must be sampled before decoding)" if (codes == self.cardinalities[l]).any() else ""
                raise ValueError(f"column {column.name!r} has token ids outside [0, {self.cardinalities[l]}): "
                                 f"{_examples(codes[bad])}{hint}")
            missing = (codes == column.num_values) if column.has_missing else np.zeros(len(codes), dtype=bool)
            if column.is_numeric and ranges and column.name in ranges:
                out[column.name] = column.decode(codes, missing, generator, ranges[column.name])
            elif not column.is_numeric and choices and column.name in choices:
                out[column.name] = column.decode(codes, missing, generator, choices[column.name])
            else:
                out[column.name] = column.decode(codes, missing, generator)
        return pd.DataFrame(out, columns=self.columns)

    def column(self, name) -> _Categorical | _Numeric:
        """How the column `name` is coded: its categories, or its bins and quantile sketch."""
        return self._columns[self.columns.index(name)]

    def redraw(self, column, tokens: torch.Tensor, low, high, generator: torch.Generator | None = None) -> pd.Series:
        """A numeric column's values decoded again from its tokens [N] inside [low, high]
        (numbers, None or per-row arrays), in the fitted dtype."""
        codes = tokens.detach().to("cpu", torch.int64).numpy()
        numeric = self.column(column)
        missing = (codes == numeric.num_values) if numeric.has_missing else np.zeros(len(codes), dtype=bool)
        return numeric.decode(codes, missing, generator, (low, high))

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain Python types and tensors only: loads with torch.load(weights_only=True)."""
        return {"version": _STATE_VERSION,
                "columns": [{"name": c.name, "dtype": c.dtype, "has_missing": c.has_missing, **c.state_dict()}
                            for c in self._columns]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TableCodec":
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported TableCodec state version {version!r} (this fastmdm reads version "
                             f"{_STATE_VERSION}); refit the model with this version")
        columns = []
        for c in state["columns"]:
            common = (c["name"], c["dtype"], c["has_missing"])
            if c["kind"] == "categorical":
                columns.append(_Categorical(*common, list(c["categories"]), list(c["counts"]), c["capped"],
                                            c["domain"], c["ordered"]))
            else:
                columns.append(_Numeric(*common, c["lefts"], c["sketch"], c["step"], c["decimals"]))
        return cls(columns)

    def __repr__(self) -> str:
        kinds = sum(self.is_numeric)
        return (f"TableCodec({self.num_columns} columns: {kinds} numeric, {self.num_columns - kinds} categorical; "
                f"vocabulary {int(self.offsets[-1])})")
