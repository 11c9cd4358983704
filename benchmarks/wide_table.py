"""The whole stack on a wide table (default 1,000 columns) on CPU: codec, model, training, sampling.

    python benchmarks/wide_table.py                        # L = 1000, writes benchmarks/results/wide_table.md
    python benchmarks/wide_table.py --columns 200 --rows 128 --no-write

A synthetic table, half categorical (2..50 categories) and half numeric, both with missing
values, goes through the public API: TableCodec round trip, TabularMDM.fit for one step, one
more (warm) step timed on its own through fastmdm.train.Trainer, and sampling at S = L and L/4.
Peak memory is the process's peak resident set size after each phase (ru_maxrss), so each
figure includes every phase before it. Wall times depend on the machine's load; CPU times
(time.process_time) much less, hence both. On an oversubscribed machine
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
    """fn(), its wall seconds and its CPU seconds (all threads of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


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
    from fastmdm.train import TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    columns = args.columns
    report = [("start", 0.0, 0.0, peak_rss_mib(), "")]
    df, wall, cpu = timed(lambda: wide_frame(args.rows, columns))
    report.append(("make the table", wall, cpu, peak_rss_mib(), f"{args.rows} rows x {columns} columns"))

    def codec_round_trip():
        codec = TableCodec.fit(df)
        return codec, codec.decode(codec.encode(df))

    (codec, decoded), wall, cpu = timed(codec_round_trip)
    categorical = list(df.columns[::2])
    round_trip = bool((decoded[categorical].fillna("NA") == df[categorical].fillna("NA")).all().all())
    if not round_trip:
        raise AssertionError("categorical columns did not survive encode/decode")
    report.append(("codec fit / encode / decode", wall, cpu, peak_rss_mib(),
                   f"vocabulary {int(codec.offsets[-1])} tokens; categorical round trip exact"))

    model = TabularMDM(epochs=1, batch_size=args.rows, progress=False, device="cpu")
    _, wall, cpu = timed(lambda: model.fit(df, validation=None))
    report.append(("model + first training step", wall, cpu, peak_rss_mib(),
                   f"{sum(p.numel() for p in model.denoiser.parameters()):,} parameters"))
    # One more step, timed on its own: a Trainer over the fitted (EMA) weights, made trainable.
    trainer = Trainer(model.denoiser.requires_grad_(True), model.schedule.requires_grad_(True),
                      model.codec.mask_ids, model.codec.offsets,
                      TrainConfig(epochs=1, batch_size=args.rows, progress=False))
    history, wall, cpu = timed(lambda: trainer.fit(model.codec.encode(df)))
    report.append(("one warm training step", wall, cpu, peak_rss_mib(),
                   f"{args.rows} rows x K=2 masks, NELBO {history[-1].train_nelbo:.0f} nats/row"))

    for steps in (columns, max(1, columns // 4)):
        synth, wall, cpu = timed(lambda: model.sample(args.sample_rows, steps=steps, seed=0))
        if synth.shape != (args.sample_rows, columns):
            raise AssertionError(f"sampled {synth.shape}, expected {(args.sample_rows, columns)}")
        report.append((f"sampling, S = {steps}", wall, cpu, peak_rss_mib(),
                       f"{args.sample_rows} rows, {args.sample_rows / cpu:.3f} rows per CPU second"))

    lines = [f"# Wide table on CPU: L = {columns}", "",
             f"`python benchmarks/wide_table.py --columns {columns} --rows {args.rows} "
             f"--sample-rows {args.sample_rows}{f' --threads {args.threads}' if args.threads else ''}`; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{platform.processor() or platform.machine()}. Wall seconds depend on the machine's load (it was "
             f"shared); CPU seconds (all threads of the process) much less. Peak RSS is the process's peak so far.",
             "", "| phase | wall s | CPU s | peak RSS MiB | notes |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {wall:.2f} | {cpu:.2f} | {rss:.0f} | {note} |" for name, wall, cpu, rss, note in report]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
