"""The model as a predictor, a row scorer and a report, through the public API, on one thread.

    OMP_NUM_THREADS=1 python benchmarks/predict.py [--models DIR]

- predict_proba on Adult's income, real test split (16,281 rows, income left out): ROC AUC
  and expected calibration error (10 equal-width bins) beside XGBoost trained on the real
  training rows; the reliability curves go to benchmarks/results/predict_reliability.png.
  Also at 1 order of the known cells instead of the default 8.
- predict on MAGIC's fLength (a numeric column), real test split: RMSE and MAE of the
  conditional median, coverage of the 5-95% interval, beside XGBoost and the training mean.
- log_prob on held-out rows: 2,000 test rows against a corrupted copy of them, each column
  shuffled independently across the rows (marginals kept, every relation broken); ROC AUC
  of -log_prob for telling them apart, on Adult and MAGIC.
- the report (fastmdm.report.write_report): Adult's (10,000 sampled rows against the
  training rows, with the model) and a 1,000-column table's (5,000 rows against 5,000
  perturbed rows), wall time and size.

Models are TabularMDM() at the default budget, seed 0, trained on the training split (or
loaded from --models DIR, where they are saved as adult.pt and magic.pt). Results go to
benchmarks/results/predict.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xgboost
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

import fastmdm
from fastmdm import TabularMDM
from fastmdm.metrics import _DESCRIPTIONS, _privacy_embedding, evaluate
from fastmdm.report import write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "predict.md"
FIGURE = HERE / "results" / "predict_reliability.png"
CALIBRATION_BINS = 10
CORRUPTED_ROWS = 2_000
NUMERIC_TARGET = ("magic", "fLength")
XGB = dict(n_estimators=300, max_depth=6, learning_rate=0.1, tree_method="hist", enable_categorical=True,
           n_jobs=1, random_state=0)


def model_for(name: str, train: pd.DataFrame, models: Path | None) -> tuple[TabularMDM, float | None]:
    """(model, training seconds or None when loaded)."""
    path = models / f"{name}.pt" if models else None
    if path is not None and path.exists():
        return TabularMDM.load(path, device="cpu"), None
    start = time.perf_counter()
    model = TabularMDM(progress=False, device="cpu").fit(train)
    seconds = time.perf_counter() - start
    if path is not None:
        model.save(path)
    return model, seconds


def as_xgb_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(lambda c: c.astype("category") if c.dtype == object else c)


def calibration(labels: np.ndarray, probs: np.ndarray) -> tuple[float, pd.DataFrame]:
    """(expected calibration error over CALIBRATION_BINS equal-width bins, the curve)."""
    bins = np.minimum((probs * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    curve = pd.DataFrame({"bin": bins, "p": probs, "y": labels}).groupby("bin").agg(
        predicted=("p", "mean"), observed=("y", "mean"), rows=("y", "size"))
    ece = float((curve["rows"] * (curve["predicted"] - curve["observed"]).abs()).sum() / len(labels))
    return ece, curve


def timed(function):
    start = time.perf_counter()
    out = function()
    return out, time.perf_counter() - start


def classification(models: Path | None) -> dict:
    train, test = fastmdm.datasets.load("adult")
    model, train_seconds = model_for("adult", train, models)
    labels = (test["income"] == ">50K").to_numpy()
    features = test.drop(columns="income")
    probs, seconds = timed(lambda: model.predict_proba(features, target="income"))
    one_order = model.predict_proba(features, target="income", orders=1)
    xgb = xgboost.XGBClassifier(**XGB)
    xgb.fit(as_xgb_frame(train.drop(columns="income")), train["income"] == ">50K")
    xgb_probs = xgb.predict_proba(as_xgb_frame(features))[:, 1]
    out = {"train_seconds": train_seconds, "steps": model.training_steps, "rows": len(test),
           "predict_seconds": seconds, "classes": list(map(str, probs.columns))}
    curves = {}
    for name, p in (("fastmdm", probs[">50K"].to_numpy()), ("fastmdm, 1 order", one_order[">50K"].to_numpy()),
                    ("XGBoost (real rows)", xgb_probs)):
        ece, curve = calibration(labels, p)
        out[name] = {"auc": roc_auc_score(labels, p), "ece": ece,
                     "accuracy": float(((p > 0.5) == labels).mean())}
        curves[name] = curve
    plot_reliability(curves)
    out["model"] = model
    return out


def plot_reliability(curves: dict[str, pd.DataFrame]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    for name, curve in curves.items():
        ax.plot(curve["predicted"], curve["observed"], marker="o", label=name)
    ax.set_xlabel("predicted P(income > 50K)")
    ax.set_ylabel("observed share > 50K")
    ax.set_title("Adult test split: reliability")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=90)
    plt.close(fig)


def regression(models: Path | None) -> dict:
    name, target = NUMERIC_TARGET
    train, test = fastmdm.datasets.load(name)
    model, train_seconds = model_for(name, train, models)
    truth = test[target].to_numpy()
    features = test.drop(columns=target)
    median, seconds = timed(lambda: model.predict(features, target=target))
    interval = model.predict(features, target=target, quantiles=[0.05, 0.95])
    xgb = xgboost.XGBRegressor(**XGB)
    xgb.fit(as_xgb_frame(train.drop(columns=target)), train[target])
    xgb_pred = xgb.predict(as_xgb_frame(features))
    rmse = lambda p: float(mean_squared_error(truth, p) ** 0.5)   # noqa: E731
    return {"table": name, "target": target, "train_seconds": train_seconds, "steps": model.training_steps,
            "rows": len(test), "predict_seconds": seconds,
            "fastmdm": {"rmse": rmse(median), "mae": float(mean_absolute_error(truth, median))},
            "XGBoost (real rows)": {"rmse": rmse(xgb_pred), "mae": float(mean_absolute_error(truth, xgb_pred))},
            "training mean": {"rmse": rmse(np.full(len(truth), train[target].mean())),
                              "mae": float(mean_absolute_error(truth, np.full(len(truth), train[target].mean())))},
            "coverage_90": float(((interval[0.05] <= truth) & (truth <= interval[0.95])).mean()),
            "model": model}


def corruption(name: str, model: TabularMDM) -> dict:
    """AUC of -log_prob for corrupted (each column shuffled independently) against clean rows."""
    _, test = fastmdm.datasets.load(name)
    clean = test.sample(min(CORRUPTED_ROWS, len(test)), random_state=0).reset_index(drop=True)
    rng = np.random.default_rng(1)
    corrupted = clean.apply(lambda column: column.iloc[rng.permutation(len(column))].to_numpy())
    out = {"table": name, "rows": len(clean)}
    for samples in (4, 16):
        (scores, seconds) = timed(lambda: (model.log_prob(clean, num_samples=samples),
                                           model.log_prob(corrupted, num_samples=samples)))
        labels = np.r_[np.zeros(len(clean)), np.ones(len(corrupted))]
        out[f"samples_{samples}"] = {"auc": roc_auc_score(labels, -np.r_[scores[0], scores[1]]),
                                     "clean_mean": float(scores[0].mean()),
                                     "corrupted_mean": float(scores[1].mean()), "seconds": seconds}
    return out


def wide_tables(rows: int, columns: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A real-like table of alternating categorical and numeric columns (some related to the
    previous column) and a synthetic one with a tenth of its columns shifted or reshuffled."""
    rng = np.random.default_rng(seed)
    data = {}
    for l in range(columns):
        if l % 2 == 0:
            data[f"c{l}"] = rng.choice([f"v{k}" for k in range(int(rng.integers(2, 30)))], rows)
        else:
            base = pd.Series(data[f"c{l - 1}"]).str[1:].astype(float).to_numpy()
            data[f"x{l}"] = base + rng.normal(0, 3, rows)
    real = pd.DataFrame(data)
    synth = real.sample(frac=1, random_state=seed).reset_index(drop=True)
    for column in rng.choice(real.columns, columns // 10, replace=False):
        synth[column] = synth[column].sample(frac=1, random_state=seed).to_numpy()
        if column.startswith("x"):
            synth[column] = synth[column] + 2
    return real, synth


def reports(adult: TabularMDM, scratch: Path) -> dict:
    train, test = fastmdm.datasets.load("adult")
    synth = adult.sample(10_000, seed=0)
    results = evaluate(train, synth, test=test, target="income", seed=0, n_jobs=1)
    out = {}
    _, seconds = timed(lambda: write_report(scratch / "adult.html", train, synth, results, embed=_privacy_embedding,
                                            descriptions=_DESCRIPTIONS, test=test, model=adult))
    out["adult"] = {"seconds": seconds, "megabytes": os.path.getsize(scratch / "adult.html") / 1e6,
                    "columns": train.shape[1], "synthetic_rows": len(synth)}
    real, synth = wide_tables(5_000, 1_000, 0)
    summary = pd.DataFrame({"shape": [np.nan]}, index=["synthetic"])
    _, seconds = timed(lambda: write_report(scratch / "wide.html", real, synth, summary, embed=_privacy_embedding,
                                            descriptions=_DESCRIPTIONS))
    out["wide"] = {"seconds": seconds, "megabytes": os.path.getsize(scratch / "wide.html") / 1e6,
                   "columns": real.shape[1], "synthetic_rows": len(synth)}
    return out


def write_markdown(found: dict, command: str) -> None:
    c, r, rep = found["classification"], found["regression"], found["reports"]
    lines = [
        "# The model as a predictor, a row scorer and a report",
        "",
        f"`{command}`, one thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`), on a 2-core CPU shared "
        "with other jobs: read the ratios, not the absolute times. Models: `TabularMDM()` at the default "
        f"budget, seed 0, trained on the training split (Adult {c['steps']} steps, MAGIC {r['steps']} steps).",
        "",
        f"## predict_proba: Adult's income, real test split ({c['rows']:,} rows, income left out)",
        "",
        "| predictor | ROC AUC | ECE (10 bins) | accuracy at .5 |",
        "|---|---|---|---|",
    ]
    for name in ("fastmdm", "fastmdm, 1 order", "XGBoost (real rows)"):
        m = c[name]
        lines.append(f"| {name} | {m['auc']:.4f} | {m['ece']:.4f} | {m['accuracy']:.4f} |")
    lines += [
        "",
        f"predict_proba took {c['predict_seconds']:.1f} s for the {c['rows']:,} rows (8 orders of the known cells "
        "per row). Reliability curves: [predict_reliability.png](predict_reliability.png).",
        "",
        f"## predict: MAGIC's {r['target']}, real test split ({r['rows']:,} rows, {r['target']} left out)",
        "",
        "| predictor | RMSE | MAE |",
        "|---|---|---|",
    ]
    for name in ("fastmdm", "XGBoost (real rows)", "training mean"):
        lines.append(f"| {name} | {r[name]['rmse']:.3f} | {r[name]['mae']:.3f} |")
    lines += [
        "",
        f"fastmdm's conditional median; its 5-95% interval (`quantiles=[0.05, 0.95]`) held {r['coverage_90']:.1%} "
        f"of the true values (90% nominal). predict took {r['predict_seconds']:.1f} s.",
        "",
        "## log_prob: corrupted rows (held-out rows, each column shuffled independently across them, against "
        "the same rows clean)",
        "",
        "| table | rows (each set) | samples per row | ROC AUC | mean log_prob clean | corrupted | seconds (both sets) |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in found["corruption"]:
        for samples in (4, 16):
            m = result[f"samples_{samples}"]
            lines.append(f"| {result['table']} | {result['rows']:,} | {samples} | {m['auc']:.4f} | {m['clean_mean']:.2f} | "
                         f"{m['corrupted_mean']:.2f} | {m['seconds']:.1f} |")
    lines += [
        "",
        "## The report",
        "",
        "| table | columns | synthetic rows | seconds | size (MB) |",
        "|---|---|---|---|---|",
        f"| Adult, with the model | {rep['adult']['columns']} | {rep['adult']['synthetic_rows']:,} | "
        f"{rep['adult']['seconds']:.1f} | {rep['adult']['megabytes']:.2f} |",
        f"| generated, 1,000 columns | {rep['wide']['columns']:,} | {rep['wide']['synthetic_rows']:,} | "
        f"{rep['wide']['seconds']:.1f} | {rep['wide']['megabytes']:.2f} |",
        "",
        "The report's time is write_report's alone (evaluate's metrics before it are not counted). A 1,000-column "
        "table gets figures for its 50 worst columns, associations over its 100 worst and heatmaps over 40.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=None, help="directory to load models from / save them to")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.models:
        args.models.mkdir(parents=True, exist_ok=True)
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    found = {"classification": classification(args.models)}
    print(json.dumps({k: v for k, v in found["classification"].items() if k != "model"}, default=str), flush=True)
    found["regression"] = regression(args.models)
    print(json.dumps({k: v for k, v in found["regression"].items() if k != "model"}, default=str), flush=True)
    found["corruption"] = [corruption("adult", found["classification"]["model"]),
                           corruption("magic", found["regression"]["model"])]
    print(json.dumps(found["corruption"]), flush=True)
    found["reports"] = reports(found["classification"]["model"], scratch)
    print(json.dumps(found["reports"]), flush=True)
    write_markdown(found, " ".join(["OMP_NUM_THREADS=1 python benchmarks/predict.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
