"""On-disk token store: a table's token rows, memory-mapped, the smallest unsigned dtype per column.

Training from files larger than memory encodes them once, a chunk at a time, into a store;
the Trainer gathers its batches from the memory map, so resident memory holds the pages
those batches touch (file-backed: the OS drops them under pressure), never a DataFrame of
the table and never 8 bytes per cell. Under DDP each rank gathers only its share of each
batch.

A store directory holds `codec.pt` (the codec that made it), `train/` and optionally
`validation/` (each `tokens.bin` + `meta.json`), and `recipe.json`, written last: a store
whose recipe matches a request (same files, sizes and modification times, same split and
codec settings) is reused instead of encoded again, e.g. when training resumes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from numpy.lib.recfunctions import structured_to_unstructured, unstructured_to_structured

from .data import TableCodec
from .data.files import DEFAULT_CHUNK_ROWS, fit_codec, read_chunks, table_files

__all__ = ["TokenStore", "TokenStoreWriter", "build_token_store", "open_token_store", "prepare_token_store"]

_TOKENS, _META, _CODEC, _RECIPE = "tokens.bin", "meta.json", "codec.pt", "recipe.json"
_STORE_VERSION = 1


def _record_dtype(cardinalities: Sequence[int]) -> np.dtype:
    """One packed record per row, column l in the smallest unsigned dtype holding 0..K_l-1."""
    return np.dtype([(f"c{l}", np.min_scalar_type(max(k - 1, 0))) for l, k in enumerate(cardinalities)])


class TokenStore:
    """Token rows [N, L] of a store directory, memory-mapped read-only.

    Indexing with row indices (a tensor, an array, a list) or a slice gives int64 tensors
    [n, L], so a store stands wherever the Trainer takes a token tensor.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta = json.loads((self.directory / _META).read_text())
        if meta.get("version") != _STORE_VERSION:
            raise ValueError(f"{os.fspath(self.directory)!r} is not a fastmdm token store of this version")
        self.cardinalities = meta["cardinalities"]
        self.record_dtype = _record_dtype(self.cardinalities)
        self.rows = meta["rows"]
        expected = self.rows * self.record_dtype.itemsize
        actual = (self.directory / _TOKENS).stat().st_size
        if actual != expected:
            raise ValueError(f"{os.fspath(self.directory / _TOKENS)!r} has {actual} bytes, expected {expected}")
        # numpy cannot map an empty file; an empty store is an empty array.
        self._records = (np.memmap(self.directory / _TOKENS, dtype=self.record_dtype, mode="r", shape=(self.rows,))
                         if self.rows else np.empty(0, self.record_dtype))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, len(self.cardinalities))

    def __len__(self) -> int:
        return self.rows

    @property
    def nbytes(self) -> int:
        return self.rows * self.record_dtype.itemsize

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        records = self._records[index]
        return torch.from_numpy(structured_to_unstructured(np.asarray(records), dtype=np.int64))


class TokenStoreWriter:
    """Appends token chunks [n, L] (values 0..K_l-1) to a new store directory; memory: one chunk.

    >>> with TokenStoreWriter(directory, codec.cardinalities) as writer:
    ...     writer.append(tokens)
    >>> store = TokenStore(directory)
    """

    def __init__(self, directory: str | os.PathLike, cardinalities: Sequence[int]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cardinalities = [int(k) for k in cardinalities]
        self._dtype = _record_dtype(self.cardinalities)
        self._limits = np.asarray(self.cardinalities)
        self._handle = open(self.directory / _TOKENS, "wb")
        self.rows = 0

    def append(self, tokens: np.ndarray | torch.Tensor) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != len(self.cardinalities):
            raise ValueError(f"token chunks must be [n, {len(self.cardinalities)}], got {tokens.shape}")
        if ((tokens < 0) | (tokens >= self._limits)).any():
            raise ValueError("token values must lie in 0..K_l-1 for every column")
        self._handle.write(unstructured_to_structured(tokens, dtype=self._dtype).tobytes())
        self.rows += len(tokens)

    def __enter__(self) -> "TokenStoreWriter":
        return self

    def __exit__(self, *error) -> None:
        self._handle.close()
        meta = {"version": _STORE_VERSION, "rows": self.rows, "cardinalities": self.cardinalities}
        (self.directory / _META).write_text(json.dumps(meta))


# --------------------------------------------------------------------------- from table files
def _fingerprint(codec: TableCodec) -> str:
    state = json.dumps(codec.state_dict(), sort_keys=True, default=lambda t: t.tolist())
    return hashlib.sha256(state.encode()).hexdigest()


def _files_signature(files: Sequence[Path]) -> list:
    return [[os.fspath(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _read_recipe(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _RECIPE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _clear(directory: Path) -> None:
    """Remove a previous store's entries; refuse a directory that holds anything else."""
    entries = {_CODEC, _RECIPE, "train", "validation"}
    if directory.exists():
        others = [p.name for p in directory.iterdir() if p.name not in entries]
        if others:
            raise ValueError(f"{os.fspath(directory)!r} is not a token store (it holds {sorted(others)[:5]}); "
                             "give an empty or new directory")
        for name in entries:
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)


def _counted(chunks: Iterator[pd.DataFrame], description: str, progress: bool) -> Iterator[pd.DataFrame]:
    """The chunks, counted in rows on a progress bar (terminals only) if `progress`."""
    if not progress:
        yield from chunks
        return
    from tqdm.auto import tqdm
    with tqdm(desc=description, unit="row", unit_scale=True, disable=None) as bar:
        for chunk in chunks:
            bar.update(len(chunk))
            yield chunk


def build_token_store(directory: str | os.PathLike, files: Sequence[Path], *,
                      validation: float | Sequence[Path] | None = None, codec: TableCodec | None = None,
                      seed: int = 0, chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: bool = False,
                      **fit_options) -> tuple[TableCodec, TokenStore, TokenStore | None]:
    """Encode table files into a store at `directory`, or reuse the store there if its recipe matches.

    validation: a fraction of rows that a seeded coin per row sends to a validation store
    (so their count is close to, not exactly, that fraction), or other files encoded whole
    as the validation store, or None. codec: a fixed one (when resuming), or None to fit
    one with `fit_codec` over every file, validation files included (as `TabularMDM.fit`
    does in memory); fit_options (num_bins, categorical, max_categories, reservoir_rows)
    go to fit_codec. Two passes over the files: fitting, then encoding (with progress bars
    on a terminal if `progress`).
    Returns (codec, train store, validation store or None).
    """
    directory = Path(directory)
    fraction = validation if isinstance(validation, (int, float)) and not isinstance(validation, bool) else None
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {validation}")
    validation_files = list(validation) if validation is not None and fraction is None else []
    recipe = json.loads(json.dumps({
        "version": _STORE_VERSION, "files": _files_signature(files), "seed": seed, "chunk_rows": chunk_rows,
        "validation": fraction if fraction is not None else _files_signature(validation_files),
        "fit": fit_options}))
    stored = _read_recipe(directory)
    if stored is not None and stored["inputs"] == recipe and (codec is None or _fingerprint(codec) == stored["codec"]):
        return open_token_store(directory)

    _clear(directory)
    if codec is None:
        codec = fit_codec(_counted(read_chunks([*files, *validation_files], chunk_rows), "fitting codec", progress),
                          seed=seed, **fit_options)
    torch.save(codec.state_dict(), directory / _CODEC)
    rng = np.random.default_rng([seed, 1])   # a stream apart from the reservoir's keys
    with TokenStoreWriter(directory / "train", codec.cardinalities) as train, \
            TokenStoreWriter(directory / "validation", codec.cardinalities) as held_out:
        for chunk in _counted(read_chunks(files, chunk_rows), "encoding", progress):
            tokens = codec.encode(chunk).numpy()
            if fraction is None:
                train.append(tokens)
            else:
                to_validation = rng.random(len(tokens)) < fraction
                train.append(tokens[~to_validation])
                held_out.append(tokens[to_validation])
        for chunk in read_chunks(validation_files, chunk_rows) if validation_files else ():
            held_out.append(codec.encode(chunk).numpy())
    if train.rows == 0:
        raise ValueError("no training rows are left after the validation split")
    (directory / _RECIPE).write_text(json.dumps({"inputs": recipe, "codec": _fingerprint(codec)}))
    return open_token_store(directory)


def open_token_store(directory: str | os.PathLike) -> tuple[TableCodec, TokenStore, TokenStore | None]:
    """(codec, train store, validation store or None) of a directory that build_token_store wrote."""
    directory = Path(directory)
    if _read_recipe(directory) is None:
        raise FileNotFoundError(f"no complete token store in {os.fspath(directory)!r}")
    codec = TableCodec.from_state_dict(torch.load(directory / _CODEC, weights_only=True))
    validation = TokenStore(directory / "validation")
    return codec, TokenStore(directory / "train"), validation if len(validation) else None


def prepare_token_store(data: str | os.PathLike, directory: str | os.PathLike | None, *,
                        cleanup: contextlib.ExitStack, validation=None, **options
                        ) -> tuple[TableCodec, TokenStore, TokenStore | None]:
    """build_token_store for `TabularMDM.fit`, once per job: under torchrun rank 0 builds the
    store and the other ranks open it after a barrier. directory None: a temporary directory
    that `cleanup` removes (fine on one machine; several machines need a shared directory)."""
    import torch.distributed as dist
    from .train import _distributed
    rank, world = _distributed()
    if directory is None:
        shared = [tempfile.mkdtemp(prefix="fastmdm-tokens-") if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(shared)
        directory = shared[0]
        if rank == 0:
            cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
    if isinstance(validation, (str, os.PathLike)):
        validation = table_files(validation)
    elif validation is not None and (isinstance(validation, bool) or not isinstance(validation, (int, float))):
        raise TypeError("when training from files, validation must be a fraction, a path of Parquet/CSV "
                        f"files, or None; got {type(validation).__name__}")
    files = table_files(data)
    if rank == 0:
        result = build_token_store(directory, files, validation=validation, **options)
    if world > 1:
        dist.barrier()
    return result if rank == 0 else open_token_store(directory)
