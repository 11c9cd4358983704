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
NOT_SELECTED = "outside the test files this run selects"
EXPLANATIONS: dict[str, str] = {
    "fastmdm.api.TabularMDM.fit": "the resume (checkpoint) and from-files (token store) branches and their "
        f"arguments, tested by test_api.py, test_contextual.py and test_token_store.py, {NOT_SELECTED}; "
        "the defaults validation=0.1 and resume=False, which the selected tests pass explicitly",
    "fastmdm.api.TabularMDM.load": f"checkpoints and older model files (EMA preference, format upgrade): "
        f"test_api.py and test_contextual.py, {NOT_SELECTED}",
    "fastmdm.objective.model_loss": f"the contextual and order-search branches (test_contextual.py, {NOT_SELECTED}); "
        "defaults every caller overrides; generator=None changes which draws are made, not their distribution",
    "fastmdm.api.TabularMDM.__init__": f"argument checks, their messages and the architecture a contextual order "
        f"selects: test_api.py and test_contextual.py, {NOT_SELECTED}",
    "fastmdm.api.TabularMDM._saved_model_config": f"model files of older versions: test_contextual.py, {NOT_SELECTED}",
    "fastmdm.api.TabularMDM._check_format": f"rejecting other files, upgrading old formats: test_api.py, {NOT_SELECTED}",
    "fastmdm.api.TabularMDM.iter_samples": f"sharding and its checks (test_streaming.py, {NOT_SELECTED}); defaults "
        "that sample() always overrides; message text",
    "fastmdm.api.TabularMDM._split": f"the validation split: test_api.py, {NOT_SELECTED} (the selected tests fit "
        "with validation=None)",
    "fastmdm.decoding.sampler._validate_known": "message text and device checks (one device here: equivalent); the "
        "range check of known values against shifted sizes (39, 41): killed since by test_argument_errors, "
        "which now checks a later column too",
    "fastmdm.api.TabularMDM.impute": "steps, speculative, temperature and the seed not passed on: killed since "
        "by the tests added after this run (one step, speculative refused, temperature 0, seed reproduces); "
        "batch_size changes memory, not the rows' distribution (equivalent)",
    "fastmdm.api.TabularMDM._condition_frame": f"unknown columns and DataFrame conditions: test_api.py, {NOT_SELECTED}; "
        "get(c, None) marks a free cell as NaN does (equivalent)",
    "fastmdm.api.TabularMDM._encode_frame": f"codec options and a validation frame: test_api.py and test_data.py, "
        f"{NOT_SELECTED}",
    "fastmdm.api.TabularMDM.sample": "steps, speculative and seed not passed on: killed since by the tests "
        "added after this run; batch_size 4097 and progress change memory and display only (equivalent)",
    "fastmdm.api.TabularMDM._generate_blocks": "progress bar arguments: display only (equivalent)",
    "fastmdm.decoding.sampler.impute_tokens": "known_mask=None is its default rule (tokens != MASK), which the tests' "
        "inputs follow (equivalent there); a name in a message",
    "fastmdm.decoding.bidirectional.sample_bidirectional": "33, 38: skipping rows with nothing left to reveal is an "
        "optimisation (equivalent); 63, 64: message text; 68: the generator of the logits path (callable "
        "denoisers only), whose reproducibility no test checks",
    "fastmdm.api._resolve_device": "'auto' picks CUDA when there is one: no GPU here (equivalent on this machine)",
    "fastmdm.decoding.common.chunk_of_position": "device=None is the CPU here (equivalent); clamp(min=2) differs only for "
        "a row with one unknown column, whose rank 0 goes to step 0 either way (equivalent)",
    "fastmdm.decoding.common.gumbel_max": "temperature >= 0 adds 0 x noise at T = 0, argmax(+1) of [M, K] is argmax(-1) "
        "(both equivalent); generator=None: the logits path's reproducibility, untested",
    "fastmdm.decoding.common.gumbel_noise": "generator and device None: the logits path's reproducibility (untested) and "
        "device (one here)",
    "fastmdm.api.TabularMDM._denoiser_options": f"'CAUSAL': a static causal model's default order is 'static' "
        f"(equivalent); contextual models: test_contextual.py, {NOT_SELECTED}",
    "fastmdm.api.TabularMDM.save": "the history saved under another key: killed since by "
        "test_fitted_and_saved_weights_are_the_averaged_ones (history compared after load)",
}


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
             f"Written by `python benchmarks/mutation_survey.py` after {minutes:g} minutes of mutmut "
             f"({sum(total.values()) - total['not checked']} of {sum(total.values())} mutants checked; "
             "[tool.mutmut] in pyproject.toml). Modules mutated: "
             + ", ".join(f"`{p}`" for p in config.get("only_mutate", [])) + "; tests run: "
             + ", ".join(f"`{t}`" for t in config.get("pytest_add_cli_args_test_selection", [])
                                       + config.get("tests_dir", [])) + ".", "",
             "Kill rate = (killed + timed out) / (killed + timed out + survived): the mutants that ran "
             "at least one test. 'No tests' are mutants of functions none of those tests calls; "
             "'not checked' were not reached in the time given. The machine was shared (2 cores). "
             "The tests are those of the run; an explanation names the tests added since that kill a survivor.", "",
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
    spent = args.workdir / "minutes_run.txt"   # the run's time box, summed over resumed runs
    if args.minutes > 0:
        run_mutmut(args.workdir, args.minutes, args.jobs)
        spent.write_text(str(float(spent.read_text() if spent.exists() else 0) + args.minutes))
    config = tomllib.loads((args.workdir / "pyproject.toml").read_text())["tool"]["mutmut"]
    REPORT.write_text(report(results(args.workdir), config, float(spent.read_text() if spent.exists() else 0)))
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
