"""The command line as a user runs it: train -> sample -> evaluate -> impute on UCI Adult saved as
CSV and as Parquet, and evaluate on a table larger than the rows it scores.

Every command is `fastmdm ...` in a fresh process (one thread: OMP_NUM_THREADS=1); its wall
time and peak resident memory (VmHWM, read when the command returns) are recorded.

- loop: the README's four commands on Adult's 32,561 training rows, once per format; the
  holes table is 1,000 Adult test rows with 20% of their cells emptied (seeded).
- large evaluate: Adult's rows repeated --repeat times (1,041,952 rows at 32) as one Parquet
  file, evaluated against the loop's synthetic rows at the default --max-rows, so evaluate
  reads a seeded sample of 50,000 rows. Evaluate's process also holds torch, sklearn and
  XGBoost, so the reader alone is measured too, in a light process: reading that sample,
  and for contrast the whole file into a DataFrame.

Results go to benchmarks/results/cli_formats.jsonl (one line per command) and the report to
benchmarks/results/cli_formats.md.

    nice -n 10 python benchmarks/cli_formats.py
    python benchmarks/cli_formats.py --report
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "cli_formats.jsonl"
REPORT = HERE / "results" / "cli_formats.md"
# Runs one `fastmdm` command line in this process and writes its peak RSS (MiB) to a file.
RUNNER = """
import sys
from pathlib import Path
from fastmdm.cli import main
code = main(sys.argv[2:])
peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
Path(sys.argv[1]).write_text(str(peak / 1024))
sys.exit(code)
"""
# Reads a table through evaluate's reader (max_rows: sys.argv[3], "None" for the whole table)
# and writes its peak RSS (MiB).
READER = """
import sys
from pathlib import Path
from fastmdm.data.files import read_table
frame, rows = read_table(sys.argv[2], max_rows=eval(sys.argv[3]))
peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
Path(sys.argv[1]).write_text(str(peak / 1024))
print(f"read {len(frame):,} of {rows:,} rows")
"""


def run(script: str, args: list[str], workdir: Path, label: str) -> dict:
    """One fresh process: `script` with args; its time, peak RSS, return code and output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.fspath(ROOT))
    peak_file = workdir / "peak.txt"
    peak_file.unlink(missing_ok=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, os.fspath(peak_file), *args], cwd=workdir, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return {"label": label, "seconds": round(seconds, 1), "peak_rss_mb": round(float(peak_file.read_text())),
            "load": round(os.getloadavg()[0], 1), "stdout": result.stdout}


def prepare(workdir: Path, repeat: int) -> None:
    """Adult as CSV and Parquet, holes tables, and the repeated Parquet file."""
    import numpy as np
    import pandas as pd
    from fastmdm import datasets
    train, test = datasets.load("adult")
    holes = test.sample(n=1000, random_state=0).reset_index(drop=True)
    holes = holes.mask(np.random.default_rng(0).random(holes.shape) < 0.2)
    for suffix in ("csv", "parquet"):
        getattr(train, f"to_{suffix}")(workdir / f"adult.{suffix}", index=False)
        getattr(holes, f"to_{suffix}")(workdir / f"holes.{suffix}", index=False)
    pd.concat([train] * repeat, ignore_index=True).to_parquet(workdir / "large.parquet", index=False)


def measure(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fastmdm-cli-") as workdir:
        return _measure_in(Path(workdir), args)


def _measure_in(workdir: Path, args) -> list[dict]:
    prepare(workdir, args.repeat)
    records = []
    for suffix in ("csv", "parquet"):
        for command in (f"train adult.{suffix} -o model.pt --epochs {args.epochs}",
                        f"sample model.pt -n {args.sample_rows} -o synth.{suffix} --seed 0",
                        f"evaluate adult.{suffix} synth.{suffix} --jobs 1",
                        f"impute model.pt holes.{suffix} -o filled.{suffix} --seed 0"):
            record = run(RUNNER, shlex.split(command), workdir, f"fastmdm {command}")
            records.append(dict(record, part="loop", format=suffix))
            print(f"{record['label']}: {record['seconds']} s, {record['peak_rss_mb']} MiB", flush=True)
    rows = 32_561 * args.repeat
    record = run(RUNNER, ["evaluate", "large.parquet", "synth.parquet", "--jobs", "1"], workdir,
                 "fastmdm evaluate large.parquet synth.parquet --jobs 1")
    records.append(dict(record, part="large", rows=rows))
    for max_rows in ("50_000", "None"):
        record = run(READER, ["large.parquet", max_rows], workdir, f"read_table('large.parquet', max_rows={max_rows})")
        records.append(dict(record, part="large", rows=rows))
    for record in records[-3:]:
        print(f"{record['label']}: {record['seconds']} s, {record['peak_rss_mb']} MiB", flush=True)
    with open(RESULTS, "a") as handle:
        for record in records:
            handle.write(json.dumps(dict(record, epochs=args.epochs, sample_rows=args.sample_rows)) + "\n")
    return records


def report() -> None:
    records = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    loop = [r for r in records if r["part"] == "loop"][-8:]
    large = [r for r in records if r["part"] == "large"][-3:]
    lines = ["# The command line on CSV and Parquet", "",
             "Generated by `benchmarks/cli_formats.py` from `cli_formats.jsonl` (the latest run). Each command is "
             "`fastmdm ...` in a fresh process with one thread on the 2-core development machine, shared with "
             "other jobs (the 1-minute load average is given: times are noisy). Peak RSS is the process's VmHWM.",
             "", "## train -> sample -> evaluate -> impute on UCI Adult (32,561 rows)", "",
             "One epoch: these runs show that the loop works and what each command costs, not the fidelity "
             "of a trained model (see reproduce.md). CSV and Parquet read into the same frame, so both "
             "loops train the same model and sample the same rows: their scores below agree.", "",
             "| command | seconds | peak RSS (MiB) | load |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['label']}` | {r['seconds']:.1f} | {r['peak_rss_mb']:,} | {r['load']} |" for r in loop]
    evaluations = {r["format"]: r["stdout"] for r in loop if " evaluate " in r["label"]}
    for suffix, output in evaluations.items():
        lines += ["", f"`evaluate` on the {suffix.upper()} files:", "", "```", output.rstrip(), "```"]
    lines += ["", f"## evaluate on {large[0]['rows']:,} rows (Adult repeated, one Parquet file)", "",
              "| command | seconds | peak RSS (MiB) | load |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['label']}` | {r['seconds']:.1f} | {r['peak_rss_mb']:,} | {r['load']} |" for r in large]
    lines += ["", "evaluate reads a seeded sample of the large table a chunk at a time; its peak stays below "
              "that of the bare reader loading the table whole, though evaluate also holds torch, sklearn and "
              "XGBoost.", "", "```", large[0]["stdout"].rstrip(), "```", "",
              "Commands: `nice -n 10 python benchmarks/cli_formats.py` (defaults: --epochs 1 --sample-rows 2000 "
              "--repeat 32), then `python benchmarks/cli_formats.py --report`."]
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (the loop's speed, not quality)")
    parser.add_argument("--sample-rows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=32, help="copies of Adult in the large table")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the results")
    args = parser.parse_args()
    if not args.report:
        measure(args)
    report()


if __name__ == "__main__":
    main()
