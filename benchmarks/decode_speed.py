"""Sampling speed of the default model at S = L against the arithmetic it does, on Adult.

    python benchmarks/decode_speed.py                              # writes benchmarks/results/decode_speed.md
    python benchmarks/decode_speed.py --baseline /path/to/other/checkout

Each version (this checkout, and with --baseline another checkout's fastmdm) fits the
default TabularMDM on 2,048 Adult rows for one epoch (cost does not depend on the weights)
in a child process of its own (benchmarks/checkouts.py), then times `model.sample(rows)`
(exact learned-order sampling, S = L, the default batch) at 1 and 2 threads, the thread
counts interleaved within each repeat. Versions alternate over `--rounds` rounds, so load
on a shared machine hits both alike; a figure is the median over every repeat of every round.

The child also reports, for this checkout:
- FLOPs per sampled row, counted analytically from the model config: the linear layers of
  the L tokens a row runs through the blocks (one a step), the attention of each token over
  the cache slots before it and itself, and each column's head (the fused sampler evaluates
  only the sampled column's K_l logits). torch.utils.flop_counter.FlopCounterMode on one
  sampling call checks the linear part (it does not see the C++ kernels);
- the machine's matmul GFLOP/s at the decode step's linear shapes (batch rows x d_model
  into 3 d, d, the feed-forward width and back), at 1 and 2 threads; the arithmetic limit is
  that rate divided by the FLOPs per row, and the distance is achieved / limit;
- where one sampling call's time goes (cProfile at 1 thread): each torch or C++ call by
  name, and Python, the interpreter's own time in fastmdm and torch's Python layers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from checkouts import run_in, versions

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "decode_speed.md"
THREADS = (1, 2)

CHILD = r"""
import cProfile, json, pstats, statistics, sys, time, warnings
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from fastmdm import TabularMDM, datasets
rows, repeats, analyse = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
threads = (1, 2)
warnings.filterwarnings("ignore")          # a one-epoch fit warns that it has not converged
train, _ = datasets.load("adult")
model = TabularMDM(epochs=1, seed=0, progress=False).fit(train.head(2048), validation=None)
model.sample(256, seed=0)
seconds = {t: [] for t in threads}
for repeat in range(repeats):
    for t in threads:
        torch.set_num_threads(t)
        start = time.perf_counter()
        model.sample(rows, seed=repeat)
        seconds[t].append(time.perf_counter() - start)
record = dict(rows_per_s={t: rows / statistics.median(s) for t, s in seconds.items()},
              architecture=model.architecture)
if analyse:
    config = model.denoiser.config
    d, ff, layers = config["d_model"], config["dim_feedforward"], config["num_layers"]
    sizes = config["cardinalities"]
    length = len(sizes)
    linear = 2 * layers * length * (d * 3 * d + d * d + d * ff + ff * d)
    # Token p attends to slots 0..p and to itself: (p + 2) keys, scores and weighted values.
    attention = 2 * 2 * layers * d * sum(p + 2 for p in range(length))
    heads = 2 * d * sum(sizes)
    torch.set_num_threads(1)
    with FlopCounterMode(display=False) as counter:
        model.sample(rows, seed=0)
    batch = min(rows, 4096)
    shapes = [(d, 3 * d), (d, d), (d, ff), (ff, d)]
    inputs = [(torch.randn(batch, i), torch.randn(o, i), torch.randn(o)) for i, o in shapes]
    matmul_flops = 2 * batch * sum(i * o for i, o in shapes)
    gflops = {}
    for t in threads:
        torch.set_num_threads(t)
        times = []
        for _ in range(200):
            start = time.perf_counter()
            for x, w, b in inputs:
                F.linear(x, w, b)
            times.append(time.perf_counter() - start)
        gflops[t] = matmul_flops / statistics.median(times) / 1e9
    torch.set_num_threads(1)
    profile = cProfile.Profile()
    profile.enable()
    model.sample(rows, seed=0)
    profile.disable()
    stats = pstats.Stats(profile).stats
    total = max(entry[3] for entry in stats.values())
    parts = {}
    for (path, _, name), (_, _, own, _, _) in stats.items():
        key = name if path == "~" else "Python code (fastmdm, torch, pandas)"
        parts[key] = parts.get(key, 0.0) + own
    record.update(flops=dict(linear=linear, attention=attention, heads=heads),
                  counted_linear_per_row=counter.get_total_flops() / rows, matmul_gflops=gflops,
                  profile_seconds=total, profile={k: v for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:12]},
                  config=dict(d_model=d, dim_feedforward=ff, num_layers=layers, columns=length, vocab=sum(sizes)))
print(json.dumps(record))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to measure too, for comparison")
    parser.add_argument("--rows", type=int, default=4096, help="rows per sampling call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per thread count per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one child per version")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results")
    args = parser.parse_args(argv)
    sources = versions(args.baseline)
    load_before = os.getloadavg()[0]
    runs = {label: [] for label, _ in sources}
    analysis = None
    for round_index in range(args.rounds):
        for label, source in sources:
            analyse = source == sources[-1][1] and round_index == 0
            record = run_in(source, CHILD, [args.rows, args.repeats, int(analyse)], 1)
            print(json.dumps(dict(version=label, round=round_index, **record)), flush=True)
            runs[label].append(record)
            if analyse:
                analysis = record
    load_after = os.getloadavg()[0]
    rates = {label: {t: statistics.median(r["rows_per_s"][str(t)] for r in records) for t in THREADS}
             for label, records in runs.items()}
    flops = analysis["flops"]
    per_row = sum(flops.values())
    limits = {t: analysis["matmul_gflops"][str(t)] * 1e9 / per_row for t in THREADS}
    this = sources[-1][0]
    config = analysis["config"]
    lines = [
        "# Sampling speed against the arithmetic (Adult, S = L)",
        "",
        f"`python benchmarks/decode_speed.py{' --baseline CHECKOUT' if args.baseline else ''}` (see its docstring): "
        f"the default model ({analysis['architecture']}: d_model {config['d_model']}, {config['num_layers']} "
        f"layers, feed-forward {config['dim_feedforward']}; {config['columns']} columns, V = {config['vocab']}), "
        f"`model.sample({args.rows:,})` at S = L, median of {args.repeats} interleaved calls per thread count "
        f"in each of {args.rounds} rounds, versions alternating. {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs (1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after): compare ratios within a table.",
        "",
        "| version | rows/s, 1 thread | rows/s, 2 threads |",
        "|---|---:|---:|",
    ]
    for label in runs:
        lines.append(f"| {label} | {rates[label][1]:,.0f} | {rates[label][2]:,.0f} |")
    if args.baseline:
        base = sources[0][0]
        lines.append(f"| ratio | {rates[this][1] / rates[base][1]:.2f}x | {rates[this][2] / rates[base][2]:.2f}x |")
    lines += [
        "",
        f"FLOPs per sampled row (analytic, from the config): linear layers {flops['linear']:,.0f}, attention "
        f"over the cache {flops['attention']:,.0f}, heads {flops['heads']:,.0f}; total {per_row:,.0f} "
        f"(FlopCounterMode counts {analysis['counted_linear_per_row']:,.0f} per row for the torch matmuls, "
        "which are the linear layers).",
        "",
        "| threads | matmul GFLOP/s at the step's shapes | arithmetic limit, rows/s | achieved (this checkout) | distance |",
        "|---:|---:|---:|---:|---:|",
    ]
    for t in THREADS:
        lines.append(f"| {t} | {analysis['matmul_gflops'][str(t)]:.1f} | {limits[t]:,.0f} | {rates[this][t]:,.0f} | "
                     f"{rates[this][t] / limits[t]:.2f} |")
    profile_total = analysis["profile_seconds"]
    lines += [
        "",
        f"Where one `model.sample({args.rows:,})` call's time goes (this checkout, cProfile, 1 thread, "
        f"{profile_total:.3f} s under the profiler): own time of each call, largest first.",
        "",
        "| call | seconds | share |",
        "|---|---:|---:|",
    ]
    for name, own in analysis["profile"].items():
        lines.append(f"| {name} | {own:.3f} | {own / profile_total:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
