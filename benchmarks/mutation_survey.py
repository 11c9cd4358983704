"""mutmut over the modules behind the public API: kill rate and survivors, written to
benchmarks/results/mutation.md.

    pip install -e ".[dev]"                                  # mutmut is a dev dependency
    python benchmarks/mutation_survey.py --minutes 30 --workdir /tmp/fastmdm-mutmut

mutmut ([tool.mutmut] in pyproject.toml: the modules to mutate and the tests to run) works in a
copy of the repository made in --workdir, where it writes its mutants/ tree; an existing
--workdir resumes the run it holds. Each mutant runs only the tests that call the mutated
function, in a forked child, with OMP_NUM_THREADS=1 (an OpenMP thread pool does not survive
fork: the children would hang). The run stops after --minutes; mutants not reached are
reported as not checked. `--minutes 0` only writes the report of the run in --workdir.

The named mutations that the suite must kill are in benchmarks/mutations.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "mutation.md"

# mutmut's exit codes (mutmut.stats.status_by_exit_code)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 37: "killed", None: "not checked"}

# Why the mutants that survive in a function do: read from `mutmut show <name>` in the run's
# workdir. A function missing here has survivors nobody has looked at yet.
EXPLANATIONS: dict[str, str] = {}


def prepare(workdir: Path) -> None:
    """A copy of the package, its tests and configuration in workdir (kept if already there)."""
    if (workdir / "pyproject.toml").exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("fastmdm", "tests"):
        shutil.copytree(ROOT / folder, workdir / folder, ignore=ignore)
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, workdir / name)


def run_mutmut(workdir: Path, minutes: float, jobs: int) -> None:
    """mutmut run for at most `minutes`; its results so far stay in the workdir's mutants/."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               # "." (the working directory mutmut runs the tests in: mutants/) first, so the
               # tests import the mutated copy and not an installed fastmdm.
               PYTHONPATH=os.pathsep.join([".", *filter(None, [os.environ.get("PYTHONPATH")])]))
    process = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)], cwd=workdir,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=minutes * 60)
        if process.returncode != 0:
            raise RuntimeError(f"mutmut run failed ({process.returncode}):\n{stderr[-3000:]}")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)   # the session mutmut and its children run in
        process.communicate()


def results(workdir: Path) -> dict[str, str]:
    """Status of every mutant ('fastmdm.api.x_fn__mutmut_3' -> 'killed', ...)."""
    statuses = {}
    for meta in (workdir / "mutants").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            statuses[name] = STATUS.get(code, "suspicious")
    return statuses


def function_of(mutant: str) -> str:
    """'fastmdm.api.xǁTabularMDMǁfit__mutmut_3' -> 'fastmdm.api.TabularMDM.fit'."""
    module, _, mangled = mutant.rpartition(".")
    name = re.sub(r"__mutmut_\d+$", "", mangled)
    name = name[2:].replace("ǁ", ".") if name.startswith("xǁ") else name[2:]
    return f"{module}.{name}"


def report(statuses: dict[str, str], config: dict, minutes: float) -> str:
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for mutant, status in sorted(statuses.items()):
        by_module[mutant.rpartition(".")[0]][status] += 1
        if status == "survived":
            survivors[function_of(mutant)].append(mutant.rsplit("_", 1)[1])
    total = sum(by_module.values(), Counter())

    def rate(c: Counter) -> str:
        tested = c["killed"] + c["timeout"] + c["survived"]
        return f"{(c['killed'] + c['timeout']) / tested:.0%}" if tested else "-"

    lines = ["# Mutation testing (mutmut)", "",
             f"Written by `python benchmarks/mutation_survey.py --minutes {minutes:g}` (mutmut, "
             "[tool.mutmut] in pyproject.toml). Modules mutated: "
             + ", ".join(f"`{p}`" for p in config.get("only_mutate", [])) + "; tests run: "
             + ", ".join(f"`{t}`" for t in config.get("pytest_add_cli_args_test_selection", [])
                                       + config.get("tests_dir", [])) + ".", "",
             "Kill rate = (killed + timed out) / (killed + timed out + survived): the mutants that ran "
             "at least one test. 'No tests' are mutants of functions none of those tests calls; "
             "'not checked' were not reached in the time given. The machine was shared (2 cores).", "",
             "| module | mutants | killed | timeout | survived | no tests | not checked | kill rate |",
             "|---|---|---|---|---|---|---|---|"]
    for module, c in sorted(by_module.items()) + [("**all**", total)]:
        lines.append(f"| {module} | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['survived']} | "
                     f"{c['no tests']} | {c['not checked']} | {rate(c)} |")
    lines += ["", "## Survivors by function", "",
              "Numbers are mutmut's mutant numbers (`mutmut show <module>.x_<function>__mutmut_<n>` "
              "in the workdir shows the change).", "",
              "| function | survivors | why they survive |", "|---|---|---|"]
    for function, numbers in sorted(survivors.items(), key=lambda item: -len(item[1])):
        why = EXPLANATIONS.get(function, "not yet explained")
        lines.append(f"| `{function}` | {len(numbers)} ({', '.join(numbers[:12])}{', ...' if len(numbers) > 12 else ''}) "
                     f"| {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="scratch copy mutmut works in (resumed if present)")
    parser.add_argument("--minutes", type=float, default=30, help="time box of the run; 0 only reports")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    args = parser.parse_args(argv)
    prepare(args.workdir)
    if args.minutes > 0:
        run_mutmut(args.workdir, args.minutes, args.jobs)
    config = tomllib.loads((args.workdir / "pyproject.toml").read_text())["tool"]["mutmut"]
    REPORT.write_text(report(results(args.workdir), config, args.minutes))
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
