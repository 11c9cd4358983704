"""One sampled order a row (RLOO baseline from the batch's other rows) against two (baseline
from the row's other order), at equal FLOPs, on Adult: validation NELBO and CPU seconds.

    python benchmarks/orders_per_row.py                     # writes benchmarks/results/orders_per_row.md
    python benchmarks/orders_per_row.py --steps 300 --seeds 0 1 2

Each run is `TabularMDM(num_samples=K, steps=S, batch_size=1024, seed=seed).fit(adult,
validation=0.1)` in a child process of its own on one thread, with K x S fixed (K = 2 at
`--steps`, K = 1 at twice as many): both pass the same number of row orders through the
denoiser, so the same FLOPs. Reported: CPU seconds of the fit (validation included), the
best validation NELBO (nats per row, 4 orders a row) and the curve.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

from checkouts import THIS_CHECKOUT, run_in, write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "orders_per_row.md"
RUNS = HERE / "results" / "orders_per_row_runs.jsonl"

FIT = r"""
import json, sys, time, torch
from fastmdm import TabularMDM, datasets
k, steps, seed = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(1)
train, _ = datasets.load("adult")
model = TabularMDM(num_samples=k, steps=steps, batch_size=1024, seed=seed, progress=False)
cpu, wall = time.process_time(), time.perf_counter()
model.fit(train, validation=0.1)
print(json.dumps(dict(num_samples=k, steps=steps, seed=seed, cpu_s=time.process_time() - cpu,
                      wall_s=time.perf_counter() - wall, best_val=model._trainer.best["val_nelbo"],
                      curve=[(r.step, r.val_nelbo) for r in model.history])))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of the two-order runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    records = []
    for seed in args.seeds:
        for k, steps in ((2, args.steps), (1, 2 * args.steps)):
            records.append(dict(date=str(datetime.date.today()), **run_in(THIS_CHECKOUT, FIT, [k, steps, seed], 1)))
            print(json.dumps(records[-1]), flush=True)
    write_report(report(records, args), RESULTS, RUNS, records)


def report(records: list[dict], args) -> str:
    lines = [
        "# One sampled order a row against two, at equal FLOPs (Adult)",
        "",
        f"Machine: {platform.machine()} CPU, 2 cores shared with other jobs (load average above 10: "
        "wall seconds mean little, CPU seconds are the measure); one thread a fit.",
        f"Command: `python benchmarks/orders_per_row.py --steps {args.steps} --seeds "
        f"{' '.join(map(str, args.seeds))}` (records appended to `orders_per_row_runs.jsonl`).",
        "",
        "| orders a row | RLOO baseline | steps of 1,024 rows | seeds | CPU s | best validation NELBO |",
        "|---|---|---|---|---|---|",
    ]
    for k in (2, 1):
        runs = [r for r in records if r["num_samples"] == k]
        baseline = "the row's other order" if k == 2 else "the batch's other rows"
        lines.append(f"| {k} | {baseline} | {runs[0]['steps']} | {len(runs)} | "
                     f"{statistics.mean(r['cpu_s'] for r in runs):.0f} | "
                     f"{statistics.mean(r['best_val'] for r in runs):.3f} |")
    lines += ["", "Validation NELBO by rows seen (thousands), first seed:", "",
              "| rows seen (k) | 2 orders | 1 order |", "|---|---|---|"]
    curves = {k: dict(next(r["curve"] for r in records if r["num_samples"] == k)) for k in (2, 1)}
    for step, value in curves[1].items():
        two = curves[2].get(step)
        lines.append(f"| {step * 1024 // 1000:,} | {'' if two is None else f'{two:.3f}'} | {value:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
