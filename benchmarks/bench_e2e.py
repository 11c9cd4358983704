"""End-to-end throughput on Adult: training rows/s and sampling rows/s, bfloat16 and float32.

    python benchmarks/bench_e2e.py                                   # CUDA: Triton kernels vs the reference
    python benchmarks/bench_e2e.py --device cpu --precisions fp32 --epochs 2 --sample-rows 2000

Training goes through `TabularMDM.fit` (default model, batch 1024, order-space estimator,
K = 2): rows/s is the rows of one epoch over the median time of the epochs after the first
(the first pays for Triton's and cuDNN's warm-up). bf16 is the trainer's autocast
(`TrainConfig.bf16`); fp32 turns it off. Sampling goes through `TabularMDM.sample` at
S = L and S = L/4 steps (bf16 under autocast), after one warm-up call; rows/s includes
decoding the tokens back to a DataFrame, as a user sees it. Backends: "auto" is dispatch's
choice (Triton on CUDA, C++ on CPU), "reference" forces the torch reference ops.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _backend(name: str):
    from fastmdm import ops
    return contextlib.nullcontext() if name == "auto" else ops.use_backend(name)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def run(device: torch.device, precision: str, backend: str, epochs: int, sample_rows: int) -> dict:
    """Train on Adult's training split, then sample; returns the throughputs."""
    import fastmdm

    train, _ = fastmdm.datasets.load("adult")
    with _backend(backend):
        model = fastmdm.TabularMDM(epochs=epochs, bf16=precision == "bf16", progress=False, device=device)
        model.fit(train, validation=None)
        batch = model._trainer.budget.batch_size
        epoch_rows = (len(train) // batch) * batch
        warm = [record.seconds for record in model.history[1:]] or [model.history[0].seconds]
        result = {"device": str(device), "precision": precision, "backend": backend,
                  "train_rows_per_s": epoch_rows / statistics.median(warm),
                  "final_train_nelbo": model.history[-1].train_nelbo}
        num_columns = model.codec.num_columns
        for steps in (num_columns, max(1, num_columns // 4)):
            with _autocast(device, precision):
                model.sample(min(1024, sample_rows), steps=steps, seed=1)        # warm-up
                _synchronize(device)
                start = time.perf_counter()
                model.sample(sample_rows, steps=steps, seed=0)
                _synchronize(device)
            result[f"sample_rows_per_s_S{steps}"] = sample_rows / (time.perf_counter() - start)
    return result


def table(results: list[dict]) -> str:
    keys = [k for k in results[0] if k.startswith("sample_rows_per_s_")]
    header = ("| device | precision | backend | train rows/s | final train NELBO | "
              + " | ".join(f"sample rows/s, S = {k.rsplit('S', 1)[1]}" for k in keys) + " |")
    lines = [header, "|" + "---|" * (5 + len(keys))]
    for r in results:
        lines.append(f"| {r['device']} | {r['precision']} | {r['backend']} | {r['train_rows_per_s']:,.0f} | "
                     f"{r['final_train_nelbo']:.2f} | " + " | ".join(f"{r[k]:,.0f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--backends", nargs="+", default=["auto", "reference"], choices=["auto", "reference"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--sample-rows", type=int, default=32768)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    results = [run(device, precision, backend, args.epochs, args.sample_rows)
               for precision in args.precisions for backend in args.backends]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Adult, {name}, torch {torch.__version__}, {args.epochs} epochs, {args.sample_rows} sampled rows\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
