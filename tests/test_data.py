"""TableCodec and dataset loaders: round trips, bin semantics, error messages, serialisation."""
import io
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmdm.data import DEFAULT_NUM_BINS, KEY_MIN_VALUES, OTHER_LABEL, TableCodec, infer_categorical
from fastmdm.data.numeric import MAX_VALUE_TOKENS
from fastmdm.data.privacy import MIN_ROWS_PER_VALUE
from fastmdm.datasets import TARGETS, TASKS, load, load_csv


def ks_statistic(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def adult():
    return load("adult")


@pytest.fixture(scope="module")
def adult_codec(adult):
    return TableCodec.fit(adult[0])


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    n = 200
    return pd.DataFrame({
        "city": rng.choice(["Paris", "Oslo", "Lima"], n),
        "age": rng.integers(18, 90, n),
        "score": rng.normal(size=n),
        "kids": rng.integers(0, 4, n),
        "flag": rng.random(n) < 0.3,
        "job": np.where(rng.random(n) < 0.1, None, rng.choice(["a", "b"], n)).astype(object),
        "income": np.where(rng.random(n) < 0.2, np.nan, rng.exponential(1000, n)),
    })


# ------------------------------------------------------------------------------ loaders
def test_adult_official_split(adult):
    train, test = adult
    assert train.shape == (32_561, 15) and test.shape == (16_281, 15)
    assert int(train.isna().any(axis=1).sum() + test.isna().any(axis=1).sum()) == 3_620
    assert train["age"].dtype == np.int64 and train["workclass"].dtype == object
    assert set(test["income"]) == {"<=50K", ">50K"}


def test_magic_seeded_split():
    train, test = load("magic")
    assert (len(train), len(test)) == (17_118, 1_902)
    assert train["fLength"].dtype == np.float64 and train["class"].dtype == object
    assert load("magic")[1].equals(test)
    assert not load("magic", seed=1)[1].equals(test)


def test_targets_and_tasks():
    for name, target in TARGETS.items():
        train, _ = load(name)
        assert target in train.columns and TASKS[name] == "classification"
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*adult"):
        load("nope")


def test_load_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a, b\n1, x\n2,\n")
    df = load_csv(path, target="b")
    assert list(df.columns) == ["a", "b"] and df["b"].isna().tolist() == [False, True]
    with pytest.raises(ValueError, match="target column 'c'"):
        load_csv(path, target="c")
    with pytest.raises(FileNotFoundError, match="no such CSV"):
        load_csv(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_csv(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("\n\n")
    with pytest.raises(ValueError, match="no columns"):
        load_csv(tmp_path / "blank.csv")
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_csv(tmp_path / "header.csv")


# ------------------------------------------------------------------------------ codec layout
def test_layout_attributes(small):
    codec = TableCodec.fit(small, num_bins=8)
    assert codec.columns == list(small.columns) and codec.num_columns == 7
    assert codec.is_numeric == [False, True, True, False, False, False, True]
    # kids: 4 ints + "other" -> categorical; job: 2 + "other" + missing; income: <= 8 bins + missing
    assert codec.cardinalities[0] == 4 and codec.cardinalities[3] == 5 and codec.cardinalities[5] == 4
    assert codec.cardinalities[1] <= 8 and codec.cardinalities[6] <= 9
    assert codec.mask_ids.tolist() == codec.cardinalities and codec.mask_ids.dtype == torch.int64
    assert codec.offsets.tolist() == np.concatenate([[0], np.cumsum(codec.cardinalities)]).tolist()


def test_small_round_trip(small):
    codec = TableCodec.fit(small, num_bins=8)
    tokens = codec.encode(small)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(small), 7)
    assert bool((tokens >= 0).all()) and bool((tokens < codec.mask_ids).all())
    out = codec.decode(tokens, gen())
    assert list(out.columns) == list(small.columns) and out.dtypes.equals(small.dtypes)
    for col in ["city", "kids", "flag", "job"]:
        assert out[col].equals(small[col])
    assert out["income"].isna().equals(small["income"].isna())
    assert torch.equal(codec.encode(out), tokens)  # every decoded value lies in its bin
    assert codec.decode(tokens, gen(3)).equals(codec.decode(tokens, gen(3)))


def test_column_order_of_input_does_not_matter(small):
    codec = TableCodec.fit(small)
    assert torch.equal(codec.encode(small[small.columns[::-1]]), codec.encode(small))


def test_categorical_threshold_and_override(small):
    assert TableCodec.fit(small, max_categories=3).is_numeric[3]  # kids has 4 values
    codec = TableCodec.fit(small, categorical=["city", "flag", "job", "age"])
    assert codec.is_numeric == [False, False, True, True, False, False, True]
    with pytest.raises(TypeError, match="'city'.*not listed in categorical"):
        TableCodec.fit(small, categorical=["flag", "job"])
    with pytest.raises(ValueError, match="not in the table: \\['nope'\\]"):
        TableCodec.fit(small, categorical=["nope"])


def test_extension_dtypes_round_trip():
    df = pd.concat([pd.DataFrame({
        "cat": pd.Categorical(["x", "y", None, "x"], categories=["y", "x", "unused"]),
        "s": pd.array(["u", None, "v", "u"], dtype="string"),
        "i": pd.array([1, None, 3, 4], dtype="Int64"),
        "f32": np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32),
    })] * MIN_ROWS_PER_VALUE, ignore_index=True)
    codec = TableCodec.fit(df, max_categories=0)
    assert codec.cardinalities[0] == 4  # the categories rows hold + "other" + missing
    assert list(codec.column("cat").pandas_dtype.categories) == ["y", "x", "unused"]   # a declared, unheld one stays
    out = codec.decode(codec.encode(df), gen())
    assert out.dtypes.equals(df.dtypes)
    assert out["cat"].equals(df["cat"]) and out["s"].equals(df["s"])
    assert out["i"].isna().equals(df["i"].isna())


# ------------------------------------------------------------------------------ numeric bins
def test_point_mass_gets_own_bin_and_edges_are_consistent():
    x = np.concatenate([np.zeros(900), np.arange(1, 101, dtype=float)])
    codec = TableCodec.fit(pd.DataFrame({"x": x}), num_bins=10)
    tokens = codec.encode(pd.DataFrame({"x": [0.0, 0.5, 1.0, 100.0]}))[:, 0].tolist()
    assert tokens[0] != tokens[1] and tokens[1] == tokens[2]  # 0 alone; (0, ...) together
    assert codec.cardinalities[0] <= 10
    lefts = codec.state_dict()["columns"][0]["lefts"]
    at_edges = codec.encode(pd.DataFrame({"x": lefts.numpy()}))[:, 0]
    assert at_edges.tolist() == list(range(len(lefts)))  # a left edge belongs to its own bin
    decoded = codec.decode(torch.zeros(5000, 1, dtype=torch.int64), gen())["x"]
    assert (decoded == 0).all()


def test_token_positions_place_bins_at_their_middle_quantile():
    """A numeric column's bins sit at the middle of their share of the distribution (a point
    mass of 90% at .45), its missing token nowhere; categories are not ordered."""
    x = np.concatenate([np.zeros(900), np.arange(1, 101, dtype=float), [np.nan] * 10])
    codec = TableCodec.fit(pd.DataFrame({"x": x, "c": ["a", "b"] * 505}), num_bins=10)
    positions, categories = codec.token_positions()
    assert categories is None and len(positions) == codec.cardinalities[0] and np.isnan(positions[-1])
    ordered = np.array(positions[:-1])
    assert ordered[0] == pytest.approx(0.45, abs=0.01) and np.all(np.diff(ordered) > 0) and ordered[-1] < 1


def test_round_values_come_back_on_the_same_values():
    """Values that at least k rows hold are atoms, decoded exactly and as often as the data
    holds them: round amounts (a token per value), and a rate grid inside a column that is
    otherwise continuous (binned, atoms drawn inside their bins)."""
    rng = np.random.default_rng(4)
    amounts = rng.choice(np.arange(1, 41) * 1000, 4000, p=np.arange(80, 40, -1) / 2420)
    rates = np.where(rng.random(4000) < 0.6, rng.choice(np.round(np.arange(5, 25, 0.25), 2), 4000),
                     np.round(rng.uniform(5, 25, 4000), 4))
    df = pd.DataFrame({"amount": amounts, "rate": rates})
    codec = TableCodec.fit(df)
    amount, rate = codec.column("amount"), codec.column("rate")
    assert codec.cardinalities[0] == 40 and codec.cardinalities[1] <= DEFAULT_NUM_BINS
    out = codec.decode(codec.encode(df), gen())
    assert set(out["amount"]) <= set(df["amount"]) and out["amount"].dtype == df["amount"].dtype
    frequencies = out["amount"].value_counts(normalize=True).sort_index()
    expected = df["amount"].value_counts(normalize=True).sort_index()
    assert np.abs(frequencies - expected).max() < 0.01
    grid = df["rate"].value_counts()
    grid = set(grid[grid >= MIN_ROWS_PER_VALUE].index)
    assert len(rate.atoms) == len(grid) and set(rate.atoms.tolist()) == grid
    on_grid = out["rate"].isin(grid).mean()
    assert abs(on_grid - df["rate"].isin(grid).mean()) < 0.03             # atoms at the data's rate
    assert ks_statistic(out["rate"], df["rate"]) < 0.03
    off_grid = out["rate"][~out["rate"].isin(grid)]
    assert off_grid.nunique() > 500                                       # between atoms: continuous
    assert np.array_equal(np.round(off_grid, 4), off_grid)                # at the observed precision
    assert amount.token_positions() == sorted(amount.token_positions())


def test_a_range_restricts_atoms_and_residual_numbers_alike():
    """range_weights give each bin's share of rows that decode into a range, atoms counted
    exactly, and decoding with the range draws atoms and residual numbers in the data's
    proportions inside it; value_bounds hold every decoded number."""
    rng = np.random.default_rng(6)
    grid = np.round(np.arange(5, 25, 0.25), 2)
    rate = np.where(rng.random(6000) < 0.6, rng.choice(grid, 6000), np.round(rng.uniform(5, 25, 6000), 4))
    codec = TableCodec.fit(pd.DataFrame({"rate": rate}))
    column = codec.column("rate")
    tokens = codec.encode(pd.DataFrame({"rate": rate}))[:, 0].numpy()
    mass = np.bincount(tokens, minlength=codec.cardinalities[0])
    for low, high in ((10.1, 12.3), (11.0, 11.0), (None, 6.0), (24.9, None)):
        weights = column.range_weights(low, high)
        inside = (rate >= (low if low is not None else -np.inf)) & (rate <= (high if high is not None else np.inf))
        assert abs((weights * mass).sum() - inside.sum()) < 0.01 * len(rate) + 1, (low, high)
        drawn = rng.choice(len(mass), 20_000, p=weights * mass / (weights * mass).sum())
        out = column.decode(drawn, np.zeros(len(drawn), dtype=bool), gen(), (low, high))
        assert out.between(low if low is not None else -np.inf, high if high is not None else np.inf).all()
        on_grid = np.isin(rate[inside], grid).mean()
        assert abs(out.isin(grid).mean() - on_grid) < 0.03, (low, high)
    low, high = column.value_bounds()
    out = codec.decode(torch.from_numpy(np.repeat(np.arange(len(mass)), 200))[:, None], gen())["rate"].to_numpy()
    bins = np.repeat(np.arange(len(mass)), 200)
    assert (out >= low[bins]).all() and (out <= high[bins]).all()


def test_a_value_fewer_than_k_rows_hold_is_never_stored_nor_emitted(tmp_path):
    """Round incomes recur; an outlier held by one row and a value held by k - 1 rows are
    written nowhere in the model file and never come back, whichever way the model decodes."""
    from fastmdm import TabularMDM
    rng = np.random.default_rng(5)
    rare = [173_412, 55_555]
    income = np.concatenate([np.repeat(np.arange(20, 61) * 1000, 15), [rare[0]], [rare[1]] * (MIN_ROWS_PER_VALUE - 1)])
    share = np.concatenate([np.round(rng.choice([0.1, 0.2, 0.3], 614) + 0.001 * rng.integers(0, 3, 614), 3),
                            [0.9876] * (MIN_ROWS_PER_VALUE - 1), [0.05, 0.7777]])
    df = pd.DataFrame({"income": rng.permutation(income), "share": share[rng.permutation(len(share))],
                       "group": rng.choice(["a", "b"], len(income))})
    model = TabularMDM(model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32), epochs=1,
                       batch_size=128, progress=False).fit(df)
    model.save(tmp_path / "model.pt")
    blob = (tmp_path / "model.pt").read_bytes()
    stored = np.asarray(model.codec.column("income").atoms, dtype=np.int64)
    assert len(stored) == 41 and sum(v.tobytes() in blob for v in stored) == 41     # the scan finds atoms
    secret = [*rare, 0.9876, 0.05, 0.7777]
    assert values_in(blob, secret) == 0
    assert sum(np.int64(v).tobytes() in blob for v in rare) == 0
    tokens = model.codec.encode(df)
    for seed in range(20):
        decoded = model.codec.decode(tokens, gen(seed))
        assert not decoded["income"].isin(rare).any() and not decoded["share"].isin(secret[2:]).any()
    synth = model.sample(2000, seed=0)
    assert not synth["income"].isin(rare).any() and not synth["share"].isin(secret[2:]).any()
    assert synth["income"].isin(stored).mean() > 0.95


def test_out_of_range_values_clip():
    codec = TableCodec.fit(pd.DataFrame({"x": np.linspace(0, 1, 101)}), num_bins=4)
    tokens = codec.encode(pd.DataFrame({"x": [-5.0, 0.0, 1.0, 9.0]}))[:, 0].tolist()
    assert tokens == [0, 0, 3, 3]


def test_numbers_decode_at_the_observed_precision():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"count": rng.integers(0, 10_000, 2000), "thousands": rng.integers(0, 500, 2000) * 1000,
                       "price": np.round(rng.lognormal(3, 1, 2000), 2), "whole": rng.integers(0, 90, 2000) * 1.0,
                       "free": rng.normal(size=2000)})
    codec = TableCodec.fit(df)
    assert codec.is_numeric == [True] * 5
    tokens = codec.encode(df)
    out = codec.decode(tokens, gen())
    assert out.dtypes.equals(df.dtypes) and torch.equal(codec.encode(out), tokens)
    assert (out["thousands"] % 1000 == 0).all()                          # multiples of the common divisor
    assert np.array_equal(np.round(out["price"], 2), out["price"])       # two decimals, as observed
    assert not np.array_equal(np.round(out["price"], 1), out["price"])
    assert np.array_equal(np.round(out["whole"]), out["whole"])          # integer-valued floats stay so
    assert np.isin(out["free"], df["free"]).mean() == 0                  # continuous: new numbers
    assert out["count"].nunique() > 1000                                 # not a few bin centres
    for name in df:
        assert ks_statistic(out[name], df[name]) < 0.03, name


def test_adult_round_trip(adult, adult_codec):
    train, test = adult
    codec = adult_codec
    assert codec.cardinalities[codec.columns.index("education-num")] == 17  # categorical (16 + "other")
    assert max(k for k, num in zip(codec.cardinalities, codec.is_numeric) if num) <= MAX_VALUE_TOKENS
    assert codec.cardinalities[codec.columns.index("fnlwgt")] <= DEFAULT_NUM_BINS   # binned, not a token per value
    tokens = codec.encode(test)
    out = codec.decode(tokens, gen())
    assert out.dtypes.equals(test.dtypes)
    for col, numeric in zip(codec.columns, codec.is_numeric):
        if not numeric:
            assert out[col].equals(test[col]), col
    assert out.isna().equals(test.isna())
    assert torch.equal(codec.encode(out), tokens)
    assert ks_statistic(out["age"], test["age"]) < 0.01
    zero_share = (test["capital-gain"] == 0).mean()
    assert abs((out["capital-gain"] == 0).mean() - zero_share) < 1e-9  # point mass exact


def test_encode_partial(small):
    codec = TableCodec.fit(small)
    holes = small.copy()
    holes.loc[[0, 5], "score"] = np.nan
    holes.loc[[1], "city"] = None
    tokens, known = codec.encode_partial(holes)
    full = codec.encode(small)
    assert known.dtype == torch.bool and known.shape == tokens.shape
    unknown = ~known
    assert unknown.sum() == 3 + holes["job"].isna().sum() + holes["income"].isna().sum()
    assert bool((tokens[unknown] == 0).all()) and torch.equal(tokens[known], full[known])


# ------------------------------------------------------------------------------ state dict
def test_state_dict_weights_only_round_trip(adult, adult_codec, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"codec": adult_codec.state_dict(), "weights": torch.ones(2)}, path)
    codec = TableCodec.from_state_dict(torch.load(path, weights_only=True)["codec"])
    test = adult[1]
    tokens = adult_codec.encode(test)
    assert torch.equal(codec.encode(test), tokens)
    assert codec.decode(tokens, gen(1)).equals(adult_codec.decode(tokens, gen(1)))
    assert torch.equal(codec.offsets, adult_codec.offsets)


@pytest.mark.parametrize("version", [1, 3, 99])
def test_state_dict_rejects_other_versions(small, version):
    state = TableCodec.fit(small).state_dict()
    state["version"] = version
    with pytest.raises(ValueError, match=f"version {version} .*reads version 4.*refit"):
        TableCodec.from_state_dict(state)


# ------------------------------------------------------------------------------ errors
def test_fit_errors(small):
    with pytest.raises(ValueError, match="no rows"):
        TableCodec.fit(small.iloc[:0])
    with pytest.raises(ValueError, match="no columns"):
        TableCodec.fit(pd.DataFrame(index=range(3)))
    with pytest.raises(ValueError, match="'empty' has only missing values"):
        TableCodec.fit(small.assign(empty=np.nan))
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2"):
        TableCodec.fit(small, num_bins=1)
    with pytest.raises(TypeError, match="'when' has unsupported dtype period"):
        TableCodec.fit(small.assign(when=pd.Period("2020-01", freq="M")))
    with pytest.raises(ValueError, match="category_cap must be None or an integer >= 2"):
        TableCodec.fit(small, category_cap=1)
    with pytest.raises(TypeError, match="DataFrame"):
        TableCodec.fit(small.to_numpy())


def test_encode_errors(small):
    codec = TableCodec.fit(small)
    with pytest.raises(ValueError, match="missing columns \\['age'\\], unexpected columns \\['extra'\\]"):
        codec.encode(small.drop(columns="age").assign(extra=1))
    with pytest.raises(ValueError, match="'score' has 1 missing value.*encode_partial"):
        codec.encode(small.assign(score=[np.nan] + [0.0] * (len(small) - 1)))
    with pytest.raises(TypeError, match="'score' is numeric but holds non-numeric values: 'abc'"):
        codec.encode(small.assign(score=["abc"] + [1.0] * (len(small) - 1)))
    with pytest.raises(ValueError, match="no rows"):
        codec.encode(small.iloc[:0])


def test_decode_errors(small):
    codec = TableCodec.fit(small)
    tokens = codec.encode(small)
    with pytest.raises(ValueError, match="3 columns but the codec has 7"):
        codec.decode(tokens[:, :3])
    masked = tokens.clone()
    masked[0, 0] = codec.mask_ids[0]
    with pytest.raises(ValueError, match="'city' has token ids outside.*mask tokens"):
        codec.decode(masked)
    with pytest.raises(TypeError, match="dtype"):
        codec.decode(tokens.float())


# ------------------------------------------------------------------------------ property tests
@st.composite
def frames(draw):
    n = draw(st.integers(MIN_ROWS_PER_VALUE, 40))   # fewer rows are refused at fit
    cols = {}
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["int", "float", "str", "float_nan", "datetime_tz", "nullable_int"]))
        if kind == "datetime_tz":
            seconds = draw(st.lists(st.one_of(st.integers(0, 2**32), st.none()), min_size=n, max_size=n))
            cols[f"c{i}"] = pd.to_datetime(pd.Series(seconds, dtype="Int64"), unit="s").dt.tz_localize("Asia/Kolkata")
        elif kind == "nullable_int":
            cols[f"c{i}"] = pd.array(draw(st.lists(st.one_of(st.integers(-2**62, 2**62), st.none()),
                                                   min_size=n, max_size=n)), dtype="Int64")
        elif kind == "int":
            cols[f"c{i}"] = np.array(draw(st.lists(st.integers(-10**6, 10**6), min_size=n, max_size=n)), dtype=np.int64)
        elif kind == "str":
            cols[f"c{i}"] = np.array(draw(st.lists(st.sampled_from(["a", "b", "c", None]), min_size=n, max_size=n)),
                                     dtype=object)
        else:
            values = st.floats(-1e9, 1e9, allow_nan=False, allow_subnormal=False)
            if kind == "float_nan":
                values = st.one_of(values, st.just(np.nan))
            cols[f"c{i}"] = np.array(draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float64)
    df = pd.DataFrame(cols)
    return df.loc[:, df.notna().any()]


@settings(max_examples=60, deadline=None, derandomize=True,   # the same examples every run: failures reproduce
          suppress_health_check=[HealthCheck.too_slow])
@given(df=frames(), num_bins=st.integers(2, 16), seed=st.integers(0, 2**31))
def test_encode_decode_invariants(df, num_bins, seed):
    if df.shape[1] == 0:
        return
    codec = TableCodec.fit(df, num_bins=num_bins)
    tokens = codec.encode(df)
    assert bool((tokens >= 0).all()) and bool((tokens < codec.mask_ids).all())
    out = codec.decode(tokens, gen(seed))
    # A category fewer than MIN_ROWS_PER_VALUE rows hold has no token and is never written out:
    # its cells decode to a category of the column by frequency, or, in a column with none,
    # to missing (which an integer dtype cannot hold).
    rare = pd.DataFrame({col: df[col].notna() & (df[col].map(df[col].value_counts()) < MIN_ROWS_PER_VALUE)
                         if not numeric else False for col, numeric in zip(codec.columns, codec.is_numeric)},
                        index=df.index).astype(bool)
    empty = [col for col, numeric in zip(codec.columns, codec.is_numeric)
             if not numeric and not codec.column(col).categories]
    assert out.drop(columns=empty).dtypes.equals(df.drop(columns=empty).dtypes)
    assert out.isna().equals(df.isna() | rare[empty].reindex(columns=df.columns, fill_value=False).astype(bool))
    again, known = codec.encode_partial(out)
    kept = torch.from_numpy((~rare).to_numpy()) & known
    assert torch.equal(again[kept], tokens[kept])
    for l, (col, numeric) in enumerate(zip(codec.columns, codec.is_numeric)):
        if col in empty:
            assert out[col].isna().all()
        elif not numeric:
            assert out[col][~rare[col]].equals(df[col][~rare[col]])
            assert (again[torch.from_numpy(rare[col].to_numpy()), l] < len(codec.column(col).categories)).all()
        else:
            assert codec.cardinalities[codec.columns.index(col)] <= num_bins + int(df[col].isna().any())
            if pd.api.types.is_integer_dtype(df[col].dtype):
                assert pd.api.types.is_integer_dtype(out[col].dtype)


# ------------------------------------------------------------------------------ real-world dtypes
def dated_table(rows: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Every dtype users bring: datetimes (tz with summer time, naive in seconds), durations,
    nullable Int64 beyond 2**53 and boolean, an ordered category with an unused category."""
    rng = np.random.default_rng(seed)
    # Departures cluster at 6-9h and 17-20h local time: a within-bin shape a uniform draw would lose.
    hours = np.where(rng.random(rows) < 0.5, rng.integers(6, 10, rows), rng.integers(17, 21, rows))
    days = rng.integers(0, 365, rows)
    local = pd.Timestamp("2013-01-01") + pd.to_timedelta(days, unit="D") + pd.to_timedelta(hours, unit="h")
    missing = rng.random(rows) < 0.1
    return pd.DataFrame({
        "departure": pd.Series(local).dt.tz_localize("America/New_York").mask(missing),
        "booked": (pd.Timestamp("2012-06-01") + pd.to_timedelta(rng.integers(0, 10**7, rows), unit="s"))
        .astype("datetime64[s]"),
        "delay": pd.to_timedelta(rng.exponential(900, rows).round(), unit="s"),
        "fare": pd.array(np.where(rng.random(rows) < 0.1, None, 2**60 + rng.integers(0, 10**6, rows)), dtype="Int64"),
        "checked_in": pd.array(np.where(rng.random(rows) < 0.1, None, rng.random(rows) < 0.7), dtype="boolean"),
        "cabin": pd.Categorical(rng.choice(["economy", "business", "first"], rows, p=[0.8, 0.15, 0.05]),
                                categories=["economy", "premium", "business", "first"], ordered=True),
    })


@pytest.fixture(scope="module")
def dated():
    return dated_table()


def test_new_dtypes_round_trip_exactly(dated):
    codec = TableCodec.fit(dated)
    assert codec.is_numeric == [True, True, True, True, False, False]
    tokens = codec.encode(dated)
    out = codec.decode(tokens, gen())
    assert out.dtypes.equals(dated.dtypes)  # unit, timezone, nullability, categories and order
    assert str(out["departure"].dt.tz) == "America/New_York" and out["cabin"].cat.ordered
    assert list(out["cabin"].cat.categories) == ["economy", "premium", "business", "first"]
    assert out.isna().equals(dated.isna())
    assert torch.equal(codec.encode(out), tokens)  # every decoded value lies in its bin
    assert (out["departure"].dropna().dt.minute == 0).all()  # whole hours, as fitted
    assert (out["delay"].dt.total_seconds() % 1 == 0).all() and out["fare"].dropna().min() >= 2**60
    assert out["checked_in"].equals(dated["checked_in"]) and out["cabin"].equals(dated["cabin"])


def test_datetime_keeps_its_within_bin_distribution(dated):
    """32 bins over a year are ~11 days wide; the sketch keeps the distribution inside them.
    (A periodic pattern inside a bin, such as the hour of day, is finer than the sketch's
    levels: it is not kept.)"""
    codec = TableCodec.fit(dated)
    out = codec.decode(codec.encode(dated), gen(1))
    as_number = lambda frame, name: frame[name].dropna().astype("int64")  # noqa: E731
    for name in ["departure", "booked"]:
        assert ks_statistic(as_number(out, name), as_number(dated, name)) < 0.01, name
    assert ks_statistic(out["delay"].dt.total_seconds(), dated["delay"].dt.total_seconds()) < 0.03


def test_few_distinct_dates_are_categorical_and_exact():
    days = pd.Series(pd.to_datetime(["2024-01-01", "2024-02-01", "2024-03-01"] * 40), name="day")
    assert infer_categorical(days)
    df = pd.DataFrame({"day": days})
    codec = TableCodec.fit(df)
    assert codec.is_numeric == [False] and codec.cardinalities == [4]
    assert codec.decode(codec.encode(df), gen()).equals(df)
    state = torch.load(_saved(codec.state_dict()), weights_only=True)  # Python ints, not Timestamps
    assert TableCodec.from_state_dict(state).decode(codec.encode(df), gen()).equals(df)


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_datetime_input_is_converted_to_the_fitted_timezone_and_unit(dated):
    codec = TableCodec.fit(dated)
    row = dated.iloc[[0]].copy()
    instant = pd.Timestamp("2013-07-04 08:00", tz="America/New_York")
    expected = codec.encode(row.assign(departure=instant))
    as_utc = row.assign(departure=instant.tz_convert("UTC"))
    as_text = row.assign(departure="2013-07-04T12:00:00Z").astype({"departure": object})
    assert torch.equal(codec.encode(as_utc), expected) and torch.equal(codec.encode(as_text), expected)
    with pytest.raises(TypeError, match="'departure' was fitted as datetime64\\[ns, America/New_York\\] and "
                                        "cannot take datetime64\\[\\w+\\] values.*tz_localize"):
        codec.encode(row.assign(departure=pd.Timestamp("2013-07-04 08:00")))
    with pytest.raises(TypeError, match="'departure' .* cannot take object values \\('soon'\\)"):
        codec.encode(row.assign(departure="soon"))
    tokens, known = codec.encode_partial(row.assign(departure=None).astype({"departure": object}))
    assert not known[0, 0] and known[0, 1:].all()


def test_state_dict_round_trip_of_new_dtypes(dated):
    codec = TableCodec.fit(dated, category_cap=2)
    tokens = codec.encode(dated)
    loaded = TableCodec.from_state_dict(torch.load(_saved(codec.state_dict()), weights_only=True))
    assert loaded.decode(tokens, gen(4)).equals(codec.decode(tokens, gen(4)))


# ------------------------------------------------------------------------------ high cardinality
def tail_numbers(rows: int = 4000, seed: int = 0) -> pd.DataFrame:
    """A long-tailed ID-like category (Zipf, like flights' tail numbers) and a number."""
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.3, rows) % 2000
    return pd.DataFrame({"tail": [f"N{i:04d}" for i in ids], "x": rng.normal(size=rows)})


def test_rare_and_capped_values_share_one_token():
    df = tail_numbers()
    counts = df["tail"].value_counts()
    frequent = counts[counts >= MIN_ROWS_PER_VALUE]
    assert len(counts) > 200 and 49 < len(frequent) < len(counts)
    codec = TableCodec.fit(df, category_cap=50)
    assert codec.cardinalities[0] == 50  # 49 most frequent + "other"
    tokens = codec.encode(df)
    other = tokens[:, 0] == 49
    kept = set(counts.index[:49])
    assert set(df.loc[(~other).numpy(), "tail"]) == kept  # ties broken by category order
    state = codec.state_dict()["columns"][0]
    assert set(state["categories"]) == kept and state["rare_rows"] == int(other.sum())
    assert codec.rare_shares()["tail"] == pytest.approx(float(other.float().mean()))
    marked = codec.decode(tokens, gen(), rare_marker=True)
    assert torch.equal(codec.encode(marked), tokens)
    assert (marked.loc[other.numpy(), "tail"] == OTHER_LABEL).all()  # no rare value is kept to copy
    assert codec.decode(tokens, gen())["tail"].isin(kept).all()       # without the marker: a kept value
    assert codec.encode(pd.DataFrame({"tail": ["never-seen"], "x": [0.0]}))[0, 0] == 49  # unseen -> other
    # Uncapped: a token for every value at least MIN_ROWS_PER_VALUE rows hold, and no other.
    uncapped = TableCodec.fit(df, category_cap=None)
    assert uncapped.column("tail").categories == sorted(frequent.index)


def test_a_category_dtype_names_no_rare_category():
    df = tail_numbers(2000)
    df["tail"] = df["tail"].astype("category")
    counts = df["tail"].value_counts()
    codec = TableCodec.fit(df, category_cap=10)
    tokens = codec.encode(df)
    out = codec.decode(tokens, gen(), rare_marker=True)
    # The declared order, without the categories 1 to MIN_ROWS_PER_VALUE - 1 rows hold.
    assert list(out["tail"].cat.categories) == [c for c in df["tail"].cat.categories if counts[c] >= MIN_ROWS_PER_VALUE]
    assert out["tail"].isna().equals(pd.Series((tokens[:, 0] == 9).numpy()))  # "other": not a category


def test_unique_key_columns():
    rng = np.random.default_rng(0)
    rows = KEY_MIN_VALUES
    emails = pd.DataFrame({"email": [f"user{i}@example.com" for i in range(rows)], "x": rng.normal(size=rows)})
    with pytest.raises(ValueError, match="'email' looks like a unique key \\(100 distinct values; 100% of the "
                                         "rows hold a value seen only once\\).*Drop it before fitting"):
        TableCodec.fit(emails)
    TableCodec.fit(emails.iloc[:-1])  # too few rows to call it a key
    with pytest.warns(UserWarning, match="'rownames' may be a unique key: its 100 integers are all distinct"):
        TableCodec.fit(pd.DataFrame({"rownames": rng.permutation(10**6)[:rows], "x": rng.normal(size=rows)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TableCodec.fit(pd.DataFrame({"count": np.repeat(np.arange(rows), 2)}))  # repeats: not a key


# ------------------------------------------------------------------------------ typing rule
@pytest.mark.parametrize("values, categorical", [
    (["a", "b"], True),
    ([True, False], True),
    ([1, 2, 3], True),                       # few integers
    (list(range(21)), False),                # more than DEFAULT_MAX_CATEGORIES integers
    ([0.5, 1.0], False),                     # not integer-valued
    (pd.array([1, None, 2], dtype="Int64"), True),
    (pd.to_timedelta(np.arange(30), unit="s"), False),
])
def test_infer_categorical(values, categorical):
    assert infer_categorical(pd.Series(values)) is categorical


def test_load_csv_reads_datetimes_back(dated, tmp_path):
    path = tmp_path / "dated.csv"
    dated.to_csv(path, index=False)
    df = load_csv(path)
    # A zone with summer time is written with two offsets and comes back as the same instants in UTC.
    assert str(df["departure"].dtype) == "datetime64[ns, UTC]"
    assert (df["departure"] == dated["departure"]).sum() == dated["departure"].notna().sum()
    assert df["booked"].dtype == "datetime64[ns]" and df["cabin"].dtype == object
    assert load_csv(path, parse_dates=False)["departure"].dtype == object


# ------------------------------------------------------------------------------ held-out splits, no copies
def test_unseen_values_take_the_other_token():
    df = pd.DataFrame({"city": ["Oslo", "Lima"] * 50, "nights": [1, 2, 3, 4] * 25,
                       "cat": pd.Categorical(["a", "b"] * 50, categories=["a", "b"])})
    codec = TableCodec.fit(df)
    assert codec.is_numeric == [False, False, False]
    unseen = pd.DataFrame({"city": ["Rome", "Oslo"], "nights": [16, 2], "cat": ["z", "a"]})
    tokens = codec.encode(unseen)  # the held-out split of a table encodes
    assert tokens[:, 0].tolist() == [2, 1] and tokens[:, 1].tolist() == [4, 1] and tokens[:, 2].tolist() == [2, 0]
    out = codec.decode(tokens, gen())
    assert out.dtypes.equals(df.dtypes) and out.iloc[1].tolist() == ["Oslo", 2, "a"]
    # Without the marker, a rare token the sampler did not draw decodes to a category by frequency.
    many = codec.decode(tokens[[0] * 4000], gen())
    assert set(many["city"]) == {"Oslo", "Lima"} and abs((many["city"] == "Oslo").mean() - 0.5) < 0.03
    assert set(many["nights"]) == {1, 2, 3, 4} and set(many["cat"]) == {"a", "b"}
    kept = codec.keep_given(unseen, out)                                 # given cells come back as given
    assert kept["city"].tolist() == ["Rome", "Oslo"] and kept["nights"].tolist() == [16, 2]


def test_point_masses_stay_exact_without_a_bin_of_their_own():
    rng = np.random.default_rng(2)
    x = np.concatenate([np.full(20, 7.25), rng.normal(size=9980)])  # 0.2% of rows: below a bin's mass
    codec = TableCodec.fit(pd.DataFrame({"x": x}))
    out = codec.decode(codec.encode(pd.DataFrame({"x": x})), gen())["x"]
    assert abs((out == 7.25).mean() - 0.002) < 0.0015


def values_in(blob: bytes, values) -> int:
    """How many of `values` occur in `blob` as float64 bytes, in either byte order (tensors
    store little-endian, pickled Python floats big-endian)."""
    values = np.asarray(values, dtype=np.float64)
    return sum(v.tobytes() in blob or v.byteswap().tobytes() in blob for v in values)


def test_saved_model_holds_no_training_value_of_a_continuous_column(tmp_path):
    from fastmdm import TabularMDM
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"x": rng.normal(size=600), "y": rng.lognormal(size=600),
                       "group": rng.choice(["a", "b"], 600)})
    model = TabularMDM(model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32), epochs=1,
                       batch_size=128, progress=False).fit(df)
    model.save(tmp_path / "model.pt")
    blob = (tmp_path / "model.pt").read_bytes()
    assert values_in(blob, model.codec.state_dict()["columns"][0]["sketch"][::100]) == 11  # the scan finds them
    assert values_in(blob, df["x"]) == 0 and values_in(blob, df["y"]) == 0
    synth = model.sample(600, seed=0)
    assert np.isin(synth["x"], df["x"]).sum() == 0 and np.isin(synth["y"], df["y"]).sum() == 0
    held_out = pd.DataFrame({"x": [0.1], "y": [1e6], "group": ["never seen"]})  # any split can be scored
    assert np.isfinite(model.nelbo(held_out))
    assert model.impute(held_out.assign(x=np.nan))["group"].tolist() == ["never seen"]
    assert len(model.sample(3, conditions={"group": "never seen"}, seed=0)) == 3
