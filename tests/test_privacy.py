"""Privacy scores of fastmdm.metrics: DCR share and exact copies, with known answers."""
import numpy as np
import pandas as pd
import pytest

from fastmdm.metrics import REFERENCE_ROW, evaluate, privacy


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
