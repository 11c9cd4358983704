"""What a column is: the dtypes the codec takes, how each is seen as plain numbers or values,
and the one typing rule (categorical or numeric) that the codec and the metrics share.

Datetimes (naive or tz-aware) and timedeltas are numbers here: integer counts of their unit
(tz-aware ones in UTC), binned like any number and decoded back to the fitted dtype, unit
and timezone. An object column mixing text with numbers or bools (a spreadsheet's "n/a"
beside its numbers) is text: each value as its printed form, so 1 and "1" are one category,
True is not the number 1, and the column writes to Parquet. Infinities are refused
(`check_finite`): no bin or category can stand for them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_MAX_CATEGORIES", "KEY_MIN_VALUES", "is_time_dtype", "to_plain", "from_plain", "exact_values",
           "is_numeric_plain", "nullable_dtype", "times_as_numbers", "check_supported", "check_finite", "infer_categorical", "python_scalar", "examples"]

# Integer-valued numeric columns with at most this many distinct values are categorical
# (Adult's education-num): a bin per value is exact and costs no more tokens.
DEFAULT_MAX_CATEGORIES = 20
# A column with at least this many distinct values can be flagged as a unique key (below it,
# a table is too small to tell a key from a coincidence): text most of whose rows hold a value
# seen once is refused (it cannot be modelled), all-distinct integers get a warning (they are
# binned like any number, which works but may repeat identifiers).
KEY_MIN_VALUES = 100


def python_scalar(value):
    """numpy scalars -> Python scalars, so a state dict loads with torch.load(weights_only=True)."""
    value = value.item() if isinstance(value, np.generic) else value
    if not isinstance(value, (str, int, float, bool)):
        raise TypeError(f"categorical values must be str, int, float or bool, got {type(value).__name__}")
    return value


def examples(values, limit: int = 5) -> str:
    unique = list(dict.fromkeys(values.tolist()))
    more = f" (and {len(unique) - limit} more)" if len(unique) > limit else ""
    return ", ".join(repr(v) for v in unique[:limit]) + more


def is_time_dtype(dtype) -> bool:
    """datetime64 (naive or tz-aware) and timedelta64 dtypes."""
    return isinstance(dtype, pd.DatetimeTZDtype) or getattr(dtype, "kind", None) in ("M", "m")


def to_plain(name, series: pd.Series, dtype, text: bool = False) -> pd.Series:
    """The column as the codec sees it: datetimes and timedeltas as nullable Int64 counts of
    their unit (tz-aware ones in UTC), object columns mixing text with numbers or bools as
    text (missing values stay missing), every other column unchanged.

    `dtype` is the column's fitted dtype (its own when fitting): time input in another unit
    or timezone is converted to it, and text (a CSV, a condition) is parsed first.
    `text`: the column was fitted as text, so numbers and bools are read as their printed
    form too (a frame, or a Parquet file, holding only the numbers of a column fitted mixed
    finds their categories, and gives back text).
    """
    if not is_time_dtype(dtype):
        if series.dtype == object:
            kind = pd.api.types.infer_dtype(series, skipna=True)
            as_text = kind in ("mixed", "mixed-integer") or (text and kind not in ("string", "empty"))
        else:
            as_text = text and (is_numeric_plain(series.dtype) or pd.api.types.is_bool_dtype(series.dtype))
        return series.astype(str).where(series.notna(), series).astype(object) if as_text else series
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
                            f"({examples(series.to_numpy(dtype=object)[~missing])}): "
                            f"{str(err).splitlines()[0]}") from err
        if isinstance(dtype, pd.DatetimeTZDtype):
            present = present.dt.tz_convert("UTC").dt.tz_localize(None)
        counts[~missing] = present.to_numpy().view(np.int64)
    return pd.Series(pd.arrays.IntegerArray(counts, missing), index=series.index)


def from_plain(values: np.ndarray, missing: np.ndarray, dtype) -> pd.Series:
    """Inverse of to_plain: values in the codec's representation -> a Series of `dtype`."""
    if is_time_dtype(dtype):
        counts = np.asarray(values).astype(np.int64)
        if isinstance(dtype, pd.DatetimeTZDtype):
            series = pd.Series(counts.view(f"M8[{dtype.unit}]")).dt.tz_localize("UTC").dt.tz_convert(dtype.tz)
        else:
            series = pd.Series(counts.view(dtype))
    else:
        series = pd.Series(values).astype(dtype)
    if not missing.any():
        return series
    return series.astype(nullable_dtype(dtype)).mask(missing)


def nullable_dtype(dtype):
    """`dtype`, or pandas' nullable counterpart for a NumPy integer or bool dtype, which cannot
    hold a missing value: a column fitted without missing values that decodes some (a column
    none of whose values is frequent enough to emit) comes back Int64 or boolean, never float64."""
    if isinstance(dtype, np.dtype) and dtype.kind in "iub":
        return "boolean" if dtype.kind == "b" else f"{'U' if dtype.kind == 'u' else ''}Int{dtype.itemsize * 8}"
    return dtype


def times_as_numbers(frame: pd.DataFrame) -> pd.DataFrame:
    """Datetime and timedelta columns as float counts of their unit (tz-aware ones in UTC, NaN for
    missing), as the codec sees them: how the metrics and the report compare times."""
    times = [c for c in frame.columns if is_time_dtype(frame[c].dtype)]
    if not times:
        return frame
    frame = frame.copy()
    for c in times:
        frame[c] = to_plain(c, frame[c], frame[c].dtype).astype("float64")
    return frame


def exact_values(plain: pd.Series) -> np.ndarray:
    """Non-missing values, sorted, as int64 for integer columns (exact beyond 2**53) else float64."""
    integer = pd.api.types.is_signed_integer_dtype(plain.dtype) or (
        pd.api.types.is_unsigned_integer_dtype(plain.dtype) and plain.dtype.itemsize < 8)
    return np.sort(plain.dropna().to_numpy(dtype=np.int64 if integer else np.float64))


def is_numeric_plain(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def check_supported(name, dtype) -> None:
    textual = (pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)
               or isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(dtype))
    if not (textual or is_numeric_plain(dtype) or is_time_dtype(dtype)):
        raise TypeError(f"column {name!r} has unsupported dtype {dtype} (supported: numbers, text, bool, "
                        "category, datetime64 with or without timezone, timedelta64)")


def check_finite(name, plain: pd.Series) -> None:
    """Refuse infinities in a column of numbers, naming the column. A quantile bin cannot hold
    +-inf (its edges and the sketch it decodes from would be infinite) and a category of
    inf would be the only one a model could never draw sensibly as a number, so the user
    decides what they mean: missing, or a finite cap."""
    if not pd.api.types.is_float_dtype(plain.dtype):
        return
    x = plain.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(x)
    if infinite.any():
        raise ValueError(f"column {name!r} holds {int(infinite.sum()):,} infinite value(s) "
                         f"({examples(pd.Series(x[infinite]))}); replace them with NaN (missing) or a finite cap, "
                         "such as the column's largest finite value")


def infer_categorical(series: pd.Series, max_categories: int = DEFAULT_MAX_CATEGORIES) -> bool:
    """The codec's typing rule: text, bool and category columns are categorical; so are
    integer-valued numbers (datetimes as counts of their unit) with <= max_categories distinct
    values. Everything else is numeric. Also decides classification vs regression in metrics.
    """
    check_supported(series.name, series.dtype)
    plain = to_plain(series.name, series, series.dtype)
    if not is_numeric_plain(plain.dtype):
        return True
    x = exact_values(plain)
    return bool(np.all(x == np.round(x))) and len(np.unique(x)) <= max_categories
