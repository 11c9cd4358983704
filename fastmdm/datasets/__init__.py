"""Bundled benchmark tables (UCI Adult, MAGIC) and a CSV loader for user tables.

The data ship inside the package so demos, tests and benchmarks run offline.
"""
from __future__ import annotations

import os
import warnings
from importlib import resources

import numpy as np
import pandas as pd

__all__ = ["load", "load_csv", "TARGETS", "TASKS", "NAMES"]

NAMES = ("adult", "magic")
#: Label column of each table, for downstream machine-learning-efficacy evaluation.
TARGETS = {"adult": "income", "magic": "class"}
#: Downstream task on TARGETS[name].
TASKS = {"adult": "classification", "magic": "classification"}


def _read_bundled(filename: str) -> pd.DataFrame:
    with resources.files(__name__).joinpath(filename).open("rb") as handle:
        return pd.read_csv(handle, compression="gzip")


def load(name: str, *, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (train, test) for a bundled table.

    "adult": the official UCI split (32,561 / 16,281 rows; missing values are NaN).
    "magic": no official split exists, so a seeded 90/10 random split (17,118 / 1,902 rows).
    Numeric columns are int64/float64, categorical ones object (str).
    """
    if name == "adult":
        return _read_bundled("adult_train.csv.gz"), _read_bundled("adult_test.csv.gz")
    if name == "magic":
        df = _read_bundled("magic.csv.gz")
        order = np.random.default_rng(seed).permutation(len(df))
        n_test = round(0.1 * len(df))
        test = df.iloc[order[:n_test]].reset_index(drop=True)
        train = df.iloc[order[n_test:]].reset_index(drop=True)
        return train, test
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(NAMES)}")


def _iso_dates(column: pd.Series) -> pd.Series:
    """datetime64 from ISO 8601 text; ValueError when the text is not dates. A zone with summer
    time writes two offsets (-05:00, -04:00); such a column is read as UTC instants."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # pandas' warning for mixed offsets
        try:
            return pd.to_datetime(column, format="ISO8601")
        except (FutureWarning, ValueError):
            return pd.to_datetime(column, format="ISO8601", utc=True)


def _parse_iso_dates(df: pd.DataFrame) -> pd.DataFrame:
    """Text columns whose every value is an ISO 8601 date or time become datetime64 (tz-aware when
    the text carries offsets, as a tz-aware column written by to_csv does)."""
    for name in df.columns:
        if df[name].dtype != object or df[name].isna().all():
            continue
        try:
            df[name] = _iso_dates(df[name])
        except (ValueError, TypeError):  # not dates: keep the text
            pass
    return df


def load_csv(path: str | os.PathLike, *, target: str | None = None, parse_dates: bool = True) -> pd.DataFrame:
    """Read a user CSV (header row required; empty fields become NaN; spaces after commas ignored).

    `target`, if given, must name a column: checked here so a typo fails before training.
    `parse_dates`: text columns holding only ISO 8601 dates/times ("2013-01-01 05:00:00+00:00")
    become datetime64 columns, so a table written with to_csv reads back with its datetimes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such CSV file: {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"CSV file {path!r} is empty")
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"CSV file {path!r} has no columns (no header row)") from err
    if df.shape[1] == 0:
        raise ValueError(f"CSV file {path!r} has no columns (no header row)")
    if len(df) == 0:
        raise ValueError(f"CSV file {path!r} has a header but no data rows")
    if target is not None and target not in df.columns:
        raise ValueError(f"target column {target!r} not in {path!r}; columns: {list(df.columns)}")
    return _parse_iso_dates(df) if parse_dates else df
