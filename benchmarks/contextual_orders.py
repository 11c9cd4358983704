"""Contextual generation orders against static learned and linear orders, in one run.

Four causal models per (table, seed), all with the default size:
- `linear`: w = 1 fixed, orders uniform;
- `static`: learned w, one Plackett-Luce order distribution for the table (MDM(LS));
- `contextual`: `TabularMDM(order="contextual")`: the order policy p_psi(next column |
  values so far) and the posterior q_phi(pi | x) (fastmdm.models.orders), the first
  `fastmdm.train.ORDER_SEARCH_SHARE` of the epochs trained by the order search
  (fastmdm.objective.order_search_loss), then the bound;
- `contextual-no-search`: the same on the bound alone (`order_search_epochs=0`).
They get the same CPU-time budget: `static` trains `--epochs` epochs and the others as many
as fit in the same time, from a probe of each one's step CPU time, their steps interleaved
(the probe times the bound's step: an order-search step costs about 10% less, so
`contextual` gets slightly less than its share).
Reported: validation NELBO (nats per row; for the contextual model, its bound, which also
bounds -log p(x)), training rows/s, sampling rows/s at S = L, fidelity of as many rows as the
real train split (fastmdm.metrics.score), how often the first revealed columns change across
sampled rows and, on the switch table, the share of sampled rows in an easy order.

Tables: `switch` (`switch_table`: a switch column decides which of two column groups is
drawn freely and which is a fixed function of it, so the easy order depends on a value),
Adult and MAGIC. One JSON line per run goes to benchmarks/results/contextual_orders_runs.jsonl;
--report rebuilds benchmarks/results/contextual_orders.md from it.

    python benchmarks/contextual_orders.py                                  # all tables, 3 seeds
    python benchmarks/contextual_orders.py --tables switch --seeds 0 --epochs 2    # smoke run
    python benchmarks/contextual_orders.py --tables adult --variants contextual    # one variant
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import time

import numpy as np
import pandas as pd
import torch

from architectures import grouped_runs, report_path, sampling_rate, stat, step_seconds
from fastmdm import TabularMDM, datasets
from fastmdm.metrics import score
from fastmdm.decoding import DecodeStats, known_first_order

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "contextual_orders_runs.jsonl")
VARIANTS = {"linear": dict(learn_schedule=False), "static": dict(), "contextual": dict(order="contextual"),
            "contextual-no-search": dict(order="contextual", order_search_epochs=0)}
#: Epochs of the static model per table (the time budget): the switch table is small and
#: learns slowly, so it gets more; --epochs overrides. At 6 epochs MAGIC still gained 1.4
#: nats an epoch, so the comparison would measure mostly that a contextual step's extra CPU
#: cost it a whole epoch.
DEFAULT_EPOCHS = {"switch": 30, "adult": 12, "magic": 12}


def switch_table(rows: int = 20_000, categories: int = 7, noise: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """A table whose easy generation order depends on a value.

    `switch` picks a group: the picked group's three columns (u, v, w) are uniform and
    independent, and the other group's are their pairwise sums (u + v, v + w, w + u) mod
    `categories`, each cell replaced by a uniform value with probability `noise`. Generated
    free group first, every conditional is uniform or a function of two revealed values;
    the other way round (the map is invertible for an odd group size and odd `categories`),
    the first free value is a function of all three sums, and a static order, which cannot
    see the switch, meets that three-way conditional on about half the rows.

    Why sums: with products such as (u v + w) mod 6 every conditional of the free-first
    order is three-way too, and a causal model trained on uniform orders finds that order
    the hardest, so no gradient can lead a learned order to it.
    """
    rng = np.random.default_rng(seed)
    switch = rng.integers(0, 2, rows)
    free = rng.integers(0, categories, (rows, 3))
    bound = (free + np.roll(free, -1, axis=1)) % categories
    bound = np.where(rng.random(bound.shape) < noise, rng.integers(0, categories, bound.shape), bound)
    group_a = np.where(switch[:, None] == 0, free, bound)
    group_b = np.where(switch[:, None] == 0, bound, free)
    columns = {"switch": np.where(switch == 0, "a", "b")}
    columns.update({f"a{i}": [f"v{x}" for x in group_a[:, i]] for i in range(3)})
    columns.update({f"b{i}": [f"v{x}" for x in group_b[:, i]] for i in range(3)})
    return pd.DataFrame(columns)


#: Training options per table: the switch table is small, so smaller batches give more updates.
TABLE_OPTIONS = {"switch": dict(batch_size=256)}


def load_table(name: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, str | None, str | None]:
    """(train, test, MLE target, task); the switch table has no downstream task."""
    if name == "switch":
        return switch_table(seed=1000 + seed), switch_table(rows=5000, seed=2000 + seed), None, None
    train, test = datasets.load(name)
    return train, test, datasets.TARGETS[name], datasets.TASKS[name]


def first_column_spread(model: TabularMDM, rows: int = 2000) -> dict:
    """How the first revealed columns vary across sampled rows: the share of the most frequent
    first column and of the most frequent first-three prefix, and the number of distinct prefixes."""
    orders = model.generation_orders(rows, seed=0)
    prefixes = orders.iloc[:, :3].astype(str).agg(" > ".join, axis=1).value_counts(normalize=True)
    first = orders[1].value_counts(normalize=True)
    return dict(top_first_column=first.index[0], top_first_share=float(first.iloc[0]),
                top_prefix=prefixes.index[0], top_prefix_share=float(prefixes.iloc[0]),
                distinct_prefixes=int(len(prefixes)))


@functools.cache
def easy_group_orders(free: str) -> frozenset[tuple[str, ...]]:
    """Orders of the six group columns of `switch_table` that need no three-way conditional when
    group `free` ("a" or "b") is the free one: every value is either uniform given the values
    before it or a function of two of them (a sum or a difference).

    As vectors over the free values, free cell i is e_i and bound cell i is e_i + e_(i+1); a
    cell is determined by earlier cells when its vector is in their span (over the rationals,
    which agrees with mod 7 here: the minors involved are 0, 1 or 2). Of the 720 orders, 288
    are easy for each switch value and none for both, so a static order is easy on at most
    half the rows, uniform orders on 0.4, and the order the switch names on all.
    """
    bound = "b" if free == "a" else "a"
    basis = np.eye(3)
    vector = {f"{free}{i}": basis[i] for i in range(3)}
    vector.update({f"{bound}{i}": basis[i] + basis[(i + 1) % 3] for i in range(3)})

    def determined(cell: str, given: tuple[str, ...]) -> bool:
        if not given:
            return False
        span = np.array([vector[g] for g in given])
        return np.linalg.matrix_rank(np.vstack([span, vector[cell]])) == np.linalg.matrix_rank(span)

    def easy(order: tuple[str, ...]) -> bool:
        return all(not determined(cell, order[:k]) or any(determined(cell, pair) for pair in
                                                          itertools.combinations(order[:k], 2))
                   for k, cell in enumerate(order))

    return frozenset(order for order in itertools.permutations(vector) if easy(order))


def easy_order_share(orders: torch.Tensor, columns: list[str], switch: np.ndarray) -> float:
    """Switch table: the share of rows (orders [N, L] of column ids, switch values [N]) whose
    order is in `easy_group_orders` for the row's free group (the switch column may come
    anywhere): 1 for an order that follows the switch, at most 1/2 for a static one."""
    names = np.asarray(columns)[orders.numpy()]
    easy = [tuple(c for c in row if c != "switch") in easy_group_orders(free) for row, free in zip(names, switch)]
    return float(np.mean(easy))


def easy_order_share_sampled(model: TabularMDM, rows: int = 2000) -> float:
    """`easy_order_share` of `rows` sampled rows, in the order generation revealed them."""
    stats = DecodeStats(orders=[])
    tokens = model._sample_tokens(rows, None, None, generator=torch.Generator().manual_seed(0), stats=stats)
    if stats.orders:
        orders = torch.cat(stats.orders)
    else:
        orders, _ = known_first_order(model.schedule.w.detach().cpu(), rows,
                                      generator=torch.Generator().manual_seed(0))
    return easy_order_share(orders, list(model.codec.columns), model.codec.decode(tokens)["switch"].to_numpy())


def run(table: str, seed: int, epochs: int, max_rows: int | None, names: list[str]) -> list[dict]:
    train, test, target, task = load_table(table, seed)
    if max_rows:
        train = train.head(max_rows)
    variants = {name: dict(options, architecture="causal", **TABLE_OPTIONS.get(table, {}))
                for name, options in VARIANTS.items() if name in names or name == "static"}
    probe = step_seconds(train, seed, variants)     # static sets the budget, so it is always probed
    records = []
    for name in names:
        options = variants[name]
        budget = max(1, round(epochs * probe["static"] / probe[name]))
        model = TabularMDM(epochs=budget, seed=seed, progress=False, **options)
        start = time.perf_counter()
        model.fit(train, validation=0.1)
        train_seconds = time.perf_counter() - start
        rate, _ = sampling_rate(model, min(len(train), 8192))
        synth = model.sample(len(train), seed=seed)
        record = dict(
            table=table, seed=seed, variant=name, parameters=model.denoiser.num_parameters(), epochs=budget,
            order_search_epochs=model.config.order_search_epoch_count(budget) if model.order == "contextual" else 0,
            order_lr=model.config.order_lr, schedule_lr=model.config.schedule_lr,
            probe_step_seconds=probe[name], train_seconds=train_seconds,
            train_rows_per_second=0.9 * len(train) * budget / sum(r.seconds for r in model.history),
            val_nelbo=model.history[-1].val_nelbo, best_val_nelbo=min(r.val_nelbo for r in model.history),
            sampling_rows_per_second=rate,
            fidelity=score(train, synth, test=test if target else None, target=target, task=task, seed=seed,
                           n_jobs=1),
            orders=first_column_spread(model),
            easy_orders=easy_order_share_sampled(model) if table == "switch" else None,
            w={c: round(float(v), 4) for c, v in model.weights.items()},
            torch_threads=torch.get_num_threads(), load_average=os.getloadavg()[0], machine=platform.machine())
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def report(path: str = RESULTS) -> str:
    """Markdown tables per table and variant, also written to `report_path(path)`."""
    groups = grouped_runs(path, "table", "variant")

    lines = ["# Contextual vs static generation orders (causal denoiser)", "",
             "`python benchmarks/contextual_orders.py` (mean ± std over seeds, ddof = 1; an equal CPU-time "
             "training budget per table and seed; 1 torch thread on a 2-core CPU shared with other jobs, so "
             "compare the variants within a table, not absolute times). Validation NELBO is the model's bound "
             "on held-out rows (for the contextual model, the LoMDM bound with orders from its posterior).", ""]
    for table in sorted({t for t, _ in groups}):
        variants = [v for v in VARIANTS if groups[(table, v)]]
        lines += [f"## {table}", "", "| | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        rows = [("seeds", None), ("parameters", lambda r: r["parameters"]),
                ("probe: CPU seconds per step", lambda r: r["probe_step_seconds"]),
                ("epochs in the budget", lambda r: r["epochs"]),
                ("training rows/s", lambda r: r["train_rows_per_second"]),
                ("validation NELBO (nats/row), final", lambda r: r["val_nelbo"]),
                ("validation NELBO, best epoch", lambda r: r["best_val_nelbo"]),
                ("sampling rows/s, S = L", lambda r: r["sampling_rows_per_second"]),
                ("share of rows with the most frequent first column", lambda r: r["orders"]["top_first_share"]),
                ("most frequent first column", lambda r: r["orders"]["top_first_column"]),
                ("share of rows with the most frequent first three", lambda r: r["orders"]["top_prefix_share"]),
                ("distinct first-three prefixes in 2,000 rows", lambda r: r["orders"]["distinct_prefixes"])]
        if table == "switch":
            rows.append(("share of sampled rows in an easy order (uniform: 0.4, static: at most 0.5)",
                         lambda r: r.get("easy_orders")))
        metrics = sorted({m for v in variants for r in groups[(table, v)] for m in r["fidelity"]})
        rows += [(f"{m} (S = L)", lambda r, m=m: r["fidelity"].get(m)) for m in metrics]
        for label, get in rows:
            cells = [str(len(groups[(table, v)])) if get is None else stat([get(r) for r in groups[(table, v)]])
                     for v in variants]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        per_seed = {v: sorted((r["seed"], r["val_nelbo"], r["epochs"]) for r in groups[(table, v)]) for v in variants}
        lines += ["", "Validation NELBO per seed (epochs): " + "; ".join(
            f"{v}: " + ", ".join(f"{s}: {x:.4f} ({e})" for s, x, e in per_seed[v]) for v in variants), ""]
    text = "\n".join(lines)
    with open(report_path(path), "w") as handle:
        handle.write(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=["switch", "adult", "magic"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of the static model, which set the time budget (default per table: {DEFAULT_EPOCHS})")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-rows", type=int, default=None, help="use the first rows of train only (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable)")
    parser.add_argument("--results", default=RESULTS, help="JSON lines file the runs are appended to")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        for seed in args.seeds:         # seeds outermost: every table is covered early
            for table in args.tables:
                epochs = args.epochs or DEFAULT_EPOCHS.get(table, 10)
                for record in run(table, seed, epochs, args.max_rows, args.variants):
                    with open(args.results, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
    print(report(args.results))


if __name__ == "__main__":
    main()
