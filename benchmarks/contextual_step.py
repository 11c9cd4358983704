"""What a contextual order costs per training step and per sampled row, against a static one.

Two causal models per table, the default size: `static` (learned w) and `contextual` (the
order policy reads the states one block before the last, and the order posterior is
an MLP on the row: fastmdm.models.orders). Reported: the median CPU seconds
of a training step (forward, backward, update; steps interleaved,
`architectures.step_seconds`) and of sampling a batch of rows at S = L (interleaved
repeats, CPU time), each also as a ratio to static's in the
same run. The models are untrained: cost does not depend on the weights.

    python benchmarks/contextual_step.py                  # adult and magic, 1 thread
    python benchmarks/contextual_step.py --tables magic --steps 9
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from architectures import step_seconds
from contextual_orders import load_table
from fastmdm import TabularMDM

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "contextual_step.md")
VARIANTS = {"static": dict(architecture="causal"), "contextual": dict(architecture="causal", order="contextual")}


def sampling_seconds(train, seed: int, rows: int, repeats: int) -> dict[str, float]:
    """Median CPU seconds to sample `rows` rows at S = L per variant, repeats interleaved."""
    models = {}
    for name, options in VARIANTS.items():
        model = TabularMDM(epochs=1, batch_size=1024, seed=seed, progress=False, **options)
        models[name] = model.fit(train.head(2 * model.config.batch_size), validation=None)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.process_time()
            model._sample_tokens(rows, None, None, generator=torch.Generator().manual_seed(0))
            times[name].append(time.process_time() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=["adult", "magic"])
    parser.add_argument("--steps", type=int, default=21, help="training steps per variant (interleaved)")
    parser.add_argument("--rows", type=int, default=4096, help="rows per sampling call")
    parser.add_argument("--repeats", type=int, default=5, help="sampling calls per variant (interleaved)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# What a contextual order costs per step", "",
             f"`python benchmarks/contextual_step.py` (see its docstring): median CPU seconds, {args.threads} torch "
             f"thread(s), {args.steps} interleaved training steps at the default batch and {args.repeats} interleaved "
             f"sampling calls of {args.rows} rows at S = L per variant; machine {platform.machine()}, load average "
             f"{os.getloadavg()[0]:.1f} at the start.", ""]
    for table in args.tables:
        train = load_table(table, 0)[0]
        steps = step_seconds(train, 0, VARIANTS, steps=args.steps)
        sampling = sampling_seconds(train, 0, args.rows, args.repeats)
        print(json.dumps(dict(table=table, step_seconds=steps, sampling_seconds=sampling)), flush=True)
        lines += [f"## {table}", "", "| | training step, CPU s | ratio to static | sampling, CPU s | ratio to static |",
                  "|---|---|---|---|---|"]
        for name in VARIANTS:
            lines.append(f"| {name} | {steps[name]:.3f} | {steps[name] / steps['static']:.2f} | "
                         f"{sampling[name]:.2f} | {sampling[name] / sampling['static']:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    with open(RESULTS, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
