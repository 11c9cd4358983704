"""Tables as users bring them, through the whole public path: every table either works end to
end or is refused at `fit` with a ValueError/TypeError that names its column.

The fuzz draws tables from hypothesis strategies over what the codec takes (numbers, nullable
integers, bools, text, ordered and unordered categories, datetimes with and without a time
zone, timedeltas, object columns mixing numbers and text), edge values (infinities, constant
columns, huge integers and floats, empty strings, unicode), missing shares (none, 5%, 50%, 95%, whole
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmdm import TabularMDM
from fastmdm.cli import main as cli_main
from fastmdm.data import to_plain
from fastmdm.data.privacy import MIN_ROWS_PER_VALUE
from fastmdm.data.types import nullable_dtype
from fastmdm.data.files import read_table
from fastmdm.metrics import evaluate

FUZZ_TABLES = int(os.environ.get("FASTMDM_FUZZ_TABLES", "30"))
TINY = dict(steps=2, batch_size=32, progress=False, patience=None,
            model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=16))
CLI_TRAIN = ["--steps", "2", "--batch-size", "32"]
SAMPLE_ROWS = 12
KINDS = ("float", "money", "int", "small_int", "huge_int", "huge_float", "Int64", "bool", "boolean", "text", "string",
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
    if kind == "huge_float":
        return pd.Series(rng.choice([-1.0, 1.0], rows) * 10.0 ** rng.uniform(250, 308, rows))
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
    """A refusal a user can act on: it names one of the table's columns as the codec does, or,
    for a table of fewer rows than the privacy rule needs, the rule and the rows it needs."""
    return (any(f"column {name!r}" in str(err) for name in df.columns)
            or (len(df) < MIN_ROWS_PER_VALUE and "MIN_ROWS_PER_VALUE" in str(err)))


def assert_same_dtypes(frame: pd.DataFrame, df: pd.DataFrame, what: str) -> None:
    """The dtypes that went in; a NumPy integer or bool column that comes back with missing
    cells (none of its values frequent enough to emit) in pandas' nullable counterpart, and a
    category dtype without the declared categories that 1 to k - 1 rows hold (the dtype would
    name them), but with those a caller gave back to it as known cells."""
    assert list(frame.columns) == list(df.columns), what
    expected = {name: nullable_dtype(dtype) if frame[name].isna().any() else dtype
                for name, dtype in df.dtypes.items()}
    for name, dtype in expected.items():
        if isinstance(dtype, pd.CategoricalDtype):   # declared categories fewer than k rows hold are not kept
            counts = df[name].value_counts()
            kept = [c for c in dtype.categories if not 0 < counts.get(c, 0) < MIN_ROWS_PER_VALUE]
            given_back = [c for c in frame[name].cat.categories[len(kept):] if c in set(frame[name].dropna())]
            expected[name] = pd.CategoricalDtype(kept + given_back, ordered=dtype.ordered)
    got = {name: dtype for name, dtype in frame.dtypes.items()}
    assert got == expected, f"{what}: {got} != {expected}"


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
        kept = value if model.codec.column(name).dtype != "object" else given_rows[name].iloc[0]
        assert (given_rows[name] == kept).all() and str(kept) == str(value), f"condition {name!r} = {value!r}"
        if not model.codec.column(name).is_numeric:   # a set of values restricts the sampler's tokens
            in_set = model.sample(SAMPLE_ROWS, seed=2, conditions={name: [value]})
            assert (in_set[name].map(str) == str(value)).all(), f"condition {name!r} in [{value!r}]"

    assert math.isfinite(model.nelbo(df))
    scores = evaluate(df, synth, seed=0, n_jobs=1)
    assert list(scores.index) == ["synthetic", "real vs real (split of real)"]
    if len(df) >= 4:   # every metric, MLE on the first column included, or a refusal naming it
        target = df.columns[0]
        try:
            evaluate(df, synth, test=df.sample(frac=0.5, random_state=0), target=target, seed=0, n_jobs=1)
        except ValueError as err:
            assert repr(target) in str(err), f"MLE refused without naming its target: {err!r}"
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


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.filterwarnings("ignore:training did not converge")   # two steps never do
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
        assert re.search(r"column '|column \d", line) or (len(df) < MIN_ROWS_PER_VALUE and "MIN_ROWS_PER_VALUE" in line), \
            f"the command line refused without naming a column: {line}"


# ----------------------------------------------------------------------------- each decided class
def tiny_model() -> TabularMDM:
    return TabularMDM(**TINY)


def test_infinities_are_refused_at_fit_naming_the_column(tmp_path, capsys):
    df = pd.DataFrame({"price": [1.0, np.inf, 3.0, -np.inf] * 10, "kind": ["a", "b"] * 20})
    with pytest.raises(ValueError, match=r"column 'price' holds 20 infinite value\(s\) \(inf, -inf\); replace them "
                                         r"with NaN \(missing\) or a finite cap"):
        tiny_model().fit(df)
    df.to_parquet(tmp_path / "t.parquet")
    assert cli_main(["train", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "m.pt"), *CLI_TRAIN]) == 2
    assert "column 'price' holds 20 infinite value(s)" in capsys.readouterr().err
    finite = df.assign(price=df["price"].replace([np.inf, -np.inf], np.nan))
    model = tiny_model().fit(finite)
    with pytest.raises(ValueError, match="column 'price' holds 1 infinite"):
        model.impute(finite.head(3).assign(price=[np.nan, np.inf, 2.0]))
    with pytest.raises(ValueError, match="synth: column 'price' holds 1 infinite"):
        evaluate(finite, finite.head(5).assign(price=[np.inf, 1, 2, 3, 4]))


def test_a_column_mixing_numbers_and_text_is_text(tmp_path):
    """1 and "1" are one category, True is not 1, and the rows write to Parquet."""
    mixed = pd.Series([1, "1", True, 2.5, "n/a", None] * 10, dtype=object)
    df = pd.DataFrame({"m": mixed, "v": np.arange(60.0)})
    model = tiny_model().fit(df)
    assert model.codec.column("m").categories == ["1", "2.5", "True", "n/a"]
    synth = model.sample(200, seed=0)
    assert synth["m"].dtype == object and set(synth["m"].dropna()) <= {"1", "2.5", "True", "n/a"}
    model.sample_to(tmp_path / "synth.parquet", 50, seed=0)
    holes = pd.DataFrame({"m": pd.Series([1, None, True], dtype=object), "v": [0.0, 1.0, np.nan]})
    assert model.impute(holes, seed=0)["m"].tolist()[::2] == ["1", "True"]   # known cells, as text
    assert set(model.sample(30, seed=0, conditions={"m": [1, "n/a"]})["m"]) <= {"1", "n/a"}
    assert evaluate(df, synth, n_jobs=1).notna().all().all()


def test_constant_columns_are_kept_exactly():
    df = pd.DataFrame({"c": [3.25] * 30, "t": ["same"] * 30, "v": np.arange(30)})
    synth = tiny_model().fit(df).sample(50, seed=0)
    assert (synth["c"] == 3.25).all() and (synth["t"] == "same").all()


def test_one_row_and_one_column_tables():
    """A table of fewer than k = MIN_ROWS_PER_VALUE rows is refused at fit: each of its values
    is held by fewer than k rows, so none may be stored or generated. evaluate still scores a
    one-row table (its reference row has no rows to split off and every metric needing more
    rows is NaN). A one-column table works through evaluate (trend, over pairs of columns, is
    NaN); MLE has no feature to learn from and says so."""
    one_row = pd.DataFrame({"a": [1.5], "b": ["x"]})
    with pytest.raises(ValueError, match="MIN_ROWS_PER_VALUE"):
        tiny_model().fit(one_row)
    synth = pd.concat([one_row] * 5, ignore_index=True)
    scores = evaluate(one_row, synth, n_jobs=1)
    assert scores.loc["synthetic", ["alpha", "c2st", "c2st_xgb"]].isna().all()
    assert scores.iloc[1].isna().all()

    one_column = pd.DataFrame({"a": np.random.default_rng(0).normal(size=80)})
    synth = tiny_model().fit(one_column).sample(40, seed=0)
    scores = evaluate(one_column, synth, n_jobs=1).loc["synthetic"]
    assert np.isnan(scores["trend"]) and scores.drop("trend").notna().all()   # trend needs a pair of columns
    with pytest.raises(ValueError, match="MLE predicts target column 'a' from the other columns"):
        evaluate(one_column, synth, test=one_column.head(20), target="a")


def test_missing_text_reads_alike_from_csv_and_parquet(tmp_path):
    df = pd.DataFrame({"t": ["a", None, "b", np.nan], "n": [1.0, 2.0, np.nan, 4.0]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet", index=False)
    from_csv, from_parquet = read_table(tmp_path / "t.csv")[0], read_table(tmp_path / "t.parquet")[0]
    pd.testing.assert_frame_equal(from_csv, from_parquet)
    assert from_parquet["t"][2] == "b" and all(isinstance(v, float) and np.isnan(v) for v in from_parquet["t"][[1, 3]])


def test_evaluate_takes_nullable_dtypes_none_and_int_names():
    """Int64 and boolean columns, None beside NaN, and a column named by an int."""
    rng = np.random.default_rng(0)
    real = pd.DataFrame({"i": pd.array(rng.integers(0, 500, 60), dtype="Int64"),
                         "b": pd.array(rng.random(60) < 0.5, dtype="boolean"),
                         7: pd.Series(rng.choice(["x", "y", None], 60), dtype=object)})
    real.loc[::7, "i"] = pd.NA
    synth = real.sample(frac=1, random_state=1).reset_index(drop=True)
    synth[7] = synth[7].where(synth[7].notna(), np.nan)
    synth["i"] = synth["i"].astype("float64") + 0.5
    scores = evaluate(real, synth, test=real.head(30), target=7, n_jobs=1)
    assert scores.notna().all().all()


def every_column_type_with_missing_values(rows: int = 300) -> pd.DataFrame:
    """One column of each kind the codec takes, each with about 10% missing cells."""
    rng = np.random.default_rng(3)
    kinds = ("float", "money", "int", "small_int", "huge_int", "Int64", "bool", "boolean", "text", "string",
             "mixed", "category", "ordered", "datetime", "datetime_tz", "timedelta")
    return pd.DataFrame({kind: column_values(kind, rows, rng).mask(rng.random(rows) < 0.1) for kind in kinds})


@pytest.mark.parametrize("source", ["every column type", "adult"])
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_readme_loop_on_tables_with_missing_values(tmp_path, monkeypatch, source, suffix, capsys):
    """The README's command-line loop, as written there (train on table.csv, sample to
    synth.parquet, evaluate the two), on a table with missing values in every column type and
    on 2,000 rows of Adult (missing categories), the table as CSV or Parquet and the synthetic
    rows in the other format, so missing text is read both ways."""
    from fastmdm import datasets
    monkeypatch.chdir(tmp_path)
    df = (datasets.load("adult")[0].sample(2000, random_state=0).reset_index(drop=True) if source == "adult"
          else every_column_type_with_missing_values())
    other = "parquet" if suffix == "csv" else "csv"
    holes = df.head(40).copy()
    holes.iloc[::3, [0, 1]] = None
    for frame, name in ((df, "table"), (holes, "holes")):
        frame = parquet_ready(frame)
        frame.to_csv(f"{name}.csv", index=False) if suffix == "csv" else frame.to_parquet(f"{name}.parquet")
    for command in [f"train table.{suffix} -o model.pt {' '.join(CLI_TRAIN)}",
                    f"sample model.pt -n 300 -o synth.{other} --seed 0",
                    f"evaluate table.{suffix} synth.{other} --jobs 1",
                    f"impute model.pt holes.{suffix} -o filled.{other}"]:
        assert cli_main(command.split()) == 0, (command, capsys.readouterr().err)
    synth, filled = read_table(f"synth.{other}")[0], read_table(f"filled.{other}")[0]
    assert list(synth.columns) == list(df.columns) and len(synth) == 300
    holes = read_table(f"holes.{suffix}")[0]   # (a CSV reads an empty string as missing)
    assert filled.shape == holes.shape and f"filled {int(holes.isna().sum().sum())} missing cells" in capsys.readouterr().out
