"""Measure this checkout against another one: each version runs in a process of its own.

Shared by the benchmarks that take `--baseline CHECKOUT` (causal_step.py, default_path.py, numeric_columns.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

THIS_CHECKOUT = Path(__file__).resolve().parents[1]


def commit_of(source: Path) -> str:
    done = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def versions(baseline: Path | None) -> list[tuple[str, Path]]:
    """(label, checkout) pairs: the baseline first when given, then this checkout. Labels name the commit."""
    pairs = ([("baseline", baseline)] if baseline else []) + [("this checkout", THIS_CHECKOUT)]
    return [(f"{label} ({commit_of(source)})", source) for label, source in pairs]


def run_in(source: Path, code: str, args: list, threads: int) -> dict:
    """Run `python -c code args` against `source`'s fastmdm with `threads` OpenMP threads and
    return the JSON object its last output line holds."""
    env = dict(os.environ, PYTHONPATH=str(source), OMP_NUM_THREADS=str(threads))
    # cwd=source: `python -c` puts the working directory first on sys.path.
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                          env=env, cwd=source, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the child process for {source} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_report(text: str, report: Path, runs: Path, records: list[dict], *, append: bool = True) -> None:
    """The report replaces the last one; the raw records are appended to the runs file, or
    replace it with `append=False` (a script that rewrites its runs file as it goes)."""
    report.write_text(text)
    with runs.open("a" if append else "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
