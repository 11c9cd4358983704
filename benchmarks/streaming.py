"""Large tables (issue 14): peak memory and speed of streaming sampling and of training from files.

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
  reading its batches from the store (s/step, of which the gather from the store; epoch
  time = steps per epoch x s/step); peak RSS over both. For contrast, the in-memory route
  (read_parquet, TableCodec.fit, encode to int64, the same steps) in another process.

Results go to benchmarks/results/streaming_runs.jsonl (one line per measurement) and the
report to benchmarks/results/streaming.md.

    nice -n 10 python benchmarks/streaming.py --sample-rows 10000 40000 160000 --memory-sample-rows 10000 40000 \\
        --train-rows 2000000
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
TRAIN_STEPS = 10            # timed training steps per run (after 2 warm-up steps)
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
    with TableWriter(path, train.dropna().head(1)) as writer:
        for start in range(0, rows, WRITE_CHUNK_ROWS):
            picks = rng.integers(0, len(train), min(WRITE_CHUNK_ROWS, rows - start))
            writer.write(train.iloc[picks].reset_index(drop=True))


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
                      TrainConfig(progress=False))
    return trainer, sum(p.numel() for p in denoiser.parameters())


def _time_steps(trainer, tokens, rows: int) -> dict:
    """Training steps as Trainer.fit takes them: batches of a random permutation, gathered from `tokens`."""
    batch = trainer.config.batch_size
    trainer.total_steps = rows // batch
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    gather = step = 0.0
    for i in range(TRAIN_STEPS + 2):
        start = time.perf_counter()
        rows_of_batch = tokens[order[i * batch:(i + 1) * batch]]
        gathered = time.perf_counter()
        trainer._train_step(rows_of_batch)
        if i >= 2:
            gather += gathered - start
            step += time.perf_counter() - start
    return {"s_per_step": step / TRAIN_STEPS, "gather_s_per_step": gather / TRAIN_STEPS,
            "steps_per_epoch": rows // batch, "epoch_s_estimate": rows // batch * step / TRAIN_STEPS}


def measure_train(kind: str, rows: int, workdir: Path) -> dict:
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
            "baseline_rss_mb": baseline, "prepared_rss_mb": prepared_rss, **_time_steps(trainer, tokens, rows),
            "peak_rss_mb": rss_mb("VmHWM")}


# --------------------------------------------------------------------------- driver
def run_child(kind: str, rows: int, workdir: Path) -> dict:
    """One measurement in a fresh process; its JSON line is appended to RESULTS."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    output = subprocess.run([sys.executable, __file__, "--child", kind, str(rows), str(workdir)],
                            env=env, check=True, capture_output=True, text=True).stdout
    result = {"kind": kind, **json.loads(output.strip().splitlines()[-1]), "host": platform.node(),
              "torch_threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0],
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(RESULTS, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def report() -> None:
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r["kind"], []).append(r)
    lines = ["# Large tables: streaming sampling and training from files (issue 14)", "",
             "Generated by `benchmarks/streaming.py` from `streaming_runs.jsonl`; every row is one fresh process "
             "on the 2-core development machine, shared with other jobs (the 1-minute load average is given: "
             "absolute times are noisy; compare rows measured close together). Peak RSS is VmHWM over the "
             "measured operation; 'before' is the RSS when it started (imports, model, warm-up).", ""]
    if "stream-sample" in by_kind or "memory-sample" in by_kind:
        lines += ["## Sampling to Parquet at S = ceil(L/4), default batch size 4096", "",
                  "| route | rows | steps | seconds | rows/s | peak RSS (MB) | RSS before (MB) | growth (MB) | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for kind, name in (("stream-sample", "sample_to (streaming)"), ("memory-sample", "sample() + to_parquet")):
            for r in sorted(by_kind.get(kind, []), key=lambda r: r["rows"]):
                lines.append(f"| {name} | {r['rows']:,} | {r['steps']} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} "
                             f"| {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} "
                             f"| {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {r['load_avg_1min']:.1f} |")
        lines.append("")
    if "store-train" in by_kind or "frame-train" in by_kind:
        lines += ["## Training from a Parquet file (Adult resampled), default model", "",
                  "| route | rows | prepare (s) | prepare rows/s | tokens (MB) | bytes/row | RSS before (MB) "
                  "| peak RSS, prepare (MB) | s/step (gather) | steps/epoch | epoch (s, est.) | peak RSS, all (MB) | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for kind, name in (("store-train", "token store (memory-mapped)"), ("frame-train", "DataFrame + int64 tokens")):
            for r in sorted(by_kind.get(kind, []), key=lambda r: r["rows"]):
                lines.append(f"| {name} | {r['rows']:,} | {r['prepare_s']:.1f} | {r['prepare_rows_per_s']:,.0f} "
                             f"| {r['token_mb']:.1f} | {r['bytes_per_row']:.0f} | {r['baseline_rss_mb']:.0f} "
                             f"| {r['prepared_rss_mb']:.0f} "
                             f"| {r['s_per_step']:.2f} ({r['gather_s_per_step'] * 1000:.1f} ms) | {r['steps_per_epoch']:,} "
                             f"| {r['epoch_s_estimate']:,.0f} | {r['peak_rss_mb']:.0f} | {r['load_avg_1min']:.1f} |")
        lines.append("")
    notes = HERE / "results" / "streaming_notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    REPORT.write_text("\n".join(lines))
    print(f"wrote {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample-rows", type=int, nargs="*", default=[10_000, 40_000, 160_000])
    parser.add_argument("--memory-sample-rows", type=int, nargs="*", default=[10_000, 40_000])
    parser.add_argument("--train-rows", type=int, nargs="*", default=[2_000_000])
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown report")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ROWS", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rows, workdir = args.child[0], int(args.child[1]), Path(args.child[2])
        measure = measure_sample if kind.endswith("sample") else measure_train
        print(json.dumps(measure(kind, rows, workdir)))
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
        run_child("store-train", rows, workdir)
        run_child("frame-train", rows, workdir)
    report()


if __name__ == "__main__":
    main()
