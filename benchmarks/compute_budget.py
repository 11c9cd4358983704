"""The default budget in compute (cells seen, `TrainConfig.budget`) against the budget it
replaced (30 epochs, or at least 256,000 rows seen in at most 2,000 steps), at equal
settings otherwise, on a small wide table and on Adult.

    python benchmarks/compute_budget.py                    # writes benchmarks/results/compute_budget.md
    python benchmarks/compute_budget.py --tables wide-74

Every run is `TabularMDM(...).fit(train, validation=0.1)` in a child process of its own on
one thread (OMP_NUM_THREADS=1), the former budget given as the explicit `steps=` and
`batch_size=` it resolved to (same warm-up share, checks and early stopping). Reported: the
steps taken / the budget, wall and CPU seconds of the fit, the best validation NELBO (nats
per row), and XGBoost C2ST (`fastmdm.metrics.c2st_xgb`, 1 = indistinguishable) of as many
synthetic rows as training rows against the training rows.

Tables:
- `wide-74`: 1,500 rows x 74 columns: 1,500 Adult rows (15 columns) side by side with 1,500
  MAGIC rows (11 columns), both drawn with seed 0, and 48 noisy copies of those 26 columns
  (copy i of column i mod 26, with 10% of its cells swapped with another row's);
- `adult`: the bundled Adult training table (32,561 rows x 15 columns).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

from checkouts import THIS_CHECKOUT, run_in, write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "compute_budget.md"
RUNS = HERE / "results" / "compute_budget_runs.jsonl"
TABLES = ("wide-74", "adult")

FIT = r"""
import json, sys, time
import numpy as np, pandas as pd, torch
from fastmdm import TabularMDM, datasets
from fastmdm.metrics import c2st_xgb

def wide_74(rows=1500, seed=0):
    adult, _ = datasets.load("adult")
    magic, _ = datasets.load("magic")
    rng = np.random.default_rng(seed)
    base = pd.concat([adult.sample(rows, random_state=seed).reset_index(drop=True),
                      magic.sample(rows, random_state=seed).reset_index(drop=True)], axis=1)
    copies = {}
    for i in range(48):
        source = base.columns[i % base.shape[1]]
        values = base[source].to_numpy().copy()
        swap = rng.random(rows) < 0.1
        values[swap] = values[rng.permutation(rows)][swap]
        copies[f"{source}_copy{i // base.shape[1]}"] = values
    return pd.concat([base, pd.DataFrame(copies)], axis=1)

table, budget = sys.argv[1], json.loads(sys.argv[2])
train = wide_74() if table == "wide-74" else datasets.load("adult")[0]
model = TabularMDM(seed=0, progress=False, **budget)
wall, cpu = time.perf_counter(), time.process_time()
model.fit(train, validation=0.1)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
synth = model.sample(len(train), seed=1)
trainer = model._trainer
print(json.dumps(dict(steps=trainer.step, budget_steps=trainer.budget.steps, batch_size=trainer.budget.batch_size,
                      wall_s=wall, cpu_s=cpu, val_nelbo=trainer.best["val_nelbo"],
                      c2st_xgb=c2st_xgb(train, synth, n_jobs=1), rows=len(train), columns=train.shape[1])))
"""


def former_budget(rows: int, columns: int) -> dict:
    """The steps and batch the former default budget gave a table of `rows` training rows
    (30 epochs, or at least 256,000 rows seen in at most 2,000 steps; the batch a sixteenth of
    the rows, a power of two in [32, 1024]). Columns did not enter."""
    batch = int(min(1024, max(32, 2 ** round(math.log2(max(1, rows / 16))))))
    steps = max(30 * max(1, rows // batch), min(2000, math.ceil(256_000 / batch)))
    return dict(steps=steps, batch_size=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    args = parser.parse_args()
    shapes = {"wide-74": (1500, 74), "adult": (32561, 15)}
    records = []
    for table in args.tables:
        rows, columns = shapes[table]
        training_rows = rows - round(0.1 * rows)
        for label, budget in (("former", former_budget(training_rows, columns)), ("compute (default)", {})):
            result = run_in(THIS_CHECKOUT, FIT, [table, json.dumps(budget)], threads=1)
            records.append(dict(table=table, budget=label, date=str(datetime.date.today()), **result))
            print(records[-1], flush=True)
    write_report(report(records, args), RESULTS, RUNS, records)


def report(records: list[dict], args) -> str:
    lines = [
        "# The default budget in compute against the former one",
        "",
        f"Machine: {platform.machine()} CPU, 2 cores shared with other jobs (load average 5-12 during "
        "these runs), one thread a fit: wall seconds are inflated by the load, CPU seconds less so; "
        "compare within a table.",
        f"Command: `python benchmarks/compute_budget.py --tables {' '.join(args.tables)}` "
        "(records appended to `compute_budget_runs.jsonl`).",
        "",
        "| table | rows x columns | budget | batch | steps / budget | wall s | CPU s | best validation NELBO | XGBoost C2ST |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['table']} | {r['rows']:,} x {r['columns']} | {r['budget']} | {r['batch_size']} | "
                     f"{r['steps']:,} / {r['budget_steps']:,} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
                     f"{r['val_nelbo']:.3f} | {r['c2st_xgb']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
