"""Numbers with the grain of the data, one checkout against another: how close synthetic
numbers come to the data's relations and value grid, and what it costs.

    python benchmarks/numeric_grain.py --baseline /path/to/before/checkout [--rows 5000] [--seeds 0]

Each library version (the --baseline checkout, then this one) fits the default model,
`TabularMDM(seed=seed).fit(train)` (the y = x + noise table: 30 epochs, batch 256) and samples
`--rows` rows with `.sample`, in a child process of its own with one thread; the versions'
processes run at the same time, so the load of the shared machine weighs on both alike. The
parent scores every sample with this checkout's code.

Tables:
- `xy`: x ~ N(0, 1), y = x + N(0, .03), 10,000 training rows and 2,000 held out: a relation
  that lives inside a bin (corr(x, y) = .9995 in the data).
- `magic`: MAGIC (`fastmdm.datasets`), 10 numeric columns and the class; a seeded sample of
  10,000 training rows, the held-out split whole.
- `loans`: a loans table built by `loans_table` (no network here, so a documented recipe
  rather than a download): grade A-G and sub-grade 1-5 fix the interest rate on a grid of 35
  rates, amounts on round thousands (a fifth on multiples of 25), incomes mostly round
  thousands, term 36 or 60 months, instalment = the amortisation formula of amount, rate and
  term (to the cent), dti a continuous ratio. 10,000 training rows and 2,000 held out.

Scores: XGBoost C2ST against the training rows (1 = indistinguishable), MLE (RMSE of y, of
MAGIC's class AUC, of the loans' rate), the mean absolute error of the Pearson correlations of
the numeric columns against the training rows', DCR share and exact copies; per numeric column
the share of synthetic numbers equal to some training value, against the held-out rows' share;
corr(x, y) on the xy table. Next to them the "real vs real" row (held-out rows, same code).
Cost: fit seconds and steps, and sampling rows/s of the fitted model (`--rows` rows, one thread,
the versions at the same time): the ratios after / before are the cost per row.

Writes ``benchmarks/results/numeric_grain.md`` and ``numeric_grain.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from checkouts import run_in, versions, write_report
from fastmdm.data import infer_categorical
from fastmdm.data.privacy import MIN_ROWS_PER_VALUE
from fastmdm.datasets import load
from fastmdm.metrics import evaluate, score_reference

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "numeric_grain.md"
RUNS = HERE / "results" / "numeric_grain.jsonl"
TABLES = ("xy", "loans", "magic")
TARGETS = {"xy": "y", "loans": "rate", "magic": "class"}
SCORES = ("c2st_xgb", "mle", "corr_error", "dcr_share", "exact_copies")
TRAIN_ROWS, TEST_ROWS = 10_000, 2_000

CHILD = r"""
import json, sys, time
import pandas as pd, torch
import fastmdm
from fastmdm import TabularMDM
train_path, seed, rows, out_path, options = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(1)
train = pd.read_pickle(train_path)
start = time.perf_counter()
model = TabularMDM(seed=seed, progress=False, **json.loads(options)).fit(train)
fit_s = time.perf_counter() - start
model.sample(256, seed=seed + 1)                       # warm up
start = time.perf_counter()
synth = model.sample(rows, seed=seed)
sample_s = time.perf_counter() - start
synth.to_pickle(out_path)
print(json.dumps(dict(library=fastmdm.__file__, fit_s=fit_s, steps=model.training_steps,
                      rows_per_s=rows / sample_s, fit_s_per_step=fit_s / model.training_steps)))
"""


def xy_table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows)
    return pd.DataFrame({"x": x, "y": x + rng.normal(0, 0.03, rows)})


def loans_table(rows: int, seed: int) -> pd.DataFrame:
    """The loans recipe of the module docstring."""
    rng = np.random.default_rng(seed)
    grade = rng.choice(7, rows, p=[0.18, 0.28, 0.24, 0.15, 0.09, 0.04, 0.02])
    sub = rng.integers(1, 6, rows)
    rate = np.round(5.32 + 3.1 * grade + 0.61 * (sub - 1), 2)            # 35 rates
    term = np.where(rng.random(rows) < 0.3 + 0.05 * grade, 60, 36)
    amount = np.exp(rng.normal(9.3 + 0.06 * grade, 0.6, rows))
    amount = np.clip(np.where(rng.random(rows) < 0.8, np.round(amount / 1000) * 1000, np.round(amount / 25) * 25),
                     1000, 40000).astype(np.int64)
    income = np.exp(rng.normal(11.0, 0.5, rows) + 0.3 * np.log(amount / 10000))
    income = np.where(rng.random(rows) < 0.7, np.round(income / 1000) * 1000, np.round(income)).astype(np.int64)
    monthly = rate / 1200
    instalment = np.round(amount * monthly / (1 - (1 + monthly) ** -term), 2)
    dti = np.round(100 * 12 * instalment / income + rng.gamma(4, 3, rows), 2)
    purpose = rng.choice(["debt", "card", "home", "car", "other"], rows, p=[0.5, 0.2, 0.12, 0.08, 0.1])
    return pd.DataFrame({"grade": np.array(list("ABCDEFG"))[grade], "sub_grade": sub.astype(str), "term": term,
                         "amount": amount, "rate": rate, "instalment": instalment, "income": income, "dti": dti,
                         "purpose": purpose})


def load_table(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if name == "magic":
        train, test = load("magic")
        return train.sample(n=TRAIN_ROWS, random_state=0).reset_index(drop=True), test
    make = xy_table if name == "xy" else loans_table
    table = make(TRAIN_ROWS + TEST_ROWS, seed=0)
    return table.iloc[:TRAIN_ROWS].reset_index(drop=True), table.iloc[TRAIN_ROWS:].reset_index(drop=True)


def numeric_columns(table: pd.DataFrame) -> list:
    return [c for c in table.columns if not infer_categorical(table[c])]


def correlation_error(reference: pd.DataFrame, other: pd.DataFrame) -> float:
    """Mean absolute difference of the off-diagonal Pearson correlations of the numeric columns."""
    numeric = numeric_columns(reference)
    a, b = reference[numeric].corr().to_numpy(), other[numeric].corr().to_numpy()
    upper = np.triu_indices(len(numeric), 1)
    return float(np.abs(a[upper] - b[upper]).mean())


def training_value_shares(train: pd.DataFrame, other: pd.DataFrame) -> dict:
    """Per numeric column, the share of `other`'s numbers equal to some training value, and to
    a value at least MIN_ROWS_PER_VALUE training rows hold (the most a model may emit as such)."""
    shares = {}
    for c in numeric_columns(train):
        counts = train[c].value_counts()
        shares[f"equal_{c}"] = float(other[c].isin(set(counts.index)).mean())
        shares[f"atom_{c}"] = float(other[c].isin(set(counts.index[counts >= MIN_ROWS_PER_VALUE])).mean())
    return shares


def scores_of(name: str, train, test, rows: pd.DataFrame, seed: int, reference: bool) -> dict:
    metrics = ("c2st_xgb", "mle", "dcr_share", "exact_copies")
    if reference:
        _, scores = score_reference(train, len(rows), test=test, target=TARGETS[name], metrics=metrics, seed=seed,
                                    n_jobs=1)
    else:
        scores = evaluate(train, rows, test=test, target=TARGETS[name], metrics=metrics, reference=False, seed=seed,
                          n_jobs=1).loc["synthetic"].to_dict()
    out = {k: float(v) for k, v in scores.items()}
    out.update(corr_error=correlation_error(train, rows), **training_value_shares(train, rows))
    if name == "xy":
        out["corr_xy"] = float(np.corrcoef(rows["x"], rows["y"])[0, 1])
    return out


def run_table(name: str, seed: int, sources: list, args, scratch: Path) -> list[dict]:
    train, test = load_table(name)
    train_path = scratch / f"{name}_train.pkl"
    train.to_pickle(train_path)
    options = json.dumps(dict(epochs=30, batch_size=256) if name == "xy" else {})
    synth_paths = [scratch / f"{name}_{seed}_{i}.pkl" for i in range(len(sources))]
    with ThreadPoolExecutor(len(sources)) as pool:
        costs = list(pool.map(lambda source, path: run_in(source, CHILD, [train_path, seed, args.rows, path, options],
                                                          threads=1),
                              [source for _, source in sources], synth_paths))
    common = dict(table=name, seed=seed, rows=args.rows, train_rows=len(train), test_rows=len(test))
    records = []
    for (label, _), synth_path, cost in zip(sources, synth_paths, costs):
        synth = pd.read_pickle(synth_path)
        records.append(dict(common, version=label, **scores_of(name, train, test, synth, seed, False), **cost))
        print(json.dumps(records[-1]), flush=True)
    held_out = test.iloc[np.random.default_rng(seed).permutation(len(test))[:args.rows]]
    records.append(dict(common, version="real vs real", **scores_of(name, train, test, held_out, seed, True)))
    print(json.dumps(records[-1]), flush=True)
    return records


def report(records: list[dict], args, sources: list) -> str:
    frame = pd.DataFrame(records)
    before, after = sources[0][0], sources[-1][0]
    seeds = "; ".join(f"{table} {', '.join(str(int(s)) for s in sorted(group['seed'].unique()))}"
                      for table, group in frame.groupby("table", sort=False))
    lines = [
        "# Numbers with the grain of the data: one checkout against another",
        "",
        f"`python benchmarks/numeric_grain.py --baseline CHECKOUT --rows {args.rows}` on "
        f"{time.strftime('%Y-%m-%d')}, seeds per table: {seeds}: {before} against {after}. The "
        f"default model, in a process of its own per version with one thread, the versions at the same time; "
        f"{args.rows:,} sampled rows scored by this checkout's code. {platform.machine()}, {os.cpu_count()} "
        "cores shared with other jobs: seconds are indicative, ratios between versions more reliable.",
        "",
        "Tables and scores: see the script's docstring (xy: y = x + N(0, .03), 30 epochs, batch 256; loans: "
        "round amounts and incomes, a rate on a 35-value grid, instalment = f(amount, rate, term); MAGIC: 10,000 "
        "training rows). Mean over seeds; labels name the commits (records of several runs, added with --add, "
        "share them only when the commits match).",
        "",
        "| table | version | C2ST | MLE | corr error | DCR share | exact copies | corr(x, y) | fit s | steps | "
        "rows/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    means = frame.groupby(["table", "version"], sort=False).mean(numeric_only=True)
    for (table, version), row in means.iterrows():
        def cell(key, digits=4, thousands=False):
            value = row.get(key, np.nan)
            return "" if pd.isna(value) else (f"{value:,.0f}" if thousands else f"{value:.{digits}f}")
        lines.append(f"| {table} | {version} | {cell('c2st_xgb', 3)} | {cell('mle')} | {cell('corr_error')} | "
                     f"{cell('dcr_share', 3)} | {cell('exact_copies')} | {cell('corr_xy')} | {cell('fit_s', 0)} | "
                     f"{cell('steps', 0)} | {cell('rows_per_s', thousands=True)} |")
    lines += ["", "Share of synthetic numbers equal to some training value, per numeric column (held-out real "
              "rows' share in brackets), and the held-out rows' share equal to a value at least "
              f"{MIN_ROWS_PER_VALUE} training rows hold (the values the codec may store and emit):", "",
              "| table | column | before | after | [held-out] | held-out, on such a value |",
              "|---|---|---:|---:|---:|---:|"]
    for table in frame["table"].unique():
        rows = means.loc[table]
        for key in [k for k in rows.columns if k.startswith("equal_") and rows[k].notna().any()]:
            column = key[len("equal_"):]
            atom = rows.get(f"atom_{column}", pd.Series(dtype=float)).get("real vs real", np.nan)
            lines.append(f"| {table} | {column} | {rows.loc[before, key]:.3f} | {rows.loc[after, key]:.3f} | "
                         f"[{rows.loc['real vs real', key]:.3f}] | {'' if np.isnan(atom) else f'{atom:.3f}'} |")
    if before != after:
        lines += ["", "Cost per row, after / before (same run, same machine): "]
        for table in frame["table"].unique():
            rows = means.loc[table]
            lines.append(f"- {table}: training {rows.loc[after, 'fit_s_per_step'] / rows.loc[before, 'fit_s_per_step']:.2f}x "
                         f"per step, sampling {rows.loc[before, 'rows_per_s'] / rows.loc[after, 'rows_per_s']:.2f}x.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="the checkout before the change, measured first")
    parser.add_argument("--rows", type=int, default=5000, help="synthetic rows per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results")
    parser.add_argument("--add", action="store_true",
                        help="keep the runs file's records of other tables and seeds, so seeds can be run in turns")
    args = parser.parse_args(argv)
    sources = versions(args.baseline)
    records = []
    if args.add and RUNS.exists():
        planned = {(name, seed) for name in args.tables for seed in args.seeds}
        records = [r for r in map(json.loads, RUNS.read_text().splitlines()) if (r["table"], r["seed"]) not in planned]
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for name in args.tables:
                records += run_table(name, seed, sources, args, Path(scratch))
                if not args.no_write:   # after every table, so a run cut short keeps what it measured
                    write_report(report(records, args, sources), RESULTS, RUNS, records, append=False)
    print(report(records, args, sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
