"""Pictures of a learned schedule: w per column and the reveal orders it implies (or, for a
contextual model, the orders its sampled rows took)."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from .schedules import exponential_keys, order_from_keys


def position_probabilities(rank: torch.Tensor) -> np.ndarray:
    """P(column l is revealed at position i), [L, L], from ranks [n, L] of n orders."""
    counts = torch.nn.functional.one_hot(rank, rank.shape[1]).sum(0).double()
    return (counts / rank.shape[0]).numpy()


def reveal_position_probabilities(w: torch.Tensor, num_orders: int = 20_000, seed: int = 0) -> np.ndarray:
    """P(column l is revealed at position i) under Plackett-Luce(w), [L, L], by sampling orders."""
    u = torch.rand(num_orders, w.numel(), generator=torch.Generator().manual_seed(seed))
    _, rank = order_from_keys(exponential_keys(w.detach().cpu().float(), u))
    return position_probabilities(rank)


def plot_schedule(weights: pd.Series, path: str | os.PathLike, orders: pd.DataFrame | None = None,
                  top_prefixes: int = 12) -> None:
    """Write a PNG: bars of w (log scale) and a heatmap of each column's reveal position.

    Without `orders` the heatmap is Plackett-Luce(w)'s. With `orders` (sampled rows' orders,
    as `TabularMDM.generation_orders` gives; what a contextual model needs) the heatmap
    counts them, and a third panel shows how the first columns vary across rows: the most
    frequent first three columns and their share of rows.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    order = weights.sort_values(ascending=False)
    if orders is None:
        probs = reveal_position_probabilities(torch.tensor(order.to_numpy()))
        source = "Plackett-Luce(w)"
    else:
        index = {name: i for i, name in enumerate(order.index)}
        by_position = torch.tensor(orders.apply(lambda column: column.map(index)).to_numpy(), dtype=torch.long)
        rank = torch.empty_like(by_position).scatter_(
            1, by_position, torch.arange(by_position.shape[1]).expand_as(by_position))
        probs = position_probabilities(rank)
        source = f"{len(orders):,} sampled rows"
    height = max(4.0, 0.32 * len(order))
    panels = 2 if orders is None else 3
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, height),
                             gridspec_kw={"width_ratios": [1, 1.4, 1.4][:panels]})
    bars, heat = axes[0], axes[1]
    bars.barh(range(len(order)), order.to_numpy(), color="tab:blue")
    bars.set_yticks(range(len(order)), order.index)
    bars.invert_yaxis()
    bars.set_xscale("log")
    bars.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # narrow ranges: no overlapping labels
    bars.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    bars.set_xlabel("w (log scale; dashed: linear schedule w = 1)")
    bars.set_title("Learned schedule weight per column" if orders is None else "Order policy's prior w per column")
    image = heat.imshow(probs, aspect="auto", cmap="viridis", vmin=0)
    heat.set_yticks(range(len(order)), order.index)
    heat.set_xticks(range(len(order)), [str(i + 1) for i in range(len(order))])
    heat.set_xlabel("reveal position in generation (1 = first)")
    heat.set_title(f"P(column revealed at position), {source}")
    fig.colorbar(image, ax=heat, fraction=0.04)
    if orders is not None:
        first = orders.iloc[:, :3].astype(str).agg(" > ".join, axis=1).value_counts(normalize=True)[:top_prefixes]
        prefixes = axes[2]
        prefixes.barh(range(len(first)), first.to_numpy(), color="tab:green")
        prefixes.set_yticks(range(len(first)), first.index)
        prefixes.invert_yaxis()
        prefixes.set_xlabel("share of sampled rows")
        prefixes.set_title("Most frequent first three columns")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
