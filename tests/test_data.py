"""TableCodec and dataset loaders: round trips, bin semantics, error messages, serialisation."""
import io

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmdm.data import DEFAULT_NUM_BINS, TableCodec
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
    # kids: 4 ints -> categorical; job: 2 + missing; income: <= 8 bins + missing
    assert codec.cardinalities[0] == 3 and codec.cardinalities[3] == 4 and codec.cardinalities[5] == 3
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
    df = pd.DataFrame({
        "cat": pd.Categorical(["x", "y", None, "x"], categories=["y", "x", "unused"]),
        "s": pd.array(["u", None, "v", "u"], dtype="string"),
        "i": pd.array([1, None, 3, 4], dtype="Int64"),
        "f32": np.array([0.5, 1.5, 2.5, 3.5], dtype=np.float32),
    })
    codec = TableCodec.fit(df, max_categories=0)
    assert codec.cardinalities[0] == 4  # declared categories + missing
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


def test_out_of_range_values_clip():
    codec = TableCodec.fit(pd.DataFrame({"x": np.linspace(0, 1, 101)}), num_bins=4)
    tokens = codec.encode(pd.DataFrame({"x": [-5.0, 0.0, 1.0, 9.0]}))[:, 0].tolist()
    assert tokens == [0, 0, 3, 3]


def test_integer_column_decodes_to_training_integers():
    x = np.random.default_rng(1).integers(0, 10_000, 500)
    codec = TableCodec.fit(pd.DataFrame({"x": x}))
    out = codec.decode(codec.encode(pd.DataFrame({"x": x})), gen())["x"]
    assert out.dtype == np.int64 and set(out) <= set(x)


def test_adult_round_trip(adult, adult_codec):
    train, test = adult
    codec = adult_codec
    assert codec.cardinalities[codec.columns.index("education-num")] == 16  # categorical
    assert max(k for k, num in zip(codec.cardinalities, codec.is_numeric) if num) <= DEFAULT_NUM_BINS
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


def test_state_dict_rejects_unknown_version(small):
    state = TableCodec.fit(small).state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
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
    with pytest.raises(TypeError, match="'when' has unsupported dtype"):
        TableCodec.fit(small.assign(when=pd.Timestamp("2020-01-01")))
    with pytest.raises(TypeError, match="DataFrame"):
        TableCodec.fit(small.to_numpy())


def test_encode_errors(small):
    codec = TableCodec.fit(small)
    with pytest.raises(ValueError, match="missing columns \\['age'\\], unexpected columns \\['extra'\\]"):
        codec.encode(small.drop(columns="age").assign(extra=1))
    with pytest.raises(ValueError, match="'city' has categories not seen.*'Rome'"):
        codec.encode(small.assign(city=["Rome"] + ["Paris"] * (len(small) - 1)))
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
    n = draw(st.integers(1, 40))
    cols = {}
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["int", "float", "str", "float_nan"]))
        if kind == "int":
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=frames(), num_bins=st.integers(2, 16), seed=st.integers(0, 2**31))
def test_encode_decode_invariants(df, num_bins, seed):
    if df.shape[1] == 0:
        return
    codec = TableCodec.fit(df, num_bins=num_bins)
    tokens = codec.encode(df)
    assert bool((tokens >= 0).all()) and bool((tokens < codec.mask_ids).all())
    out = codec.decode(tokens, gen(seed))
    assert out.dtypes.equals(df.dtypes) and out.isna().equals(df.isna())
    assert torch.equal(codec.encode(out), tokens)
    for col, numeric in zip(codec.columns, codec.is_numeric):
        if not numeric:
            assert out[col].equals(df[col])
        else:
            assert codec.cardinalities[codec.columns.index(col)] <= num_bins + int(df[col].isna().any())
            assert set(out[col].dropna()) <= set(df[col].dropna())
