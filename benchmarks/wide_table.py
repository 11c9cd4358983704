"""The whole stack on a wide table (default 1,000 columns) on CPU: codec, model, training, sampling.

    python benchmarks/wide_table.py                        # L = 1000, writes benchmarks/results/wide_table.md
    python benchmarks/wide_table.py --columns 200 --rows 128 --no-write

A synthetic table, half categorical (2..50 categories) and half numeric, both with missing
values, goes through the public API: TableCodec round trip, TabularMDM.fit for two epochs of
one step each (the second is the timed, warm step), and sampling at S = L and S = L/4.
Peak memory is the process's peak resident set size after each phase (ru_maxrss), so each
figure includes every phase before it. Times are wall clock on a shared machine: indicative. On an oversubscribed machine
torch's OpenMP threads spin: one sampling run took 33x longer with 2 threads than with 1.
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "wide_table.md"


def wide_frame(rows: int, columns: int, seed: int = 0) -> pd.DataFrame:
    """Alternating categorical and numeric columns, about 5% missing in each."""
    rng = np.random.default_rng(seed)
    data = {}
    for l in range(columns):
        missing = rng.random(rows) < 0.05
        if l % 2 == 0:
            categories = np.array([f"c{k}" for k in range(int(rng.integers(2, 51)))], dtype=object)
            values = categories[rng.integers(0, len(categories), rows)]
            values[missing] = None
        else:
            values = rng.normal(l, 1 + l % 7, rows)
            values[missing] = np.nan
        data[f"col{l}"] = values
    return pd.DataFrame(data)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=64, help="training rows = one batch (one step per epoch)")
    parser.add_argument("--sample-rows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's); 1 avoids OpenMP spinning on a loaded machine")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    args = parser.parse_args(argv)

    from fastmdm import TableCodec, TabularMDM

    if args.threads:
        torch.set_num_threads(args.threads)
    columns = args.columns
    report = [("start", 0.0, peak_rss_mib(), "")]
    df, seconds = timed(lambda: wide_frame(args.rows, columns))
    report.append(("make the table", seconds, peak_rss_mib(), f"{args.rows} rows x {columns} columns"))

    codec, seconds = timed(lambda: TableCodec.fit(df))
    tokens, encode_seconds = timed(lambda: codec.encode(df))
    decoded, decode_seconds = timed(lambda: codec.decode(tokens))
    categorical = list(df.columns[::2])
    round_trip = bool((decoded[categorical].fillna("NA") == df[categorical].fillna("NA")).all().all())
    if not round_trip:
        raise AssertionError("categorical columns did not survive encode/decode")
    report.append(("codec fit / encode / decode", seconds + encode_seconds + decode_seconds, peak_rss_mib(),
                   f"vocabulary {int(codec.offsets[-1])} tokens; categorical round trip exact"))

    model = TabularMDM(epochs=2, batch_size=args.rows, progress=False, device="cpu")
    _, seconds = timed(lambda: model.fit(df, validation=None))
    step = model.history[-1].seconds
    report.append(("training, 2 steps", seconds, peak_rss_mib(),
                   f"warm step {step:.2f} s ({args.rows} rows x K=2 masks); "
                   f"{sum(p.numel() for p in model.denoiser.parameters()):,} parameters; "
                   f"NELBO {model.history[-1].train_nelbo:.0f} nats/row"))

    for steps in (columns, max(1, columns // 4)):
        synth, seconds = timed(lambda: model.sample(args.sample_rows, steps=steps, seed=0))
        if synth.shape != (args.sample_rows, columns):
            raise AssertionError(f"sampled {synth.shape}, expected {(args.sample_rows, columns)}")
        report.append((f"sampling, S = {steps}", seconds, peak_rss_mib(),
                       f"{args.sample_rows} rows, {args.sample_rows / seconds:.2f} rows/s"))

    lines = [f"# Wide table on CPU: L = {columns}", "",
             f"`python benchmarks/wide_table.py --columns {columns} --rows {args.rows} "
             f"--sample-rows {args.sample_rows}{f' --threads {args.threads}' if args.threads else ''}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{platform.processor() or platform.machine()}. Wall-clock seconds on a shared machine (indicative); "
             "peak RSS is the process's peak so far.", "",
             "| phase | seconds | peak RSS MiB | notes |", "|---|---|---|---|"]
    lines += [f"| {name} | {sec:.2f} | {rss:.0f} | {note} |" for name, sec, rss, note in report]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
