"""A long-tailed text column: the rare token redrawn (the default), kept as a marker, and a
checkout from before the privacy rule, against the table without that column.

    git worktree add /tmp/before <commit>            # a checkout to compare with (its _C*.so copied in)
    python benchmarks/long_tail.py --baseline /tmp/before [--seeds 0 1] [--rows 5000]

The table: `--rows` training rows of UCI Adult (`fastmdm.datasets`) plus a job title drawn per
row from its occupation: title k of occupation o is written "o (grade k)", and k follows a
Zipf law, P(k) proportional to k^-1.2 over 20,000 grades (missing where the occupation is).
On 5,000 rows that gives about 2,000 distinct titles, three quarters of them held by one row,
and 46% of the rows hold a title fewer than 5 training rows hold: the shape of a real
job-title column (a few common titles, a long tail of one-offs), and the title says the
occupation, so a generator must keep the pair consistent. The rows are a seeded sample of
Adult's training split; as many other rows are the held-out rows of the DCR score, and as many
again the "real vs real" reference, scored by the same code as the synthetic rows.

Each model is `TabularMDM(seed=seed).fit(train)` with every default, sampling `--rows` rows
with `.sample`, in a child process of its own with one thread:
- "redraw" (this checkout, the default): a generated rare cell is drawn among the frequent
  titles from the model's conditional for the row;
- "marker": the same fitted model with `rare_marker = True`, so generated rare cells read
  "(other)";
- "before" (the `--baseline` checkout): a token for each of the 999 most frequent titles
  (`category_cap=1000`), one-row titles included, and "(other)" for the rest;
- "without title": this checkout on the table without the title column.

Scores, all from this checkout's `fastmdm.metrics` against the training rows: XGBoost C2ST
(1 = indistinguishable), Shape of the title column (sdmetrics' TVComplement, 1 - total
variation distance), DCR share (.5 = no closer to the training rows than to held-out ones),
the share of synthetic title cells outside the frequent set (titles at least
`MIN_ROWS_PER_VALUE` training rows hold), of them the share reading "(other)" and the share
copying a title fewer than `MIN_ROWS_PER_VALUE` training rows hold, and how many such rare
titles the saved model file holds.

Writes ``benchmarks/results/long_tail.md`` and ``long_tail.jsonl`` (one record per seed and variant;
the records of the seeds not run this time, at the same `--rows`, are kept and reported too).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from checkouts import THIS_CHECKOUT, commit_of, run_in, write_report
from fastmdm.data import OTHER_LABEL
from fastmdm.data.privacy import MIN_ROWS_PER_VALUE
from fastmdm.datasets import load
from fastmdm.metrics import c2st_xgb, privacy

RESULTS = Path(__file__).resolve().parent / "results"
TITLE = "job_title"
ZIPF_EXPONENT, GRADES = 1.2, 20_000

# Fits the default model on a Parquet table and samples it; with "marker", samples again from
# the same model with rare_marker = True. Prints one JSON line.
CHILD = """
import json, sys, time
from pathlib import Path
import pandas as pd
import torch
torch.set_num_threads(1)
from fastmdm import TabularMDM
table, out, seed, rows, marker = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
train = pd.read_parquet(table)
start = time.perf_counter()
model = TabularMDM(seed=seed, progress=False).fit(train)
record = {"fit_s": time.perf_counter() - start, "steps": model.training_steps}
model.save(out / "model.pt")
start = time.perf_counter()
model.sample(rows, seed=seed).to_parquet(out / "synth.parquet")
record["sample_s"] = time.perf_counter() - start
if marker:
    model.rare_marker = True
    start = time.perf_counter()
    model.sample(rows, seed=seed).to_parquet(out / "synth_marker.parquet")
    record["sample_marker_s"] = time.perf_counter() - start
print(json.dumps(record))
"""


def with_titles(adult: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Adult with a job-title column: "occupation (grade k)", k ~ Zipf(ZIPF_EXPONENT) over GRADES."""
    rng = np.random.default_rng(seed)
    grades = np.arange(1, GRADES + 1, dtype=np.float64) ** -ZIPF_EXPONENT
    k = rng.choice(GRADES, len(adult), p=grades / grades.sum()) + 1
    titles = adult["occupation"].astype(object) + pd.Series([f" (grade {g})" for g in k], index=adult.index)
    return adult.assign(**{TITLE: titles.where(adult["occupation"].notna(), None)})


def tables(rows: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, holdout, reference): disjoint seeded samples of `rows` rows of Adult with titles."""
    adult, _ = load("adult")
    table = with_titles(adult, seed=0).sample(3 * rows, random_state=0).reset_index(drop=True)
    return table.iloc[:rows].reset_index(drop=True), table.iloc[rows:2 * rows].reset_index(drop=True), \
        table.iloc[2 * rows:].reset_index(drop=True)


def rare_titles_in_file(path: Path, rare: list[str]) -> int:
    """How many of the rare titles the file holds as text (pickled strings are UTF-8; each
    title ends in ")", so no title is found inside another)."""
    blob = path.read_bytes()
    return sum(title.encode() in blob for title in rare)


def scores(train: pd.DataFrame, holdout: pd.DataFrame, rows: pd.DataFrame, seed: int) -> dict:
    """C2ST, DCR share, and for a table with titles the title column's Shape and tail shares."""
    from sdmetrics.single_column import TVComplement
    columns = [c for c in train.columns if c in rows.columns]
    record = {"c2st_xgb": c2st_xgb(train[columns], rows[columns], seed=seed, n_jobs=1),
              "dcr_share": privacy(train[columns], holdout[columns], rows[columns])["dcr_share"]}
    if TITLE in rows.columns:
        counts = train[TITLE].value_counts()
        frequent = set(counts.index[counts >= MIN_ROWS_PER_VALUE])
        cells = rows[TITLE].dropna()
        record.update(shape_title=float(TVComplement.compute(train[TITLE].fillna("(missing)"),
                                                             rows[TITLE].fillna("(missing)"))),
                      outside_frequent=float((~cells.isin(frequent)).mean()),
                      marker=float((cells == OTHER_LABEL).mean()),
                      rare_copied=float(cells.isin(set(counts.index[counts < MIN_ROWS_PER_VALUE])).mean()))
    return record


def run_seed(baseline: Path, train: pd.DataFrame, holdout: pd.DataFrame, reference: pd.DataFrame, seed: int,
             rows: int, work: Path) -> list[dict]:
    counts = train[TITLE].value_counts()
    rare = list(counts.index[counts < MIN_ROWS_PER_VALUE])
    jobs = {"redraw": (THIS_CHECKOUT, train, True), "before": (baseline, train, False),
            "without title": (THIS_CHECKOUT, train.drop(columns=[TITLE]), False)}
    commits = {name: commit_of(source) for name, (source, _, _) in jobs.items()}   # of the code that fits
    for name, (_, table, _) in jobs.items():
        (work / name).mkdir(parents=True, exist_ok=True)
        table.to_parquet(work / name / "train.parquet")
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(run_in, source, CHILD, [work / name / "train.parquet", work / name, seed,
                                                              rows, int(marker)], 1)
                   for name, (source, _, marker) in jobs.items()}
        fits = {name: future.result() for name, future in futures.items()}
    samples = {name: (name, work / name / "synth.parquet") for name in jobs}
    samples["marker"] = ("redraw", work / "redraw" / "synth_marker.parquet")
    records = []
    fits["marker"] = dict(fits["redraw"], sample_s=fits["redraw"].pop("sample_marker_s"))
    for variant in ("redraw", "marker", "before", "without title"):
        fitted, path = samples[variant]
        record = {"seed": seed, "variant": variant, "commit": commits[fitted], **fits[variant],
                  "rare_titles_in_model_file": (rare_titles_in_file(work / fitted / "model.pt", rare)
                                                if fitted != "without title" else None),
                  **scores(train, holdout, pd.read_parquet(path), seed)}
        records.append(record)
        print(json.dumps(record), flush=True)
    records.append({"seed": seed, "variant": "real vs real", **scores(train, holdout, reference, seed)})
    return records


def report(records: list[dict], train: pd.DataFrame, rows: int) -> str:
    counts = train[TITLE].value_counts()
    rare = counts[counts < MIN_ROWS_PER_VALUE]
    frame = pd.DataFrame(records)
    seeds = sorted(frame["seed"].unique())
    columns = ["c2st_xgb", "shape_title", "dcr_share", "outside_frequent", "marker", "rare_copied",
               "rare_titles_in_model_file", "fit_s", "steps", "sample_s"]
    frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *columns])))   # scores a run lacked: NaN
    mean = frame.groupby("variant", sort=False)[columns].mean()
    lines = [
        "# Long-tailed categories",
        "",
        "`python benchmarks/long_tail.py --baseline CHECKOUT --seeds " + " ".join(map(str, seeds))
        + f" --rows {rows}`, on a 2-core CPU shared with other jobs (one thread per fit; the fits of a "
        "seed run side by side, so read fit times as rough).",
        "",
        f"Table: {rows:,} training rows of Adult plus a job title per row, \"occupation (grade k)\" with "
        f"k ~ Zipf({ZIPF_EXPONENT}) over {GRADES:,} grades (see the script). The training rows hold "
        f"{len(counts):,} distinct titles, {int((counts == 1).sum()):,} of them once; "
        f"{rare.sum() / counts.sum():.1%} of the rows with a title hold one that fewer than "
        f"{MIN_ROWS_PER_VALUE} rows hold ({len(rare):,} such titles).",
        "",
        f"Means over {len(seeds)} seed(s); every model is `TabularMDM(seed=seed).fit(train)` with defaults, "
        f"{rows:,} rows sampled. \"redraw\" is this checkout's default, \"marker\" the same fitted model with "
        "`rare_marker=True`, \"before\" the baseline checkout (a token for the 999 most frequent titles, "
        "\"(other)\" for the rest), \"without title\" this checkout on the table without the title column. "
        "Title cells outside the frequent set: the share of synthetic titles not among those at least "
        f"{MIN_ROWS_PER_VALUE} training rows hold; of all title cells, the share reading \"(other)\" and "
        "the share copying a rare training title. Model file: how many rare training titles the saved "
        "model holds as text.",
        "",
        "| variant | commit | XGBoost C2ST | Shape (title) | DCR share | title outside frequent set | "
        "\"(other)\" | rare title copied | rare titles in model file | fit s | steps | sample s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    commits = frame.groupby("variant", sort=False)["commit"].first()

    def cell(value, digits=3):
        return "" if pd.isna(value) else f"{value:.{digits}f}"

    for variant, row in mean.iterrows():
        lines.append(f"| {variant} | {commits.get(variant) if pd.notna(commits.get(variant)) else ''} | "
                     f"{cell(row.c2st_xgb)} | {cell(row.shape_title)} | {cell(row.dcr_share)} | "
                     f"{cell(row.outside_frequent)} | {cell(row.marker)} | {cell(row.rare_copied)} | "
                     f"{cell(row.rare_titles_in_model_file, 0)} | {cell(row.fit_s, 0)} | {cell(row.steps, 0)} | "
                     f"{cell(row.sample_s, 1)} |")
    by_seed = frame.set_index(["variant", "seed"])["sample_s"]
    ratio = (by_seed["redraw"] / by_seed["marker"]).mean()
    lines += ["", "Read the DCR share against the real-vs-real row: the distance one-hot encodes titles on the "
              "training rows, so a title no training row holds (most of a held-out row's rare titles) counts as no "
              "title, one step from any title where two different titles are two apart. Real rows score well below "
              ".5 for it, and rows whose titles are all training titles (redraw) score higher without copying."]
    if pd.notna(ratio):
        lines += ["", f"Sampling cost of the rule: the default model's {rows:,} rows took {ratio:.2f}x the time of "
                  "the same model's rows with the marker (every categorical column's draws restricted against none; "
                  "the two samples run one after the other in one process, mean over the seeds that timed it)."]
    if len(seeds) > 1:
        spread = frame.groupby("variant", sort=False)["c2st_xgb"].agg(["min", "max"])
        lines += ["", "XGBoost C2ST range over seeds: " + "; ".join(
            f"{variant} {low:.3f}-{high:.3f}" for variant, (low, high) in spread.iterrows())]
    lines += ["", f"Machine: {platform.machine()}, Python {platform.python_version()}; raw records in "
              "long_tail.jsonl.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout from before the privacy rule")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args()
    train, holdout, reference = tables(args.rows)
    # The records of other seeds at the same size stay, so seeds can be run one at a time.
    runs = RESULTS / "long_tail.jsonl"
    earlier = [json.loads(line) for line in runs.read_text().splitlines()] if runs.exists() else []
    records = [r for r in earlier if r["seed"] not in args.seeds and r.get("rows") == args.rows]
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            records += [dict(r, rows=args.rows)
                        for r in run_seed(args.baseline, train, holdout, reference, seed, args.rows, Path(work) / str(seed))]
            write_report(report(records, train, args.rows), RESULTS / "long_tail.md", RESULTS / "long_tail.jsonl",
                         records, append=False)


if __name__ == "__main__":
    main()
