"""Default training budgets on small, wide and large tables: `TabularMDM().fit(df)` against the
fixed budget the defaults used to be (30 epochs of 1,024-row batches, 100 warm-up steps, no
early stopping).

For every table: training wall time, optimizer steps, NELBO on held-out real rows, XGBoost
C2ST of the synthetic rows against the training rows next to the same score for held-out real
rows (real vs real), and for the generated tables the dependence they plant (copies that agree
with their source; corr(x, y)). Both runs of a table go in one process, one after the other,
on one thread.

    python benchmarks/budgets.py                      # every table
    python benchmarks/budgets.py --tables adult-full  # some of them

Each run appends a line to benchmarks/results/budgets.jsonl; benchmarks/results/budgets.md
is rebuilt from all lines.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fastmdm import datasets
from fastmdm.api import TabularMDM
from fastmdm.metrics import c2st_xgb
from fastmdm.train import TrainConfig

RESULTS = Path(__file__).parent / "results"
#: The budget before the defaults followed the table.
FIXED_BUDGET = dict(epochs=30, batch_size=1024, warmup_steps=100, patience=None)
COPIES, COPY_NOISE, CATEGORIES = 20, 0.05, list("abcde")
#: Denoiser sizes compared with `--sizes` (the default is TableDenoiser's own: d_model 48, 3 layers).
SIZES = {"small": dict(d_model=32, num_layers=2, num_heads=4, dim_feedforward=64), "default": {},
         "large": dict(d_model=96, num_layers=4, num_heads=4, dim_feedforward=192)}


def wide_copies(rows: int, seed: int) -> pd.DataFrame:
    """COPIES categorical columns, each copied into a second one with COPY_NOISE of its cells
    redrawn: real copies agree with their source .95 + .05 / 5 = .96 of the time."""
    rng = np.random.default_rng(seed)
    columns = {}
    for i in range(COPIES):
        source = rng.choice(CATEGORIES, rows)
        copy = np.where(rng.random(rows) < COPY_NOISE, rng.choice(CATEGORIES, rows), source)
        columns[f"s{i}"], columns[f"c{i}"] = source, copy
    return pd.DataFrame(columns)


def copy_agreement(df: pd.DataFrame) -> float:
    return float(np.mean([(df[f"s{i}"] == df[f"c{i}"]).mean() for i in range(COPIES)]))


def noisy_line(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows)
    return pd.DataFrame({"x": x, "y": x + rng.normal(scale=0.03, size=rows)})


def xy_corr(df: pd.DataFrame) -> float:
    return float(np.corrcoef(df["x"].astype(float), df["y"].astype(float))[0, 1])


def sampled(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    return frame.sample(n=min(rows, len(frame)), random_state=seed).reset_index(drop=True)


def load_table(name: str) -> tuple[pd.DataFrame, pd.DataFrame, callable]:
    """(training rows, held-out real rows, the table's own dependence score or None)."""
    if name == "wide-copies-1.5k":
        return wide_copies(1500, 0), wide_copies(1500, 1), copy_agreement
    if name == "noisy-line-5k":
        return noisy_line(5000, 0), noisy_line(2000, 1), xy_corr
    adult, adult_test = datasets.load("adult")
    magic, magic_test = datasets.load("magic")
    if name == "adult-1k":
        return sampled(adult, 1000, 0), sampled(adult_test, 1000, 1), None
    if name == "adult-7col-5k":
        columns = ["age", "workclass", "education", "marital-status", "occupation", "sex", "income"]
        return sampled(adult[columns], 5000, 0), sampled(adult_test[columns], 2000, 1), None
    if name == "magic-5k":
        return sampled(magic, 5000, 0), magic_test, None
    if name == "magic-full":
        return magic, magic_test, None
    if name == "adult-full":
        return adult, sampled(adult_test, 5000, 1), None
    raise ValueError(f"unknown table {name!r}")


TABLES = ("wide-copies-1.5k", "noisy-line-5k", "adult-1k", "adult-7col-5k", "magic-5k", "magic-full", "adult-full")


def seen_rows(holdout: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """The held-out rows whose categories all occur in the training rows (a codec cannot
    score a category it never saw)."""
    keep = np.ones(len(holdout), dtype=bool)
    for column in train.columns:
        if not pd.api.types.is_numeric_dtype(train[column]):
            keep &= holdout[column].isin(train[column]).to_numpy() | holdout[column].isna().to_numpy()
    return holdout[keep].reset_index(drop=True)


def run(table: str, budget: str, train: pd.DataFrame, holdout: pd.DataFrame, dependence,
        size: str = "default") -> dict:
    options = FIXED_BUDGET if budget == "fixed (before)" else {}
    model = TabularMDM(progress=False, device="cpu", seed=0, model=SIZES[size], **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model.fit(train, validation=0.1)
        seconds = time.perf_counter() - start
    synth = model.sample(len(holdout), seed=0)
    record = dict(table=table, budget=budget, size=size, parameters=model.denoiser.num_parameters(),
                  rows=len(train), columns=train.shape[1],
                  batch_size=model._trainer.budget.batch_size, budget_steps=model._trainer.budget.steps,
                  steps=model.training_steps, train_seconds=round(seconds, 1),
                  heldout_nelbo=round(model.nelbo(holdout), 4),
                  c2st_xgb=round(c2st_xgb(train, synth, n_jobs=1), 3),
                  c2st_xgb_real=round(c2st_xgb(train, holdout, n_jobs=1), 3),
                  warnings=[str(w.message).split(":")[0] for w in caught if issubclass(w.category, UserWarning)
                            and "converge" in str(w.message)])
    if dependence is not None:
        record.update(dependence=dependence.__name__, synth_dependence=round(dependence(synth), 3),
                      real_dependence=round(dependence(holdout), 3))
    print(json.dumps(record), flush=True)
    return record


def write_report(lines: list[dict]) -> None:
    rows = []
    for r in lines:
        dep = f"{r['synth_dependence']:.3f} / {r['real_dependence']:.3f}" if "dependence" in r else ""
        size = f"{r.get('size', 'default')} ({r['parameters'] / 1000:.0f}K)" if "parameters" in r else "default"
        rows.append(f"| {r['table']} | {r['rows']:,} x {r['columns']} | {r['budget']} | {size} | {r['batch_size']} | "
                    f"{r['steps']:,} / {r['budget_steps']:,} | {r['train_seconds']:.0f} | {r['heldout_nelbo']:.3f} | "
                    f"{r['c2st_xgb']:.3f} / {r['c2st_xgb_real']:.3f} | {dep} | {'; '.join(r['warnings'])} |")
    text = "\n".join([
        "# Default training budgets",
        "",
        "Produced by `benchmarks/budgets.py`. Each table trained with `TabularMDM().fit(df, validation=0.1)`",
        "(\"table defaults\") and with the fixed budget the defaults used to be (\"fixed (before)\": 30 epochs",
        "of 1,024-row batches, 100 warm-up steps, no early stopping), one after the other in one process on",
        "one thread of a 2-core machine shared with other jobs: wall times are indicative, compare them",
        "within a table. Held-out NELBO: nats per row on real rows never trained on. XGBoost C2ST: synthetic",
        "rows against the training rows / held-out real rows against the training rows (1 = indistinguishable).",
        "Dependence: wide-copies, share of copies that agree with their source; noisy-line, corr(x, y);",
        "synthetic / real. Steps: taken / budget (early stopping ends a run before its budget).",
        "",
        "Model: the denoiser size (`--sizes`; default d_model 48, 3 layers) and its parameter count.",
        "",
        "| table | rows x columns | budget | model | batch | steps | train s | held-out NELBO | XGBoost C2ST synth / real | dependence synth / real | warnings |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows, "", *budget_table(), ""])
    (RESULTS / "budgets.md").write_text(text)


def budget_table() -> list[str]:
    """The default budget by training rows (90% of a table; validation=0.1) of 15 columns
    (Adult's), next to the former one."""
    fixed = TrainConfig(**{k: v for k, v in FIXED_BUDGET.items() if k != "patience"})
    lines = ["## Default budget by training rows", "",
             "Steps are the budget, for 15 columns (the default budget is in cells seen: see "
             "benchmarks/results/compute_budget.md); early stopping may end a run before it. "
             "Former: 30 epochs of 1,024 rows.", "",
             "| training rows | batch | steps | epochs | warm-up | former steps | rows seen / former |",
             "|---|---|---|---|---|---|---|"]
    for rows in (270, 900, 1_350, 4_500, 9_000, 15_406, 29_305, 270_000):
        new, old = TrainConfig().budget(rows, 15), fixed.budget(rows, 15)
        lines.append(f"| {rows:,} | {new.batch_size} | {new.steps:,} | {new.epochs} | {new.warmup_steps} | "
                     f"{old.steps:,} | {new.steps * min(rows, new.batch_size) / (old.steps * min(rows, old.batch_size)):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--budgets", nargs="+", default=["fixed (before)", "table defaults"])
    parser.add_argument("--sizes", nargs="+", default=["default"], choices=SIZES,
                        help="denoiser sizes to train (each with every budget)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = RESULTS / "budgets.jsonl"
    for table in args.tables:
        train, holdout, dependence = load_table(table)
        holdout = seen_rows(holdout, train)
        for budget, size in [(b, s) for b in args.budgets for s in args.sizes]:
            record = run(table, budget, train, holdout, dependence, size)
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            write_report([json.loads(line) for line in log.read_text().splitlines()])


if __name__ == "__main__":
    main()
