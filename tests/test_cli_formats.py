"""The command line reads every table format it writes: each command on a CSV file, a Parquet
file and a directory of Parquet shards, the errors for paths that are not tables, evaluate's
row sampling, and the train -> sample -> evaluate -> impute loop the README shows."""
import numpy as np
import pandas as pd
import pytest
from scipy.stats import chisquare

from fastmdm.api import TabularMDM
from fastmdm.cli import main as cli_main
from fastmdm.data import TableCodec
from fastmdm.data.files import read_table
from test_api import correlated_table

FORMATS = ["csv", "parquet", "directory"]
TRAIN = ["--epochs", "1", "--batch-size", "64"]
ACCEPTED = "a table is a .parquet or .csv file, or a directory of them"


def write(frame: pd.DataFrame, root, name: str, fmt: str) -> str:
    """`frame` as root/name.csv, root/name.parquet, or a directory root/name of two Parquet shards."""
    if fmt == "csv":
        path = root / f"{name}.csv"
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        path = root / f"{name}.parquet"
        frame.to_parquet(path, index=False)
    else:
        path = root / name
        path.mkdir()
        half = len(frame) // 2
        frame.iloc[:half].to_parquet(path / "part-0.parquet", index=False)
        frame.iloc[half:].to_parquet(path / "part-1.parquet", index=False)
    return str(path)


def output_name(root, name: str, fmt: str) -> str:
    """Where a command writes `name` in `fmt`: a directory gets sample's shards (see test_sample)."""
    return str(root / f"{name}.csv") if fmt == "csv" else str(root / f"{name}.parquet")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table():
    return correlated_table(120)


@pytest.fixture(scope="module")
def model_path(table, tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    path = root / "model.pt"
    assert cli_main(["train", write(table, root, "train", "csv"), "-o", str(path), *TRAIN]) == 0
    return str(path)


def with_holes(table: pd.DataFrame) -> pd.DataFrame:
    """30 rows with holes in two columns that have no missing values (so the filled cells do not
    either; amount's missing values are a value the model can impute)."""
    holes = table.head(30).copy()
    holes.loc[::2, "color"] = np.nan
    holes.loc[1::3, "size"] = np.nan
    return holes


# ----------------------------------------------------------------------------- every command x format
@pytest.mark.parametrize("fmt", FORMATS)
def test_train(table, tmp_path, fmt):
    model = tmp_path / "m.pt"
    assert cli_main(["train", write(table, tmp_path, "train", fmt), "-o", str(model), *TRAIN]) == 0
    codec = TabularMDM.load(model, device="cpu").codec
    assert codec.columns == list(table.columns) and codec.is_numeric == TableCodec.fit(table).is_numeric


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample(table, model_path, tmp_path, fmt):
    """Conditions read from each format; rows written to .csv, .parquet, or as two shards into a
    directory that reads back as one table."""
    conditions = table[["color"]].head(40).copy()
    conditions.loc[::4, "color"] = np.nan
    given = write(conditions, tmp_path, "conditions", fmt)
    out = output_name(tmp_path / "out", "synth", fmt)
    (tmp_path / "out").mkdir()
    shards = [["--shard", "0/2"], ["--shard", "1/2"]] if fmt == "directory" else [[]]
    for shard in shards:
        assert cli_main(["sample", model_path, "--conditions", given, "-o", out, "--seed", "3", *shard]) == 0
    synth, rows = read_table(tmp_path / "out" if fmt == "directory" else out)
    assert rows == len(conditions) and list(synth.columns) == list(table.columns)
    known = conditions["color"].notna().to_numpy()
    assert (synth["color"][known].to_numpy() == conditions["color"][known].to_numpy()).all()
    assert synth["color"].notna().all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_evaluate(table, model_path, tmp_path, fmt, capsys):
    synth = TabularMDM.load(model_path, device="cpu").sample(60, seed=0)
    real = write(table, tmp_path, "real", fmt)
    test = write(correlated_table(50, seed=9), tmp_path, "test", fmt)
    fake = write(synth, tmp_path, "synth", fmt)
    assert cli_main(["evaluate", real, fake, "--test", test, "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"real: all 120 rows of {real}" in out and f"synthetic: all 60 rows of {fake}" in out
    assert f"test: all 50 rows of {test}" in out and "real vs real (held-out, 50 rows)" in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_impute(table, model_path, tmp_path, fmt, capsys):
    holes = with_holes(table)
    out = output_name(tmp_path, "filled", "parquet" if fmt == "csv" else "csv")
    assert cli_main(["impute", model_path, write(holes, tmp_path, "holes", fmt), "-o", out, "--seed", "0"]) == 0
    assert f"filled {int(holes.isna().sum().sum())} missing cells in 30 rows" in capsys.readouterr().out
    filled, _ = read_table(out)
    assert filled.shape == holes.shape and filled[["color", "size"]].notna().all().all()
    known = holes.notna()
    pd.testing.assert_frame_equal(filled.where(known), holes.where(known), check_dtype=False)


def test_impute_fills_a_chunk_at_a_time_into_a_complete_file(table, model_path, tmp_path, monkeypatch):
    """In chunks of 7 rows: no chunk larger reaches the model, the output is the same for a
    seed and keeps every known cell; a failure in the third chunk leaves no output file."""
    import fastmdm.data.files
    read_chunks, impute = fastmdm.data.files.read_chunks, TabularMDM.impute
    monkeypatch.setattr(fastmdm.data.files, "read_chunks", lambda files: read_chunks(files, chunk_rows=7))
    sizes = []
    monkeypatch.setattr(TabularMDM, "impute", lambda self, df, **kw: sizes.append(len(df)) or impute(self, df, **kw))
    holes = with_holes(table)
    given = write(holes, tmp_path, "holes", "parquet")
    runs = []
    for name in ("a", "b"):
        assert cli_main(["impute", model_path, given, "-o", str(tmp_path / f"{name}.parquet"), "--seed", "1"]) == 0
        runs.append(pd.read_parquet(tmp_path / f"{name}.parquet"))
    assert sizes == [7, 7, 7, 7, 2] * 2
    pd.testing.assert_frame_equal(runs[0], runs[1])
    known = holes.notna()
    pd.testing.assert_frame_equal(runs[0].where(known), holes.where(known), check_dtype=False)

    def fail_third(self, df, **kw):
        sizes.append(len(df))
        if len(sizes) % 3 == 0:
            raise RuntimeError("stopped")
        return impute(self, df, **kw)
    monkeypatch.setattr(TabularMDM, "impute", fail_third)
    sizes.clear()
    assert cli_main(["impute", model_path, given, "-o", str(tmp_path / "c.parquet")]) == 2
    assert sizes == [7, 7, 7] and sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet",
                                                                                 "holes.parquet"]


# ----------------------------------------------------------------------------- errors
def bad_inputs(root, table) -> dict[str, str]:
    """A path per way of not being a table, each a file name the error must repeat."""
    table.to_parquet(root / "parquet_named.csv")
    table.to_csv(root / "csv_named.parquet", index=False)
    (root / "latin1.csv").write_bytes("color,size\ncaf\xe9,1\n".encode("latin-1"))
    table.to_csv(root / "table.txt", index=False)
    return {"missing": str(root / "missing.csv"), "parquet as csv": str(root / "parquet_named.csv"),
            "csv as parquet": str(root / "csv_named.parquet"), "not utf-8": str(root / "latin1.csv"),
            "unknown extension": str(root / "table.txt")}


@pytest.mark.parametrize("command", ["train", "sample", "impute", "evaluate real", "evaluate synth", "evaluate test"])
def test_inputs_that_are_not_tables_are_named(table, model_path, tmp_path, capsys, command):
    good = write(table, tmp_path, "good", "parquet")
    for kind, bad in bad_inputs(tmp_path, table).items():
        argv = {"train": ["train", bad, "-o", str(tmp_path / "m.pt"), *TRAIN],
                "sample": ["sample", model_path, "--conditions", bad, "-o", str(tmp_path / "s.csv")],
                "impute": ["impute", model_path, bad, "-o", str(tmp_path / "f.csv")],
                "evaluate real": ["evaluate", bad, good],
                "evaluate synth": ["evaluate", good, bad],
                "evaluate test": ["evaluate", good, good, "--test", bad, "--target", "color"]}[command]
        assert cli_main(argv) == 2, kind
        error = capsys.readouterr().err
        assert error.startswith(f"fastmdm {command.split()[0]}: error: ") and bad in error and ACCEPTED in error, \
            (kind, error)


@pytest.mark.parametrize("command", ["sample", "impute"])
def test_unknown_output_extension_fails_before_any_work(table, model_path, tmp_path, capsys, command):
    holes = write(with_holes(table), tmp_path, "holes", "csv")
    out = str(tmp_path / "out.xlsx")
    argv = ["sample", model_path, "-n", "5"] if command == "sample" else ["impute", model_path, holes]
    assert cli_main([*argv, "-o", out]) == 2
    error = capsys.readouterr().err
    assert out in error and "unknown extension '.xlsx'" in error and ACCEPTED in error


def test_sample_conditions_must_match_the_model(table, model_path, tmp_path, capsys):
    given = write(table.head(5).assign(colour="red"), tmp_path, "c", "csv")
    assert cli_main(["sample", model_path, "--conditions", given, "-o", str(tmp_path / "s.csv")]) == 2
    assert "columns the model does not have: ['colour']" in capsys.readouterr().err
    given = write(table.head(5), tmp_path, "d", "csv")
    assert cli_main(["sample", model_path, "--conditions", given, "-n", "6", "-o", str(tmp_path / "s.csv")]) == 2
    assert "has 5 rows" in capsys.readouterr().err


def test_sample_condition_options(model_path, tmp_path, capsys):
    """--condition: a value, a set (A|B) and a range (LOW..HIGH, open ends), for every row."""
    out = str(tmp_path / "c.csv")
    argv = ["sample", model_path, "-n", "40", "--seed", "1", "-o", out]
    assert cli_main([*argv, "--condition", "color=red|blue", "--condition", "amount=10.5..",
                     "--condition", "count=..300"]) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 40 and rows["color"].isin(["red", "blue"]).all()
    assert (rows["amount"] >= 10.5).all() and (rows["count"] <= 300).all()
    assert cli_main([*argv, "--condition", "color=green"]) == 0 and (pd.read_csv(out)["color"] == "green").all()
    assert cli_main([*argv, "--rule", "amount <= count"]) == 0
    rows = pd.read_csv(out)
    assert (rows["amount"] <= rows["count"]).all()
    assert cli_main([*argv, "--condition", "count=500..100"]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli_main([*argv, "--condition", "count"]) == 2
    assert "column=value" in capsys.readouterr().err


# ----------------------------------------------------------------------------- reading
def test_evaluate_scores_a_seeded_sample_of_a_larger_table(table, model_path, tmp_path, capsys):
    real = write(table, tmp_path, "real", "parquet")
    synth = write(TabularMDM.load(model_path, device="cpu").sample(60, seed=0), tmp_path, "synth", "csv")
    assert cli_main(["evaluate", real, synth, "--max-rows", "50", "--seed", "4", "--no-reference", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"real: 50 of 120 rows (uniform, seed 4) of {real}" in out
    assert f"synthetic: 50 of 60 rows (uniform, seed 4) of {synth}" in out


def test_read_table_samples_rows_uniformly_across_chunks(tmp_path):
    """8 of 40 rows read from two files in chunks of 7: the rows kept are distinct, in table
    order, the same for a seed, and over 150 seeds every row (first chunk, last chunk) is kept
    equally often (chi-square against 30 each)."""
    frame = pd.DataFrame({"row": np.arange(40), "text": [f"v{i % 3}" for i in range(40)]})
    path = write(frame, tmp_path, "rows", "directory")
    counts = np.zeros(40)
    for seed in range(150):
        sample, rows = read_table(path, max_rows=8, seed=seed, chunk_rows=7)
        assert rows == 40 and len(sample) == 8
        assert sample["row"].is_monotonic_increasing and sample["row"].is_unique
        pd.testing.assert_frame_equal(sample, frame.iloc[sample["row"]].reset_index(drop=True))
        counts[sample["row"]] += 1
    assert chisquare(counts).pvalue > 1e-3
    assert read_table(path, max_rows=8, seed=5)[0].equals(read_table(path, max_rows=8, seed=5)[0])
    whole, rows = read_table(path, max_rows=1000)
    assert rows == 40
    pd.testing.assert_frame_equal(whole, frame)
    with pytest.raises(ValueError, match="max_rows"):
        read_table(path, max_rows=0)


def test_csv_dates_read_back_as_the_parquet_file_does(tmp_path):
    """A datetime column written to CSV is ISO text; it reads back as datetimes in every chunk
    (a zone with summer time, two offsets, as UTC instants), as from Parquet."""
    rows = 50
    when = pd.date_range("2024-03-01", periods=rows, freq="D")
    frame = pd.DataFrame({"when": when, "zoned": when.tz_localize("America/New_York"),
                          "note": ["2024-01-01" if i else "soon" for i in range(rows)], "x": np.arange(rows)})
    frame.loc[3, "when"] = pd.NaT
    csv, parquet = write(frame, tmp_path, "t", "csv"), write(frame, tmp_path, "t", "parquet")
    from_csv, _ = read_table(csv, chunk_rows=8)
    from_parquet, _ = read_table(parquet, chunk_rows=8)
    assert from_csv["when"].dtype == "datetime64[ns]" and from_csv["when"].equals(from_parquet["when"])
    assert str(from_csv["zoned"].dtype) == "datetime64[ns, UTC]"
    assert (from_csv["zoned"] == from_parquet["zoned"]).all()
    assert from_csv["note"].dtype == object and from_csv["note"].tolist() == frame["note"].tolist()
    (tmp_path / "late.csv").write_text("d\n" + "2024-01-01\n" * 8 + "later\n")
    with pytest.raises(ValueError, match="column 'd' of .*late.csv.* holds ISO dates in its first 8 rows but not"):
        read_table(tmp_path / "late.csv", chunk_rows=8)


# ----------------------------------------------------------------------------- the README loop
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_train_sample_evaluate_impute_loop(table, tmp_path, monkeypatch, suffix):
    """The commands of the README's command-line section, as written there (with a tiny model)."""
    monkeypatch.chdir(tmp_path)
    data = f"table.{suffix}"
    write(table, tmp_path, "table", suffix)
    write(with_holes(table), tmp_path, "holes", suffix)
    for command in [f"train {data} -o model.pt", f"sample model.pt -n 100 -o synth.{suffix}",
                    f"evaluate {data} synth.{suffix}", f"impute model.pt holes.{suffix} -o filled.{suffix}"]:
        extra = TRAIN if command.startswith("train") else ["--jobs", "1"] if command.startswith("evaluate") else []
        assert cli_main([*command.split(), *extra]) == 0, command
    assert read_table(f"synth.{suffix}")[1] == 100
    assert read_table(f"filled.{suffix}")[0][["color", "size"]].notna().all().all()
