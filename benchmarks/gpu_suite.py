"""One command for a CUDA machine: the tests natively, the op and end-to-end benchmarks, one report.

A fresh machine with network access (install a CUDA build of torch first if it has none):

    pip install -e ".[dev]" && python benchmarks/gpu_suite.py

A machine that has torch, triton and a C++ compiler but no network: bring the missing
dependencies (for example sdmetrics, copulas, plotly and xgboost-cpu) as wheels in .whl/:

    python benchmarks/gpu_suite.py --wheels .whl

Steps, each a subprocess run from the repository root with the working tree on PYTHONPATH and
TRITON_INTERPRET unset (the suite goes on after a failing step):
  install   wheels from --wheels (no index, no dependencies), then pip for the project
            dependencies still missing (offline this fails and names them), then
            fastmdm._C built in place when it does not import
  headline  benchmarks/bench_e2e.py for the default model only (bf16, fused ops, 2 epochs):
            Adult training rows/s and sampling rows/s in the first minutes, before the long steps
  tests     pytest natively: the Triton tests run on the GPU, not the interpreter
            (tests/conftest.py sets TRITON_INTERPRET only without CUDA); xdist when installed
  ops       benchmarks/bench_gpu.py: each fused op and the full loss step against the torch
            reference and torch.compile, bandwidth against the measured copy bandwidth
  e2e       benchmarks/bench_e2e.py: Adult training rows/s and sampling rows/s at S = L and
            S = L/4, bf16 and fp32, Triton and reference ops
The report is benchmarks/results/gpu_<device>.md (the raw output of every step beside it,
gpu_<device>.log). The exit status is 1 if any step failed (a test, a timeout, a crash).
--quick trims the benchmarks to about ten minutes with the tests (not yet timed on a GPU).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = ("install", "headline", "tests", "ops", "e2e")


@dataclass
class StepResult:
    name: str
    command: str
    returncode: int
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_step(name: str, commands: list[list[str]], timeout: float) -> StepResult:
    """Run the commands in order (stop at the first failure); output is echoed and kept."""
    start, output, returncode = time.perf_counter(), [], 0
    for command in commands:
        text = shlex.join(command)
        print(f"\n=== {name}: {text}", flush=True)
        try:
            done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True,
                                  timeout=max(1.0, timeout - (time.perf_counter() - start)))
            returncode, out = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            returncode = 124
            out = (expired.stdout or b"").decode(errors="replace") + f"\n[timed out after {timeout:.0f} s]"
        print(out, flush=True)
        output.append(f"$ {text}\n{out}")
        if returncode:
            break
    return StepResult(name, " && ".join(shlex.join(c) for c in commands), returncode,
                      time.perf_counter() - start, "\n".join(output))


def missing_dependencies() -> list[str]:
    """Project dependencies (pyproject.toml) with no installed distribution."""
    import tomllib
    from packaging.requirements import Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    missing = []
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        name = Requirement(spec).name
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(spec)
    return missing


def install(wheels: str | None, timeout: float) -> list[StepResult]:
    """Carried wheels, then pip for whatever project dependency is still missing, then fastmdm._C."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    results = []
    if wheels:
        files = sorted(str(p) for p in Path(wheels).glob("*.whl"))
        results.append(run_step("install wheels", [[*pip, "--no-index", "--no-deps", *files]], timeout))
    missing = missing_dependencies()
    if missing:
        results.append(run_step("install dependencies", [[*pip, *missing]], timeout))
        still = missing_dependencies()
        if still:
            results[-1].returncode = results[-1].returncode or 1
            results[-1].output += f"\nstill missing: {still}"
    probe = subprocess.run([sys.executable, "-c", "import fastmdm._C"], cwd=ROOT, env=environment(),
                           capture_output=True)
    if probe.returncode:
        results.append(run_step("build fastmdm._C", [[sys.executable, "setup.py", "build_ext", "--inplace"]],
                                timeout))
    return results


def device_facts() -> tuple[str, list[str]]:
    """(file-name slug, report lines) for the GPU, the driver and the library versions."""
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-cuda"
    facts = [f"- device: {name}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.append(f"- compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    facts.append(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
                 f"Python {platform.python_version()}")
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
        facts.append(f"- driver {driver}")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"), facts


def markdown_tables(output: str) -> str:
    """The markdown table lines a benchmark printed (its report), or a note that it printed none."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    return "\n".join(lines) if lines else "(no table printed: see the log)"


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {STEPS}")
    parser.add_argument("--wheels", help="a folder of wheels to install first (offline machines)")
    parser.add_argument("--pytest-args", default="tests -q -p no:cacheprovider",
                        help="arguments for pytest (xdist's -n is added when installed)")
    parser.add_argument("--quick", action="store_true", help="smaller benchmarks (one 10-minute call in all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each step")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")

    started = datetime.datetime.now(datetime.timezone.utc)
    results = install(args.wheels, args.timeout) if "install" in steps else []
    slug, facts = device_facts()
    import torch
    if not torch.cuda.is_available():
        print("gpu_suite.py: torch sees no CUDA device; the suite measures nothing without one.", file=sys.stderr)
        return 1

    if "headline" in steps:
        headline = ["--epochs", "2", "--sample-rows", "8192", "--precisions", "bf16", "--backends", "auto"]
        results.append(run_step("headline", [[sys.executable, "benchmarks/bench_e2e.py", *headline]], args.timeout))
    if "tests" in steps:
        pytest_args = shlex.split(args.pytest_args)
        if importlib.util.find_spec("xdist") is not None:
            pytest_args += ["-n", str(min(8, os.cpu_count() or 1))]
        results.append(run_step("tests", [[sys.executable, "-m", "pytest", *pytest_args]], args.timeout))
    if "ops" in steps:
        shapes = ["--rows", "65536", "--columns", "15", *([] if args.quick else ["100"])]
        results.append(run_step("ops", [[sys.executable, "benchmarks/bench_gpu.py", *shapes]], args.timeout))
    if "e2e" in steps:
        sizes = ["--epochs", "2", "--sample-rows", "8192"] if args.quick else []
        results.append(run_step("e2e", [[sys.executable, "benchmarks/bench_e2e.py", *sizes]], args.timeout))

    write_report(results, facts, slug, " ".join(argv if argv is not None else sys.argv[1:]), started)
    failed = [r.name for r in results if not r.ok]
    print(f"failed steps: {failed or 'none'}")
    return 1 if failed else 0


def write_report(results: list[StepResult], facts: list[str], slug: str, arguments: str,
                 started: datetime.datetime) -> None:
    """benchmarks/results/gpu_<slug>.md (steps, benchmark tables, failing output) and the raw log."""
    report = [f"# GPU suite: {facts[0][len('- device: '):]}", "",
              f"`python benchmarks/gpu_suite.py {arguments}`, "
              f"{started:%Y-%m-%d %H:%M} UTC, commit {_commit()}.", "", *facts, "",
              "| step | status | seconds | command |", "|---|---|---|---|"]
    report += [f"| {r.name} | {'ok' if r.ok else f'**FAILED** (exit {r.returncode})'} | {r.seconds:.0f} | "
               f"`{r.command if len(r.command) < 150 else r.command[:147] + '...'}` |" for r in results]
    for r in results:
        if r.name in ("ops", "e2e"):
            report += ["", f"## {r.name}", "", markdown_tables(r.output)]
        if not r.ok or r.name == "tests":
            report += ["", f"## {r.name}: end of the output", "", "```", tail(r.output), "```"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gpu_{slug}.md").write_text("\n".join(report) + "\n")
    (RESULTS / f"gpu_{slug}.log").write_text("\n\n".join(f"##### {r.name}\n{r.output}" for r in results))
    print(f"\nreport: benchmarks/results/gpu_{slug}.md")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
