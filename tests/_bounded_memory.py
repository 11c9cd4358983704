"""Worker for test_token_store's memory tests: peak RSS growth while streaming 200k rows.

argv: a directory holding small.parquet and big.parquet, then the phase, "sample" or "train".
Runs in a fresh process per phase, so that ru_maxrss (the peak resident set since the
process started) measures only that phase. The phase first runs on the small table, so
imports, thread pools and first-call allocations of the same batch shapes are in the
baseline; the growth past it is what the row count adds. Prints the growth in bytes.

"train" does what TabularMDM.fit(path) does before the model sees a batch: fit the codec
(with a reservoir and chunks small against the 200k rows; fit's defaults, 100k and 64k rows,
are sized for tables of millions of rows), encode into a token store, and gather an epoch
of batches from it in a random order as the Trainer does. The model step itself is left
out: its memory depends on the batch, not on the row count, and it is the same code as for
in-memory tokens; its peak also varies from step to step with the random masks, which at
this scale would drown what is measured.
"""
import resource
import sys
import tempfile
from pathlib import Path

import torch

from fastmdm.table_files import table_files
from fastmdm.token_store import build_token_store
from test_api import tiny


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def train_from_files(path: Path) -> None:
    _, store, _ = build_token_store(Path(tempfile.mkdtemp()) / "store", table_files(path),
                                    reservoir_rows=5_000, chunk_rows=8_192)
    order = torch.randperm(len(store))
    for start in range(0, len(store), 1024):
        store[order[start:start + 1024]]


if __name__ == "__main__":
    torch.set_num_threads(1)
    root, phase = Path(sys.argv[1]), sys.argv[2]
    if phase == "train":
        train_from_files(root / "small.parquet")
        before = peak_rss()
        train_from_files(root / "big.parquet")
    else:
        model = tiny(epochs=1, batch_size=4096).fit(root / "small.parquet", validation=None)
        model.sample_to(root / "warm.parquet", 4096, seed=0, batch_size=2048, steps=1)
        before = peak_rss()
        model.sample_to(root / "big-sample.parquet", 200_000, seed=0, batch_size=2048, steps=1)
    print(peak_rss() - before)
