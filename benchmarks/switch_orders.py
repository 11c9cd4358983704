"""How much a value-dependent order is worth on the switch table, and whether a model learns it.

Trains causal models on `switch_table` (benchmarks/contextual_orders.py) for the same
number of epochs and reports their validation NELBO per epoch:

- `oracle`: orders drawn per row as switch first, then the free group the switch names, then
  the other group (each group in random order); the order a contextual model should find.
  Its validation bound uses the same orders, so it is the NELBO a contextual model would
  reach if its policy and posterior learned that order exactly.
- `static`: learned w (MDM(LS)).
- `contextual`: the LoMDM model (fastmdm.models.orders), posterior on top of a learned w.
- `contextual-fixed-w`: the same with w = 1 fixed, so the posterior alone shapes the orders.

For the learned orders it also reports the share of sampled rows that reveal the free
group before the other (`free_group_first_share`; 1 for the oracle's order, 1/20 for
uniform orders, at most 1/2 for a static order), and for the contextual models the same
share of orders drawn from the posterior q(pi | x) for real rows. The oracle replaces the
training objective for its run only (it patches fastmdm.objective.causal_loss), so run one
variant per process, as the CLI does.

    python benchmarks/switch_orders.py oracle --epochs 20 --seed 0
    python benchmarks/switch_orders.py contextual --epochs 20 --seed 0
    python benchmarks/switch_orders.py --report      # benchmarks/results/switch_orders.md
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import fastmdm.objective as objective
from architectures import grouped_runs, stat
from contextual_orders import free_group_first, free_group_first_share, switch_table
from fastmdm import TabularMDM
from fastmdm.schedules import exponential_keys, order_from_keys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "switch_orders_runs.jsonl")
REPORT = os.path.join(HERE, "results", "switch_orders.md")
VARIANTS = {"oracle": dict(learn_schedule=False), "static": dict(),
            "contextual": dict(order="contextual"),
            "contextual-fixed-w": dict(order="contextual", learn_schedule=False)}


def oracle_loss(denoiser, x, schedule, *, num_samples=2, generator=None) -> objective.LossOutput:
    """-log p(x | pi) with pi = switch, the free group, the other group (random within groups).

    Columns are those of `switch_table`: switch (token 0 = "a": the a-group is free), a0-a2, b0-b2.
    """
    rows, _ = x.shape
    x_rep = x.repeat_interleave(num_samples, dim=0)
    free_is_a = (x_rep[:, :1] == 0)
    scores = torch.ones(x_rep.shape, dtype=torch.float64)
    scores[:, 0] = 1e8
    scores[:, 1:4] = torch.where(free_is_a, 1e4, 1.0)
    scores[:, 4:7] = torch.where(free_is_a, 1.0, 1e4)
    u = torch.rand(x_rep.shape, generator=generator, dtype=torch.float64)
    order, _ = order_from_keys(exponential_keys(scores, u))
    everywhere = torch.ones(x_rep.shape, dtype=torch.bool)
    per_sample = denoiser(x_rep, order, targets=x_rep, weight=everywhere.float(), mask=everywhere)
    samples = per_sample.detach().view(rows, num_samples)
    return objective.LossOutput(per_sample.mean(), samples.mean(1), samples)


def posterior_free_group_first(model: TabularMDM, frame) -> float:
    """`free_group_first` of orders drawn from a contextual model's posterior q(pi | x) for
    real rows: whether q, which the policy learns to follow, found the order."""
    tokens = model.codec.encode(frame)
    with torch.no_grad():
        scores = model.schedule.w * model.denoiser.order_posterior(tokens)
    u = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0), dtype=scores.dtype)
    orders, _ = order_from_keys(exponential_keys(scores, u))
    return free_group_first(orders, list(model.codec.columns), frame["switch"].to_numpy())


def report(path: str = RESULTS) -> str:
    """Mean ± std over seeds per variant, as markdown (also written to REPORT)."""
    groups = grouped_runs(path, "variant")
    variants = [v for v in VARIANTS if groups[(v,)]]
    rows = [("epochs", lambda r: r["epochs"]),
            ("validation NELBO (nats/row), final", lambda r: r["val_nelbo"][-1]),
            ("validation NELBO, epoch 10", lambda r: r["val_nelbo"][9] if len(r["val_nelbo"]) >= 10 else None),
            ("CPU seconds (training)", lambda r: r["cpu_seconds"]),
            ("sampled rows revealing the free group first", lambda r: r["free_group_first"]),
            ("posterior orders revealing the free group first", lambda r: r.get("posterior_free_group_first"))]
    lines = ["# Switch table: the oracle order against learned orders", "",
             "`python benchmarks/switch_orders.py VARIANT --seed S` per run (see its docstring), "
             "mean ± std over seeds (ddof = 1); 1 torch thread, batch 256, the same epochs for every variant.",
             "", "| | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    lines.append("| seeds | " + " | ".join(", ".join(str(s) for s in sorted(r["seed"] for r in groups[(v,)]))
                                         for v in variants) + " |")
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(stat([get(r) for r in groups[(v,)]]) for v in variants) + " |")
    text = "\n".join(lines) + "\n"
    with open(REPORT, "w") as handle:
        handle.write(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?", choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=RESULTS, help="JSON lines file the run is appended to")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown from --results")
    args = parser.parse_args()
    if args.report:
        print(report(args.results))
        return
    if args.variant is None:
        parser.error("name a variant, or pass --report")
    torch.set_num_threads(args.threads)
    if args.variant == "oracle":
        objective.causal_loss = oracle_loss
    train = switch_table(seed=1000 + args.seed)
    model = TabularMDM(architecture="causal", epochs=args.epochs, seed=args.seed, progress=False,
                       batch_size=256, **VARIANTS[args.variant])
    start = time.process_time()
    model.fit(train, validation=0.1)
    record = dict(variant=args.variant, seed=args.seed, epochs=args.epochs,
                  cpu_seconds=time.process_time() - start,
                  val_nelbo=[round(r.val_nelbo, 4) for r in model.history],
                  free_group_first=None if args.variant == "oracle" else free_group_first_share(model),
                  posterior_free_group_first=(posterior_free_group_first(model, switch_table(2000, seed=2000))
                                              if model.order == "contextual" else None),
                  w={c: round(float(v), 4) for c, v in model.weights.items()})
    print(json.dumps(record), flush=True)
    with open(args.results, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(report(args.results))


if __name__ == "__main__":
    main()
