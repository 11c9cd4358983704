"""Tables as users bring them, through the whole public path: every table either works end to
end or is refused at `fit` with a ValueError/TypeError that names its column.

The fuzz draws tables from hypothesis strategies over what the codec takes (numbers, nullable
integers, bools, text, ordered and unordered categories, datetimes with and without a time
zone, timedeltas, object columns mixing numbers and text), edge values (infinities, constant
columns, huge integers, empty strings, unicode), missing shares (none, 5%, 50%, 95%, whole
rows) and shapes (1 to 2,000 rows, 1 to 6 columns, spaced and unicode names). Each table goes
through fit, sample, save/load, impute, conditions, nelbo and evaluate, and, written as CSV or
Parquet, through the command line's train, sample, evaluate and impute.

It is derandomized: CI runs `FUZZ_TABLES` (30) tables, the same ones every run, in about two
minutes on two cores. For a longer local run set the environment variable, e.g.
`FASTMDM_FUZZ_TABLES=500 python -m pytest -q tests/test_messy_tables.py`.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmdm import TabularMDM
from fastmdm.cli import main as cli_main
from fastmdm.data import to_plain
from fastmdm.data.files import read_table
from fastmdm.metrics import evaluate

FUZZ_TABLES = int(os.environ.get("FASTMDM_FUZZ_TABLES", "30"))
TINY = dict(steps=2, batch_size=32, progress=False, patience=None,
            model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=16))
CLI_TRAIN = ["--steps", "2", "--batch-size", "32"]
SAMPLE_ROWS = 12
KINDS = ("float", "money", "int", "small_int", "huge_int", "Int64", "bool", "boolean", "text", "string",
         "mixed", "category", "ordered", "datetime", "datetime_tz", "timedelta", "constant_number",
         "constant_text", "infinities")
NAMES = ("a", "price", "naïve column", " spaced name ", "名前", "x-y z", "Ünïcödé", "n", 7)
WORDS = np.array(["alpha", "beta", "", "gamma γ", "δέλτα", "with space", "日本", "x"], dtype=object)


def column_values(kind: str, rows: int, rng: np.random.Generator) -> pd.Series:
    """`rows` values of one kind of column, before any are made missing."""
    if kind == "float":
        return pd.Series(rng.normal(50, 20, rows))
    if kind == "money":
        return pd.Series(rng.choice([9.99, 100.0, 250.0, 1000.0, 19.5, 4999.99], rows) * rng.integers(1, 4, rows))
    if kind == "int":
        return pd.Series(rng.integers(-1000, 1000, rows))
    if kind == "small_int":
        return pd.Series(rng.integers(0, 4, rows))
    if kind == "huge_int":
        return pd.Series(2 ** 62 + rng.integers(0, 50, rows) * 2 ** 40)
    if kind == "Int64":
        return pd.Series(rng.integers(0, 500, rows), dtype="Int64")
    if kind == "bool":
        return pd.Series(rng.random(rows) < 0.3)
    if kind == "boolean":
        return pd.Series(rng.random(rows) < 0.6, dtype="boolean")
    if kind == "text":
        return pd.Series(rng.choice(WORDS, rows))
    if kind == "string":
        return pd.Series(rng.choice(WORDS, rows), dtype="string")
    if kind == "mixed":
        return pd.Series(rng.choice(np.array([1, 2.5, "three", "x", 40, True], dtype=object), rows))
    if kind in ("category", "ordered"):
        values = pd.Categorical(rng.choice(["lo", "mid", "hi"], rows), categories=["lo", "mid", "hi", "never"],
                                ordered=kind == "ordered")
        return pd.Series(values)
    if kind == "datetime":
        return pd.Series(pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 10 ** 6, rows), unit="min"))
    if kind == "datetime_tz":
        start = pd.Timestamp("2021-03-01", tz="Europe/Paris")
        return pd.Series(start + pd.to_timedelta(rng.integers(0, 10 ** 5, rows), unit="h"))
    if kind == "timedelta":
        return pd.Series(pd.to_timedelta(rng.integers(0, 3600, rows), unit="s"))
    if kind == "constant_number":
        return pd.Series(np.full(rows, 3.25))
    if kind == "constant_text":
        return pd.Series(np.full(rows, "same", dtype=object))
    if kind == "infinities":
        values = rng.normal(0, 1, rows)
        values[rng.random(rows) < 0.2] = rng.choice([np.inf, -np.inf])
        return pd.Series(values)
    raise AssertionError(kind)


@st.composite
def messy_tables(draw) -> pd.DataFrame:
    rows = draw(st.sampled_from([1, 2, 3, 5, 12, 40, 120, 400, 2000]))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=6))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=len(kinds), max_size=len(kinds), unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    columns = {}
    for name, kind in zip(names, kinds):
        series = column_values(kind, rows, rng)
        share = draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 0.95]))
        columns[name] = series.mask(rng.random(rows) < share) if share else series
    df = pd.DataFrame(columns)
    if draw(st.booleans()) and rows > 2:   # a few rows missing in every column
        df.iloc[rng.random(rows) < 0.1] = None
    return df


def refused_by_name(err: Exception, df: pd.DataFrame) -> bool:
    """A refusal a user can act on: it names one of the table's columns as the codec does."""
    return any(f"column {name!r}" in str(err) for name in df.columns)


def assert_same_dtypes(frame: pd.DataFrame, df: pd.DataFrame, what: str) -> None:
    assert list(frame.columns) == list(df.columns), what
    assert frame.dtypes.to_dict() == df.dtypes.to_dict(), f"{what}: {frame.dtypes.to_dict()} != {df.dtypes.to_dict()}"


def condition_value(df: pd.DataFrame):
    """(column, value) for a condition on a categorical-looking column's most frequent value."""
    for name in df.columns:
        values = df[name].dropna()
        if len(values) and not pd.api.types.is_float_dtype(df[name]):
            return name, values.mode().iloc[0]
    return None


def check_api(df: pd.DataFrame, tmp_path) -> TabularMDM | None:
    """fit -> sample -> save/load -> impute -> conditions -> nelbo -> evaluate, or a named refusal."""
    try:
        model = TabularMDM(**TINY).fit(df)
    except (ValueError, TypeError) as err:
        assert refused_by_name(err, df), f"fit refused without naming a column: {err!r}"
        return None
    synth = model.sample(SAMPLE_ROWS, seed=0)
    assert_same_dtypes(synth, df, "sample")
    model.save(tmp_path / "model.pt")
    loaded = TabularMDM.load(tmp_path / "model.pt", device="cpu")
    pd.testing.assert_frame_equal(loaded.sample(SAMPLE_ROWS, seed=0), synth)

    holes = df.head(SAMPLE_ROWS).copy()
    holes.iloc[::2, 0] = None
    filled = loaded.impute(holes, seed=0)
    assert_same_dtypes(filled, df, "impute")
    known = holes.notna().to_numpy()
    assert filled.notna().to_numpy()[known].all(), "impute lost a known cell"

    condition = condition_value(df)
    if condition is not None:
        name, value = condition
        given_rows = model.sample(SAMPLE_ROWS, seed=1, conditions={name: value})
        assert_same_dtypes(given_rows, df, "conditions")
        assert (given_rows[name] == value).all(), f"condition {name!r} = {value!r} not kept"

    assert math.isfinite(model.nelbo(df))
    scores = evaluate(df, synth, seed=0, n_jobs=1)
    assert len(scores) >= 1
    return model


def parquet_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet cannot store a column mixing numbers and text: as a user must, write such a
    column as text (the codec's reading of it, `to_plain`)."""
    frame = frame.copy()
    for name in frame.columns[frame.dtypes == object]:
        frame[name] = to_plain(name, frame[name], frame[name].dtype)
    return frame


def check_cli(df: pd.DataFrame, tmp_path, suffix: str) -> None:
    """The README's command-line loop on the table written as `suffix`: train, sample, evaluate,
    impute; or train refuses it naming a column."""
    table, holes = tmp_path / f"table.{suffix}", tmp_path / f"holes.{suffix}"
    with_holes = df.head(SAMPLE_ROWS).copy()
    with_holes.iloc[::2, 0] = None
    if suffix == "csv":
        df.to_csv(table, index=False)
        with_holes.to_csv(holes, index=False)
    else:
        parquet_ready(df).to_parquet(table, index=False)
        parquet_ready(with_holes).to_parquet(holes, index=False)
    model, synth = str(tmp_path / "cli.pt"), str(tmp_path / f"synth.{suffix}")
    if cli_main(["train", str(table), "-o", model, *CLI_TRAIN]) != 0:
        return   # the message is checked by check_cli's caller through capsys
    for command in (["sample", model, "-n", str(SAMPLE_ROWS), "-o", synth, "--seed", "0"],
                    ["evaluate", str(table), synth, "--jobs", "1"],
                    ["impute", model, str(holes), "-o", str(tmp_path / f"filled.{suffix}"), "--seed", "0"]):
        assert cli_main(command) == 0, command
    assert read_table(synth)[1] == SAMPLE_ROWS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=FUZZ_TABLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(df=messy_tables(), suffix=st.sampled_from(["csv", "parquet"]))
def test_every_table_works_or_is_refused_by_name(df, suffix, tmp_path_factory, capsys):
    tmp_path = tmp_path_factory.mktemp("table")
    check_api(df, tmp_path)
    capsys.readouterr()
    check_cli(df, tmp_path, suffix)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    for line in errors:
        assert re.search(r"column '|column \d", line), f"the command line refused without naming a column: {line}"
