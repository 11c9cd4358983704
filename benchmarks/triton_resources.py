"""Compile every Triton kernel ahead of time for GPUs that are not here, and read its resources.

    python benchmarks/triton_resources.py --markdown benchmarks/results/triton_resources.md   # sm_80 and sm_90, representative shapes
    python benchmarks/triton_resources.py --exhaustive --markdown benchmarks/results/triton_resources_exhaustive.md
    python benchmarks/triton_resources.py --exhaustive --only ragged_head  # one op's kernels

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` builds
the cubin and `cuobjdump --dump-resource-usage` (shipped in the triton wheel) reads its
registers and stack (local memory: spills); the shared memory is what the launch requests
(triton's metadata), checked against SHARED_LIMIT.

The launches come from the ops' own `plan_*` functions called on meta tensors (no memory), and
are specialized as a real launch would be (pointer alignment, integers equal to 1 or divisible
by 16), so each compiled configuration is one that dispatch picks. Representative shapes give
the largest tile of every width class; `--exhaustive` sweeps rows, widths and vocabularies over
all powers of two, and the ragged heads over every state width 1..MAX_HEAD_WIDTH, strided
states, head weights off a 16-byte boundary, one column of one value. The exit status is 1 on any compile error, stack use or
shared memory over the limit.

Must run without TRITON_INTERPRET=1 (under the interpreter the kernels are not compilable
objects); `tests/test_triton_compile.py` runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import product

import torch

ARCHS = (80, 90)
REPRESENTATIVE_ROWS = 1 << 16       # large batches: the largest tile of every width class
#: Dynamic shared memory a launch may request: 99 KiB, the smallest per-block opt-in limit of
#: the sm_80+ GPUs (sm_86 and sm_89; sm_80 allows 163 KiB, sm_90 227 KiB), so that what
#: compiles here for sm_80/sm_90 also launches on the consumer cards of those generations.
SHARED_LIMIT = 99 * 1024
_SEED = 2**40 + 7                   # seeds are drawn from [0, 2^62): an int64 argument


@dataclass(frozen=True)
class Job:
    """One kernel configuration to compile; plain data, so worker processes can take it."""
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict        # num_warps, and num_stages where the launch sets it

    def label(self) -> str:
        pointers = sorted({v[1:] for v in self.signature.values() if v.startswith("*")})
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        options = ", ".join(f"{k.removeprefix('num_')}={v}" for k, v in self.options.items())
        return f"{consts}, {options}, pointers {'/'.join(pointers)}"


@dataclass
class Result:
    kernel: str
    config: str
    shapes: str          # the first problem that picks this configuration
    arch: int
    registers: int | None = None
    stack: int | None = None
    shared: int | None = None
    local: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.stack == 0 and self.local == 0 and self.shared <= SHARED_LIMIT


def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _head_weight(vocab: int, d: int, dtype: torch.dtype, misaligned: bool) -> torch.Tensor:
    """W [vocab, d]; misaligned: its data starts one element past a 16-byte boundary."""
    return _meta((vocab * d + 1,), dtype)[1:].view(vocab, d) if misaligned else _meta((vocab, d), dtype)


def ragged_head_loss_launch(d: int, dtype: torch.dtype, compute_grad: bool, *, strided: bool = False,
                            misaligned: bool = False, columns: int = 16, rows: int = 2048, vocab: int = 4096):
    """The ragged_head_ce launch for h [rows, columns, d] (strided: no unit stride), W [vocab, d]."""
    from fastmdm.triton.ragged_head import plan_ragged_head_ce
    h = _meta((d, columns, 2 * rows), dtype)[:, :, ::2].permute(2, 1, 0) if strided else _meta((rows, columns, d), dtype)
    cells = (rows, columns)
    tiles = tuple(_meta((rows * columns // 64,), torch.int64) for _ in range(3))
    return plan_ragged_head_ce(h, _head_weight(vocab, d, dtype, misaligned), _meta((vocab,), dtype),
                               _meta((columns + 1,), torch.int64), _meta((rows * columns,), torch.int64), tiles,
                               _meta(cells, torch.int64), _meta(cells), compute_grad)[1]


def ragged_head_sample_launch(d: int, dtype: torch.dtype, temperature: float, *, restricted: bool = False,
                              strided: bool = False, misaligned: bool = False, columns: int = 16,
                              cells: int = 2048, vocab: int = 4096):
    """The ragged_head_sample launch for the states h [cells, d] of cells of `columns` columns
    (restricted: with a table of 8 log-weight patterns)."""
    from fastmdm.triton.ragged_head import plan_ragged_head_sample
    h = _meta((d, 2 * cells), dtype)[:, ::2].t() if strided else _meta((cells, d), dtype)
    tiles = tuple(_meta((cells // 64,), torch.int64) for _ in range(3))
    restriction = (_meta((8, vocab)), _meta((cells,), torch.int64)) if restricted else ()
    return plan_ragged_head_sample(h, _meta((cells,), torch.int64), tiles, _head_weight(vocab, d, dtype, misaligned),
                                   _meta((vocab,), dtype), _meta((columns + 1,), torch.int64), temperature, _SEED,
                                   *restriction)[1]


def problems(exhaustive: bool):
    """(kernel-agnostic shape label, Launch) for every problem class, from the ops' plan functions."""
    from fastmdm.triton.cross_entropy import plan_weighted_ce
    from fastmdm.triton.masking import MAX_ORDER_COLUMNS, plan_mask_order, plan_mask_tspace
    from fastmdm.triton.ragged_head import MAX_HEAD_WIDTH
    from fastmdm.triton.rloo import plan_rloo_grad

    powers = lambda top: [2**i for i in range(top.bit_length())]  # noqa: E731
    rows_classes = powers(REPRESENTATIVE_ROWS) if exhaustive else [REPRESENTATIVE_ROWS]
    widths = powers(MAX_ORDER_COLUMNS) if exhaustive else [1, 15, 100, 600, MAX_ORDER_COLUMNS]
    mean_vocab = powers(2048) if exhaustive else [2, 40, 100, 5000]

    for rows, num_columns, has_u in product(rows_classes, widths, (False, True)):
        x, w = _meta((rows, num_columns), torch.int64), _meta((num_columns,))
        mask_id, u = _meta((num_columns,), torch.int64), _meta((rows, num_columns)) if has_u else None
        label = f"B={rows} L={num_columns}" + (" explicit u" if has_u else " seeded")
        yield label, plan_mask_tspace(x, _meta((rows,)), w, mask_id, _meta((rows,)), u, _SEED)[1]
        yield label, plan_mask_order(x, w, mask_id, u, _meta((rows,), torch.int64), _SEED)[1]
    num_columns = 16
    dtypes = (torch.float32, torch.bfloat16)
    for rows, vocab, dtype, grad in product(rows_classes, mean_vocab, dtypes, (True, False)):
        cells = (rows, num_columns)
        yield (f"B={rows} L={num_columns} V={vocab * num_columns} {str(dtype)[6:]}{' +grad' if grad else ''}",
               plan_weighted_ce(_meta((rows, vocab * num_columns), dtype), _meta(cells, torch.int64), _meta(cells),
                                _meta(cells, torch.bool), _meta((num_columns + 1,), torch.int64), grad)[1])
    for rows, num_columns in product(rows_classes, widths):
        yield f"B={rows} K=2 L={num_columns}", plan_rloo_grad(_meta((rows, 2)), _meta((rows, 2, num_columns)))[1]
    for rows, samples, num_columns in product(rows_classes, (2, 5, 64), widths):   # K = 64: the capped tile
        yield (f"B={rows} K={samples} L={num_columns} per row",
               plan_rloo_grad(_meta((rows, samples)), _meta((rows, samples, num_columns)), per_row=True)[1])
    # Ragged heads: the tile depends on d's class, dtype, kernel and W's alignment; d = 48 is a
    # width that is no power of two. Exhaustive: every width, strided states, misaligned W, one
    # column of one value.
    head_widths = range(1, MAX_HEAD_WIDTH + 1) if exhaustive else (16, 48, 128, 256)
    head_layouts = [dict(), dict(strided=True), dict(misaligned=True), dict(columns=1, vocab=1)]
    for d, dtype, layout in product(head_widths, dtypes, head_layouts if exhaustive else head_layouts[:1]):
        label = f"d={d} {str(dtype)[6:]}" + "".join(f" {k}={v}" for k, v in layout.items())
        for grad in (False, True):
            yield f"{label}{' +grad' if grad else ''}", ragged_head_loss_launch(d, dtype, grad, **layout)
        for temperature, restricted in product((1.0, 0.0), (False, True)):
            yield (f"{label} sample T={temperature:g}{' restricted' if restricted else ''}",
                   ragged_head_sample_launch(d, dtype, temperature, restricted=restricted, **layout))


def job_for(launch) -> Job:
    """The compile inputs a real launch of `launch` would produce (triton's own specialization)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit
    native_specialize_impl = getattr(jit, "native_specialize_impl", None)
    if native_specialize_impl is None:
        raise RuntimeError(f"triton {_triton_version()} has no runtime.jit.native_specialize_impl "
                           "(the ahead-of-time check was written against triton 3.9)")
    kernel = launch.kernel
    runtime = [p for p in kernel.params if not p.is_constexpr]
    if len(runtime) != len(launch.args):
        raise ValueError(f"{kernel.fn.__name__}: {len(launch.args)} arguments for {len(runtime)} parameters")
    values = dict(zip((p.name for p in runtime), launch.args)) | launch.constexprs
    signature, constexprs, attrs = {}, {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", values[p.name]
            continue
        kind, key = native_specialize_impl(BaseBackend, values[p.name], p.is_const, not p.do_not_specialize,
                                           not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":          # an integer equal to 1 becomes a compile-time constant
            constexprs[p.name] = values[p.name]
        elif isinstance(key, str) and key:
            attrs[str(p.num)] = BaseBackend.parse_attr(key)
    return Job(kernel.module, kernel.fn.__name__, signature, constexprs, attrs, launch.options())


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED (static only), LOCAL of the cubin's one function, from cuobjdump."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", handle.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def compile_job(job: Job, arch: int) -> dict:
    """Compile one configuration for sm_<arch>; its resources (registers, stack and local
    bytes, the shared memory its launch requests), or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job.module), job.kernel)
    start = time.perf_counter()
    try:
        source = ASTSource(kernel, job.signature, job.constexprs, {(int(k),): v for k, v in job.attrs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=job.options)
        usage = resource_usage(compiled.asm["cubin"])
    except Exception as error:  # report every failing configuration, not only the first
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}",
                "seconds": time.perf_counter() - start}
    return {"registers": usage["reg"], "stack": usage["stack"], "local": usage["local"],
            "shared": compiled.metadata.shared, "seconds": time.perf_counter() - start}


def check(exhaustive: bool = False, archs=ARCHS, jobs: int = 2, only: str = "") -> list[Result]:
    """Compile every distinct configuration that `problems` reaches, for each arch (only the
    kernels whose name contains `only`)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("benchmarks/triton_resources.py compiles kernels: run it without TRITON_INTERPRET=1")
    first_shapes: dict[str, tuple[Job, str]] = {}
    for shapes, launch in problems(exhaustive):
        if only not in launch.kernel.fn.__name__:
            continue
        job = job_for(launch)
        key = json.dumps(asdict(job), sort_keys=True)          # Jobs hold dicts: dedupe on their text
        first_shapes.setdefault(key, (job, shapes))
    work = [(job, shapes, arch) for job, shapes in first_shapes.values() for arch in archs]
    context = multiprocessing.get_context("spawn")             # torch is imported: do not fork
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        outcomes = pool.map(compile_job, [job for job, _, _ in work], [arch for _, _, arch in work])
        return [Result(job.kernel, job.label(), shapes, arch, **outcome)
                for (job, shapes, arch), outcome in zip(work, outcomes)]


def markdown(results: list[Result], exhaustive: bool, only: str = "") -> str:
    representative = "representative shapes: the largest tile of each width class"
    lines = [
        "# Triton kernels compiled ahead of time: registers, stack (spills), shared memory",
        "",
        f"`python benchmarks/triton_resources.py{' --exhaustive' if exhaustive else ''}{f' --only {only}' if only else ''}` (triton "
        f"{_triton_version()}, no GPU needed). One row per configuration the ops' launch code picks "
        f"({'every power-of-two shape class, every head width' if exhaustive else representative}); "
        "'shapes' is the first problem that picks it. Stack and local memory must be 0 (no spills); "
        "255 registers is the per-thread maximum; shared is the dynamic shared memory the launch "
        f"requests, at most {SHARED_LIMIT} B (see `SHARED_LIMIT`).",
        "",
        "| kernel | configuration | shapes | sm | registers | stack B | shared B | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.kernel} | {r.config} | {r.shapes} | {r.arch} | - | - | - | **{r.error}** |")
        else:
            verdict = "yes" if r.ok else "**spills**" if r.stack or r.local else "**shared memory**"
            lines.append(f"| {r.kernel} | {r.config} | {r.shapes} | {r.arch} | {r.registers} | {r.stack} | "
                         f"{r.shared} | {verdict} |")
    return "\n".join(lines) + "\n"


def _triton_version() -> str:
    import triton
    return triton.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exhaustive", action="store_true", help="every power-of-two shape class")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="CUDA compute capabilities")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--only", default="", help="only the kernels whose name contains this (e.g. ragged_head)")
    parser.add_argument("--markdown", help="write the resource table here")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args(argv)

    results = check(args.exhaustive, args.arch, args.jobs, args.only)
    table = markdown(results, args.exhaustive, args.only)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1)
    print(table)
    bad = [r for r in results if not r.ok]
    print(f"{len(results)} compiles ({sum(r.seconds for r in results):.0f} s compiling), {len(bad)} failing "
          "(compile error, spills or shared memory)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
