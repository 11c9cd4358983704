"""GPU benchmark of the fused ops: Triton vs the torch reference vs torch.compile(reference).

    python benchmarks/bench_gpu.py                       # B in {4096, 65536}, L in {15, 100}, fp32 + bf16
    python benchmarks/bench_gpu.py --rows 4096 --no-compile
    pytest benchmarks/bench_gpu.py --benchmark-only      # a small pytest-benchmark subset

Per op, the backend functions are called directly (the contract of `fastmdm.ops.reference`),
so the numbers are kernel costs. The full loss step goes through the public API with autograd
(`fastmdm.ops.use_backend`): order-space masking of K=2 copies of each row, weighted CE forward
and backward on random logits (a stand-in for the denoiser), the RLOO gradient. Its compiled
variant runs the same math through the reference functions under torch.compile, since custom
ops are opaque to the compiler.

Times are medians of triton.testing.do_bench (which flushes L2 between runs). Achieved
bandwidth = the bytes an ideal kernel must move (each input read once, each output written
once; logits only for masked segments) / time, compared with a measured device-to-device
copy (read + write) of 1 GiB.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

SAMPLES = 2          # K: masked copies per row (RLOO needs >= 2)
SEED = 1234
DEVICE = "cuda"      # a module global so the plumbing can be smoke-run elsewhere


@dataclass
class Problem:
    rows: int
    num_columns: int
    dtype: torch.dtype
    x: torch.Tensor          # [B, L] tokens, column l in [0, sizes[l])
    w: torch.Tensor          # [L]
    mask_id: torch.Tensor    # [L]
    log_t: torch.Tensor      # [B]
    time_weight: torch.Tensor  # [B]
    n_revealed: torch.Tensor  # [B]
    offsets: torch.Tensor    # [L+1]
    logits: torch.Tensor     # [B, V]
    mask: torch.Tensor       # [B, L] an order-space mask, for the CE benchmark
    weight: torch.Tensor     # [B, L]
    f: torch.Tensor          # [B, K]
    score: torch.Tensor      # [B, K, L]

    @property
    def vocab(self) -> int:
        return self.logits.shape[1]


def make_problem(rows: int, num_columns: int, dtype: torch.dtype, max_vocab: int) -> Problem:
    from fastmdm.ops import reference
    from fastmdm.schedules import sample_tspace_times
    device = torch.device(DEVICE)
    generator = torch.Generator().manual_seed(SEED)
    sizes = torch.randint(2, max_vocab + 1, (num_columns,), generator=generator)
    offsets = torch.zeros(num_columns + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    x = (torch.rand(rows, num_columns, generator=generator) * sizes).long()
    w = torch.exp(torch.randn(num_columns, generator=generator))
    n_revealed = torch.randint(0, num_columns, (rows,), generator=generator)
    log_t, time_weight = sample_tspace_times(w, rows, generator)
    x, w, n_revealed, sizes, offsets, log_t, time_weight = (
        v.to(device) for v in (x, w, n_revealed, sizes, offsets, log_t, time_weight))
    _, mask, weight, _ = reference.mask_order(x, w, sizes, None, n_revealed, SEED)
    logits = (3 * torch.randn(rows, int(offsets[-1]), device=device)).to(dtype)
    return Problem(rows, num_columns, dtype, x, w, sizes, log_t, time_weight, n_revealed,
                   offsets, logits, mask, weight, torch.randn(rows, SAMPLES, device=device),
                   torch.randn(rows, SAMPLES, num_columns, device=device))


# ---------------------------------------------------------------- bytes an ideal kernel moves

def masking_bytes(rows: int, num_columns: int) -> int:
    """Read x (int64) and two per-row values (fp32); write x_t (int64), mask (bool), weight and score (fp32)."""
    return rows * num_columns * (8 + 8 + 1 + 4 + 4) + rows * 8


def ce_bytes(p: Problem, mask: torch.Tensor | None = None, rows_factor: int = 1) -> int:
    """Masked segments of the logits read once, dlogits written in full, [B, L] side inputs and ce."""
    mask = p.mask if mask is None else mask
    sizes = (p.offsets[1:] - p.offsets[:-1]).to(torch.float64)
    element = p.logits.element_size()
    logits_read = float((mask.to(torch.float64) * sizes).sum()) * element
    rows = p.rows * rows_factor
    return int(logits_read + rows * p.vocab * element + rows * p.num_columns * (8 + 4 + 1 + 4) + rows * 4)


def rloo_bytes(rows: int, num_columns: int) -> int:
    return rows * SAMPLES * (num_columns + 1) * 4


def step_bytes(p: Problem) -> int:
    """Masking of K*B rows, CE fwd+bwd on them, the backward's dlogits * grad (read + write), RLOO."""
    rows = SAMPLES * p.rows
    expected_masked = p.mask.repeat(SAMPLES, 1)       # same mask rate as the step's fresh masks
    element = p.logits.element_size()
    return (masking_bytes(rows, p.num_columns) + ce_bytes(p, expected_masked, SAMPLES)
            + 2 * rows * p.vocab * element + rloo_bytes(p.rows, p.num_columns))


# ---------------------------------------------------------------- timing

def bench(fn, grad_to_none=None) -> float | str:
    """Median milliseconds, or a short reason when the variant cannot run."""
    import triton
    try:
        fn()                                 # compile / autotune outside the timing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                       return_mode="median")
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    except Exception as error:               # e.g. an inductor failure: report it, keep going
        return f"failed ({type(error).__name__})"
    finally:
        torch.cuda.empty_cache()


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (read + write of 1 GiB), the practical ceiling for a streaming kernel."""
    import triton
    src = torch.empty(2**28, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------- the variants

def op_variants(p: Problem):
    """(op name, ideal bytes, {variant: fn}) for every fused op on problem p."""
    import fastmdm.triton as triton_backend
    from fastmdm.ops import reference

    def compiled(fn):
        return torch.compile(fn)

    shape = tuple(p.x.shape)
    yield "mask_tspace", masking_bytes(p.rows, p.num_columns), {
        "triton": lambda: triton_backend.mask_tspace(p.x, p.log_t, p.w, p.mask_id, p.time_weight, None, SEED),
        "reference": lambda: reference.mask_tspace(p.x, p.log_t, p.w, p.mask_id, p.time_weight, None, SEED),
        "compiled": compiled(lambda: reference.mask_tspace(p.x, p.log_t, p.w, p.mask_id, p.time_weight,
                                                           torch.rand(shape, device=DEVICE), SEED)),
    }
    yield "mask_order", masking_bytes(p.rows, p.num_columns), {
        "triton": lambda: triton_backend.mask_order(p.x, p.w, p.mask_id, None, p.n_revealed, SEED),
        "reference": lambda: reference.mask_order(p.x, p.w, p.mask_id, None, p.n_revealed, SEED),
        "compiled": compiled(lambda: reference.mask_order(p.x, p.w, p.mask_id, torch.rand(shape, device=DEVICE),
                                                          p.n_revealed, SEED)),
    }
    ce_args = (p.logits, p.x, p.weight, p.mask, p.offsets, True)
    yield "weighted_ce fwd+bwd", ce_bytes(p), {
        "triton": lambda: triton_backend.weighted_ce(*ce_args),
        "reference": lambda: reference.weighted_ce(*ce_args),
        "compiled": compiled(lambda: reference.weighted_ce(*ce_args)),
    }
    yield "rloo_grad", rloo_bytes(p.rows, p.num_columns), {
        "triton": lambda: triton_backend.rloo_grad(p.f, p.score),
        "reference": lambda: reference.rloo_grad(p.f, p.score),
        "compiled": compiled(lambda: reference.rloo_grad(p.f, p.score)),
    }


def step_variants(p: Problem):
    """The full loss step; returns ({variant: fn}, tensors whose .grad do_bench resets)."""
    from fastmdm import ops
    from fastmdm.ops import reference

    x = p.x.repeat_interleave(SAMPLES, 0)              # row b*K + k is copy k of row b
    n_revealed = torch.randint(0, p.num_columns, (x.shape[0],), device=DEVICE)
    logits = (3 * torch.randn(x.shape[0], p.vocab, device=DEVICE)).to(p.dtype).requires_grad_()
    w = p.w.clone().requires_grad_()

    def public_step(backend):
        def step():
            with ops.use_backend(backend):
                batch = ops.mask_order(x, w, p.mask_id, n_revealed, seed=SEED)
                loss = ops.weighted_ce(logits, x, batch.weight, batch.mask, p.offsets, validate=False)
                loss.mean().backward()
                return ops.rloo_grad(loss.detach().view(p.rows, SAMPLES),
                                     batch.score.view(p.rows, SAMPLES, p.num_columns))
        return step

    def reference_step():
        """The same math on plain tensors: the custom ops' backward is dlogits * d loss / d loss_b."""
        u = torch.rand(x.shape, device=DEVICE)
        _, mask, weight, score = reference.mask_order(x, p.w, p.mask_id, u, n_revealed, SEED)
        loss, _, dlogits = reference.weighted_ce(logits.detach(), x, weight, mask, p.offsets, True)
        grad_logits = dlogits * (1.0 / x.shape[0])
        return grad_logits, reference.rloo_grad(loss.view(p.rows, SAMPLES), score.view(p.rows, SAMPLES, p.num_columns))

    variants = {"triton": public_step("triton"), "reference": public_step("reference"),
                "compiled": torch.compile(reference_step)}
    return variants, [logits, w]


# ---------------------------------------------------------------- report

def fmt_ms(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else value


def ratio(num, den) -> str:
    return f"{num / den:.1f}x" if isinstance(num, float) and isinstance(den, float) else "-"


def row(op: str, p: Problem, nbytes: int, times: dict, copy_gbs: float) -> str:
    tri = times["triton"]
    if isinstance(tri, float):
        gbs = nbytes / (tri * 1e-3) / 1e9
        bw = f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}%"
    else:
        bw = "- | -"
    dtype = str(p.dtype).replace("torch.", "")
    return (f"| {op} | {p.rows} | {p.num_columns} | {p.vocab} | {dtype} | {fmt_ms(tri)} | "
            f"{fmt_ms(times['reference'])} | {fmt_ms(times.get('compiled', 'skipped'))} | "
            f"{ratio(times['reference'], tri)} | {ratio(times.get('compiled'), tri)} | {bw} |")


HEADER = ("| op | B | L | V | logits | triton ms | reference ms | compiled ms | vs reference | "
          "vs compiled | triton GB/s | of copy BW |\n|" + "---|" * 12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--columns", type=int, nargs="+", default=[15, 100])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--max-vocab", type=int, default=256, help="column sizes are drawn from 2..max-vocab")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure.",
              file=sys.stderr)
        return 1
    from fastmdm.ops import available_backends
    if "triton" not in available_backends():
        print("bench_gpu.py: the Triton backend does not import here (is triton installed?).", file=sys.stderr)
        return 1

    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}, measured copy bandwidth {copy_gbs:.0f} GB/s "
          f"(read + write), torch {torch.__version__}\n")
    print(HEADER)
    for rows in args.rows:
        for num_columns in args.columns:
            for dtype_name in args.dtypes:
                torch._dynamo.reset()             # fresh compile caches: no recompile limit across shapes
                p = make_problem(rows, num_columns, getattr(torch, dtype_name), args.max_vocab)
                for op, nbytes, fns in op_variants(p):
                    if args.no_compile:
                        fns.pop("compiled")
                    times = {name: bench(fn) for name, fn in fns.items()}
                    print(row(op, p, nbytes, times, copy_gbs), flush=True)
                fns, grads = step_variants(p)
                if args.no_compile:
                    fns.pop("compiled")
                times = {name: bench(fn, grad_to_none=grads) for name, fn in fns.items()}
                print(row(f"full step (K={SAMPLES})", p, step_bytes(p), times, copy_gbs), flush=True)
                del p, fns, grads
                torch.cuda.empty_cache()
    print("\nBytes: the minimum an ideal kernel moves (inputs read once, outputs written once, "
          "logits only for masked segments); the full step counts K*B rows and the backward's "
          "read + write of dlogits.")
    return 0


# ---------------------------------------------------------------- pytest-benchmark entry points

def _cuda_or_skip():
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _bench_step(benchmark, variant):
    _cuda_or_skip()
    fns, grads = step_variants(make_problem(4096, 15, torch.float32, 256))

    def run():
        for tensor in grads:
            tensor.grad = None
        out = fns[variant]()
        torch.cuda.synchronize()
        return out
    benchmark(run)


def test_full_step_triton(benchmark):
    _bench_step(benchmark, "triton")


def test_full_step_reference(benchmark):
    _bench_step(benchmark, "reference")


if __name__ == "__main__":
    sys.exit(main())
