"""Privacy: the scores of fastmdm.metrics (DCR share and exact copies, with known answers),
and the codec's rule that a value fewer than MIN_ROWS_PER_VALUE training rows hold is neither
stored in a model file nor generated."""
import numpy as np
import pandas as pd
import pytest

from fastmdm import TabularMDM
from fastmdm.cli import _model_from_args, build_parser
from fastmdm.data import OTHER_LABEL
from fastmdm.data.privacy import MIN_ROWS_PER_VALUE
from fastmdm.metrics import REFERENCE_ROW, evaluate, format_report, privacy, rare_pool_shares


def table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    group = rng.choice(["a", "b", "c"], rows)
    return pd.DataFrame({"group": group, "x": rng.normal(size=rows) + (group == "a"),
                         "y": rng.gamma(2.0, 3.0, rows), "n": rng.integers(0, 50, rows)})


@pytest.fixture(scope="module")
def population():
    full = table(6000, 0)
    return full.iloc[:3000].reset_index(drop=True), full.iloc[3000:4500].reset_index(drop=True), \
        full.iloc[4500:].reset_index(drop=True)   # train, holdout (half the size), unseen rows


def test_copies_of_training_rows_score_one(population):
    train, holdout, _ = population
    scores = privacy(train, holdout, train.sample(800, random_state=1))
    assert scores["dcr_share"] > 0.97 and scores["exact_copies"] == 1.0


def test_unseen_real_rows_score_one_half_with_a_smaller_holdout(population):
    """The nearest row is a training row for 2/3 of fresh rows when the training set is twice
    the holdout; the share is reported at equal sizes: .5."""
    train, holdout, unseen = population
    scores = privacy(train, holdout, unseen)
    assert abs(scores["dcr_share"] - 0.5) < 0.04 and scores["exact_copies"] == 0.0


def test_partial_copying_moves_the_share(population):
    train, holdout, unseen = population
    half_copied = pd.concat([train.iloc[:750], unseen.iloc[:750]], ignore_index=True)
    scores = privacy(train, holdout, half_copied)
    assert abs(scores["dcr_share"] - 0.75) < 0.05 and scores["exact_copies"] == 0.5


def test_exact_copies_ignore_dtypes_and_missing_spellings(population):
    train, holdout, _ = population
    train = train.assign(group=train["group"].where(train.index % 7 > 0, None))
    copied = train.iloc[:100].astype({"n": "float64", "group": "category"})
    copied["group"] = copied["group"].astype(object).where(copied["group"].notna(), np.nan)
    assert privacy(train, holdout, copied)["exact_copies"] == 1.0
    moved = copied.assign(x=copied["x"] + 1e-9)
    assert privacy(train, holdout, moved)["exact_copies"] == 0.0


def test_evaluate_reports_both_rows(population):
    train, holdout, unseen = population
    results = evaluate(train, train.iloc[:600], test=pd.concat([holdout, unseen], ignore_index=True),
                       metrics=["dcr_share", "exact_copies"])
    assert list(results.columns) == ["dcr_share", "exact_copies"]
    assert results.loc["synthetic"].tolist() == pytest.approx([1.0, 1.0], abs=0.03)
    reference = results.loc[[i for i in results.index if i.startswith(REFERENCE_ROW)][0]]
    assert abs(reference["dcr_share"] - 0.5) < 0.05 and reference["exact_copies"] == 0.0


# ------------------------------------------------------------------------------ rare values
def long_tailed(rows_per_title: int = 20, seed: int = 0) -> pd.DataFrame:
    """40 titles held by `rows_per_title` rows each, 20 held by MIN_ROWS_PER_VALUE - 1 rows and
    300 held by one row each (every title ends in ")", so none is found inside another); a
    count with a rare value (17, two rows), a category dtype with a rare category, a bool
    whose False is rare, and a number."""
    rng = np.random.default_rng(seed)
    titles = ([f"common title {k})" for k in range(40) for _ in range(rows_per_title)]
              + [f"fewer title {k})" for k in range(20) for _ in range(MIN_ROWS_PER_VALUE - 1)]
              + [f"single title {k})" for k in range(300)])
    rows = len(titles)
    kids = rng.integers(0, 4, rows)
    kids[:2] = 17
    member = rng.choice(["basic", "gold"], rows).astype(object)
    member[2:5] = "platinum)"
    return pd.DataFrame({"title": rng.permutation(titles), "kids": kids,
                         "member": pd.Categorical(member, categories=["basic", "gold", "platinum)", "unused"]),
                         "flag": np.arange(rows) >= 3, "x": rng.normal(size=rows)})


RARE = {"title": [f"fewer title {k})" for k in range(20)] + [f"single title {k})" for k in range(300)],
        "kids": [17], "member": ["platinum)"], "flag": [False]}


def assert_no_rare_value(frame: pd.DataFrame) -> None:
    for column, values in RARE.items():
        assert not frame[column].isin(values).any(), column
    assert not (frame == OTHER_LABEL).any().any()   # and no marker by default


TINY = dict(model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32), steps=30, batch_size=128,
            progress=False)


@pytest.mark.parametrize("source", ["frame", "file"])
def test_no_rare_value_is_stored_or_generated(source, tmp_path):
    """A value fewer than MIN_ROWS_PER_VALUE training rows hold is not in the model file (as
    text, in any dtype's list of categories) nor in any sampled, imputed or conditioned row
    (but for the known cells a caller gives, which come back as given);
    the scan finds every frequent title, so it would find a stored rare one. Fitting from a
    file (exact counts, fastmdm.data.files.fit_codec) keeps the same rule."""
    df = long_tailed()
    data = df
    if source == "file":
        data = tmp_path / "table.parquet"
        df.to_parquet(data)
    model = TabularMDM(seed=0, **TINY).fit(data)
    model.save(tmp_path / "model.pt")
    blob = (tmp_path / "model.pt").read_bytes()
    assert all(f"common title {k})".encode() in blob for k in range(40))
    assert not any(value.encode() in blob for value in RARE["title"] + RARE["member"])
    assert list(model.codec.column("member").pandas_dtype.categories) == ["basic", "gold", "unused"]
    assert model.codec.rare_shares()["title"] == pytest.approx(380 / len(df))
    assert_no_rare_value(model.sample(3000, seed=1))
    holes = df.iloc[:500].assign(title=None, kids=np.nan, flag=None, member=None)
    filled = model.impute(holes, seed=2)
    assert_no_rare_value(filled) and filled["title"].notna().all()
    assert_no_rare_value(model.sample(500, conditions={"kids": [0, 1], "member": "gold"}, seed=3))
    kept = model.impute(df.iloc[:10].assign(x=np.nan), seed=4)     # given cells come back as given
    assert kept["title"].equals(df["title"].iloc[:10])
    assert kept["member"].astype(object).equals(df["member"].iloc[:10].astype(object))   # a rare one too


def test_the_marker_setting_writes_other_where_the_model_drew_the_rare_token(tmp_path):
    model = TabularMDM(seed=0, rare_marker=True, **TINY).fit(long_tailed())
    synth = model.sample(3000, seed=1)
    assert (synth["title"] == OTHER_LABEL).mean() > 0.05   # about the rare pool's share, 32%
    assert not synth["title"].isin(RARE["title"]).any()
    model.save(tmp_path / "model.pt")
    assert TabularMDM.load(tmp_path / "model.pt").rare_marker
    with pytest.raises(TypeError, match="rare_marker must be True or False"):
        TabularMDM(rare_marker="yes")
    for flags, marker in (([], False), (["--rare-marker"], True)):
        args = build_parser().parse_args(["train", "table.csv", "-o", "model.pt", *flags])
        assert _model_from_args(args).rare_marker is marker


def test_a_column_without_a_frequent_value_comes_back_missing():
    df = long_tailed().assign(code=lambda d: [f"c{k // 2}" for k in range(len(d))])   # two rows each
    with pytest.warns(UserWarning, match=r"no value of column\(s\) \['code'\] is held by 5 or more"):
        model = TabularMDM(seed=0, **TINY).fit(df)
    assert model.sample(200, seed=1)["code"].isna().all()


def test_the_fit_log_and_evaluate_report_the_rare_pool(capsys):
    df = long_tailed()
    TabularMDM(seed=0, **dict(TINY, progress=True)).fit(df)
    log = capsys.readouterr().out
    assert "rare pool (share of rows holding a value fewer than 5 rows hold" in log and "'title' 32.2%" in log
    shares = rare_pool_shares(df)
    assert shares["title"] == pytest.approx(380 / len(df)) and shares["kids"] == pytest.approx(2 / len(df))
    assert "x" not in shares.index and shares["member"] == pytest.approx(3 / len(df))
    results = evaluate(df, df, metrics=["exact_copies"], reference=False)
    assert results.attrs["rare_pool_shares"].equals(shares)
    assert "rare pool (rows holding a value fewer than 5 real rows hold; never generated): title 32.2%" \
        in format_report(results)
