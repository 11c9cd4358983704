"""Find the ragged-head tiles: for each kernel (loss, loss with gradients, sampler), dtype,
state width class and alignment, the largest tile that compiles for sm_80 and sm_90 without spills.

    nice -n 10 python benchmarks/ragged_head_tiles.py --jobs 2

No GPU needed: every candidate is compiled ahead of time through `triton_resources.py` (the
ops' own launch plans on meta tensors, with the candidate's tile put in). Writes
benchmarks/results/ragged_head_tiles.md (the winners, and the larger tiles that lost, with
why) and ragged_head_tiles_runs.jsonl (every compile); `_TILES` in
fastmdm/triton/ragged_head.py holds the winners, and tests/test_triton_compile.py checks
that they match this file.

A candidate is (BLOCK_M, BLOCK_K) in {16, 32, 64, 128}^2 with 4, 8 or 16 warps. It wins if
it compiles with no stack (spills) and at most `aot.SHARED_LIMIT` of shared memory on both
archs, in every specialization its launches can take (see fastmdm/triton/ragged_head.py):
the aligned tiles (widths that are multiples of 16) at width BLOCK_D, the unaligned ones
(W's rows off 16-byte boundaries, so its loads go element by element) at the odd width
BLOCK_D / 2 + 1 and, in the first class, at width 1 (a compile-time constant); the sampler
at temperature 1 and 0. When only the shared memory is over, fewer pipeline stages (3, 2, 1)
are tried. Candidates go from the largest tile (BLOCK_M * BLOCK_K) down, more cells
first (each W chunk is read once per BLOCK_M cells), fewer warps first. To stay bounded (a
compile takes 2-100 s; spilling ones are the slow ones):
- widths run from 16 up and a width starts at the previous width's winner (a wider state
  needs more registers, so a tile that lost at a narrower width is not tried again);
- a candidate that contains (in BLOCK_M and BLOCK_K, same warps) a tile that spilled with
  every register a thread may have (255; 128 with 16 warps) is skipped: it needs as many.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from itertools import product
from pathlib import Path

import torch

import triton_resources as aot

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_DS = (16, 32, 64, 128, 256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("loss", "grad", "sample")
#: (BLOCK_M, BLOCK_K, warps), most preferred first.
CANDIDATES = sorted(product((16, 32, 64, 128), (16, 32, 64, 128), (4, 8, 16)),
                    key=lambda c: (-c[0] * c[1], -c[0], c[2]))
STAGES = (3, 2, 1)
#: What ptxas may give a thread: 255, or 65,536 / threads when that is less (16 warps: 128).
MAX_REGISTERS = {4: 255, 8: 255, 16: 128}


def launches(mode: str, dtype: torch.dtype, block_d: int, aligned: bool):
    """(label, launch) for every specialization a candidate must pass."""
    widths = [block_d] if aligned else [block_d // 2 + 1] + [1] * (block_d == 16)
    for d in widths:
        if mode == "sample":
            for temperature in (1, 0):
                yield f"d={d} T={temperature}", aot.ragged_head_sample_launch(d, dtype, temperature)
        else:
            yield f"d={d}", aot.ragged_head_loss_launch(d, dtype, mode == "grad")


def with_tile(launch, block_m: int, block_k: int, num_warps: int, num_stages: int):
    return dataclasses.replace(launch, constexprs=dict(launch.constexprs, BLOCK_M=block_m, BLOCK_K=block_k),
                               num_warps=num_warps, num_stages=num_stages)


def try_candidate(mode, dtype, block_d, aligned, candidate, records):
    """(ok, stages, compile records) for one candidate: each arch and specialization in turn,
    stopping at the first failure; fewer pipeline stages where only shared memory is over."""
    block_m, block_k, num_warps = candidate
    for stages in STAGES:
        over_shared = False
        for arch, (spec, launch) in product(aot.ARCHS, list(launches(mode, dtype, block_d, aligned))):
            job = aot.job_for(with_tile(launch, block_m, block_k, num_warps, stages))
            outcome = aot.compile_job(job, arch)
            records.append(dict(mode=mode, dtype=str(dtype)[6:], block_d=block_d, aligned=aligned, block_m=block_m,
                                block_k=block_k, num_warps=num_warps, num_stages=stages, arch=arch, spec=spec,
                                **outcome))
            print(json.dumps(records[-1]), file=sys.stderr, flush=True)      # progress
            if outcome.get("error") or outcome["stack"] or outcome["local"]:
                return False, stages
            if outcome["shared"] > aot.SHARED_LIMIT:
                over_shared = True
                break
        if not over_shared:
            return True, stages
    return False, stages


def search_chain(mode: str, dtype_name: str, aligned: bool) -> list[dict]:
    """Every width class of one kernel, dtype and alignment, narrowest first; the compile records."""
    dtype, records, start = DTYPES[dtype_name], [], 0
    for block_d in BLOCK_DS:
        saturated = []        # (BLOCK_M, BLOCK_K, warps) that spilled with every register it may have
        for index in range(start, len(CANDIDATES)):
            block_m, block_k, warps = candidate = CANDIDATES[index]
            if any(warps == w and block_m >= m and block_k >= k for m, k, w in saturated):
                continue
            before = len(records)
            ok, stages = try_candidate(mode, dtype, block_d, aligned, candidate, records)
            records[-1]["verdict"] = "won" if ok else "lost"
            if ok:
                start = index
                break
            if any(r.get("registers") == MAX_REGISTERS[warps] and r.get("stack") for r in records[before:]):
                saturated.append(candidate)
        else:            # no tile fits: recorded, and the wider widths are still searched
            records.append(dict(mode=mode, dtype=dtype_name, block_d=block_d, aligned=aligned, verdict="none"))
            candidate = stages = None
        print(f"{mode} {dtype_name} BLOCK_D={block_d} aligned={aligned}: {candidate} stages={stages}",
              file=sys.stderr, flush=True)
    return records


def key(record: dict) -> tuple[str, str, int, bool]:
    return record["mode"], record["dtype"], record["block_d"], record["aligned"]


def winners(records: list[dict]) -> dict[tuple[str, str, int, bool], dict]:
    return {key(r): r for r in records if r.get("verdict") == "won"}


def markdown(records: list[dict], seconds: float) -> str:
    lines = [
        "# Ragged-head tiles: the largest that compiles without spills for sm_80 and sm_90",
        "",
        f"`nice -n 10 python benchmarks/ragged_head_tiles.py` (triton {aot._triton_version()}, no GPU; "
        f"{len(records)} compiles, {seconds / 60:.0f} min on this machine). Rules in the script's docstring; "
        "`_TILES` in `fastmdm/triton/ragged_head.py` holds the winners. Registers are the most over the "
        "specializations compiled (see the script's docstring). Stack is 0 for every winner; shared is the launch's "
        "dynamic shared memory in bytes. A '-' for the larger tiles that lost: the next narrower width's "
        "tile fits here too (tiles that lost there are not tried again).",
        "",
        "| kernel | dtype | BLOCK_D | d % 16 == 0 | BLOCK_M | BLOCK_K | warps | stages | registers sm_80 / sm_90 "
        "| shared B sm_80 / sm_90 | larger tiles that lost (the largest three) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (mode, dtype, block_d, aligned), won in sorted(winners(records).items()):
        group = [r for r in records if key(r) == (mode, dtype, block_d, aligned)]
        tile = ("block_m", "block_k", "num_warps", "num_stages")
        passing = [r for r in group if all(r[k] == won[k] for k in tile)]
        by_arch = {arch: [r for r in passing if r["arch"] == arch] for arch in aot.ARCHS}
        registers = " / ".join(str(max(r["registers"] for r in by_arch[a])) for a in aot.ARCHS)
        shared = " / ".join(str(max(r["shared"] for r in by_arch[a])) for a in aot.ARCHS)
        lost = [r for r in group if r.get("verdict") == "lost"]
        reasons = "; ".join(f"{r['block_m']}x{r['block_k']} w{r['num_warps']}: {_reason(r)}" for r in lost[:3])
        reasons += f"; {len(lost) - 3} more" if len(lost) > 3 else "" if lost else "-"
        lines.append(f"| {mode} | {dtype} | {block_d} | {'yes' if aligned else 'no'} | {won['block_m']} | "
                     f"{won['block_k']} | {won['num_warps']} | "
                     f"{won['num_stages']} | {registers} | {shared} | {reasons} |")
    lines += [f"\n**No tile fits** {mode} {dtype} BLOCK_D={block_d} {'aligned' if aligned else 'unaligned'}."
              for mode, dtype, block_d, aligned in map(key, unfitted(records))]
    return "\n".join(lines) + "\n"


def unfitted(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("verdict") == "none"]


def _reason(record: dict) -> str:
    where = f"sm_{record['arch']} {record['spec']}"
    if record.get("error"):
        return f"error ({where})"
    if record["stack"] or record["local"]:
        return f"{record['registers']} reg + {record['stack']} B stack ({where})"
    return f"{record['shared']} B shared ({where})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--out", type=Path, default=RESULTS / "ragged_head_tiles.md")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compiles kernels: run without TRITON_INTERPRET=1")
    chains = list(product(MODES, DTYPES, (True, False)))
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")             # torch is imported: do not fork
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        records = [r for chain in pool.map(search_chain, *zip(*chains)) for r in chain]
    with open(args.out.with_name(args.out.stem + "_runs.jsonl"), "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    table = markdown(records, time.perf_counter() - start)
    args.out.write_text(table)
    print(table)
    return 1 if unfitted(records) else 0


if __name__ == "__main__":
    sys.exit(main())
