"""Tables on disk, read and written a chunk of rows at a time: Parquet (pyarrow) and CSV.

A table is a .parquet or .csv file, or a directory of them (read in sorted file name order,
so the shards `out-00000-of-00004.parquet`, ... that `fastmdm sample` writes read back in
row order). The format follows the file name's extension. CSV text columns whose values are
all ISO 8601 dates or times are read as datetimes, those holding only durations as
timedeltas (`_DURATION`), and missing text reads as NaN from both formats, so a table reads
back the same from either. Nothing here holds more than one chunk of rows, except the
bounded samples of `fit_codec` and `read_table`.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from ..datasets import _iso_dates
from .categorical import DEFAULT_CATEGORY_CAP, frequent_categories
from .codec import TableCodec
from .numeric import DEFAULT_NUM_BINS
from .privacy import MIN_ROWS_PER_VALUE
from .types import (DEFAULT_MAX_CATEGORIES, check_finite, exact_values, is_numeric_plain, is_time_dtype,
                    python_scalar, to_plain)

__all__ = ["table_files", "table_format", "read_chunks", "read_table", "fit_codec", "TableWriter", "write_table",
           "DEFAULT_CHUNK_ROWS", "DEFAULT_RESERVOIR_ROWS"]

FORMATS = {".parquet": "Parquet", ".csv": "CSV"}
# Ends every error about a path that is not a readable table.
ACCEPTED = "a table is a .parquet or .csv file, or a directory of them"
# Rows per chunk when reading or encoding: a few MB of pandas frame for typical tables.
DEFAULT_CHUNK_ROWS = 65_536
# Rows the codec fits its quantile bins on. Quantile error is ~sqrt(p(1-p)/n) <= 0.0016 of a
# column's mass at 100k rows, well under the 1/32 a default bin holds.
DEFAULT_RESERVOIR_ROWS = 100_000


def table_format(path: str | os.PathLike) -> str:
    """"Parquet" or "CSV", by the file name's extension (any case); ValueError for another one.
    Writers call it before any work, so a mistyped output name fails at once."""
    suffix = Path(path).suffix
    if suffix.lower() not in FORMATS:
        raise ValueError(f"{os.fspath(path)!r}: unknown extension {suffix!r}; {ACCEPTED}")
    return FORMATS[suffix.lower()]


def table_files(path: str | os.PathLike) -> list[Path]:
    """The files of a table: [path] for a file, the sorted .parquet/.csv files of a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise ValueError(f"directory {os.fspath(path)!r} holds no .parquet or .csv files; {ACCEPTED}")
        if len({table_format(p) for p in files}) > 1:
            raise ValueError(f"directory {os.fspath(path)!r} mixes Parquet and CSV files; keep one format")
        return files
    if not path.is_file():
        kind = FORMATS.get(path.suffix.lower(), "table")
        raise FileNotFoundError(f"no such {kind} file or directory: {os.fspath(path)!r}; {ACCEPTED}")
    table_format(path)
    return [path]


_PARQUET_MAGIC = b"PAR1"


def _as_dates(column: pd.Series) -> pd.Series:
    """ISO 8601 text as datetimes; ValueError if it is not. Text with offsets becomes UTC
    instants: a CSV holds offsets, not zones, and a zone with summer time writes two, so
    chunks of one column would otherwise come back in different fixed-offset types."""
    dates = _iso_dates(column)
    return dates.dt.tz_convert("UTC") if dates.dt.tz is not None else dates


# A duration as to_csv writes a timedelta ("1 days 02:03:04.5"), or in ISO 8601 ("P1DT2H3M4.5S").
_DURATION = (r"-?\d+ days? [+-]?\d{1,2}:\d{2}:\d{2}(?:\.\d+)?"
             r"|-?P(?:\d+D)?(?:T(?:\d+H)?(?:\d+M)?(?:\d+(?:\.\d+)?S)?)?")


def _as_durations(column: pd.Series) -> pd.Series:
    """Duration text (`_DURATION`) as timedelta64; ValueError if it is not."""
    present = column.dropna()
    if (pd.api.types.infer_dtype(present) != "string" or len(present) == 0
            or not present.str.fullmatch(_DURATION).all()):
        raise ValueError("not durations")
    return pd.to_timedelta(column)


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    with open(path, "rb") as handle:
        if handle.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC:
            raise ValueError(f"{os.fspath(path)!r} is a Parquet file, not CSV: name it .parquet; {ACCEPTED}")
    # Text columns are read as text in every chunk: left to inference, a chunk whose values
    # all look like numbers ("7") would come back numeric and no longer match the category.
    # The first chunk decides which of them hold dates or durations.
    try:
        try:
            head = pd.read_csv(path, nrows=chunk_rows, skipinitialspace=True)
        except pd.errors.EmptyDataError as err:
            raise ValueError(f"CSV file {os.fspath(path)!r} has no columns (no header row)") from err
        text = {c: str for c in head.columns if head[c].dtype == object}
        parsers = {}
        for name in text:
            for kind, parse in (("ISO dates", _as_dates), ("durations", _as_durations)):
                try:
                    parse(head[name])
                    parsers[name] = kind, parse
                    break
                except (ValueError, TypeError):   # not this kind: the column stays text
                    pass
        for chunk in pd.read_csv(path, chunksize=chunk_rows, skipinitialspace=True, dtype=text):
            for name, (kind, parse) in parsers.items():
                try:
                    chunk[name] = parse(chunk[name])
                except (ValueError, TypeError) as err:
                    raise ValueError(f"column {name!r} of {os.fspath(path)!r} holds {kind} in its first "
                                     f"{len(head):,} rows but not in later ones; clean it or store the table "
                                     "as Parquet") from err
            yield chunk
    except UnicodeDecodeError as err:
        raise ValueError(f"{os.fspath(path)!r} is not a UTF-8 CSV file ({err.reason}); save it as UTF-8; "
                         f"{ACCEPTED}") from err


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    # pre_buffer (pyarrow's default) reads ahead without limit: its memory grew with the
    # file (56 MB for a 1M-row, 12-column file); without it, reading stays at ~5 MB.
    try:
        file = pq.ParquetFile(path, pre_buffer=False)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{os.fspath(path)!r} is not a Parquet file ({err}); {ACCEPTED}") from err
    for batch in file.iter_batches(batch_size=chunk_rows):
        chunk = batch.to_pandas()
        # pyarrow gives a missing text cell as None, read_csv as NaN: NaN here too, so a table
        # reads the same from either format (and compares equal cell by cell).
        for name in chunk.columns[chunk.dtypes == object]:
            chunk[name] = chunk[name].mask(chunk[name].isna())
        yield chunk


def read_chunks(files: Sequence[Path], chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """DataFrames of at most chunk_rows rows, file after file; every file must have the same columns."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    columns = None
    rows = 0
    for path in files:
        reader = _parquet_chunks if table_format(path) == "Parquet" else _csv_chunks
        for chunk in reader(path, chunk_rows):
            if columns is None:
                columns = list(chunk.columns)
            elif list(chunk.columns) != columns:
                raise ValueError(f"{os.fspath(path)!r} has columns {list(chunk.columns)}, "
                                 f"but {os.fspath(files[0])!r} has {columns}")
            if len(chunk):
                rows += len(chunk)
                yield chunk.reset_index(drop=True)
    if rows == 0:
        raise ValueError(f"the table in {[os.fspath(p) for p in files]} has no rows")


# --------------------------------------------------------------------------- codec fitting
def _common_dtype(a, b):
    """The dtype pandas gives a column whose chunks have dtypes a and b."""
    if a == b:
        return a
    if isinstance(a, pd.CategoricalDtype) and isinstance(b, pd.CategoricalDtype):
        return pd.CategoricalDtype(list(dict.fromkeys([*a.categories, *b.categories])))
    numeric = [isinstance(d, np.dtype) and d.kind in "iuf" for d in (a, b)]
    return np.result_type(a, b) if all(numeric) else np.dtype(object)


class _ColumnPass:
    """What the codec must see of a column exactly, gathered in one pass over its chunks: its
    dtype, whether it has missing values, and how often each value occurs (in the codec's
    plain form: datetimes as integer counts). A column that may be numeric stops counting once
    it has more than `limit` values or a non-integer one (it is then binned, from the
    reservoir); `limit` None counts every value (text, or listed as categorical)."""

    def __init__(self, name, limit: int | None):
        self.name, self.limit = name, limit
        self.dtype = None
        self.has_missing = False
        self.present = 0
        self.counts: Counter | None = Counter()   # None once the column is known to be binned
        self.declared: dict = {}                   # a category dtype's declared categories, in order

    def update(self, series: pd.Series) -> None:
        self.dtype = series.dtype if self.dtype is None else _common_dtype(self.dtype, series.dtype)
        plain = to_plain(self.name, series, series.dtype)
        check_finite(self.name, plain)
        missing = plain.isna().to_numpy()
        self.has_missing |= bool(missing.any())
        self.present += int((~missing).sum())
        if self.counts is None:
            return
        if isinstance(series.dtype, pd.CategoricalDtype):
            self.declared.update(dict.fromkeys(python_scalar(v) for v in series.cat.categories))
        may_be_binned = self.limit is not None and is_numeric_plain(plain.dtype)
        if may_be_binned:
            x = exact_values(plain)
            if not np.all(x == np.round(x)):
                self.counts = None
                return
        self.counts.update({python_scalar(v): int(c) for v, c in plain[~missing].value_counts(sort=False).items()})
        if may_be_binned and len(self.counts) > self.limit:
            self.counts = None

    def categories(self) -> list:
        """Every value, ordered as TableCodec.fit orders them: a category dtype's declared
        order, else sorted when comparable; numbers in the column's dtype."""
        if isinstance(self.dtype, pd.CategoricalDtype):
            return list(self.declared)
        values = list(self.counts)
        try:
            values = sorted(values)
        except TypeError:
            pass
        if (is_numeric_plain(self.dtype) or self.dtype == bool) and not is_time_dtype(self.dtype):
            values = pd.Series(values, dtype=self.dtype).tolist()
        return values

    def fix_vocabulary(self, entry: dict, category_cap: int | None) -> None:
        """Give a categorical column's state (fitted on the reservoir) the table's frequent
        categories by exact count (`frequent_categories`: held by at least MIN_ROWS_PER_VALUE
        rows, within category_cap) and the exact count of the rows in its rare pool; a
        category dtype keeps the declared categories `CategoricalColumn` keeps."""
        values = self.categories()
        count = [self.counts.get(v, 0) for v in values]
        kept = frequent_categories(pd.Series(count, index=pd.Index(values, dtype=object), dtype=np.int64),
                                   category_cap)
        if entry["domain"] is not None:
            entry["domain"] = [v for v, n in zip(values, count) if n == 0 or n >= MIN_ROWS_PER_VALUE]
        entry["categories"] = [v for v in values if v in kept]
        entry["counts"] = [n for v, n in zip(values, count) if v in kept]
        entry["rare_rows"] = sum(count) - sum(entry["counts"])


def _keep_smallest(frame: pd.DataFrame | None, keys: np.ndarray | None, chunk: pd.DataFrame,
                   chunk_keys: np.ndarray, size: int):
    """Bottom-k sampling: the `size` rows with the smallest random keys so far are a uniform
    sample without replacement of every row seen."""
    if frame is not None and len(frame) == size:
        enters = chunk_keys < keys.max()   # only these can displace a kept row
        chunk, chunk_keys = chunk[enters], chunk_keys[enters]
        if len(chunk) == 0:
            return frame, keys
    if frame is not None:
        chunk = pd.concat([frame, chunk], ignore_index=True)
        chunk_keys = np.concatenate([keys, chunk_keys])
    if len(chunk) > size:
        keep = np.sort(np.argpartition(chunk_keys, size - 1)[:size])
        chunk, chunk_keys = chunk.iloc[keep].reset_index(drop=True), chunk_keys[keep]
    return chunk, chunk_keys


def fit_codec(chunks: Iterable[pd.DataFrame], *, num_bins: int = DEFAULT_NUM_BINS,
              categorical: Sequence[str] | None = None, max_categories: int = DEFAULT_MAX_CATEGORIES,
              category_cap: int | None = DEFAULT_CATEGORY_CAP, reservoir_rows: int = DEFAULT_RESERVOIR_ROWS,
              seed: int = 0) -> TableCodec:
    """A TableCodec for a table seen one chunk at a time, in bounded memory.

    One pass keeps a uniform reservoir sample of `reservoir_rows` rows and, exactly over all
    rows, each column's dtype, whether it has missing values, and the counts of the values
    of categorical columns. `TableCodec.fit` then runs on the reservoir with the categorical
    columns decided by the exact pass, and the exact categories (those at least
    MIN_ROWS_PER_VALUE rows hold, up to category_cap, chosen by exact counts), rare-pool
    counts and missing flags replace the reservoir's. So every frequent category of the table
    has its token and the others share the rare token (as does a category only seen later,
    at encode time, in any codec), while numeric bins, their atoms (values k reservoir rows
    hold, so at least k table rows: `fastmdm.data.privacy`), the quantile sketch they decode
    from and the unique-key check come from the reservoir. With at most reservoir_rows rows the
    result equals TableCodec.fit on the whole table.

    Memory: the reservoir, one chunk, and the value counts of the categorical columns.
    """
    if isinstance(reservoir_rows, bool) or not isinstance(reservoir_rows, int) or reservoir_rows < 1:
        raise ValueError(f"reservoir_rows must be a positive integer, got {reservoir_rows!r}")
    rng = np.random.default_rng(seed)
    passes: dict = {}
    reservoir = keys = None
    rows = 0
    for chunk in chunks:
        if not passes:
            listed = set(categorical or ())
            passes = {name: _ColumnPass(name, None if name in listed else max_categories) for name in chunk.columns}
        for name, column in passes.items():
            column.update(chunk[name])
        reservoir, keys = _keep_smallest(reservoir, keys, chunk, rng.random(len(chunk)), reservoir_rows)
        rows += len(chunk)
    if reservoir is None:
        raise ValueError("cannot fit a codec on a table with no rows")

    for name, column in passes.items():
        if column.present and reservoir[name].isna().all():
            raise ValueError(f"column {name!r} has {column.present} values in {rows} rows but none in the "
                             f"reservoir sample of {len(reservoir)}: raise reservoir_rows")
        if column.counts is None and not (is_numeric_plain(column.dtype) or is_time_dtype(column.dtype)):
            raise ValueError(f"column {name!r} holds numbers in some chunks and text in others (in a CSV, "
                             "a non-numeric value in a numeric column); clean it or store the table as Parquet")
    if categorical is None:
        categorical = [name for name, column in passes.items() if column.counts is not None]
    reservoir = reservoir.astype({name: column.dtype for name, column in passes.items()})
    state = TableCodec.fit(reservoir, num_bins=num_bins, categorical=categorical, max_categories=max_categories,
                           category_cap=category_cap).state_dict()
    for entry in state["columns"]:
        column = passes[entry["name"]]
        entry["has_missing"] = column.has_missing
        if entry["kind"] == "categorical":
            column.fix_vocabulary(entry, category_cap)
    return TableCodec.from_state_dict(state)


# --------------------------------------------------------------------------- writing
class TableWriter:
    """Appends DataFrames to a Parquet or CSV file (chosen by the suffix), one batch at a time.

    The file is written under a temporary name and renamed when closed without error, so a
    file at `path` is always complete. `example`: a frame with the table's columns and
    dtypes and no missing values, which fixes the Parquet schema (a batch whose text column
    happens to be all missing would otherwise infer a null type). A column the example cannot
    type (a column none of whose values a model may generate is all missing) takes its type
    from the first batch written.
    """

    def __init__(self, path: str | os.PathLike, example: pd.DataFrame):
        self.path = Path(path)
        self.format = table_format(self.path)
        self.rows = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self.format == "Parquet":
            import pyarrow as pa
            self._schema = pa.Schema.from_pandas(example, preserve_index=False)
            self._writer = None
            if not any(pa.types.is_null(field.type) for field in self._schema):
                self._open_parquet()
        else:
            self._writer = open(self._tmp, "w", newline="")
            example.iloc[:0].to_csv(self._writer, index=False)

    def _open_parquet(self, first: pd.DataFrame | None = None) -> None:
        """The Parquet writer, its untyped columns typed by `first` (a batch) when given."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        if first is not None:
            inferred = pa.Schema.from_pandas(first, preserve_index=False)
            self._schema = pa.schema([inferred.field(field.name) if pa.types.is_null(field.type) else field
                                      for field in self._schema], metadata=self._schema.metadata)
        self._writer = pq.ParquetWriter(self._tmp, self._schema)

    def write(self, frame: pd.DataFrame) -> None:
        if self.format == "Parquet":
            import pyarrow as pa
            if self._writer is None:
                self._open_parquet(frame)
            self._writer.write_table(pa.Table.from_pandas(frame, schema=self._schema, preserve_index=False))
        else:
            frame.to_csv(self._writer, header=False, index=False)
        self.rows += len(frame)

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if self._writer is None:   # nothing written: the example's schema as it is
            self._open_parquet()
        self._writer.close()
        if error_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- whole tables
def read_table(path: str | os.PathLike, *, max_rows: int | None = None, seed: int = 0,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[pd.DataFrame, int]:
    """(frame, rows in the table): a table file or directory read into memory, whole, or with
    `max_rows` a uniform sample of that many rows without replacement (seeded, in table order)
    when the table has more. Read a chunk at a time, so memory is the sample plus one chunk
    whatever the table's size."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    rng = np.random.default_rng(seed)
    frame = keys = None
    rows = 0
    chunks = []
    for chunk in read_chunks(table_files(path), chunk_rows):
        rows += len(chunk)
        if max_rows is None:
            chunks.append(chunk)
        else:
            frame, keys = _keep_smallest(frame, keys, chunk, rng.random(len(chunk)), max_rows)
    if max_rows is None:
        frame = pd.concat(chunks, ignore_index=True)
    return frame.reset_index(drop=True), rows


def write_table(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    """Write a frame to a Parquet or CSV file (by the suffix), complete or not at all."""
    with TableWriter(path, frame) as writer:
        writer.write(frame)
