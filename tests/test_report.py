"""The HTML report, read back by parsing it: every column present, figures embedded as PNGs,
nothing fetched from elsewhere, wide tables capped."""
import base64
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from fastmdm import TabularMDM, cli, report
from fastmdm.metrics import _DESCRIPTIONS, _privacy_embedding, evaluate


class Page(HTMLParser):
    """The text, the images' sources and every link-like attribute of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.images, self.links = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if tag == "img" and name == "src":
                self.images.append(value)
            elif name in ("href", "src", "srcset", "action"):
                self.links.append(value)

    def handle_data(self, data):
        self.text.append(data)


def read_page(path) -> tuple[Page, str]:
    text = open(path, encoding="utf-8").read()
    return Page(text), text


def check_self_contained(page: Page, text: str) -> None:
    assert page.images
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG")
    assert page.links == []
    assert "://" not in text and "@import" not in text and "url(" not in text


def mixed_table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    group = rng.choice(["north", "south", "east"], rows)
    table = pd.DataFrame({
        "group": group,
        "amount": np.round(rng.gamma(2.0, 50.0, rows) * np.where(group == "north", 2, 1), 2),
        "count": rng.integers(0, 5, rows),
        "day": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, rows), unit="D"),
        "flag": rng.random(rows) < 0.3,
    })
    table.loc[rng.random(rows) < 0.1, "amount"] = np.nan
    return table


@pytest.fixture(scope="module")
def tables():
    real, test = mixed_table(600, 0), mixed_table(300, 1)
    synth = mixed_table(600, 2)
    synth["amount"] = synth["amount"].sample(frac=1, random_state=0).to_numpy() * 3   # a column gone wrong
    return real, test, synth


def test_evaluate_writes_a_self_contained_report(tables, tmp_path):
    real, test, synth = tables
    path = tmp_path / "report.html"
    results = evaluate(real, synth, test=test, metrics=("shape", "trend", "dcr_share"), report=str(path))
    page, text = read_page(path)
    check_self_contained(page, text)
    words = "".join(page.text)
    for column in real.columns:
        assert column in words
    for metric in results.columns:
        assert metric in words and _DESCRIPTIONS[metric] in words
    assert "real vs real" in words
    # one figure per column, the heatmaps, the distances
    assert len(page.images) == real.shape[1] + 2
    # worst first: the broken column leads the ranking
    scores = report.column_scores(real, synth)
    assert scores["column"].iloc[0] == "amount"
    assert words.index("amount (number)") < min(words.index(f"{c} (") for c in real.columns if c != "amount")


def test_the_command_line_report_draws_the_model(tables, tmp_path):
    real, test, synth = tables
    for name, frame in (("real.csv", real), ("test.csv", test), ("synth.parquet", synth)):
        (frame.to_csv if name.endswith(".csv") else frame.to_parquet)(tmp_path / name, index=False)
    model = TabularMDM(model=dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=16), steps=2,
                       progress=False).fit(real, validation=None)
    model.save(tmp_path / "model.pt")
    path = tmp_path / "report.html"
    assert cli.main(["evaluate", str(tmp_path / "real.csv"), str(tmp_path / "synth.parquet"), "--test",
                     str(tmp_path / "test.csv"), "--report", str(path), "--model", str(tmp_path / "model.pt"),
                     "--jobs", "1"]) == 0
    page, text = read_page(path)
    check_self_contained(page, text)
    assert "schedule and generation order" in "".join(page.text)
    assert len(page.images) == real.shape[1] + 3
    assert cli.main(["evaluate", str(tmp_path / "real.csv"), str(tmp_path / "synth.parquet"), "--model",
                     str(tmp_path / "model.pt")]) == 2


def test_a_wide_table_gets_figures_for_its_worst_columns_only(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "MAX_COLUMN_FIGURES", 6)
    monkeypatch.setattr(report, "MAX_PAIR_COLUMNS", 10)
    monkeypatch.setattr(report, "MAX_HEATMAP_COLUMNS", 5)
    rng = np.random.default_rng(0)
    real = pd.DataFrame(rng.normal(size=(200, 30)), columns=[f"x{i}" for i in range(30)])
    synth = pd.DataFrame(rng.normal(size=(200, 30)), columns=real.columns)
    synth[["x3", "x17"]] += 2.0
    path = tmp_path / "wide.html"
    report.write_report(path, real, synth, pd.DataFrame({"shape": [0.9]}, index=["synthetic"]),
                        embed=_privacy_embedding, descriptions=_DESCRIPTIONS)
    page, text = read_page(path)
    check_self_contained(page, text)
    words = "".join(page.text)
    assert all(column in words for column in real.columns)
    assert len(page.images) == 6 + 2
    assert "x3 (number)" in words and "x17 (number)" in words
    assert "computed over the 10 worst columns" in words and "the 5 columns of the largest differences" in words


def test_association_measures_follow_the_column_types():
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    real = pd.DataFrame({"x": x, "y": 2 * x + 0.1 * rng.normal(size=500), "c": np.where(x > 0, "pos", "neg")})
    synth = real.assign(y=rng.normal(size=500))
    real_assoc, synth_assoc, measure = report.association_matrices(real, synth)
    assert measure.loc["x", "y"] == "Pearson r" and measure.loc["x", "c"] == "Cramér's V"
    assert real_assoc.loc["x", "y"] > 0.99 and abs(synth_assoc.loc["x", "y"]) < 0.2
    assert real_assoc.loc["x", "c"] > 0.9 and real_assoc.loc["y", "c"] > 0.8 and synth_assoc.loc["y", "c"] < 0.3
