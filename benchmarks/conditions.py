"""Set and range conditions: speed and fidelity of `TabularMDM.sample(conditions=...)`.

Conditions restrict the support of the conditioned columns when the fused sampler draws them,
with importance resampling across rows when several are restricted (fastmdm.conditions), so
no row is rejected. The alternative is to sample unconditionally and keep the rows that
satisfy the condition ("sample then reject"), whose cost grows as one over the acceptance rate.

Per table (Adult, MAGIC), one default model, `TabularMDM(seed=0).fit(train)`, is sampled
under: no condition; a common condition (30-60% of the training rows satisfy it); a rare one
(under 1%); two conditions (a range and a set, or two ranges: resampling); and two rare ones.
Adult also has a common set and a range of 8% (age >= 60).

Speed: `model.sample(rows, conditions=..., seed=r)` timed for each condition in turn, repeat
after repeat (interleaved, so a slow spell of the shared machine hits all alike; each repeat
starts at another condition), one thread, in CPU seconds of the process (wall seconds,
inflated on a machine shared with other jobs, are in the raw table); medians over repeats.
Reported: rows/s; the cost of a condition, the median over repeats of its draw's CPU
seconds over the unconditional draw's in the same repeat; the rejection baseline's rows/s
(unconditional rows/s times the share of the unconditional rows that satisfy the condition,
pooled over repeats); and the effective sample size per row
(`attrs["effective_sample_size"]` / rows; 1 = the resampling lost nothing).

Fidelity: Shape and Trend (`fastmdm.metrics.evaluate`) of all conditioned rows drawn (pooled
over repeats) against the training rows that satisfy the condition; next to them the pooled
unconditional rows that satisfy it (sample then reject; scored when there are at least
`--min-rows` of them), and `evaluate`'s real-vs-real row, a split of the conditioned
training rows scored the same way (at most half of them against the rest, so it is noisy
when few rows satisfy the condition). The conditioned rows are also scored against the
accepted unconditional rows: both sample the model's conditional distribution, so that
score is near 1 when the conditioned draw is exact, whatever the model's fidelity.

    OMP_NUM_THREADS=1 python benchmarks/conditions.py [--rows 4096] [--repeats 7] [--models DIR]

`--models DIR` keeps the fitted models there (DIR/adult.pt, DIR/magic.pt) and reuses them on
the next run. `--max-train-rows` caps the training rows (default: all of them).
Writes ``benchmarks/results/conditions.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np
import pandas as pd
import torch

from fastmdm import TabularMDM
from fastmdm.datasets import load
from fastmdm.metrics import evaluate, score

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "results", "conditions.md")
UNCONDITIONAL = "none"
SELF_EMPLOYED = ["Self-emp-not-inc", "Self-emp-inc"]
PUBLIC_SECTOR = ["Federal-gov", "State-gov"]
# {table: {label: conditions}}; the shares of training rows satisfying each are in the report.
CONDITIONS = {
    "adult": {
        "common: age 30..45": {"age": (30, 45)},
        "common set: education HS-grad or Some-college": {"education": ["HS-grad", "Some-college"]},
        "range: age >= 60": {"age": (60, None)},
        "rare: age >= 80": {"age": (80, None)},
        "two: age 30..45, self-employed": {"age": (30, 45), "workclass": SELF_EMPLOYED},
        "two rare: age >= 60, federal or state": {"age": (60, None), "workclass": PUBLIC_SECTOR},
    },
    "magic": {
        "common: fAlpha <= 20": {"fAlpha": (None, 20)},
        "rare: fLength >= 230": {"fLength": (230, None)},
        "two: fAlpha <= 20, fLength >= 100": {"fAlpha": (None, 20), "fLength": (100, None)},
        "two rare: fAlpha <= 5, fLength >= 150": {"fAlpha": (None, 5), "fLength": (150, None)},
    },
}


def satisfies(frame: pd.DataFrame, conditions: dict) -> pd.Series:
    """Rows of `frame` that satisfy every condition (a list: a set; a tuple: a closed range)."""
    keep = pd.Series(True, index=frame.index)
    for column, spec in conditions.items():
        if isinstance(spec, tuple):
            low, high = spec
            values = frame[column]
            keep &= values.notna() & (values >= low if low is not None else True) & \
                (values <= high if high is not None else True)
        else:
            keep &= frame[column].isin(spec)
    return keep


def fitted_model(table: str, train: pd.DataFrame, models: str | None) -> TabularMDM:
    """The default model of `table`: loaded from `models` when it holds one, else fitted (and
    kept there)."""
    path = os.path.join(models, f"{table}.pt") if models else None
    if path and os.path.exists(path):
        return TabularMDM.load(path, device="cpu")
    model = TabularMDM(seed=0, progress=False).fit(train)
    if path:
        os.makedirs(models, exist_ok=True)
        model.save(path)
    return model


def training_summary(model: TabularMDM) -> str:
    """Steps, training seconds and best validation NELBO, from the model's history (kept in
    the model file, so a reused model reports its own training)."""
    history = model.history
    best = min(r.val_nelbo for r in history if r.val_nelbo is not None)
    return (f"{history[-1].step:,} steps in {sum(r.seconds for r in history):.0f} s, best validation NELBO "
            f"{best:.3f} nats/row")


def timed_draws(model: TabularMDM, conditions: dict, args) -> tuple[list[dict], dict]:
    """Per-repeat records and the pooled rows of each condition, timed interleaved."""
    labels = [UNCONDITIONAL, *conditions]
    specs = {UNCONDITIONAL: None, **conditions}
    for label in labels:   # warm-up, untimed
        model.sample(256, conditions=specs[label], seed=10_000)
    records, pooled = [], {label: [] for label in labels}
    for repeat in range(args.repeats):
        shift = repeat % len(labels)   # each repeat starts at another condition: no fixed neighbours
        for label in labels[shift:] + labels[:shift]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start, start_cpu = time.perf_counter(), time.process_time()
                frame = model.sample(args.rows, conditions=specs[label], seed=repeat)
                cpu_seconds = time.process_time() - start_cpu
                wall_seconds = time.perf_counter() - start
            ess = frame.attrs.get("effective_sample_size")
            records.append({"condition": label, "repeat": repeat, "cpu_seconds": cpu_seconds,
                            "wall_seconds": wall_seconds, "rows_per_s": args.rows / cpu_seconds,
                            "ess_per_row": None if ess is None else ess / args.rows,
                            "low_ess_warning": any("effective sample size" in str(w.message) for w in caught)})
            pooled[label].append(frame)
            print(records[-1], flush=True)
    return records, {label: pd.concat(frames, ignore_index=True) for label, frames in pooled.items()}


def cost_ratio(records: list[dict], label: str) -> float:
    """Median over repeats of the CPU seconds of the conditioned draw over the unconditional
    draw of the same repeat, so a slow spell of the machine cancels out."""
    seconds = {(r["condition"], r["repeat"]): r["cpu_seconds"] for r in records}
    repeats = sorted({r["repeat"] for r in records})
    return statistics.median(seconds[label, r] / seconds[UNCONDITIONAL, r] for r in repeats)


def run_table(table: str, args) -> tuple[list[dict], list[dict], dict]:
    train, _ = load(table)
    if args.max_train_rows and len(train) > args.max_train_rows:
        train = train.sample(args.max_train_rows, random_state=0).reset_index(drop=True)
    model = fitted_model(table, train, args.models)
    conditions = CONDITIONS[table]
    records, pooled = timed_draws(model, conditions, args)
    for record in records:
        record["table"] = table
    unconditional = pooled[UNCONDITIONAL]
    speed = pd.DataFrame(records).groupby("condition", sort=False)
    base_rate = speed["rows_per_s"].median()[UNCONDITIONAL]
    summary = []
    for label, spec in conditions.items():
        real = train[satisfies(train, spec)].reset_index(drop=True)
        synth = pooled[label]
        accepted = unconditional[satisfies(unconditional, spec)].reset_index(drop=True)
        scores = evaluate(real, synth, metrics=("shape", "trend"), seed=0)
        reference = scores.index[1]
        enough = len(accepted) >= args.min_rows
        missing = {"shape": np.nan, "trend": np.nan}
        rejected = score(real, accepted, metrics=("shape", "trend")) if enough else missing
        same_model = score(accepted, synth, metrics=("shape", "trend")) if enough else missing
        rate = speed["rows_per_s"].median()[label]
        acceptance = len(accepted) / len(unconditional)
        summary.append({
            "table": table, "condition": label, "train_share": len(real) / len(train), "real_rows": len(real),
            "rows_per_s": rate, "cost": cost_ratio(records, label), "acceptance": acceptance,
            "rejection_rows_per_s": base_rate * acceptance,
            "ess_per_row": statistics.median(speed.get_group(label)["ess_per_row"]),
            "all_satisfy": bool(satisfies(synth, spec).all()),
            "shape": scores.loc["synthetic", "shape"], "trend": scores.loc["synthetic", "trend"],
            "rejected_rows": len(accepted), "rejected_shape": rejected["shape"], "rejected_trend": rejected["trend"],
            "against_rejected_shape": same_model["shape"], "against_rejected_trend": same_model["trend"],
            "reference": reference, "reference_shape": scores.loc[reference, "shape"],
            "reference_trend": scores.loc[reference, "trend"]})
        print(summary[-1], flush=True)
    meta = {"table": table, "train_rows": len(train), "training": training_summary(model),
            "unconditional_rows_per_s": base_rate}
    return records, summary, meta


def rate_text(rows_per_s: float) -> str:
    """A rate to three significant figures (rejection rates of rare conditions are small)."""
    return f"{rows_per_s:,.0f}" if rows_per_s >= 100 else f"{rows_per_s:.3g}"


def write_report(records: list[dict], summary: list[dict], metas: list[dict], args, path: str) -> None:
    command = (f"OMP_NUM_THREADS=1 python benchmarks/conditions.py --rows {args.rows} --repeats {args.repeats}"
               + (f" --max-train-rows {args.max_train_rows}" if args.max_train_rows else "")
               + (" --models DIR" if args.models else ""))
    lines = ["# Set and range conditions: speed and fidelity", "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, one thread of a "
             "2-core machine shared with other jobs; rows/s per CPU second of the process: compare speeds "
             "within a table, as ratios).", "",
             "One default model per table (`TabularMDM(seed=0).fit(train)`); "
             + "; ".join(f"{m['table']}: {m['train_rows']:,} training rows, {m['training']}" for m in metas) + ". "
             f"Each draw is `model.sample({args.rows}, conditions=..., seed=repeat)`; {args.repeats} repeats, "
             "conditions interleaved within each repeat, each repeat starting at another one; medians.", "",
             "## Speed", "",
             "cost: CPU seconds of a conditioned draw over those of the unconditional draw of the same repeat, "
             "median over repeats (target: at most 3 for a rare condition). "
             "rejection rows/s: unconditional rows/s times the share of unconditional rows that satisfy the "
             "condition (acceptance), the rate of sample-then-reject. ESS/row: effective sample size of the "
             "importance resampling per row drawn (1 = nothing lost). share of train: training rows that "
             "satisfy the condition. all satisfy: every conditioned row satisfies it.", "",
             "| table | condition | share of train | rows/s | cost | acceptance | rejection rows/s | "
             "conditioned / rejection speed | ESS/row | all satisfy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in metas:
        base = rate_text(m["unconditional_rows_per_s"])
        lines.append(f"| {m['table']} | {UNCONDITIONAL} | 1 | {base} | 1.00 | 1 | {base} | 1 | | |")
        for s in (s for s in summary if s["table"] == m["table"]):
            advantage = (f"{s['rows_per_s'] / s['rejection_rows_per_s']:,.1f}x" if s["acceptance"] > 0
                         else "(no unconditional row accepted)")
            lines.append(f"| {s['table']} | {s['condition']} | {s['train_share']:.4f} | "
                         f"{rate_text(s['rows_per_s'])} | {s['cost']:.2f} | {s['acceptance']:.4f} | "
                         f"{rate_text(s['rejection_rows_per_s'])} | {advantage} | {s['ess_per_row']:.3f} | "
                         f"{s['all_satisfy']} |")
    lines += ["", "## Fidelity", "",
              "Shape / Trend (`fastmdm.metrics`, sdmetrics Column Shapes / Column Pair Trends, 1 = identical) "
              "against the training rows that satisfy the condition. conditioned: all conditioned rows drawn "
              f"({args.repeats} x {args.rows:,}). sample then reject: the unconditional rows drawn that satisfy "
              f"the condition (scored when at least {args.min_rows}). real vs real: `evaluate`'s reference row, "
              "a split of the conditioned training rows (at most half scored against the rest; noisy for a "
              "few hundred rows and fewer). conditioned vs sample then reject: the conditioned rows scored "
              "against the accepted unconditional rows, two samples of the same model conditional, so near 1 "
              "when the conditioned draw is exact.", "",
              "| table | condition | real rows | conditioned shape | trend | sample then reject rows | shape | trend | "
              "real vs real shape | trend | conditioned vs sample then reject shape | trend |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        rejected, against_rejected = ((f"{s[k + '_shape']:.4f} | {s[k + '_trend']:.4f}" if not np.isnan(s[k + "_shape"])
                                       else "– | –") for k in ("rejected", "against_rejected"))
        lines.append(f"| {s['table']} | {s['condition']} | {s['real_rows']:,} | {s['shape']:.4f} | "
                     f"{s['trend']:.4f} | {s['rejected_rows']:,} | {rejected} | {s['reference_shape']:.4f} | "
                     f"{s['reference_trend']:.4f} | {against_rejected} |")
    lines += ["", "## Raw timings", "", "rows/s = rows / CPU seconds of the process; wall seconds for reference.", "",
              "| table | condition | repeat | CPU s | wall s | rows/s | ESS/row | low-ESS warning |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        ess = "" if r["ess_per_row"] is None else f"{r['ess_per_row']:.3f}"
        lines.append(f"| {r['table']} | {r['condition']} | {r['repeat']} | {r['cpu_seconds']:.3f} | "
                     f"{r['wall_seconds']:.3f} | {rate_text(r['rows_per_s'])} | {ess} | {r['low_ess_warning']} |")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="rows per timed draw")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tables", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--models", help="directory that keeps the fitted models for the next run")
    parser.add_argument("--max-train-rows", type=int, help="cap on the training rows (seeded sample)")
    parser.add_argument("--min-rows", type=int, default=50, help="fewest accepted rows scored for sample then reject")
    parser.add_argument("--report-path", default=REPORT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records, summary, metas = [], [], []
    for table in args.tables:
        table_records, table_summary, meta = run_table(table, args)
        records += table_records
        summary += table_summary
        metas.append(meta)
        write_report(records, summary, metas, args, args.report_path)   # nothing lost if interrupted


if __name__ == "__main__":
    main()
