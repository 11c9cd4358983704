"""Streaming and sharded sampling: iter_samples, sample_to (Parquet, CSV), the CLI under torchrun's
environment, and the per-block seeds that make shards concatenate to a single-process run."""
import numpy as np
import pandas as pd
import pytest

from fastmdm.cli import main as cli_main
from fastmdm.sample_blocks import BlockPlan, parse_shard, shard_path
from test_api import correlated_table, tiny


def fit_tiny(architecture: str):
    return tiny(architecture=architecture, epochs=1).fit(correlated_table(300), validation=None)


@pytest.fixture(scope="module")
def model():
    return fit_tiny("bidirectional")


@pytest.fixture(scope="module")
def causal():
    return fit_tiny("causal")


def read(path) -> pd.DataFrame:
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)


@pytest.mark.parametrize("architecture, num_shards", [("bidirectional", 2), ("bidirectional", 7), ("causal", 3)])
def test_shards_concatenate_to_the_single_process_rows(request, tmp_path, architecture, num_shards):
    """300 rows in blocks of 64 (5 blocks, the last partial): 7 shards leave two empty files.
    Shards are made last to first, so none can lean on state an earlier one left."""
    model = request.getfixturevalue("model" if architecture == "bidirectional" else "causal")
    single = model.sample(300, seed=5, batch_size=64, steps=2)
    paths = [model.sample_to(tmp_path / "out.parquet", 300, seed=5, batch_size=64, steps=2,
                             shard=(k, num_shards)) for k in reversed(range(num_shards))]
    pd.testing.assert_frame_equal(pd.concat([read(p) for p in reversed(paths)], ignore_index=True),
                                  single.reset_index(drop=True))
    assert single.index.equals(pd.RangeIndex(300))


@pytest.mark.parametrize("architecture", ["bidirectional", "causal"])
def test_iter_samples_passes_options_and_indexes_rows(request, architecture):
    model = request.getfixturevalue("model" if architecture == "bidirectional" else "causal")
    options = dict(seed=2, batch_size=40, conditions={"color": "blue"})
    if architecture == "causal":
        options["speculative"] = 2
    frames = list(model.iter_samples(100, **options))
    assert [len(f) for f in frames] == [40, 40, 20]
    assert [f.index[0] for f in frames] == [0, 40, 80]
    whole = pd.concat(frames)
    assert (whole["color"] == "blue").all()
    pd.testing.assert_frame_equal(whole, model.sample(100, **options))
    # A condition frame is cut into the same blocks.
    frame_conditions = pd.DataFrame({"color": ["red", "green"] * 50})
    rows = model.sample(100, seed=2, batch_size=40, conditions=frame_conditions)
    assert (rows["color"].to_numpy() == frame_conditions["color"].to_numpy()).all()


def test_different_seeds_and_unseeded_runs_differ(model):
    a, b = model.sample(50, seed=1), model.sample(50, seed=2)
    assert not a.equals(b)
    assert not model.sample(50).equals(model.sample(50))


def test_csv_and_parquet_hold_the_same_rows(model, tmp_path):
    parquet = read(model.sample_to(tmp_path / "s.parquet", 100, seed=4, batch_size=32))
    csv = read(model.sample_to(tmp_path / "s.csv", 100, seed=4, batch_size=32))
    pd.testing.assert_frame_equal(parquet, csv)


def test_parquet_schema_holds_when_a_batch_has_only_missing_text(tmp_path):
    """One-row batches: some batches hold only a missing value in a text column, which pyarrow
    alone would type as null and then refuse to append to the string column."""
    df = correlated_table(300)
    df["note"] = np.where(np.arange(300) % 2 == 0, "x", None)
    fitted = tiny(epochs=None, steps=100).fit(df, validation=None)   # learns that half the notes are missing
    path = fitted.sample_to(tmp_path / "s.parquet", 12, seed=0, batch_size=1, steps=1)
    expected = fitted.sample(12, seed=0, batch_size=1, steps=1).reset_index(drop=True)
    assert expected["note"].isna().any() and expected["note"].notna().any()
    written = read(path)
    written["note"] = written["note"].where(written["note"].notna(), np.nan)  # Parquet's null reads as None
    pd.testing.assert_frame_equal(written, expected)


def test_failed_sampling_leaves_no_file(model, tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        model.sample_to(tmp_path / "s.parquet", 100, temperature=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="needs a seed"):
        model.iter_samples(10, shard=(0, 2))
    with pytest.raises(ValueError, match="shard must lie"):
        model.iter_samples(10, shard=(2, 2), seed=0)
    with pytest.raises(ValueError, match=".parquet or .csv"):
        model.sample_to(tmp_path / "s.txt", 10)
    with pytest.raises(ValueError, match="batch_size"):
        model.iter_samples(10, batch_size=0)
    with pytest.raises(ValueError, match="conditions has 3 rows"):
        model.iter_samples(10, conditions=pd.DataFrame({"color": ["red"] * 3}))
    for text in ("2/2", "1", "a/b"):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(text)


def test_block_plan_covers_every_row_once():
    for num_rows, block_rows, num_shards in [(1, 1, 1), (10, 3, 4), (1000, 128, 7), (5, 10, 3)]:
        plans = [BlockPlan(num_rows, block_rows, 0, k, num_shards) for k in range(num_shards)]
        rows = [r for plan in plans for b in plan.blocks for r in plan.rows_of(b)]
        assert rows == list(range(num_rows))
        assert [len(p.rows) for p in plans] == [sum(len(p.rows_of(b)) for b in p.blocks) for p in plans]
    assert shard_path("a/out.parquet", 2, 4).name == "out-00002-of-00004.parquet"
    assert shard_path("out.csv", 0, 1).name == "out.csv"


def test_cli_shards_under_torchrun_environment(model, tmp_path, monkeypatch, capsys):
    """torchrun sets RANK and WORLD_SIZE: each rank writes its shard; --shard regenerates one alone."""
    model_path = tmp_path / "m.pt"
    model.save(model_path)
    args = ["sample", str(model_path), "-n", "200", "--seed", "3", "--batch-size", "64", "--steps", "2"]
    assert cli_main(args + ["-o", str(tmp_path / "single.parquet")]) == 0
    assert "rows/s" in capsys.readouterr().out
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert cli_main(args + ["-o", str(tmp_path / "out.parquet")]) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    shards = [read(tmp_path / f"out-0000{k}-of-00002.parquet") for k in range(2)]
    pd.testing.assert_frame_equal(pd.concat(shards, ignore_index=True), read(tmp_path / "single.parquet"))
    assert cli_main(args + ["-o", str(tmp_path / "again.parquet"), "--shard", "1/2"]) == 0
    pd.testing.assert_frame_equal(read(tmp_path / "again-00001-of-00002.parquet"), shards[1])
    assert cli_main(["sample", str(model_path), "-n", "5", "-o", str(tmp_path / "x.parquet"), "--shard", "0/2"]) == 2
    assert "needs a seed" in capsys.readouterr().err
