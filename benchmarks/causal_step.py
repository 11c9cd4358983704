"""The causal denoiser against the bidirectional one at the default size (parameter counts
within 1%): training step time, sampling rows/s at S = L, and a short validation NELBO at
equal CPU time, on Adult.

    python benchmarks/causal_step.py                              # writes benchmarks/results/causal_step.md
    python benchmarks/causal_step.py --baseline /path/to/other/checkout

Each version (this checkout, and with --baseline another checkout's fastmdm) runs in its own
child processes (benchmarks/checkouts.py):
- speed, per thread count: a training step (forward, backward, update) of each architecture
  at a batch of `--batch-size` rows, `--steps` steps interleaved round-robin (median CPU seconds, so load
  on a shared machine hits both alike), and sampling `--rows` rows at S = L (median wall
  rows/s of `--repeats` interleaved calls). The models are fitted on two batches only:
  cost does not depend on the weights;
- NELBO, at 1 thread: each architecture trains for the optimizer steps that fit in
  `--seconds` of CPU time at its probed step time (so both get the same CPU), at the same
  batch, seed 0,
  validation on 10% of the rows, and reports the last validation NELBO (nats per row).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from checkouts import run_in, versions, write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "causal_step.md"
RUNS = HERE / "results" / "causal_step_runs.jsonl"
ARCHITECTURES = ("bidirectional", "causal")

SPEED = r"""
import json, statistics, sys, time
import torch
from fastmdm import TabularMDM, datasets
steps, rows, repeats, batch_size = (int(a) for a in sys.argv[1:5])
architectures = ("bidirectional", "causal")
train, _ = datasets.load("adult")
models, batches = {}, {}
for arch in architectures:
    model = TabularMDM(architecture=arch, epochs=1, batch_size=batch_size, seed=0, progress=False)
    model.fit(train.head(2 * batch_size), validation=None)
    models[arch] = model
    batches[arch] = model.codec.encode(train.head(model.config.batch_size))
step_times = {arch: [] for arch in architectures}
for _ in range(steps):
    for arch in architectures:
        start = time.process_time()
        models[arch]._trainer._train_step(batches[arch])
        step_times[arch].append(time.process_time() - start)
rates = {arch: [] for arch in architectures}
for arch in architectures:
    models[arch]._sample_tokens(256, None, None, generator=torch.Generator().manual_seed(0))
for _ in range(repeats):
    for arch in architectures:
        start = time.perf_counter()
        models[arch]._sample_tokens(rows, None, None, generator=torch.Generator().manual_seed(0))
        rates[arch].append(rows / (time.perf_counter() - start))
print(json.dumps(dict(step_seconds={a: statistics.median(t) for a, t in step_times.items()},
                      rows_per_s={a: statistics.median(r) for a, r in rates.items()},
                      parameters={a: models[a].denoiser.num_parameters() for a in architectures},
                      batch_size=models["causal"].config.batch_size)))
"""

NELBO = r"""
import json, sys, time
from fastmdm import TabularMDM, datasets
arch, steps, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
train, _ = datasets.load("adult")
model = TabularMDM(architecture=arch, steps=steps, batch_size=batch_size, seed=0, progress=False)
start = time.process_time()
model.fit(train, validation=0.1)
print(json.dumps(dict(val_nelbo=model.history[-1].val_nelbo, cpu_seconds=time.process_time() - start)))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--steps", type=int, default=15, help="training steps per architecture (interleaved)")
    parser.add_argument("--rows", type=int, default=4096, help="rows per sampling call")
    parser.add_argument("--repeats", type=int, default=3, help="sampling calls per architecture")
    parser.add_argument("--batch-size", type=int, default=1024, help="training batch (step timing and NELBO)")
    parser.add_argument("--seconds", type=float, default=75.0, help="CPU seconds of training for the NELBO")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    sources = versions(args.baseline)
    runs = []
    for threads in (1, 2):
        for label, source in sources:
            record = dict(kind="speed", version=label, threads=threads,
                          **run_in(source, SPEED, [args.steps, args.rows, args.repeats, args.batch_size], threads))
            print(json.dumps(record), flush=True)
            runs.append(record)
    for label, source in sources:
        probe = next(r for r in runs if r["version"] == label and r["threads"] == 1)
        for arch in ARCHITECTURES:
            if arch == "bidirectional" and label != sources[-1][0]:
                continue              # one bidirectional reference: this checkout's
            steps = max(1, round(args.seconds / probe["step_seconds"][arch]))
            record = dict(kind="nelbo", version=label, architecture=arch, steps=steps,
                          **run_in(source, NELBO, [arch, steps, args.batch_size], 1))
            print(json.dumps(record), flush=True)
            runs.append(record)
    lines = [
        "# Causal vs bidirectional: step time, sampling speed, short NELBO (Adult)", "",
        f"`python benchmarks/causal_step.py{' --baseline CHECKOUT' if args.baseline else ''}` (see its docstring): "
        f"default sizes, batch {runs[0]['batch_size']}, {args.steps} interleaved training steps (median CPU s), "
        f"{args.repeats} sampling calls of {args.rows:,} rows at S = L (median rows/s), each version and thread "
        f"count in its own process. {platform.machine()}, {os.cpu_count()} cores shared with other jobs (1-minute "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after): compare ratios within a row.", "",
        "| version | threads | parameters (bidir / causal) | step CPU s, bidirectional | step CPU s, causal | "
        "causal / bidirectional step | rows/s S = L, bidirectional | rows/s S = L, causal |",
        "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in (r for r in runs if r["kind"] == "speed"):
        steps, rates, params = r["step_seconds"], r["rows_per_s"], r["parameters"]
        lines.append(f"| {r['version']} | {r['threads']} | {params['bidirectional']:,} / {params['causal']:,} | "
                     f"{steps['bidirectional']:.3f} | {steps['causal']:.3f} | "
                     f"{steps['causal'] / steps['bidirectional']:.2f} | {rates['bidirectional']:,.0f} | "
                     f"{rates['causal']:,.0f} |")
    lines += ["", f"Validation NELBO after about {args.seconds:.0f} CPU seconds of training (1 thread, seed 0, "
              "steps from each version's probed step time):", "",
              "| version | architecture | optimizer steps | CPU s | validation NELBO (nats/row) |",
              "|---|---|---:|---:|---:|"]
    for r in (r for r in runs if r["kind"] == "nelbo"):
        lines.append(f"| {r['version']} | {r['architecture']} | {r['steps']} | {r['cpu_seconds']:.0f} | "
                     f"{r['val_nelbo']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_report(text, RESULTS, RUNS, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
