"""Named mutations the test suite must kill: deliberate bugs in the public API's promises.

Each mutation replaces one snippet of one library file in a temporary copy of the package
and runs, in a subprocess, the tests that should catch it; it is killed when they fail.
`tests/test_mutations.py` runs this list in the test suite; this script runs it by hand and
writes benchmarks/results/mutations.md:

    python benchmarks/mutations.py                 # every mutation, then the report
    python benchmarks/mutations.py --only sample-ignores-w
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMISES = "tests/test_api_promises.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    breaks: str              # the promise the bug breaks
    path: str                # library file, relative to the repository root
    original: str            # snippet that occurs exactly once in it
    mutated: str
    tests: tuple[str, ...]   # pytest node ids that must fail


MUTATIONS = (
    Mutation("sample-ignores-w", "sample() draws orders from PL(model.weights)", "fastmdm/api.py",
             "sample_tokens(self.denoiser, self.schedule.w.detach(),",
             "sample_tokens(self.denoiser, torch.ones_like(self.schedule.w.detach()),",
             (f"{PROMISES}::test_sample_follows_the_learned_order_distribution",)),
    Mutation("impute-ignores-known-cells", "impute() samples each NaN given the row's known cells",
             "fastmdm/api.py",
             "tokens.to(self.device), known.to(self.device), steps=steps,",
             "tokens.to(self.device), torch.zeros_like(known).to(self.device), steps=steps,",
             (f"{PROMISES}::test_impute_samples_each_row_given_its_known_cells",)),
    Mutation("temperature-ignored", "sample(temperature=T) draws from softmax(logits / T)", "fastmdm/api.py",
             "options = dict(steps=steps, speculative=speculative, temperature=temperature)",
             "options = dict(steps=steps, speculative=speculative, temperature=1.0)",
             (f"{PROMISES}::test_temperature_reshapes_every_conditional",)),
    Mutation("heads-ignore-temperature", "the fused head sampler draws from softmax(logits / T)",
             "fastmdm/models/base.py",
             "self.offsets, temperature, seed,", "self.offsets, 1.0, seed,",
             (f"{PROMISES}::test_temperature_reshapes_every_conditional",)),
    Mutation("condition-ignored", "sample(conditions=...) samples the other columns given them",
             "fastmdm/api.py",
             "tokens = self._sample_tokens(len(rows), known, known_mask,",
             "tokens = self._sample_tokens(len(rows), known, None if known is None else known_mask & False,",
             (f"{PROMISES}::test_conditions_are_sampled_given",)),
    Mutation("unseeded-sample-repeats", "sample() without a seed draws fresh rows each call", "fastmdm/api.py",
             "fresh_seed() if seed is None else seed", "0 if seed is None else seed",
             (f"{PROMISES}::test_a_seed_reproduces_the_rows_and_no_seed_draws_fresh_ones",)),
    Mutation("padded-logits-in-fit", "fit() computes its loss through the fused heads, without [N, V] logits",
             "fastmdm/objective.py",
             "per_sample = denoiser(masked.x_t, targets=x_rep, weight=masked.weight, mask=masked.mask)",
             "per_sample = ops.weighted_ce(denoiser(masked.x_t), x_rep, masked.weight, masked.mask, offsets)",
             ("tests/test_ragged_head.py::test_default_fit_score_and_sample_never_build_padded_logits",)),
    Mutation("rloo-advantage-sign-flipped", "the RLOO gradient of w is unbiased (reference op)",
             "fastmdm/ops/reference.py",
             "advantage = f - baseline", "advantage = baseline - f",
             ("tests/test_estimators.py::test_rloo_gradient_is_unbiased",)),
    Mutation("rloo-surrogate-sign-flipped", "training follows the RLOO gradient of w, whatever the backend",
             "fastmdm/objective.py",
             "surrogate = (g.detach().to(w.dtype) * w).sum()", "surrogate = -(g.detach().to(w.dtype) * w).sum()",
             ("tests/test_causal.py::test_rloo_gradient_matches_enumerated_gradient[w0]",)),
    Mutation("weights-saved-without-ema", "fit() ends on, and save() writes, the EMA weights", "fastmdm/api.py",
             "self.denoiser = trainer.ema\n        self.schedule = trainer.ema_schedule",
             "self.denoiser = trainer.denoiser\n        self.schedule = trainer.schedule",
             (f"{PROMISES}::test_fitted_and_saved_weights_are_the_averaged_ones",)),
)


@dataclass
class Outcome:
    mutation: Mutation
    killed: bool
    seconds: float
    output: str


def mutated_copy(mutation: Mutation | None, target: Path) -> None:
    """The package, its tests and pytest settings copied to `target`, with `mutation` applied."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("fastmdm", "tests"):
        shutil.copytree(ROOT / folder, target / folder, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    if mutation is None:
        return
    source = target / mutation.path
    text = source.read_text()
    if text.count(mutation.original) != 1:
        raise ValueError(f"mutation {mutation.name!r}: {mutation.original!r} occurs "
                         f"{text.count(mutation.original)} times in {mutation.path}, expected once")
    source.write_text(text.replace(mutation.original, mutation.mutated))


def run_tests(mutation: Mutation | None, tests: tuple[str, ...], timeout: float = 600) -> tuple[int, float, str]:
    """(pytest exit code, seconds, output) of `tests` run against a copy with `mutation` applied."""
    with tempfile.TemporaryDirectory(prefix="fastmdm-mutation-") as folder:
        target = Path(folder)
        mutated_copy(mutation, target)
        env = dict(os.environ, PYTHONPATH=str(target), PYTHONDONTWRITEBYTECODE="1")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=target, env=env, capture_output=True, text=True, timeout=timeout)
        return result.returncode, time.perf_counter() - start, result.stdout + result.stderr


def run(mutation: Mutation, timeout: float = 600) -> Outcome:
    """Killed when the tests fail (pytest exit code 1); an error of the copy itself raises."""
    code, seconds, output = run_tests(mutation, mutation.tests, timeout)
    if code not in (0, 1):
        raise RuntimeError(f"mutation {mutation.name!r}: pytest exited with {code}\n{output[-3000:]}")
    return Outcome(mutation, code == 1, seconds, output)


def report(outcomes: list[Outcome], baseline_seconds: float) -> str:
    killed = sum(o.killed for o in outcomes)
    lines = ["# Named mutations", "",
             "Deliberate bugs in the public API's promises, each applied to a copy of the package; the "
             "listed tests must fail. Written by `python benchmarks/mutations.py`; "
             "`tests/test_mutations.py` runs the same list in the test suite.", "",
             f"**{killed} of {len(outcomes)} killed.** The unmutated copy passes all listed tests "
             f"({baseline_seconds:.0f} s).", "",
             "| mutation | promise broken | file | killed | seconds | tests |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        m = o.mutation
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in m.tests)
        lines.append(f"| {m.name} | {m.breaks} | `{m.path}` | {'yes' if o.killed else '**no**'} | "
                     f"{o.seconds:.0f} | {tests} |")
    lines += ["", "Seconds are wall time of one pytest subprocess (import included) on a shared 2-core machine."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations (no report)")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTATIONS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"unknown mutations {unknown}; choose from {sorted(names)}")
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    code, baseline_seconds, output = run_tests(None, all_tests)
    if code != 0:
        print(output[-3000:])
        print("the unmutated copy fails the listed tests: fix them first", file=sys.stderr)
        return 2
    outcomes = []
    for mutation in chosen:
        outcome = run(mutation)
        outcomes.append(outcome)
        print(f"{mutation.name:32s} {'killed' if outcome.killed else 'SURVIVED'}  ({outcome.seconds:.0f} s)",
              flush=True)
    if args.only is None:
        path = ROOT / "benchmarks" / "results" / "mutations.md"
        path.write_text(report(outcomes, baseline_seconds))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0 if all(o.killed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
