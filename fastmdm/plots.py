"""Pictures of a learned schedule: w per column and the reveal-order distribution it implies."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from .schedules import exponential_keys, order_from_keys


def reveal_position_probabilities(w: torch.Tensor, num_orders: int = 20_000, seed: int = 0) -> np.ndarray:
    """P(column l is revealed at position i) under Plackett-Luce(w), [L, L], by sampling orders."""
    u = torch.rand(num_orders, w.numel(), generator=torch.Generator().manual_seed(seed))
    _, rank = order_from_keys(exponential_keys(w.detach().cpu().float(), u))
    counts = torch.nn.functional.one_hot(rank, w.numel()).sum(0).double()
    return (counts / num_orders).numpy()


def plot_schedule(weights: pd.Series, path: str | os.PathLike) -> None:
    """Write a PNG: bars of w (log scale) and a heatmap of each column's reveal position."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = weights.sort_values(ascending=False)
    probs = reveal_position_probabilities(torch.tensor(order.to_numpy()))
    height = max(4.0, 0.32 * len(order))
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(13, height), gridspec_kw={"width_ratios": [1, 1.4]})
    bars.barh(range(len(order)), order.to_numpy(), color="tab:blue")
    bars.set_yticks(range(len(order)), order.index)
    bars.invert_yaxis()
    bars.set_xscale("log")
    bars.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    bars.set_xlabel("w (log scale; dashed: linear schedule w = 1)")
    bars.set_title("Learned schedule weight per column")
    image = heat.imshow(probs, aspect="auto", cmap="viridis", vmin=0)
    heat.set_yticks(range(len(order)), order.index)
    heat.set_xticks(range(len(order)), [str(i + 1) for i in range(len(order))])
    heat.set_xlabel("reveal position in generation (1 = first)")
    heat.set_title("P(column revealed at position), Plackett-Luce(w)")
    fig.colorbar(image, ax=heat, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
