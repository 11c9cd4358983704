"""How much a value-dependent order is worth on the switch table, and whether a model learns it.

Trains causal models on `switch_table` (benchmarks/contextual_orders.py) for the same
number of epochs and reports their validation NELBO per epoch:

- `oracle`: orders drawn per row as switch first, then the free group the switch names, then
  the other group (each group in random order); the order a contextual model should find.
  Its validation bound uses the same orders, so it is the NELBO a contextual model would
  reach if its policy and posterior learned that order exactly.
- `linear`: w = 1 fixed, so orders are uniform.
- `static`: learned w (MDM(LS)).
- `contextual`: the LoMDM model (fastmdm.models.orders), posterior on top of a learned w.
- `contextual-fixed-w`: the same with w = 1 fixed, so the posterior alone shapes the orders.

For the learned orders it also reports the share of sampled rows generated in an easy
order, one that needs no three-way conditional (`easy_order_share`: 1 for the oracle's
order, 0.4 for uniform orders, at most 1/2 for a static order), and for the contextual
models the same share of orders drawn from the posterior q(pi | x) for real rows. For every model it reports
held-out -log p(x | pi) along free-group-first and bound-group-first orders
(`group_order_nll`): which way its conditionals point a learned order. The oracle replaces the
training objective for its run only (it patches fastmdm.objective.causal_loss), so run one
variant per process, as the CLI does. The contextual models take the library's defaults:
runs before session 10 (no `posterior` field in their records) had a transformer-block
posterior and w at `order_lr`, 1e-3.

    python benchmarks/switch_orders.py oracle --epochs 20 --seed 0
    python benchmarks/switch_orders.py contextual --epochs 20 --seed 0
    python benchmarks/switch_orders.py --report      # benchmarks/results/switch_orders.md
    python benchmarks/switch_orders.py contextual-fixed-w --epochs 30 --seed 0 --order-warmup-epochs 8 \
        --results benchmarks/results/switch_orders_warmup_runs.jsonl
    python benchmarks/switch_orders.py contextual --epochs 22 --seed 0 --centre-posterior \
        --results benchmarks/results/switch_orders_centred_runs.jsonl
    python benchmarks/switch_orders.py contextual --epochs 26 --seed 0 --centre-posterior \
        --order-search-epochs 10 --results benchmarks/results/switch_orders_search_runs.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import fastmdm.objective as objective
from architectures import grouped_runs, report_path, stat
from contextual_orders import easy_order_share, easy_order_share_sampled, switch_table
from fastmdm import TabularMDM
from fastmdm.schedules import exponential_keys, order_from_keys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "switch_orders_runs.jsonl")
VARIANTS = {"oracle": dict(learn_schedule=False), "linear": dict(learn_schedule=False), "static": dict(),
            "contextual": dict(order="contextual"),
            "contextual-fixed-w": dict(order="contextual", learn_schedule=False)}


def group_orders(x: torch.Tensor, free_first: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orders [N, L] for switch-table tokens x [N, L]: the switch, then the free group the switch
    names (or, with free_first=False, the bound group), then the other group; random within groups.

    Columns are those of `switch_table`: switch (token 0 = "a": the a-group is free), a0-a2, b0-b2.
    """
    first_is_a = (x[:, :1] == 0) == free_first
    priority = torch.zeros(x.shape, dtype=torch.float64)
    priority[:, 0] = 2
    priority[:, 1:4] = first_is_a.double()
    priority[:, 4:7] = (~first_is_a).double()
    return torch.argsort(priority + torch.rand(x.shape, generator=generator, dtype=torch.float64), 1,
                         descending=True)


def oracle_loss(denoiser, x, schedule, *, num_samples=2, generator=None) -> objective.LossOutput:
    """-log p(x | pi) with pi from `group_orders` (free group first)."""
    rows, _ = x.shape
    x_rep = x.repeat_interleave(num_samples, dim=0)
    everywhere = torch.ones(x_rep.shape, dtype=torch.bool)
    per_sample = denoiser(x_rep, group_orders(x_rep, generator=generator), targets=x_rep,
                          weight=everywhere.float(), mask=everywhere)
    samples = per_sample.detach().view(rows, num_samples)
    return objective.LossOutput(per_sample.mean(), samples.mean(1), samples)


def group_order_nll(model: TabularMDM, frame) -> dict:
    """Held-out -log p_theta(x | pi) (nats/row, without the order terms) along orders that reveal
    the free group first and along orders that reveal the bound group first: which way the
    denoiser's conditionals point, and so which way the RLOO signal of a learned order points."""
    tokens = model.codec.encode(frame)
    everywhere = torch.ones(tokens.shape, dtype=torch.bool)
    result = {}
    with torch.no_grad():
        for name, free_first in (("free_first", True), ("bound_first", False)):
            orders = group_orders(tokens, free_first, torch.Generator().manual_seed(0))
            nll = model.denoiser(tokens, orders, targets=tokens, weight=everywhere.float(), mask=everywhere)
            result[name] = round(float(nll.mean()), 4)
    return result


def posterior_easy_order_share(model: TabularMDM, frame) -> float:
    """`easy_order_share` of orders drawn from a contextual model's posterior q(pi | x) for
    real rows: whether q, which the policy learns to follow, found the orders the switch names."""
    tokens = model.codec.encode(frame)
    with torch.no_grad():
        scores = model.denoiser.posterior_scores(tokens, model.schedule.w)
    u = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0), dtype=scores.dtype)
    orders, _ = order_from_keys(exponential_keys(scores, u))
    return easy_order_share(orders, list(model.codec.columns), frame["switch"].to_numpy())


def report(path: str = RESULTS) -> str:
    """Mean ± std over seeds per variant, as markdown, also written to `report_path(path)`."""
    groups = grouped_runs(path, "variant")
    variants = [v for v in VARIANTS if groups[(v,)]]
    rows = [("epochs", lambda r: r["epochs"]),
            ("order warm-up epochs", lambda r: r.get("order_warmup_epochs")),
            ("order search epochs", lambda r: r.get("order_search_epochs", 0)),
            ("order_lr", lambda r: r.get("order_lr")),
            ("validation NELBO (nats/row), final", lambda r: r["val_nelbo"][-1]),
            ("validation NELBO, epoch 10", lambda r: r["val_nelbo"][9] if len(r["val_nelbo"]) >= 10 else None),
            ("CPU seconds (training)", lambda r: r["cpu_seconds"]),
            ("sampled rows in an easy order", lambda r: r["easy_orders"]),
            ("posterior orders (held-out rows) that are easy", lambda r: r.get("posterior_easy_orders")),
            ("-log p(x \\| pi), free group first", lambda r: r["group_order_nll"]["free_first"]),
            ("-log p(x \\| pi), bound group first", lambda r: r["group_order_nll"]["bound_first"])]
    lines = ["# Switch table: the oracle order against learned orders", "",
             "`python benchmarks/switch_orders.py VARIANT --seed S` per run (see its docstring), "
             "mean ± std over seeds (ddof = 1); 1 torch thread, batch 256, the same epochs for every variant.",
             "", "| | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    lines.append("| seeds | " + " | ".join(", ".join(str(s) for s in sorted(r["seed"] for r in groups[(v,)]))
                                         for v in variants) + " |")
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(stat([get(r) for r in groups[(v,)]]) for v in variants) + " |")
    text = "\n".join(lines) + "\n"
    with open(report_path(path), "w") as handle:
        handle.write(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?", choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--order-warmup-epochs", type=int, default=0,
                        help="epochs with the order held at its start (TrainConfig.order_warmup_epochs)")
    parser.add_argument("--order-search-epochs", type=int, default=0,
                        help="a contextual model's first epochs trained by the order search (TrainConfig.order_search_epochs)")
    parser.add_argument("--order-lr", type=float, default=None,
                        help="learning rate of a contextual model's policy and posterior (default: TrainConfig.order_lr)")
    parser.add_argument("--centre-posterior", action="store_true",
                        help="centre a contextual model's order posterior per column (model option centre_posterior)")
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
                       batch_size=256, order_warmup_epochs=args.order_warmup_epochs,
                       order_search_epochs=args.order_search_epochs,
                       **({} if args.order_lr is None else dict(order_lr=args.order_lr)),
                       **(dict(model=dict(centre_posterior=args.centre_posterior)) if "contextual" in args.variant else {}),
                       **VARIANTS[args.variant])
    start = time.process_time()
    model.fit(train, validation=0.1)
    held_out = switch_table(2000, seed=2000)
    record = dict(variant=args.variant, seed=args.seed, epochs=args.epochs, order_warmup_epochs=args.order_warmup_epochs,
                  order_search_epochs=args.order_search_epochs,
                  order_lr=model.config.order_lr, centre_posterior=model.denoiser.config.get("centre_posterior", False),
                  posterior=model.denoiser.config.get("posterior"), schedule_lr=model.config.schedule_lr,
                  policy_depth=model.denoiser.config.get("policy_depth"),
                  cpu_seconds=time.process_time() - start,
                  val_nelbo=[round(r.val_nelbo, 4) for r in model.history],
                  easy_orders=None if args.variant == "oracle" else easy_order_share_sampled(model),
                  posterior_easy_orders=(posterior_easy_order_share(model, held_out)
                                              if model.order == "contextual" else None),
                  group_order_nll=group_order_nll(model, held_out),
                  w={c: round(float(v), 4) for c, v in model.weights.items()})
    print(json.dumps(record), flush=True)
    with open(args.results, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(report(args.results))


if __name__ == "__main__":
    main()
