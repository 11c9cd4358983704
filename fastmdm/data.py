"""TableCodec: pandas DataFrame <-> token ids, one or two discrete tokens per column.

Masked diffusion works on discrete tokens, so every column becomes small vocabularies:
categorical columns map each category to an id, numeric columns map each value to a
quantile bin and, where bins hold several values, to a fine level inside the bin (an extra
token column; see TableCodec). Decoding draws a new number inside the fine level from the
column's quantile sketch, at the column's observed precision; point masses (capital-gain = 0)
come back exactly. The codec stores quantile levels, never training rows' values (see `_Numeric`).
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

# Bin-count experiment: round trip decode(encode(train)) on Adult and MAGIC (fit on train),
# decoding by resampling training values inside a bin:
#   num_bins                                16      32      64      128
#   max KS over numeric columns, Adult    .0019   .0016   .0011   .0008
#   max KS over numeric columns, MAGIC    .0030   .0025   .0018   .0012
#   max |Spearman corr drift|, MAGIC      .0073   .0020   .0007   .0002
#   max |Pearson corr drift|, MAGIC       .080    .038    .025    .018
#   max median |x - decoded| / IQR, MAGIC .058    .029    .014    .007
# Resampling inside a bin keeps every marginal (KS < 0.01 at any count), so KS
# cannot pick the count; what bins lose is dependence between columns inside a bin. 32 is the
# smallest count keeping correlation drift under ~0.04 (16 loses 0.08 of Pearson correlation
# on MAGIC, a ceiling no model could beat) while the vocabulary stays small for the model.
DEFAULT_NUM_BINS = 32
# Integer-valued numeric columns with at most this many distinct values are categorical
# (Adult's education-num): a bin per value is exact and costs no more tokens.
DEFAULT_MAX_CATEGORIES = 20
# Most tokens a categorical column gets (its "other" token included). The denoiser's
# embedding and output head grow with every token and each training step scores all of them,
# so a column with thousands of rare values (flights' 4,043 tail numbers) would dominate the
# model's size and cost while each rare value is seen too seldom to learn.
DEFAULT_CATEGORY_CAP = 1000
# Equal-mass quantile levels each numeric column stores for decoding inside a bin: 32 per
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
_STATE_VERSION = 4


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

    @property
    def token_cardinalities(self) -> list[int]:
        return [self.num_values + int(self.has_missing)]

    def encode(self, series: pd.Series, missing: np.ndarray) -> np.ndarray:
        codes = self._index.get_indexer(series.to_numpy(dtype=object))
        codes[(codes < 0) & ~missing] = len(self.categories)
        return np.where(missing, self.num_values, codes)[:, None]

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(value, value) of each category token as [tokens, 1], for comparisons between
        columns; "other" and missing are (+inf, -inf), which satisfy no comparison. Only a
        column of numbers compares."""
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.categories):
            raise ValueError(f"column {self.name!r} holds categories that are not numbers; a rule compares numbers "
                             "or times")
        values = np.array(self.categories, dtype=np.float64)
        never = np.full(self.num_values + int(self.has_missing) - len(values), np.inf)
        return np.concatenate([values, never])[:, None], np.concatenate([values, -never])[:, None]

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
        codes = np.where(missing, 0, codes[:, 0])
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
    """Quantile bins [left_k, left_{k+1}) as tokens, each split into `fine_levels` equal-mass
    fine levels (a second token; 0 = the bin alone says the value); a (bin, fine level) pair
    decodes to a new number drawn from the column's quantile sketch inside it, at the column's
    observed precision.

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
                 step: int | None, decimals: int | None, fine_levels: int):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.lefts, self.sketch, self.step, self.decimals = lefts, sketch, step, decimals
        self.fine_levels = fine_levels
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
        # A fine level only where some bin holds more than one distinct value: otherwise the bin
        # alone says which value it is.
        bins = _bin_of(lefts, x)
        several = bool(np.any((np.diff(x) > 0) & (bins[1:] == bins[:-1])))
        return cls(name, str(series.dtype), has_missing, torch.from_numpy(lefts), torch.from_numpy(sketch),
                   step, decimals, num_bins if several else 0)

    @property
    def num_values(self) -> int:
        return len(self.lefts)

    @property
    def token_cardinalities(self) -> list[int]:
        """The bin (with the missing token when the column had missing values), then the fine level."""
        coarse = self.num_values + int(self.has_missing)
        return [coarse, self.fine_levels] if self.fine_levels else [coarse]

    def encode(self, series: pd.Series, missing: np.ndarray) -> np.ndarray:
        numbers = pd.to_numeric(series, errors="coerce") if series.dtype == object else series
        if not (pd.api.types.is_numeric_dtype(numbers) or pd.api.types.is_bool_dtype(numbers)):
            raise TypeError(f"column {self.name!r} is numeric but got dtype {series.dtype}")
        x = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(x) & ~missing
        if bad.any():
            raise TypeError(f"column {self.name!r} is numeric but holds non-numeric values: "
                            f"{_examples(series.to_numpy(dtype=object)[bad])}")
        bins, fine = self._cells(np.where(missing, self._lefts_np[0], x))
        codes = np.where(missing, self.num_values, bins)
        return np.stack([codes, np.where(missing, 0, fine)], axis=1) if self.fine_levels else codes[:, None]

    def _cells(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bin, fine level) of each value: a value at a bin's left edge belongs to that bin,
        out-of-range values clip to the end bins; the fine level is the equal-mass share of
        the bin below the value (0 in a point-mass bin, and in a column without fine levels)."""
        bins = _bin_of(self._lefts_np, x)
        if not self.fine_levels:
            return bins, np.zeros_like(bins)
        start, end = self._cdf_range[bins, 0], self._cdf_range[bins, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(end > start, (self._cdf(x) - start) / (end - start), 0.0)
        fine = np.clip(np.floor(share * self.fine_levels), 0, self.fine_levels - 1).astype(np.int64)
        return bins, np.where(self._point[bins], 0, fine)

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

    def _cell_cdf(self, bins: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The interval [start, end] of the sketch's distribution function each (bin, fine
        level) cell covers."""
        start, end = self._cdf_range[bins, 0], self._cdf_range[bins, 1]
        if self.fine_levels:   # the fine level's equal-mass share of the bin
            width = np.maximum(end - start, 0.0) / self.fine_levels
            start = start + fine * width
            end = start + width
        return start, end

    def range_weights(self, low: float | None, high: float | None) -> np.ndarray:
        """[coarse tokens, fine levels (1 without)]: the share of each cell's mass that decodes
        into [low, high] (None: open), the missing token's row 0. Decoding with the same range
        draws inside it (`decode`), so these are the probabilities of landing in the range."""
        start_of_range, end_of_range, grid_low, grid_high = self._range_cdf(low, high)
        if grid_low > grid_high:   # no value at the column's precision
            return np.zeros((self.num_values + int(self.has_missing), max(self.fine_levels, 1)))
        bins = np.arange(self.num_values)[:, None]
        fine = np.arange(max(self.fine_levels, 1))[None, :]
        start, end = self._cell_cdf(np.broadcast_to(bins, (len(bins), fine.shape[1])),
                                    np.broadcast_to(fine, (len(bins), fine.shape[1])))
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.clip((np.minimum(end, end_of_range) - np.maximum(start, start_of_range))
                            / (end - start), 0.0, 1.0)
        point = self._point[bins] | (end <= start)
        left = self._lefts_np[bins]
        share = np.where(point, ((left >= grid_low) & (left <= grid_high)).astype(np.float64), share)
        missing_row = np.zeros((int(self.has_missing), share.shape[1]))
        return np.concatenate([share, missing_row])

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) number each (bin, fine level) cell decodes to, [coarse tokens,
        fine levels (1 without)]; the missing token's row (+inf, -inf) satisfies no comparison."""
        bins = np.arange(self.num_values)[:, None]
        fine = np.arange(max(self.fine_levels, 1))[None, :]
        shape = (len(bins), fine.shape[1])
        start, end = self._cell_cdf(np.broadcast_to(bins, shape), np.broadcast_to(fine, shape))
        point = self._point[bins] | (end <= start)
        left = np.broadcast_to(self._lefts_np[bins], shape)
        low = np.where(point, left, self._quantile(start))
        high = np.where(point, left, self._quantile(end))
        never = np.full((int(self.has_missing), shape[1]), np.inf)
        return np.concatenate([low, never]), np.concatenate([high, -never])

    def _range_cdf(self, low, high) -> tuple[float, float, float, float]:
        """(start, end) of [low, high] in the sketch's distribution function, and the range's
        first and last values at the column's precision. A number rounds to its grid value,
        so on a grid the range covers half a step beyond its first and last grid values."""
        low = -np.inf if low is None else low
        high = np.inf if high is None else high
        if self.step is None and self.decimals is None:
            grid_low, grid_high, half = low, high, 0.0
        else:
            grid_low = self._grid_at_or_above(np.array([low]))[0] if np.isfinite(low) else low
            grid_high = self._grid_at_or_below(np.array([high]))[0] if np.isfinite(high) else high
            half = (self.step if self.step is not None else 10.0 ** -self.decimals) / 2
        start = self._cdf(np.array([grid_low - half]))[0]
        end = self._cdf(np.array([np.nextafter(grid_high + half, np.inf)]))[0]
        return float(start), float(end), float(grid_low), float(grid_high)

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator,
               value_range: tuple[float | None, float | None] | None = None) -> pd.Series:
        """Numbers drawn inside their (bin, fine level) cells; with `value_range`, inside the
        part of the cell in that range (rows the range restricted when they were sampled)."""
        bins = np.where(missing, 0, codes[:, 0])
        fine = np.where(missing, 0, codes[:, 1]) if self.fine_levels else np.zeros_like(bins)
        u = torch.rand(len(bins), generator=generator, dtype=torch.float64).numpy()
        start, end = self._cell_cdf(bins, fine)
        cell_start = start
        if value_range is not None:
            start_of_range, end_of_range, grid_low, grid_high = self._range_cdf(*value_range)
            start, end = np.clip(start, start_of_range, end_of_range), np.clip(end, start_of_range, end_of_range)
        drawn = self._quantile(start + u * np.maximum(end - start, 0.0))
        lefts = self._lefts_np[bins]
        point = self._point[bins] | (end <= start)
        drawn = np.where(point, lefts, drawn)
        cell_start = np.where(point, lefts, self._quantile(cell_start))
        values = self._on_grid(drawn, bins, fine, cell_start)
        if value_range is not None:   # rounding to the grid never leaves the range
            values = np.clip(values, grid_low, grid_high).astype(values.dtype)
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

    def _on_grid(self, drawn: np.ndarray, bins: np.ndarray, fine: np.ndarray, cell_start: np.ndarray) -> np.ndarray:
        """Drawn numbers rounded to the column's precision, kept inside their (bin, fine level)
        cells where the grid allows: a rounded value that leaves its cell takes one of the
        two grid values at the cell's start, or else, if both are outside the cell, the bin's
        first grid value (a bin holds a training value, so it has one; a cell no training
        value fell in may hold no grid value)."""
        if self._grid() is None:
            return drawn
        scale, to_value = self._grid()

        def cell_of(values):
            return self._cells(values.astype(np.float64))

        values = to_value(np.round(drawn * scale))
        # Where the rounded value left its cell, the grid value nearest the cell's start, or
        # the next one (a point mass that starts in the cell below can fill the cell's start).
        nearest = to_value(np.round(cell_start * scale))
        for candidate in (nearest, self._grid_at_or_above(np.nextafter(nearest.astype(np.float64), np.inf))):
            outside = np.any(np.stack(cell_of(values)) != np.stack([bins, fine]), axis=0)
            fits = np.all(np.stack(cell_of(candidate)) == np.stack([bins, fine]), axis=0)
            values = np.where(outside & fits, candidate, values)
        return np.where(cell_of(values)[0] != bins, self._grid_at_or_above(self._lefts_np[bins]), values)

    def state_dict(self) -> dict:
        return {"kind": "numeric", "lefts": self.lefts, "sketch": self.sketch, "step": self.step,
                "decimals": self.decimals, "fine_levels": self.fine_levels}


def _bin_of(lefts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bin of each value given the bins' sorted left edges: a value at a left edge belongs to
    that bin; values below the first edge go to bin 0."""
    return np.maximum(np.searchsorted(lefts, x, side="right") - 1, 0)


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
    """Maps a table's rows to int64 tokens [N, T] and back.

    Each column of the table is one token column, or two for a numeric column whose bins hold
    more than one distinct value: its bin, then its fine level, the equal-mass share of the
    bin the value falls in (num_bins of them, so 32 x 32 = 1,024 levels by default). The fine
    level is a column of the model like any other, so it is predicted from the whole row and
    the learned order decides when it comes; that keeps relations that live inside a bin
    (carat and price), which decoding a bin independently of the other columns would lose.

    `columns` names the table's columns; `token_columns` names the T token columns (a fine
    level is "<column> (fine)") and `token_owner[t]` is the table column token column t
    belongs to. Token column t has cardinalities[t] = K_t values (categories or bins, plus a
    final "missing" token on the first token column of a column that had missing values when
    fitted); its mask token is K_t, one past the last real value. offsets[t] is where token
    column t starts in a flat [sum K_t] vocabulary. Build with TableCodec.fit(df).
    """

    def __init__(self, columns: Sequence[_Categorical | _Numeric]):
        self._columns = list(columns)
        self.columns = [c.name for c in self._columns]
        self.is_numeric = [c.is_numeric for c in self._columns]
        self.cardinalities = [k for c in self._columns for k in c.token_cardinalities]
        self.token_owner = np.repeat(np.arange(len(self._columns)),
                                     [len(c.token_cardinalities) for c in self._columns])
        self.token_columns = [str(c.name) if t == 0 else f"{c.name} (fine)"
                              for c in self._columns for t in range(len(c.token_cardinalities))]
        self.num_token_columns = len(self.cardinalities)
        self.mask_ids = torch.tensor(self.cardinalities, dtype=torch.int64)
        self.offsets = torch.zeros(self.num_token_columns + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.mask_ids, 0)
        self._token_slices = np.concatenate([[0], np.cumsum([len(c.token_cardinalities) for c in self._columns])])

    def token_columns_of(self, column) -> slice:
        """The token columns of the table column named `column`."""
        i = self.columns.index(column)
        return slice(int(self._token_slices[i]), int(self._token_slices[i + 1]))

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
        tokens = np.zeros((len(df), self.num_token_columns), dtype=np.int64)
        known = np.ones((len(df), self.num_token_columns), dtype=bool)
        for l, column in enumerate(self._columns):
            span = slice(self._token_slices[l], self._token_slices[l + 1])
            series = df[column.name].reset_index(drop=True)
            if isinstance(series.dtype, pd.CategoricalDtype):
                series = series.astype(object)
            series = to_plain(column.name, series, column.pandas_dtype)
            missing = series.isna().to_numpy()
            tokens[:, span] = column.encode(series, missing)
            if nan_is_unknown:
                tokens[missing, span] = 0
                known[:, span] = ~missing[:, None]
            elif missing.any() and not column.has_missing:
                raise ValueError(f"column {column.name!r} has {int(missing.sum())} missing value(s) but "
                                 "had none when the codec was fitted (use encode_partial to impute them)")
        return torch.from_numpy(tokens), torch.from_numpy(known)

    def encode(self, df: pd.DataFrame) -> torch.Tensor:
        """Tokens int64 [N, T] in token column order; NaN becomes the column's missing token."""
        return self._encode(df, nan_is_unknown=False)[0]

    def encode_partial(self, df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N, T], known bool [N, T]) for imputation: NaN marks a value to fill in
        (every token column of that cell).

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
        if tokens.shape[1] != self.num_token_columns:
            raise ValueError(f"tokens has {tokens.shape[1]} columns but the codec has {self.num_token_columns} "
                             f"token columns")
        tokens = tokens.detach().to("cpu", torch.int64).numpy()
        bad = (tokens < 0) | (tokens >= np.asarray(self.cardinalities))
        if bad.any():
            t = int(np.nonzero(bad.any(0))[0][0])
            codes = tokens[:, t]
            hint = " (mask tokens must be sampled before decoding)" if (codes == self.cardinalities[t]).any() else ""
            raise ValueError(f"column {self.token_columns[t]!r} has token ids outside [0, {self.cardinalities[t]}): "
                             f"{_examples(codes[bad[:, t]])}{hint}")
        out = {}
        for l, column in enumerate(self._columns):
            codes = tokens[:, self._token_slices[l]:self._token_slices[l + 1]]
            missing = (codes[:, 0] == column.num_values) if column.has_missing else np.zeros(len(codes), dtype=bool)
            if column.is_numeric and ranges and column.name in ranges:
                out[column.name] = column.decode(codes, missing, generator, ranges[column.name])
            elif not column.is_numeric and choices and column.name in choices:
                out[column.name] = column.decode(codes, missing, generator, choices[column.name])
            else:
                out[column.name] = column.decode(codes, missing, generator)
        return pd.DataFrame(out, columns=self.columns)

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
                columns.append(_Numeric(*common, c["lefts"], c["sketch"], c["step"], c["decimals"],
                                        c["fine_levels"]))
        return cls(columns)

    def __repr__(self) -> str:
        kinds = sum(self.is_numeric)
        return (f"TableCodec({len(self.columns)} columns: {kinds} numeric, {len(self.columns) - kinds} categorical; "
                f"{self.num_token_columns} token columns, vocabulary {int(self.offsets[-1])})")
