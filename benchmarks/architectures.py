"""Causal vs bidirectional denoiser, in one run: training speed, NELBO at equal CPU time,
estimator noise, sampling speed and fidelity.

For each dataset and seed both architectures get the same default size (parameter counts
within 1%) and the same CPU-time budget: the bidirectional model trains `--epochs` epochs;
the causal model trains as many epochs as fit in the same time, from a probe of the per-step
CPU time of both, their steps interleaved (`step_seconds`). Then, per model:

- training rows/s and validation NELBO (nats per row, the EMA model);
- per-row standard deviation of the NELBO estimate: the bidirectional model under the
  order-space and t-space estimators, the causal model under its whole-order estimator
  (16 draws per validation row, std per row, averaged over rows);
- sampling rows/s at S = L, S = ceil(L/4) and (causal) speculative decoding with k = 4,
  with the mean number of columns revealed per speculative round;
- fidelity of as many rows as the real train split, sampled at S = L (fastmdm.metrics.score).

One JSON line per (dataset, seed, architecture) goes to benchmarks/results/architectures_runs.jsonl
as soon as it is measured; --report rebuilds benchmarks/results/architectures.md from it.

    python benchmarks/architectures.py                            # adult + magic, 3 seeds
    python benchmarks/architectures.py --datasets adult --seeds 0 --epochs 2 --max-rows 3000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections import defaultdict

import numpy as np
import torch

from fastmdm import TabularMDM, datasets
from fastmdm.metrics import score
from fastmdm.kinds import model_loss
from fastmdm.decoding import DecodeStats

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "architectures_runs.jsonl")
REPORT = os.path.join(HERE, "results", "architectures.md")
ARCHITECTURES = ("bidirectional", "causal")


def step_seconds(train, seed: int, variants: dict[str, dict], steps: int = 15) -> dict[str, float]:
    """Median CPU seconds (process time) of one training step (forward, backward, update) of a
    TabularMDM per variant, built with that variant's options, on a real batch of its batch size.

    The variants' steps are interleaved round-robin, so that a change in the machine's load
    (other jobs on shared cores) hits all of them alike, and CPU time, not wall time, is what
    each step is charged.
    """
    probes = {}
    for name, options in variants.items():
        model = TabularMDM(epochs=1, batch_size=1024, seed=seed, progress=False, **options)
        batch = model.config.batch_size
        model.fit(train.head(2 * batch), validation=None)
        probes[name] = (model._trainer, model.codec.encode(train.head(batch)))
    times = {name: [] for name in variants}
    for _ in range(steps):
        for name, (trainer, tokens) in probes.items():
            start = time.process_time()
            trainer._train_step(tokens)
            times[name].append(time.process_time() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def estimator_std(model: TabularMDM, tokens: torch.Tensor, estimator: str, draws: int = 16) -> float:
    """Mean over rows of the std of `draws` independent NELBO estimates of that row."""
    schedule = model.schedule
    with torch.no_grad():
        out = model_loss(model.denoiser, tokens.to(model.device), schedule, model.codec.mask_ids,
                         model.codec.offsets, estimator=estimator, num_samples=draws,
                         generator=torch.Generator().manual_seed(0))
    return float(out.samples.std(1).mean())


def sampling_rate(model: TabularMDM, rows: int, **options) -> tuple[float, float | None]:
    stats = DecodeStats()
    start = time.perf_counter()
    model._sample_tokens(rows, None, None, stats=stats, generator=torch.Generator().manual_seed(0), **options)
    rate = rows / (time.perf_counter() - start)
    return rate, (stats.columns_per_round if stats.rounds else None)


def run(dataset: str, seed: int, epochs: int, max_rows: int | None, sample_rows: int | None) -> list[dict]:
    train, test = datasets.load(dataset)
    if max_rows:
        train = train.head(max_rows)
    probe = step_seconds(train, seed, {arch: dict(architecture=arch) for arch in ARCHITECTURES})
    budget_epochs = {"bidirectional": epochs,
                     "causal": max(1, round(epochs * probe["bidirectional"] / probe["causal"]))}
    records = []
    for arch in ARCHITECTURES:
        model = TabularMDM(architecture=arch, epochs=budget_epochs[arch], seed=seed, progress=False)
        start = time.perf_counter()
        model.fit(train, validation=0.1)
        train_seconds = time.perf_counter() - start
        val = train.sample(frac=0.1, random_state=seed).head(2000)
        val_tokens = model.codec.encode(val)
        estimators = ["order"] if arch == "causal" else ["order", "tspace"]
        num_columns = model.codec.num_columns
        n = sample_rows or len(train)
        rates = {"S=L": sampling_rate(model, n), f"S={math.ceil(num_columns / 4)}":
                 sampling_rate(model, n, steps=math.ceil(num_columns / 4))}
        if arch == "causal":
            rates["speculative k=4"] = sampling_rate(model, n, speculative=4)
        synth = model.sample(len(train), seed=seed)
        fidelity = score(train, synth, test=test, target=datasets.TARGETS[dataset],
                            task=datasets.TASKS[dataset], seed=seed)
        record = dict(
            dataset=dataset, seed=seed, architecture=arch, parameters=model.denoiser.num_parameters(),
            epochs=budget_epochs[arch], probe_step_seconds=probe[arch], train_seconds=train_seconds,
            train_rows_per_second=0.9 * len(train) * budget_epochs[arch] / sum(r.seconds for r in model.history),
            val_nelbo=model.history[-1].val_nelbo,
            estimator_std={e: estimator_std(model, val_tokens, e) for e in estimators},
            sampling={k: dict(rows_per_second=v[0], columns_per_round=v[1]) for k, v in rates.items()},
            fidelity=fidelity, torch_threads=torch.get_num_threads(), machine=platform.machine())
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def grouped_runs(path: str, *keys: str) -> dict[tuple, list[dict]]:
    """The JSON lines of a runs file, grouped by the values of `keys`."""
    with open(path) as handle:
        runs = [json.loads(line) for line in handle if line.strip()]
    groups = defaultdict(list)
    for r in runs:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def report_path(results: str) -> str:
    """The markdown report beside a runs file: name_runs.jsonl -> name.md, so a report built
    from a scratch runs file never overwrites the committed one."""
    return results.removesuffix("_runs.jsonl").removesuffix(".jsonl") + ".md"


def stat(values) -> str:
    """'mean ± std' over seeds (ddof = 1; a single value alone; distinct strings listed)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if isinstance(values[0], str):
        return ", ".join(sorted(set(values)))
    mean = float(np.mean(values))
    return f"{mean:.4g} ± {np.std(values, ddof=1):.2g}" if len(values) > 1 else f"{mean:.4g}"


def report(path: str = RESULTS) -> str:
    groups = grouped_runs(path, "dataset", "architecture")

    lines = ["# Causal vs bidirectional denoiser", "",
             "`python benchmarks/architectures.py` (mean ± std over seeds, ddof = 1; equal CPU-time training "
             "budget per dataset and seed; 1 torch thread on a 2-core CPU shared with other jobs while measuring, so "
             "compare the two architectures within a row group, not absolute times).", ""]
    for dataset in sorted({d for d, _ in groups}):
        lines += [f"## {dataset}", "",
                  "| | bidirectional | causal |", "|---|---|---|"]
        rows = [("parameters", lambda r: r["parameters"]), ("seeds", None),
                ("epochs in the budget", lambda r: r["epochs"]),
                ("training seconds", lambda r: r["train_seconds"]),
                ("training rows/s", lambda r: r["train_rows_per_second"]),
                ("validation NELBO (nats/row)", lambda r: r["val_nelbo"]),
                ("per-row std, order-space (causal: whole-order)", lambda r: r["estimator_std"].get("order")),
                ("per-row std, t-space", lambda r: r["estimator_std"].get("tspace"))]
        keys = sorted({k for arch in ARCHITECTURES for r in groups[(dataset, arch)] for k in r["sampling"]})
        rows += [(f"sampling rows/s, {k}", lambda r, k=k: r["sampling"].get(k, {}).get("rows_per_second"))
                 for k in keys]
        rows += [("columns per speculative round", lambda r: r["sampling"].get("speculative k=4", {})
                  .get("columns_per_round"))]
        metrics = sorted({m for arch in ARCHITECTURES for r in groups[(dataset, arch)] for m in r["fidelity"]})
        rows += [(f"{m} (S = L)", lambda r, m=m: r["fidelity"].get(m)) for m in metrics]
        for label, get in rows:
            cells = []
            for arch in ARCHITECTURES:
                runs_ = groups[(dataset, arch)]
                cells.append(str(len(runs_)) if get is None else stat([get(r) for r in runs_]))
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        lines.append("")
    text = "\n".join(lines)
    with open(REPORT, "w") as handle:
        handle.write(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["adult", "magic"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="bidirectional epochs; sets the time budget")
    parser.add_argument("--max-rows", type=int, default=None, help="use the first rows of train only (smoke runs)")
    parser.add_argument("--sample-rows", type=int, default=None, help="rows per sampling-speed measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings stable on a shared machine)")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        for seed in args.seeds:         # seeds outermost: every dataset is covered early
            for dataset in args.datasets:
                for record in run(dataset, seed, args.epochs, args.max_rows, args.sample_rows):
                    with open(RESULTS, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
    print(report())


if __name__ == "__main__":
    main()
