"""Training from files larger than memory: chunked reading, the reservoir-fitted codec, the
memory-mapped token store, fit(path) (equal to fit(df), resumable, under torchrun), and
bounded memory measured in a fresh process."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fastmdm.data import TableCodec
from fastmdm.data.files import fit_codec, read_chunks, table_files
from fastmdm.token_store import TokenStore, TokenStoreWriter, build_token_store
from test_api import correlated_table, tiny

HERE = os.path.dirname(os.path.abspath(__file__))
# Workers import this checkout's fastmdm and the test helpers, whatever is installed.
WORKER_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))


def awkward_table(rows: int, seed: int = 0) -> pd.DataFrame:
    """correlated_table plus what chunking can get wrong: a bool column, an integer column
    whose missing values and a category that appear only in the last rows (so early chunks
    are int64 and complete-looking), and a numeric column with 21 distinct integers, one
    more than TableCodec's categorical limit, the 21st only in the last row."""
    df = correlated_table(rows, seed)
    df["flag"] = df["size"] > 4
    late = np.arange(rows) >= rows - 3
    df["level"] = np.where(late, np.nan, df["size"] % 3)
    df.loc[rows - 1, "color"] = "violet"
    df["dial"] = np.arange(rows) % 20
    df.loc[rows - 1, "dial"] = 20
    return df


def assert_same_codec(a: TableCodec, b: TableCodec) -> None:
    for x, y in zip(a.state_dict()["columns"], b.state_dict()["columns"], strict=True):
        assert x.keys() == y.keys(), x["name"]
        for key in x:
            same = torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key]
            assert same, (x["name"], key)


@pytest.fixture(scope="module")
def table():
    return awkward_table(2000)


@pytest.fixture(scope="module")
def files(table, tmp_path_factory):
    """The table as one Parquet file of 300-row row groups, a directory of three Parquet
    files, and a CSV file."""
    root = tmp_path_factory.mktemp("tables")
    table.to_parquet(root / "one.parquet", row_group_size=300)
    (root / "parts").mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(table)), 3)):
        table.iloc[part].to_parquet(root / "parts" / f"p{k}.parquet")
    table.to_csv(root / "one.csv", index=False)
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 600-row table as a directory of two Parquet files, for the training tests."""
    root = tmp_path_factory.mktemp("small")
    df = awkward_table(600, seed=2)
    df.iloc[:400].to_parquet(root / "a.parquet")
    df.iloc[400:].to_parquet(root / "b.parquet")
    return df, root


# ----------------------------------------------------------------------------- token store
def test_token_store_round_trips_with_the_smallest_dtypes(tmp_path):
    cardinalities = [1, 2, 256, 257, 70_000]
    rng = np.random.default_rng(0)
    tokens = np.stack([rng.integers(0, k, 1000) for k in cardinalities], 1)
    tokens[0] = np.asarray(cardinalities) - 1            # the largest value of every column
    with TokenStoreWriter(tmp_path / "s", cardinalities) as writer:
        for chunk in np.array_split(tokens, 7):
            writer.append(chunk)
    store = TokenStore(tmp_path / "s")
    assert [store.record_dtype[f].name for f in store.record_dtype.names] == \
        ["uint8", "uint8", "uint8", "uint16", "uint32"]
    assert os.path.getsize(tmp_path / "s" / "tokens.bin") == 1000 * (1 + 1 + 1 + 2 + 4) == store.nbytes
    assert store.shape == (1000, 5) and len(store) == 1000
    expected = torch.from_numpy(tokens)
    assert torch.equal(store[:], expected)
    assert torch.equal(store[10:20], expected[10:20])
    index = torch.tensor([999, 0, 5, 5, 321])
    assert torch.equal(store[index], expected[index]) and store[index].dtype == torch.int64
    assert torch.equal(store[[3, 1]], expected[[3, 1]])


def test_token_store_edges_and_errors(tmp_path):
    with TokenStoreWriter(tmp_path / "empty", [3, 4]):
        pass
    empty = TokenStore(tmp_path / "empty")
    assert empty.shape == (0, 2) and empty[:].shape == (0, 2)
    with TokenStoreWriter(tmp_path / "bad", [3, 4]) as writer:
        with pytest.raises(ValueError, match="0..K_l-1"):
            writer.append(np.array([[3, 0]]))
        with pytest.raises(ValueError, match=r"\[n, 2\]"):
            writer.append(np.zeros((2, 3), dtype=np.int64))
        writer.append(np.array([[2, 3]]))
    with open(tmp_path / "bad" / "tokens.bin", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="bytes"):
        TokenStore(tmp_path / "bad")


# ----------------------------------------------------------------------------- reading, codec
def test_chunked_reading_gives_the_table_back(table, files):
    for path in (files / "one.parquet", files / "parts", files / "one.csv"):
        chunks = list(read_chunks(table_files(path), chunk_rows=256))
        assert max(len(c) for c in chunks) <= 256
        back = pd.concat(chunks, ignore_index=True)
        expected = pd.read_csv(files / "one.csv", skipinitialspace=True) if path.suffix == ".csv" else table
        pd.testing.assert_frame_equal(back, expected, check_dtype=False)


@pytest.mark.parametrize("name", ["one.parquet", "parts", "one.csv"])
def test_codec_from_chunks_equals_codec_of_whole_table_when_reservoir_holds_it(table, files, name):
    whole = pd.read_csv(files / "one.csv", skipinitialspace=True) if name.endswith(".csv") else table
    streamed = fit_codec(read_chunks(table_files(files / name), chunk_rows=256))
    assert_same_codec(streamed, TableCodec.fit(whole))


def test_small_reservoir_keeps_categories_and_missing_exact(table, files):
    """With a 200-row reservoir, the one-row category, the late missing values and the 21st
    dial value are almost surely outside it; the exact pass still finds them (the category
    as one row of the rare pool: too few rows hold it for a token)."""
    streamed = fit_codec(read_chunks(table_files(files / "one.parquet"), chunk_rows=256), reservoir_rows=200)
    reference = TableCodec.fit(table)
    assert streamed.columns == reference.columns
    assert streamed.is_numeric == reference.is_numeric          # dial is binned, as on the whole table
    states = {c["name"]: c for c in streamed.state_dict()["columns"]}
    assert "violet" not in states["color"]["categories"] and states["color"]["rare_rows"] == 1
    assert states["level"]["has_missing"] and states["level"]["categories"] == [0.0, 1.0, 2.0]
    assert streamed.cardinalities[:5] == reference.cardinalities[:5]
    streamed.encode(table)                                        # every value of the table encodes
    decoded = streamed.decode(streamed.encode(table), generator=torch.Generator().manual_seed(0))
    assert decoded.dtypes.equals(table.dtypes)
    # dial's values recur, so they are atoms taken from the reservoir (a value k reservoir rows
    # hold, so k table rows), decoded exactly; the 21st, in one row, is not one
    atoms = streamed.column("dial").atoms.tolist()
    assert set(atoms) <= set(range(20)) and len(atoms) >= 15
    assert decoded["dial"].isin(atoms).mean() >= len(atoms) / 20 - 0.02


def test_datetimes_and_capped_categories(tmp_path):
    """A datetime column (binned) and a 60-value text column under category_cap=10: equal to
    TableCodec.fit when the reservoir holds the table; with a small reservoir the kept
    categories are still the 9 most frequent by exact count."""
    rng = np.random.default_rng(0)
    rows = 3000
    df = pd.DataFrame({"when": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 10**6, rows), "s"),
                       "tag": rng.choice([f"t{k:02d}" for k in range(60)], rows, p=np.arange(60, 0, -1) / 1830),
                       "x": rng.normal(size=rows)})
    df.to_parquet(tmp_path / "t.parquet", row_group_size=400)
    chunks = lambda: read_chunks(table_files(tmp_path / "t.parquet"), chunk_rows=256)  # noqa: E731
    assert_same_codec(fit_codec(chunks(), category_cap=10), TableCodec.fit(df, category_cap=10))
    small = {c["name"]: c for c in fit_codec(chunks(), category_cap=10, reservoir_rows=300).state_dict()["columns"]}
    top = df["tag"].value_counts().sort_index().sort_values(ascending=False, kind="stable").index[:9]
    assert small["tag"]["categories"] == sorted(top)
    assert small["tag"]["counts"] == df["tag"].value_counts()[sorted(top)].tolist()  # exact, not the reservoir's
    assert small["tag"]["rare_rows"] == rows - sum(small["tag"]["counts"])
    assert small["when"]["kind"] == "numeric"


def test_unseen_category_at_encode_time_takes_the_other_token(files):
    codec = fit_codec(read_chunks(table_files(files / "one.parquet")))
    color = codec.columns.index("color")
    tokens = codec.encode(awkward_table(10).assign(color="ultraviolet"))
    assert (tokens[:, color] == codec.state_dict()["columns"][color]["categories"].__len__()).all()


def test_bad_files_raise_clear_errors(table, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such Parquet file"):
        table_files(tmp_path / "missing.parquet")
    (tmp_path / "x.txt").write_text("a\n1\n")
    with pytest.raises(ValueError, match=".parquet or .csv"):
        table_files(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="holds no .parquet"):
        table_files(tmp_path)
    table.to_parquet(tmp_path / "a.parquet")
    table.drop(columns="dial").to_parquet(tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="has columns"):
        list(read_chunks(table_files(tmp_path)))
    table.to_csv(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="mixes Parquet and CSV"):
        table_files(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="no header"):
        list(read_chunks([tmp_path / "empty.csv"]))
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="no rows"):
        list(read_chunks([tmp_path / "header.csv"]))


# ----------------------------------------------------------------------------- fit(path)
def test_fit_from_files_trains_exactly_as_from_the_frame(small):
    """Same codec (the reservoir holds the table) and the same token rows in the same order:
    the trained parameters are identical bit for bit."""
    table, root = small
    from_frame = tiny(epochs=2).fit(table, validation=None)
    from_files = tiny(epochs=2).fit(root, validation=None)
    assert_same_codec(from_files.codec, from_frame.codec)
    for (name, a), b in zip(from_frame.denoiser.state_dict().items(), from_files.denoiser.state_dict().values()):
        assert torch.equal(a, b), name


def test_validation_split_and_store_reuse(table, files, tmp_path):
    codec, train, validation = build_token_store(tmp_path / "store", table_files(files / "one.parquet"),
                                                 validation=0.2, seed=3, chunk_rows=256)
    assert len(train) + len(validation) == len(table)
    assert 0.15 < len(validation) / len(table) < 0.25
    assert torch.equal(torch.cat([train[:], validation[:]]).sort(0).values[:, 0].sort().values,
                       codec.encode(table)[:, 0].sort().values)
    stamp = os.stat(tmp_path / "store" / "train" / "tokens.bin").st_mtime_ns
    build_token_store(tmp_path / "store", table_files(files / "one.parquet"), validation=0.2, seed=3, chunk_rows=256)
    assert os.stat(tmp_path / "store" / "train" / "tokens.bin").st_mtime_ns == stamp       # reused
    _, _, other = build_token_store(tmp_path / "store", table_files(files / "one.parquet"), validation=0.1,
                                    seed=3, chunk_rows=256)
    assert len(other) < len(validation)                                                      # rebuilt
    with pytest.raises(TypeError, match="validation must be a fraction"):
        tiny().fit(files / "one.parquet", validation=table)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a token store"):
        build_token_store(tmp_path / "notes", table_files(files / "one.parquet"))
    assert (tmp_path / "notes" / "mine.txt").exists()


def test_fit_from_files_resumes_exactly(small, tmp_path, monkeypatch):
    """A 3-epoch run killed after its first checkpoint, resumed, ends bit for bit where an
    uninterrupted run does; with a kept token store (reused) and with a temporary one.
    (5 steps an epoch against 5 warmup steps: the resumed epochs are past the warmup.)"""
    import fastmdm.train
    path = small[1]
    options = dict(epochs=3, batch_size=96)
    straight = tiny(**options).fit(path, validation=0.2)
    save = fastmdm.train.atomic_save

    def save_then_crash(*args):
        save(*args)
        raise KeyboardInterrupt

    for store in (tmp_path / "tokens", None):
        checkpoint = tmp_path / f"run-{store is None}.ckpt"
        monkeypatch.setattr(fastmdm.train, "atomic_save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            tiny(**options).fit(path, validation=0.2, checkpoint=checkpoint, token_store=store)
        monkeypatch.setattr(fastmdm.train, "atomic_save", save)
        resumed = tiny(**options).fit(path, validation=0.2, checkpoint=checkpoint, resume=True, token_store=store)
        for (name, a), b in zip(straight.denoiser.state_dict().items(), resumed.denoiser.state_dict().values()):
            assert torch.equal(a, b), name
        assert [r.val_nelbo for r in straight.history] == [r.val_nelbo for r in resumed.history]


def test_cli_trains_from_a_parquet_directory(small, tmp_path):
    from fastmdm.cli import main as cli_main
    model = tmp_path / "m.pt"
    assert cli_main(["train", str(small[1]), "-o", str(model), "--epochs", "1", "--batch-size", "256",
                     "--token-store", str(tmp_path / "tokens")]) == 0
    assert (tmp_path / "tokens" / "recipe.json").exists()
    assert cli_main(["sample", str(model), "-n", "50", "-o", str(tmp_path / "s.parquet"), "--seed", "0"]) == 0
    assert set(pd.read_parquet(tmp_path / "s.parquet")["color"]) <= {"red", "green", "blue", "violet"}


def test_torchrun_ddp_trains_from_files(small, tmp_path):
    """Two processes under torchrun: rank 0 builds one store, both read their part of each batch
    from it and end with identical weights."""
    worker = os.path.join(HERE, "_ddp_train.py")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             worker, str(tmp_path), str(small[1])],
                            env=WORKER_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert (a["log_w"] != 0).any()


# ----------------------------------------------------------------------------- bounded memory
def wide_table(rows: int, seed: int = 0) -> pd.DataFrame:
    """correlated_table with four more text and four more float columns (12 in all)."""
    df = correlated_table(rows, seed)
    rng = np.random.default_rng(seed)
    for k in range(4):
        df[f"text{k}"] = rng.choice([f"word{j}-{k}" for j in range(7)], rows)
        df[f"x{k}"] = rng.normal(size=rows)
    return df


@pytest.fixture(scope="module")
def memory_growth(tmp_path_factory):
    """Peak RSS growth of a fresh process streaming 200k rows, per phase (see
    _bounded_memory.py), and the bytes the same rows take as a DataFrame plus int64 tokens."""
    root = tmp_path_factory.mktemp("memory")
    big = wide_table(200_000, seed=1)
    big.to_parquet(root / "big.parquet", row_group_size=20_000)
    big.iloc[:40_000].to_parquet(root / "small.parquet", row_group_size=20_000)
    table_bytes = int(big.memory_usage(deep=True).sum()) + big.size * 8

    def growth(phase: str) -> int:
        result = subprocess.run([sys.executable, os.path.join(HERE, "_bounded_memory.py"), str(root), phase],
                                capture_output=True, text=True, timeout=600, env=WORKER_ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        return int(result.stdout.strip().splitlines()[-1])
    return growth, table_bytes


@pytest.mark.parametrize("phase", ["sample", "train"])
def test_memory_does_not_grow_with_rows(memory_growth, phase):
    """Streaming 200k rows to Parquet, or from Parquet through the codec pass, the encoding
    and an epoch of batch reads, must add less than a quarter of what holding the rows
    costs (94 MB as a DataFrame plus int64 tokens). Measured: about 2 MB (sample) and 6 MB
    (train: fixed costs, the permutation at 8 B/row, the store pages at 12 B/row); the same
    train phase that also held the DataFrame read whole measured 52 MB and fails."""
    growth, table_bytes = memory_growth
    assert growth(phase) < table_bytes / 4, (phase, table_bytes)
