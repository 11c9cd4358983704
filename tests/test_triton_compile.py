"""Every Triton kernel compiles for sm_80 and sm_90, in every configuration dispatch picks, without spills.

The interpreter (TRITON_INTERPRET=1, how the other Triton tests run without a GPU) checks what
the kernels compute; only a compile checks that they build for a real GPU and fit its registers.
`python benchmarks/triton_resources.py` compiles each launch the ops' own plan functions make (on meta
tensors, specialized as a real launch would be), reads registers and stack from the cubin with
the cuobjdump that ships in the triton wheel and the shared memory the launch requests from
Triton's metadata (at most 99 KiB, `triton_resources.SHARED_LIMIT`). It runs in a subprocess
because the test run has set TRITON_INTERPRET=1, under which kernels cannot be compiled.

Representative shapes only (the largest tile of every width class, and the ragged heads at
d = 16, 48, 128, 256 in float32 and bfloat16: 172 compiles, several minutes on 2 cores the
first time, seconds from Triton's on-disk cache afterwards). The exhaustive sweep over
every power-of-two shape and every head width (1,108 compiles) is
`python benchmarks/triton_resources.py --exhaustive --jobs N` (`--only ragged_head`: 176 of them).
The test writes its table to a temporary folder; the committed report
benchmarks/results/triton_resources.md is written by
`python benchmarks/triton_resources.py --markdown benchmarks/results/triton_resources.md`.

The ragged heads' tiles themselves come from `benchmarks/ragged_head_tiles.py`, a search over
candidate tiles with the same compiler; the last test checks that the dispatched table is
what that search found.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from triton_resources import SHARED_LIMIT  # noqa: E402  (needs triton)
if not hasattr(triton.runtime.jit, "native_specialize_impl"):
    pytest.skip(f"triton {triton.__version__} lacks the specialization API benchmarks/triton_resources.py uses",
                allow_module_level=True)
cuobjdump = Path(triton.knobs.nvidia.cuobjdump.path)
if not cuobjdump.exists():
    pytest.skip(f"no cuobjdump at {cuobjdump} (triton without its NVIDIA backend)", allow_module_level=True)

KERNELS = {"_mask_tspace_kernel", "_mask_order_kernel", "_weighted_ce_kernel", "_rloo_partial_kernel",
           "_ragged_head_ce_kernel", "_ragged_head_sample_kernel"}


def compile_in_subprocess(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", code] if code else [sys.executable, "benchmarks/triton_resources.py", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def test_every_dispatched_configuration_compiles_without_spills(tmp_path):
    raw, table = tmp_path / "resources.json", tmp_path / "triton_resources.md"
    run = compile_in_subprocess("--json", str(raw), "--markdown", str(table))
    assert raw.exists() and table.exists(), f"triton_resources.py did not finish:\n{run.stderr[-3000:]}"
    results = json.loads(raw.read_text())
    failing = [r for r in results if r["error"] or r["stack"] or r["local"] or r["shared"] > SHARED_LIMIT]
    assert not failing, "compile errors, spills or too much shared memory:\n" + "\n".join(
        f"{r['kernel']} [{r['config']}] sm_{r['arch']} ({r['shapes']}): "
        + (r["error"] or f"{r['registers']} registers, {r['stack']} B stack, {r['shared']} B shared")
        for r in failing)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {r["kernel"] for r in results} == KERNELS
    assert {r["arch"] for r in results} == {80, 90}
    # The widest tables mask_order takes on the GPU are among the configurations compiled.
    assert any(r["kernel"] == "_mask_order_kernel" and "BLOCK_L=4096" in r["config"] for r in results)
    # Every ragged-head tile class of the widest states: loss, loss with gradients, both samplers
    # with and without token restrictions.
    widest = [r["config"] for r in results if r["kernel"].startswith("_ragged_head") and "BLOCK_D=256" in r["config"]]
    classes = [("COMPUTE_GRAD=False",), ("COMPUTE_GRAD=True",)] + [
        (f"GREEDY={greedy}", f"RESTRICTED={restricted}") for greedy in (False, True) for restricted in (False, True)]
    for flags in classes:
        for precision in ("PRECISION=ieee", "PRECISION=tf32"):   # float32, bfloat16
            assert sum(all(f in config for f in (*flags, precision)) for config in widest) == 2, (flags, precision)


def test_a_spilling_configuration_is_reported():
    """The check can fail: the RLOO kernel with its [64, 128] accumulator on one warp (256 values
    a thread) must show stack use."""
    code = """
import dataclasses, json
import torch
import sys
sys.path.insert(0, "benchmarks")
import triton_resources as aot
from fastmdm.triton.rloo import plan_rloo_grad
launch = plan_rloo_grad(aot._meta((4096, 2)), aot._meta((4096, 2, 128)))[1]
launch = dataclasses.replace(launch, constexprs=dict(launch.constexprs, BLOCK_R=64), num_warps=1)
print(json.dumps(aot.compile_job(aot.job_for(launch), 90)))
"""
    run = compile_in_subprocess(code=code)
    assert run.returncode == 0, run.stderr[-3000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    assert usage.get("error") is None and usage["stack"] > 0, usage


def test_ragged_head_tiles_are_the_searched_ones():
    """`_TILES` in fastmdm/triton/ragged_head.py is what benchmarks/ragged_head_tiles.py found."""
    from fastmdm.triton.ragged_head import _TILES
    runs = ROOT / "benchmarks" / "results" / "ragged_head_tiles_runs.jsonl"
    records = [json.loads(line) for line in runs.read_text().splitlines()]
    found = {(r["mode"], r["dtype"], r["block_d"], r["aligned"]): (r["block_m"], r["block_k"], r["num_warps"],
                                                                  r["num_stages"])
             for r in records if r.get("verdict") == "won"}
    assert {(mode, str(dtype)[6:], *rest): tile for (mode, dtype, *rest), tile in _TILES.items()} == found
