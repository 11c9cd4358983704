"""Causal sampling at S = L on Adult through TabularMDM.sample: rows/s at 1 and 2 threads, and
the distance from the arithmetic limit.

    python benchmarks/decode_speed.py                        # writes benchmarks/results/decode_speed.md
    python benchmarks/decode_speed.py --baseline /path/to/other/checkout --no-write

A causal model is trained for one epoch on Adult (speed does not depend on how well it is
trained) and saved; each library version (this checkout, and with --baseline the fastmdm
package of another checkout) loads it in its own child process and samples `--rows` rows,
`--repeats` times per thread count, the versions alternating, so that load on a shared
machine hits both alike. Rows/s are medians; the ratio is this checkout's over the baseline's.

The arithmetic limit: a row at S = L costs, per step and block, one token (q, k, v, output
projection, MLP), plus attention over at most L + 2 cache slots and the step's head (K_l * d). The limit is the rows/s if only the
blocks' matrix products ran, each at the speed torch reaches here for that product's shape
at the sampling batch (timed the same way, in the same child).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from checkouts import run_in, versions, write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "decode_speed.md"
RUNS = HERE / "results" / "decode_speed_runs.jsonl"

CHILD = r"""
import json, statistics, sys, time
import torch
import fastmdm
from fastmdm import TabularMDM
path, rows, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = TabularMDM.load(path)
model.sample(256, seed=0)                                   # warm up
start = time.perf_counter()
model.sample(rows, seed=1, batch_size=rows)
rows_per_s = rows / (time.perf_counter() - start)
# The blocks' products at this batch, per step and block: one token [rows, d] through q, k, v,
# the output projection and the MLP.
config = model.denoiser.config
d, F, blocks, L = config["d_model"], config["dim_feedforward"], config["num_layers"], model.denoiser.num_columns
products = [(rows, d, 3 * d), (rows, d, d), (rows, d, F), (rows, F, d)]
def seconds(m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    times = []
    for _ in range(20):
        t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
    return statistics.median(times)
matmul_s = sum(seconds(*p) for p in products) * blocks * L
flops_row = 2 * sum(m // rows * k * n for m, k, n in products) * blocks * L
cache_slots = L + 2
attention_row = 2 * 2 * cache_slots * d * blocks * L                 # QK and AV
heads_row = 2 * int(model.denoiser.offsets[-1]) * d
# Where the time goes: the ops' shares of self CPU time in one more sampling call.
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    model.sample(rows, seed=2, batch_size=rows)
events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
total = sum(e.self_cpu_time_total for e in events)
shares = {e.key: e.self_cpu_time_total / total for e in events[:6]}
print(json.dumps(dict(library=fastmdm.__file__, rows_per_s=rows_per_s, limit_rows_per_s=rows / matmul_s, shares=shares,
                      matmul_gflops=flops_row * rows / matmul_s / 1e9,
                      mflop_per_row=(flops_row + attention_row + heads_row) / 1e6)))
"""


def train(model_path: Path) -> None:
    import torch
    from fastmdm import TabularMDM, datasets
    torch.set_num_threads(2)
    table, _ = datasets.load("adult")
    TabularMDM(architecture="causal", epochs=1, progress=False, device="cpu").fit(table, validation=None).save(model_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--model", type=Path, help="a saved causal Adult model (default: train one)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model or Path(scratch) / "adult_causal.pt"
        if args.model is None:
            train(model_path)
        sources = versions(args.baseline)
        runs = []
        for threads in (1, 2):
            for _ in range(args.repeats):
                for label, source in sources:
                    record = dict(version=label, threads=threads, rows=args.rows,
                                  **run_in(source, CHILD, [model_path, args.rows, threads], threads))
                    print(json.dumps(record), flush=True)
                    runs.append(record)
    lines = [
        "# Causal sampling speed at S = L (Adult)",
        "",
        f"`python benchmarks/decode_speed.py{' --baseline CHECKOUT' if args.baseline else ''}`: "
        f"TabularMDM.sample of {args.rows:,} rows (one batch) from a causal model trained one epoch "
        f"on Adult, medians of {args.repeats} runs per version and thread count, versions "
        f"alternating, each run in its own process. {platform.machine()}, {os.cpu_count()} cores, "
        f"shared with other jobs (1-minute load average {load_before:.1f} before the runs, "
        f"{os.getloadavg()[0]:.1f} after): ratios are more reliable than absolute figures, and "
        "two threads are slowed most when another job holds the second core (see the matmul GFLOP/s).",
        "",
        "| version | threads | rows/s | arithmetic limit (rows/s) | share of the limit | matmul GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    medians = {}
    for threads in (1, 2):
        for label, _ in sources:
            mine = [r for r in runs if r["threads"] == threads and r["version"].startswith(label)]
            rate = statistics.median(r["rows_per_s"] for r in mine)
            limit = statistics.median(r["limit_rows_per_s"] for r in mine)
            gflops = statistics.median(r["matmul_gflops"] for r in mine)
            medians[label, threads] = rate
            lines.append(f"| {mine[0]['version']} | {threads} | {rate:,.0f} | {limit:,.0f} | "
                         f"{rate / limit:.0%} | {gflops:.1f} |")
    lines += ["", f"About {runs[-1]['mflop_per_row']:.2f} MFLOP per row (blocks, attention over the cache, heads).",
              "", "Where the time goes (share of self CPU time, torch.profiler, this checkout, median over runs):", ""]
    mine = [r for r in runs if r["version"].startswith("this checkout")]
    for op in sorted({op for r in mine for op in r["shares"]}, key=lambda op: -statistics.median(
            r["shares"].get(op, 0.0) for r in mine)):
        lines.append(f"- `{op}`: {statistics.median(r['shares'].get(op, 0.0) for r in mine):.0%}")
    if args.baseline:
        lines += [""] + [f"- {threads} thread(s): this checkout samples "
                         f"{medians[sources[1][0], threads] / medians[sources[0][0], threads]:.2f}x the baseline's rows/s."
                         for threads in (1, 2)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_report(text, RESULTS, RUNS, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
