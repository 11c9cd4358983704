"""Variance of the t-space vs order-space NELBO estimators and of their gradients, same cost.

On UCI Adult with a briefly trained denoiser: per-row NELBO estimates with one denoiser call
each, then gradient estimates over independent mini-batches of the same size (K = 2 masks a
row, RLOO for w). Both estimators target the same NELBO; the table shows the means agree
and how much less noise the order-space one carries.

    python benchmarks/estimator_variance.py [--rows 8192] [--batches 48] [--epochs 3]
"""
from __future__ import annotations

import argparse

import torch

from fastmdm import TabularMDM, datasets, ops
from fastmdm.objective import diffusion_loss


def nelbo_samples(model, tokens, estimator, seed):
    with torch.no_grad():
        out = diffusion_loss(model.denoiser, tokens, model.schedule, model.codec.mask_ids,
                             model.codec.offsets, estimator=estimator, num_samples=1,
                             generator=torch.Generator().manual_seed(seed))
    return out.samples.flatten().double()


def gradient_samples(model, tokens, estimator, batches, batch_rows, seed):
    """One flattened (denoiser, log w) gradient per independent mini-batch."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.denoiser.requires_grad_(True).parameters())
    schedule = model.schedule
    schedule.log_w.requires_grad_(True)
    grads_theta, grads_w = [], []
    for _ in range(batches):
        rows = tokens[torch.randint(0, tokens.shape[0], (batch_rows,), generator=generator)]
        loss = diffusion_loss(model.denoiser, rows, schedule, model.codec.mask_ids, model.codec.offsets,
                              estimator=estimator, num_samples=2, generator=generator).loss
        g = torch.autograd.grad(loss, params + [schedule.log_w])
        grads_theta.append(torch.cat([x.flatten() for x in g[:-1]]).double())
        grads_w.append(g[-1].double())
    return torch.stack(grads_theta), torch.stack(grads_w)


def total_variance(samples: torch.Tensor) -> float:
    """Trace of the covariance across independent estimates."""
    return samples.var(0).sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    train, _ = datasets.load("adult")
    model = TabularMDM(epochs=args.epochs, progress=False, learn_schedule=False).fit(train, validation=None)
    tokens = model.codec.encode(train)
    rows = tokens[torch.randperm(tokens.shape[0])[:args.rows]]
    generator = torch.Generator().manual_seed(1)
    spread = torch.exp(torch.randn(model.codec.num_columns, generator=generator))
    print(f"Adult, denoiser trained {args.epochs} epochs; {args.rows} rows, "
          f"{args.batches} mini-batches of {args.batch_rows} rows x K=2 for gradients\n")
    print("| w | estimator | NELBO mean ± s.e. | per-row std | var(grad theta) | var(grad log w) |")
    print("|---|---|---|---|---|---|")
    for label, w in (("all 1 (linear)", torch.ones_like(spread)), ("log-normal(0,1)", spread)):
        with torch.no_grad():
            model.schedule.log_w.copy_(torch.log(w))
        results = {}
        for estimator in ("tspace", "order"):
            with ops.use_backend("reference"):
                samples = nelbo_samples(model, rows, estimator, seed=2)
                g_theta, g_w = gradient_samples(model, tokens, estimator, args.batches, args.batch_rows, seed=3)
            results[estimator] = (samples, total_variance(g_theta), total_variance(g_w))
            se = samples.std().item() / samples.numel() ** 0.5
            print(f"| {label} | {estimator} | {samples.mean().item():.3f} ± {se:.3f} | "
                  f"{samples.std().item():.2f} | {results[estimator][1]:.3e} | {results[estimator][2]:.3e} |")
        t, o = results["tspace"], results["order"]
        print(f"| {label} | ratio t/order | | {t[0].var().item() / o[0].var().item():.1f}x (variance) | "
              f"{t[1] / o[1]:.1f}x | {t[2] / o[2]:.1f}x |")


if __name__ == "__main__":
    main()
