"""Worker for test_token_store's memory tests: peak RSS growth while streaming 200k rows.

argv: a directory holding small.parquet and big.parquet, then the phase, "sample" or "train".
The phase first runs on the small table, so imports, thread pools and first-call
allocations of the same batch shapes are in the baseline; then the kernel's peak-RSS mark
is reset to the current RSS and the phase runs on the big table. Prints the peak growth in
bytes: what the row count adds, plus the working memory of one batch. (ru_maxrss would not
do: it keeps the peak of the parent process that forked this one.)

"train" does what TabularMDM.fit(path) does before the model sees a batch: fit the codec
(with a reservoir and chunks small against the 200k rows; fit's defaults, 100k and 64k rows,
are sized for tables of millions of rows), encode into a token store, and gather an epoch
of batches from it in a random order as the Trainer does. The model step itself is left
out: its memory depends on the batch, not on the row count, and it is the same code as for
in-memory tokens; its peak also varies from step to step with the random masks, which at
this scale would drown what is measured.
"""
import sys
import tempfile
from pathlib import Path

import torch

from fastmdm.data.files import table_files
from fastmdm.token_store import build_token_store
from test_api import tiny


def rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


def reset_peak() -> int:
    """Resets VmHWM to the current RSS (Linux >= 4.0) and returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss("VmRSS")


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
        before = reset_peak()
        train_from_files(root / "big.parquet")
    else:
        model = tiny(epochs=1, batch_size=4096).fit(root / "small.parquet", validation=None)
        model.sample_to(root / "warm.parquet", 4096, seed=0, batch_size=2048, steps=1)
        before = reset_peak()
        model.sample_to(root / "big-sample.parquet", 200_000, seed=0, batch_size=2048, steps=1)
    print(rss("VmHWM") - before)
