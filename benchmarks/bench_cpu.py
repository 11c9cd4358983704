"""CPU benchmarks: the C++ backend against the torch reference (eager and torch.compile).

The "full loss step" of order-space training, per the paper's estimator:
  rows x [B, L] repeated K = 2 times -> mask_order (seeded, order-space, n_revealed uniform)
  -> weighted_ce forward + backward on given random logits [B*K, V] (ragged per-column vocab
  sizes drawn in 2..256) -> rloo_grad on the per-sample losses, and backward into logits
  and w (the pathwise weight term through the masking op's autograd).
B = 4096 data rows (8192 masked rows with K = 2), L in {15, 100}.

Run from the repository root, in the environment fastmdm is installed in, as pytest-benchmark
(a ratio table is printed at the end of the run):
    python -m pytest benchmarks/bench_cpu.py
or as a script that times with its own loop and prints the markdown table:
    python benchmarks/bench_cpu.py [--rows 4096] [--repeats 5] [--ops full_step,weighted_ce]

Variants: "cpp" and "reference" go through the public API (fastmdm.ops with
use_backend); "compiled" is torch.compile of the plain reference kernels doing the same
work (masking, CE with its analytic dlogits, RLOO and the pathwise w gradient), skipped when
compilation fails.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import pytest
import torch

import fastmdm.ops as ops
from fastmdm.ops import reference as ref
from fastmdm.schedules import sample_tspace_times

ROWS = int(os.environ.get("FASTMDM_BENCH_ROWS", "4096"))
SAMPLES = 2
COLUMNS = (15, 100)
MAX_VOCAB = 256


@dataclass
class Problem:
    rows: int
    columns: int
    x_rep: torch.Tensor       # [rows * K, L] int64 tokens
    w: torch.Tensor           # [L]
    mask_id: torch.Tensor     # [L]
    n_revealed: torch.Tensor  # [rows * K]
    offsets: torch.Tensor     # [L + 1]
    logits: torch.Tensor      # [rows * K, V]
    log_t: torch.Tensor       # [rows * K] (t-space masking alone)
    time_weight: torch.Tensor  # [rows * K]
    u: torch.Tensor           # [rows * K, L]


def make_problem(columns: int, rows: int = ROWS, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed + columns)
    sizes = torch.randint(2, MAX_VOCAB + 1, (columns,), generator=gen)
    offsets = torch.zeros(columns + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    x = (torch.rand(rows, columns, generator=gen) * sizes).long()
    x_rep = x.repeat_interleave(SAMPLES, dim=0)
    n = rows * SAMPLES
    w = torch.exp(0.5 * torch.randn(columns, generator=gen))
    log_t, time_weight = sample_tspace_times(w, n, gen)
    return Problem(
        rows=rows, columns=columns, x_rep=x_rep, w=w,
        mask_id=sizes.clone(),
        n_revealed=torch.randint(0, columns, (n,), generator=gen),
        offsets=offsets,
        logits=2 * torch.randn(n, int(offsets[-1]), generator=gen),
        log_t=log_t, time_weight=time_weight,
        u=torch.rand(n, columns, generator=gen),
    )


# ----------------------------------------------------------------------------- eager steps
def full_step(p: Problem, seed: int = 0):
    w = p.w.detach().requires_grad_()
    logits = p.logits.detach().requires_grad_()
    batch = ops.mask_order(p.x_rep, w, p.mask_id, p.n_revealed, seed=seed)
    per_row = ops.weighted_ce(logits, p.x_rep, batch.weight, batch.mask, p.offsets)
    g = ops.rloo_grad(per_row.detach().view(p.rows, SAMPLES),
                      batch.score.view(p.rows, SAMPLES, p.columns))
    total = per_row.mean() + (g * w).sum()
    total.backward()
    return logits.grad, w.grad


def mask_order_step(p: Problem, seed: int = 0):
    return ops.mask_order(p.x_rep, p.w, p.mask_id, p.n_revealed, seed=seed)


def mask_tspace_step(p: Problem, seed: int = 0):
    return ops.mask_tspace(p.x_rep, p.log_t, p.w, p.mask_id, p.time_weight, seed=seed)


def _ce_inputs(p: Problem):
    if not hasattr(p, "_ce_cache"):
        batch = ops.mask_order(p.x_rep, p.w, p.mask_id, p.n_revealed, u=p.u)
        p._ce_cache = (batch.weight, batch.mask,
                       batch.score.view(p.rows, SAMPLES, p.columns).contiguous())
    return p._ce_cache


def weighted_ce_step(p: Problem, seed: int = 0):
    weight, mask, _ = _ce_inputs(p)
    logits = p.logits.detach().requires_grad_()
    ops.weighted_ce(logits, p.x_rep, weight, mask, p.offsets).sum().backward()
    return logits.grad


def rloo_step(p: Problem, seed: int = 0):
    _, _, score = _ce_inputs(p)
    f = p.logits[:, :SAMPLES].reshape(-1)[: p.rows * SAMPLES].view(p.rows, SAMPLES)
    return ops.rloo_grad(f, score)


STEPS = {"full_step": full_step, "mask_order": mask_order_step, "mask_tspace": mask_tspace_step,
         "weighted_ce": weighted_ce_step, "rloo_grad": rloo_step}


# -------------------------------------------------------------------------- compiled path
def _reference_full(x_rep, w, mask_id, n_revealed, offsets, logits, rows: int):
    """The full step on the plain reference kernels (no custom ops), for torch.compile."""
    u = torch.rand(x_rep.shape)
    x_t, mask, weight, score = ref.mask_order(x_rep, w, mask_id, u, n_revealed, 0)
    per_row, ce, dlogits = ref.weighted_ce(logits, x_rep, weight, mask, offsets, True)
    num_columns = w.shape[0]
    g = ref.rloo_grad(per_row.view(rows, -1), score.view(rows, -1, num_columns))
    scale = 1.0 / per_row.shape[0]                     # d total / d per_row (mean)
    grad_weight = ce * scale                           # d total / d weight
    hidden_total = torch.where(mask, w[None, :], torch.zeros_like(weight)).sum(1, keepdim=True)
    weighted_grad = (grad_weight * weight).sum(1, keepdim=True)
    per = (num_columns * grad_weight - weighted_grad) / hidden_total
    grad_w = torch.where(mask, per, torch.zeros_like(per)).sum(0) + g
    return dlogits * scale, grad_w


_compiled = {}


def compiled_full_step(p: Problem, seed: int = 0):
    key = "full"
    if key not in _compiled:
        _compiled[key] = torch.compile(_reference_full, dynamic=False)
    return _compiled[key](p.x_rep, p.w, p.mask_id, p.n_revealed, p.offsets, p.logits, p.rows)


def try_compile(p: Problem) -> str | None:
    """Compile and warm up once; the reason it failed, or None."""
    try:
        compiled_full_step(p)
        return None
    except Exception as error:  # noqa: BLE001 (any inductor failure means "skip")
        _compiled["full"] = None
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


# ------------------------------------------------------------------------------ reporting
RESULTS: dict[tuple[str, int, str], float] = {}


def table(results: dict[tuple[str, int, str], float]) -> str:
    lines = ["| op | L | cpp (ms) | reference (ms) | compiled (ms) | reference/cpp | compiled/cpp |",
             "|---|---|---|---|---|---|---|"]
    ops_seen = sorted({(op, cols) for op, cols, _ in results}, key=lambda k: (list(STEPS).index(k[0]), k[1]))
    for op, cols in ops_seen:
        cpp = results.get((op, cols, "cpp"))
        reference = results.get((op, cols, "reference"))
        compiled = results.get((op, cols, "compiled"))
        fmt = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
        ratio = lambda v: "-" if v is None or cpp is None else f"{v / cpp:.1f}x"  # noqa: E731
        lines.append(f"| {op} | {cols} | {fmt(cpp)} | {fmt(reference)} | {fmt(compiled)} | "
                     f"{ratio(reference)} | {ratio(compiled)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest mode
@pytest.fixture(scope="module", params=COLUMNS, ids=lambda c: f"L{c}")
def problem(request):
    return make_problem(request.param)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("op", list(STEPS))
def test_bench(benchmark, problem, op, backend):
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} not built")
    benchmark.group = f"{op} L={problem.columns}"
    rounds = 3 if (backend == "reference" and op in ("full_step", "weighted_ce")) else 5
    with ops.use_backend(backend):
        STEPS[op](problem)  # warm up
        benchmark.pedantic(STEPS[op], args=(problem,), rounds=rounds, iterations=1)
    RESULTS[(op, problem.columns, backend)] = benchmark.stats.stats.median


def test_bench_compiled(benchmark, problem):
    benchmark.group = f"full_step L={problem.columns}"
    reason = try_compile(problem)
    if reason is not None:
        pytest.skip(f"torch.compile of the reference path failed on CPU: {reason}")
    benchmark.pedantic(compiled_full_step, args=(problem,), rounds=3, iterations=1)
    RESULTS[("full_step", problem.columns, "compiled")] = benchmark.stats.stats.median


# --------------------------------------------------------------------------- script mode
def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", default=",".join(STEPS), help=f"comma list from {', '.join(STEPS)}")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.ops.split(",")) - set(STEPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(STEPS)}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rows {args.rows} x K={SAMPLES}")
    results = {}
    for columns in COLUMNS:
        p = make_problem(columns, rows=args.rows)
        print(f"L={columns}: V={p.logits.shape[1]}", file=sys.stderr)
        for op in args.ops.split(","):
            for backend in ("cpp", "reference"):
                with ops.use_backend(backend):
                    results[(op, columns, backend)] = _median_time(lambda: STEPS[op](p), args.repeats)
                print(f"  {op} {backend}: {results[(op, columns, backend)] * 1e3:.1f} ms", file=sys.stderr)
        if not args.no_compile and "full_step" in args.ops:
            start = time.perf_counter()
            reason = try_compile(p)
            if reason is None:
                print(f"  compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
                results[("full_step", columns, "compiled")] = _median_time(
                    lambda: compiled_full_step(p), args.repeats)
            else:
                print(f"  torch.compile skipped: {reason}", file=sys.stderr)
            _compiled.clear()
    print(table(results))


if __name__ == "__main__":
    main()
