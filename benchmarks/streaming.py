"""Large tables: peak memory and speed of streaming sampling and of training from files.

Every measurement runs in a fresh process. Memory is the peak resident set (VmHWM) during
the measured operation, with the mark reset to the current RSS just before it (ru_maxrss
would keep the peak of the parent that forked the process), and that starting RSS.

- sample: a default-size model samples N rows at S = ceil(L/4) steps straight into Parquet
  (`TabularMDM.sample_to`, what `fastmdm sample -o out.parquet` runs) at the default batch
  size; rows/s and peak RSS for increasing N. For contrast, the in-memory route at the
  smaller Ns: `sample(N)` then `to_parquet`. The model is trained for one epoch on 4096
  Adult rows: its size, not its quality, sets speed and memory.
- train: UCI Adult resampled with replacement to N rows, written to Parquet a chunk at a
  time. Then `build_token_store` (reservoir codec fit and chunked encoding into the
  memory-mapped store: seconds and rows/s) and training steps of the default model
  reading its batches from the store (s/step over --train-steps timed steps, of which the
  gather from the store; epoch time = steps per epoch x s/step, an estimate); peak RSS over
  both. For contrast, the in-memory route (read_parquet, TableCodec.fit, encode to int64,
  the same steps) in another process (--train-routes picks the routes).

Results go to benchmarks/results/streaming_runs.jsonl (one line per measurement) and the
report to benchmarks/results/streaming.md.

    nice -n 10 python benchmarks/streaming.py        # defaults: the first run of results/streaming.md
    nice -n 10 python benchmarks/streaming.py --sample-rows 640000 --memory-sample-rows 160000 --train-rows 500000
    nice -n 10 python benchmarks/streaming.py --sample-rows --memory-sample-rows --train-rows 10000000 \
        --train-routes store-train --train-steps 40
    python benchmarks/streaming.py --report
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "streaming_runs.jsonl"
REPORT = HERE / "results" / "streaming.md"
WARMUP_STEPS = 2            # untimed training steps before the timed ones
WRITE_CHUNK_ROWS = 200_000  # rows per chunk when writing the resampled Parquet file


def rss_mb(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def reset_peak_mb() -> float:
    """Resets VmHWM to the current RSS (Linux >= 4.0) and returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


# --------------------------------------------------------------------------- setup (parent)
def train_sampling_model(path: Path) -> None:
    from fastmdm import TabularMDM, datasets
    train, _ = datasets.load("adult")
    TabularMDM(epochs=1, progress=False).fit(train.head(4096), validation=None).save(path)


def write_resampled_adult(path: Path, rows: int, seed: int = 0) -> None:
    """Adult rows drawn with replacement, written a chunk at a time (the file may exceed memory)."""
    from fastmdm import datasets
    from fastmdm.table_files import TableWriter
    train, _ = datasets.load("adult")
    rng = np.random.default_rng(seed)
    start_time = time.perf_counter()
    with TableWriter(path, train.dropna().head(1)) as writer:
        for start in range(0, rows, WRITE_CHUNK_ROWS):
            picks = rng.integers(0, len(train), min(WRITE_CHUNK_ROWS, rows - start))
            writer.write(train.iloc[picks].reset_index(drop=True))
    print(f"wrote {path}: {rows:,} rows, {path.stat().st_size / 2**20:.0f} MB, "
          f"{time.perf_counter() - start_time:.0f} s", flush=True)


# --------------------------------------------------------------------------- measurements (child)
def measure_sample(kind: str, rows: int, workdir: Path) -> dict:
    from fastmdm import TabularMDM
    model = TabularMDM.load(workdir / "model.pt", device="cpu")
    steps = math.ceil(model.codec.num_columns / 4)
    model.sample_to(workdir / "warm.parquet", 4096, steps=steps, seed=1)   # first-call costs into the baseline
    baseline = reset_peak_mb()
    out = workdir / f"{kind}-{rows}.parquet"
    start = time.perf_counter()
    if kind == "stream-sample":
        model.sample_to(out, rows, steps=steps, seed=0)
    else:
        model.sample(rows, steps=steps, seed=0).to_parquet(out, index=False)
    seconds = time.perf_counter() - start
    result = {"rows": rows, "steps": steps, "columns": model.codec.num_columns, "seconds": seconds,
              "rows_per_s": rows / seconds, "baseline_rss_mb": baseline, "peak_rss_mb": rss_mb("VmHWM"),
              "file_mb": out.stat().st_size / 2**20}
    out.unlink()
    return result


def _trainer(codec):
    from fastmdm.models import build_denoiser
    from fastmdm.schedules import PowerSchedule
    from fastmdm.train import TrainConfig, Trainer
    torch.manual_seed(0)
    denoiser = build_denoiser("bidirectional", codec.cardinalities)
    trainer = Trainer(denoiser, PowerSchedule(codec.num_columns), codec.mask_ids, codec.offsets,
                      TrainConfig(batch_size=1024, progress=False))
    return trainer, sum(p.numel() for p in denoiser.parameters())


def _time_steps(trainer, tokens, rows: int, timed_steps: int) -> dict:
    """Training steps as Trainer.fit takes them: batches of a random permutation, gathered from `tokens`.

    Also the peak RSS after each step (to see it settle) and the file-backed RSS before and
    after the steps (memory-mapped store pages count there, and the OS may drop them).
    """
    trainer.budget = trainer.config.budget(rows)
    batch = trainer.budget.batch_size
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    file_rss_before = rss_mb("RssFile")
    gather = step = 0.0
    peaks = []
    for i in range(WARMUP_STEPS + timed_steps):
        start = time.perf_counter()
        rows_of_batch = tokens[order[i * batch:(i + 1) * batch]]
        gathered = time.perf_counter()
        trainer._train_step(rows_of_batch)
        if i >= WARMUP_STEPS:
            gather += gathered - start
            step += time.perf_counter() - start
        peaks.append(round(rss_mb("VmHWM")))
    return {"peak_rss_by_step_mb": peaks, "file_rss_before_steps_mb": file_rss_before,
            "file_rss_after_steps_mb": rss_mb("RssFile"), "timed_steps": timed_steps,
            "s_per_step": step / timed_steps, "gather_s_per_step": gather / timed_steps,
            "steps_per_epoch": rows // batch, "epoch_s_estimate": rows // batch * step / timed_steps}


def measure_train(kind: str, rows: int, workdir: Path, timed_steps: int) -> dict:
    from fastmdm.table_files import table_files
    from fastmdm.token_store import build_token_store
    path = workdir / f"adult-{rows}.parquet"
    baseline = reset_peak_mb()
    start = time.perf_counter()
    if kind == "store-train":
        shutil.rmtree(workdir / f"store-{rows}", ignore_errors=True)   # measure a build, not a reuse
        codec, tokens, _ = build_token_store(workdir / f"store-{rows}", table_files(path), validation=None)
        stored_bytes = tokens.nbytes
    else:
        import pandas as pd
        from fastmdm.data import TableCodec
        frame = pd.read_parquet(path)
        codec = TableCodec.fit(frame)
        tokens = codec.encode(frame)
        stored_bytes = tokens.numel() * tokens.element_size()
    prepare = time.perf_counter() - start
    prepared_rss = rss_mb("VmHWM")
    trainer, parameters = _trainer(codec)
    return {"rows": rows, "columns": codec.num_columns, "prepare_s": prepare, "prepare_rows_per_s": rows / prepare,
            "token_mb": stored_bytes / 2**20, "bytes_per_row": stored_bytes / rows, "parameters": parameters,
            "baseline_rss_mb": baseline, "prepared_rss_mb": prepared_rss,
            **_time_steps(trainer, tokens, rows, timed_steps),
            "peak_rss_mb": rss_mb("VmHWM")}


# --------------------------------------------------------------------------- driver
def run_child(kind: str, rows: int, workdir: Path, *options: str) -> dict:
    """One measurement in a fresh process, `options` its further flags; its JSON line is appended to RESULTS."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    output = subprocess.run([sys.executable, __file__, "--child", kind, str(rows), str(workdir), *options],
                            env=env, check=True, capture_output=True, text=True).stdout
    result = {"kind": kind, **json.loads(output.strip().splitlines()[-1]), "host": platform.node(),
              "torch_threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0],
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(RESULTS, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def _sample_row(name: str, r: dict) -> str:
    return (f"| {name} | {r['rows']:,} | {r['steps']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} "
            f"| {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} "
            f"| {r['load_avg_1min']:.1f} |")


def _train_row(name: str, r: dict) -> str:
    # runs recorded before --train-steps existed timed 10 steps and did not store the count
    return (f"| {name} | {r['rows']:,} | {r['prepare_s']:.1f} | {r['prepare_rows_per_s']:,.0f} | {r['token_mb']:,.1f} "
            f"| {r['bytes_per_row']:.0f} | {r['baseline_rss_mb']:.0f} | {r['prepared_rss_mb']:,.0f} "
            f"| {r['s_per_step']:.2f} ({r['gather_s_per_step'] * 1000:.1f} ms) | {r.get('timed_steps', 10)} "
            f"| {r['steps_per_epoch']:,} "
            f"| {r['epoch_s_estimate']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['load_avg_1min']:.1f} |")


# (title, header, routes as (kind, name), row formatter)
SECTIONS = [
    ("Sampling to Parquet at S = ceil(L/4), default batch size 4096",
     "| route | rows | steps | seconds | rows/s | peak RSS (MB) | RSS before (MB) | growth (MB) | load |",
     [("stream-sample", "sample_to (streaming)"), ("memory-sample", "sample() + to_parquet")], _sample_row),
    ("Training from a Parquet file (Adult resampled), default model",
     "| route | rows | prepare (s) | prepare rows/s | tokens (MB) | bytes/row | RSS before (MB) "
     "| peak RSS, prepare (MB) | s/step (gather) | timed steps | steps/epoch | epoch (s, est.) | peak RSS, all (MB) "
     "| load |",
     [("store-train", "token store (memory-mapped)"), ("frame-train", "DataFrame + int64 tokens")], _train_row),
]


def report() -> None:
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    lines = ["# Large tables: streaming sampling and training from files", "",
             "Generated by `benchmarks/streaming.py` from `streaming_runs.jsonl`; every row is one fresh process "
             "on the 2-core development machine, shared with other jobs (the 1-minute load average is given: "
             "absolute times are noisy; compare rows measured close together). Peak RSS is VmHWM over the "
             "measured operation; 'before' is the RSS when it started (imports, model, warm-up).", ""]
    for title, header, routes, row in SECTIONS:
        rows = [row(name, r) for kind, name in routes
                for r in sorted((r for r in runs if r["kind"] == kind), key=lambda r: r["rows"])]
        if rows:
            lines += [f"## {title}", "", header, "|---|" + "---:|" * (header.count("|") - 2), *rows, ""]
    notes = HERE / "results" / "streaming_notes.md"
    if notes.exists():
        lines.append(notes.read_text())
    REPORT.write_text("\n".join(lines))
    print(f"wrote {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample-rows", type=int, nargs="*", default=[10_000, 40_000, 160_000])
    parser.add_argument("--memory-sample-rows", type=int, nargs="*", default=[10_000, 40_000])
    parser.add_argument("--train-rows", type=int, nargs="*", default=[2_000_000])
    parser.add_argument("--train-routes", nargs="+", choices=["store-train", "frame-train"],
                        default=["store-train", "frame-train"])
    parser.add_argument("--train-steps", type=int, default=10,
                        help=f"timed training steps per run, after {WARMUP_STEPS} warm-up steps")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown report")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ROWS", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rows, workdir = args.child[0], int(args.child[1]), Path(args.child[2])
        result = (measure_sample(kind, rows, workdir) if kind.endswith("sample")
                  else measure_train(kind, rows, workdir, args.train_steps))
        print(json.dumps(result))
        return
    if args.report:
        report()
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fastmdm-streaming-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.sample_rows or args.memory_sample_rows:
        if not (workdir / "model.pt").exists():
            train_sampling_model(workdir / "model.pt")
        for rows in args.sample_rows:
            run_child("stream-sample", rows, workdir)
        for rows in args.memory_sample_rows:
            run_child("memory-sample", rows, workdir)
    for rows in args.train_rows:
        if not (workdir / f"adult-{rows}.parquet").exists():
            write_resampled_adult(workdir / f"adult-{rows}.parquet", rows)
        for kind in args.train_routes:
            run_child(kind, rows, workdir, "--train-steps", str(args.train_steps))
    report()


if __name__ == "__main__":
    main()
