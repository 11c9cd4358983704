"""TableCodec: pandas DataFrame <-> token ids, one discrete token per column.

Masked diffusion works on discrete tokens, so every column becomes a small vocabulary:
categorical columns map each category to an id, numeric columns map each value to a
quantile bin. Decoding a bin draws a real training value from that bin, which keeps point
masses (capital-gain = 0), integer values and the within-bin shape of the distribution.
A column that had missing values when fitted gets one extra token for "missing".

Datetimes (naive or tz-aware) and timedeltas are numbers here: integer counts of their unit
(tz-aware ones in UTC), binned like any number and decoded back to the fitted dtype, unit
and timezone. Categorical columns with more than `category_cap` values keep a token for the
most frequent ones and share one "other" token among the rest; decoding "other" draws one
of the rare training values by frequency, as a bin draws a value.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ._checks import INT_DTYPES, check_tensor

__all__ = ["TableCodec", "infer_categorical", "DEFAULT_NUM_BINS", "DEFAULT_MAX_CATEGORIES",
           "DEFAULT_CATEGORY_CAP"]

# Bin-count experiment: round trip decode(encode(train)) on Adult and MAGIC (fit on train):
#   num_bins                                16      32      64      128
#   max KS over numeric columns, Adult    .0019   .0016   .0011   .0008
#   max KS over numeric columns, MAGIC    .0030   .0025   .0018   .0012
#   max |Spearman corr drift|, MAGIC      .0073   .0020   .0007   .0002
#   max |Pearson corr drift|, MAGIC       .080    .038    .025    .018
#   max median |x - decoded| / IQR, MAGIC .058    .029    .014    .007
# Resampling real values within a bin keeps every marginal (KS < 0.01 at any count), so KS
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
# Real values kept per bin (and for "other") for decoding: enough to reproduce the
# within-bin distribution.
SAMPLES_PER_BIN = 256
# A column with at least this many distinct values can be flagged as a unique key (below it,
# a table is too small to tell a key from a coincidence): text most of whose rows hold a value
# seen once is refused (it cannot be modelled), all-distinct integers get a warning (they are
# binned like any number, which works but may repeat identifiers).
KEY_MIN_VALUES = 100
_STATE_VERSION = 2
_READABLE_STATE_VERSIONS = (1, 2)


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


def _spread_ranks(start: int, end: int) -> np.ndarray:
    """Up to SAMPLES_PER_BIN evenly spaced positions in [start, end) of sorted values: a sample
    that keeps their distribution (each value about as often as it occurs)."""
    return np.unique(np.round(np.linspace(start, end - 1, min(end - start, SAMPLES_PER_BIN)))).astype(np.int64)


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
    dtype's declared order), plus one shared "other" token for the rare ones beyond the cap."""

    is_numeric = False

    def __init__(self, name, dtype: str, has_missing: bool, categories: list,
                 other: list | None = None, domain: list | None = None, ordered: bool = False):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.categories, self.other = categories, other
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
        other = None
        if cap is not None and len(values) > cap:
            # Most frequent first; ties keep the category order (a stable sort).
            kept = set(counts.sort_values(ascending=False, kind="stable").index[:cap - 1])
            rare = [v for v in values if v not in kept]
            values = [v for v in values if v in kept]
            other = cls._frequency_sample(plain[plain.isin(rare)], rare)
        domain = [_python_scalar(v) for v in series.cat.categories] if is_category else None
        return cls(name, str(series.dtype), has_missing, [_python_scalar(v) for v in values],
                   other, domain, bool(series.cat.ordered) if is_category else False)

    @staticmethod
    def _frequency_sample(rows: pd.Series, rare: list) -> list:
        """Up to SAMPLES_PER_BIN rare values, each about as often as in `rows` (evenly spaced
        ranks of the rows sorted by category), or every rare category when no row holds one."""
        if len(rows) == 0:
            return [_python_scalar(v) for v in rare]
        order = np.sort(pd.Index(rare, dtype=object).get_indexer(rows.to_numpy(dtype=object)))
        return [_python_scalar(rare[i]) for i in order[_spread_ranks(0, len(order))]]

    @property
    def num_values(self) -> int:
        return len(self.categories) + int(self.other is not None)

    def encode(self, series: pd.Series, missing: np.ndarray) -> np.ndarray:
        values = series.to_numpy(dtype=object)
        codes = self._index.get_indexer(values)
        unseen = (codes < 0) & ~missing
        if self.other is not None:
            codes[unseen] = len(self.categories)
        elif unseen.any():
            raise ValueError(f"column {self.name!r} has categories not seen when the codec was fitted: "
                             f"{_examples(values[unseen])}")
        return codes

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator) -> pd.Series:
        codes = np.where(missing, 0, codes)
        values = np.empty(len(codes), dtype=object)
        known = codes < len(self.categories)
        values[known] = np.array(self.categories, dtype=object)[codes[known]]
        if self.other is not None:
            u = torch.rand(len(codes), generator=generator, dtype=torch.float64).numpy()
            pick = np.minimum((u * len(self.other)).astype(np.int64), len(self.other) - 1)
            values[~known] = np.array(self.other, dtype=object)[pick[~known]]
        return _from_plain(values, missing, self.pandas_dtype)

    def state_dict(self) -> dict:
        return {"kind": "categorical", "categories": list(self.categories), "other": self.other,
                "domain": self.domain, "ordered": self.ordered}


class _Numeric:
    """Quantile bins [left_k, left_{k+1}); decoding resamples stored training values of the bin."""

    is_numeric = True

    def __init__(self, name, dtype: str, has_missing: bool, lefts: torch.Tensor,
                 samples: torch.Tensor, sample_offsets: torch.Tensor):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.lefts, self.samples, self.sample_offsets = lefts, samples, sample_offsets
        self._lefts_np = lefts.numpy()
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
        edges = np.quantile(x, np.linspace(0.0, 1.0, num_bins + 1))
        # A value that fills several quantile steps is a point mass: give it a bin of its own
        # by starting the next bin just above it. This never exceeds num_bins bins.
        repeated = np.unique(edges[:-1][edges[:-1] == edges[1:]])
        lefts = np.union1d(edges[:-1], np.nextafter(repeated, np.inf))
        # Drop bins no training value falls in (merging them into the bin below).
        counts = np.bincount(np.searchsorted(lefts, x, side="right") - 1, minlength=len(lefts))
        lefts = lefts[counts > 0]
        ends = np.searchsorted(x, lefts[1:], side="left").tolist() + [len(x)]
        starts = [0] + ends[:-1]
        samples, offsets = [], [0]
        for start, end in zip(starts, ends):
            ranks = _spread_ranks(start, end)
            samples.append(exact[ranks])
            offsets.append(offsets[-1] + len(ranks))
        return cls(name, str(series.dtype), has_missing, torch.from_numpy(lefts),
                   torch.from_numpy(np.concatenate(samples)), torch.tensor(offsets, dtype=torch.int64))

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
        # Values at a bin's left edge belong to that bin; out-of-range values clip to the ends.
        codes = np.searchsorted(self._lefts_np, np.where(missing, self._lefts_np[0], x), side="right") - 1
        return np.maximum(codes, 0)

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator) -> pd.Series:
        bins = torch.from_numpy(np.where(missing, 0, codes))
        start = self.sample_offsets[bins]
        count = self.sample_offsets[bins + 1] - start
        u = torch.rand(len(bins), generator=generator, dtype=torch.float64)
        pick = start + torch.minimum((u * count).long(), count - 1)
        return _from_plain(self.samples[pick].numpy(), missing, self.pandas_dtype)

    def state_dict(self) -> dict:
        return {"kind": "numeric", "lefts": self.lefts, "samples": self.samples,
                "sample_offsets": self.sample_offsets}


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
        category_cap - 1 most frequent ones and one "other" token for the rest (None: no cap).
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
        rare-category token, and decoding draws a value from it, so the tokens alone would
        not return a conditioned or imputed row's known values."""
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

    def decode(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> pd.DataFrame:
        """DataFrame with the fitted column names, order and dtypes.

        Numeric bins decode to a training value drawn from the bin (random via `generator`,
        a CPU torch.Generator); missing tokens decode to NaN.
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
        if state.get("version") not in _READABLE_STATE_VERSIONS:
            raise ValueError(f"unsupported TableCodec state version {state.get('version')!r}")
        columns = []
        for c in state["columns"]:
            common = (c["name"], c["dtype"], c["has_missing"])
            if c["kind"] == "categorical":
                domain = c.get("domain") or (list(c["categories"]) if c["dtype"] == "category" else None)
                columns.append(_Categorical(*common, list(c["categories"]), c.get("other"), domain,
                                            c.get("ordered", False)))
            else:
                columns.append(_Numeric(*common, c["lefts"], c["samples"], c["sample_offsets"]))
        return cls(columns)

    def __repr__(self) -> str:
        kinds = sum(self.is_numeric)
        return (f"TableCodec({self.num_columns} columns: {kinds} numeric, {self.num_columns - kinds} categorical; "
                f"vocabulary {int(self.offsets[-1])})")
