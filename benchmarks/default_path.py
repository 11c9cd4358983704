"""A wide-vocabulary table through the default path: peak memory and epoch time of one fit.

    python benchmarks/default_path.py                               # writes benchmarks/results/default_path.md
    python benchmarks/default_path.py --baseline /path/to/other/checkout --no-write

The table: 20,000 rows, 19 columns of 4 categories and one of 10,000 (every value twice),
kept whole with category_cap=None, so that a padded [batch, V] logits tensor would dwarf
everything else a step holds. Each library version (this checkout, and with --baseline the
fastmdm package of another checkout, for a before/after comparison) trains
TabularMDM(category_cap=None, epochs=1) with default settings otherwise, in its own child
process, one after the other. Without --architecture each version trains its own default
model (the one TabularMDM builds when no architecture is named); --architecture asks for
others. Peak RSS growth is the child's peak resident set size after
fit minus its resident set before fit (the table built, torch loaded); the epoch time is
the trainer's own record (validation included), fit time is the whole call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from checkouts import run_in, versions, write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "default_path.md"
RUNS = HERE / "results" / "default_path_runs.jsonl"

CHILD = r"""
import json, resource, sys, time
import numpy as np, pandas as pd, torch
import fastmdm
torch.set_num_threads(int(sys.argv[1]))
rows, architecture = int(sys.argv[2]), sys.argv[3]
options = {} if architecture == "default" else dict(architecture=architecture)
rng = np.random.default_rng(0)
data = {f"c{l}": rng.choice(list("abcd"), rows) for l in range(19)}
data["wide"] = np.repeat(np.arange(rows // 2), 2).astype(str)
rng.shuffle(data["wide"])
frame = pd.DataFrame(data)
from fastmdm import TabularMDM
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
before = rss_mib()
start = time.perf_counter()
model = TabularMDM(**options, category_cap=None, epochs=1, progress=False, device="cpu").fit(frame)
fit_seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(library=fastmdm.__file__, model="causal" if model.denoiser.causal else "bidirectional",
                      rss_before_mib=before, peak_growth_mib=peak - before, fit_s=fit_seconds,
                      epoch_s=model.history[-1].seconds, val_nelbo=model.history[-1].val_nelbo,
                      vocab=int(model.denoiser.offsets[-1]))))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to measure first, for comparison")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--architecture", action="append",
                        help="bidirectional and/or causal, repeatable (default: each version's default model)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results")
    args = parser.parse_args(argv)
    architectures = args.architecture or ["default"]
    sources = versions(args.baseline)
    records = []
    for architecture in architectures:
        for label, source in sources:
            record = dict(version=label, architecture=architecture, rows=args.rows, threads=args.threads,
                          **run_in(source, CHILD, [args.threads, args.rows, architecture], args.threads))
            print(json.dumps(record), flush=True)
            records.append(record)
    lines = [
        "# The default path on a 10,000-category table",
        "",
        f"`python benchmarks/default_path.py{' --baseline CHECKOUT' if args.baseline else ''}`: "
        f"{args.rows:,} rows, 19 columns of 4 categories and one of {args.rows // 2:,} (category_cap=None; "
        f"V, the model's vocabulary, in the table), one default epoch (validation 10%), {args.threads} threads, "
        f"each version in its own process, one at a time. {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, shared with other jobs: times are indicative.",
        "",
        "| version | model | V | peak RSS growth | epoch | fit |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in records:
        model = r["model"] + (" (default)" if r["architecture"] == "default" else "")
        lines.append(f"| {r['version']} | {model} | {r['vocab']:,} | {r['peak_growth_mib'] / 1024:.2f} GiB | "
                     f"{r['epoch_s']:.1f} s | {r['fit_s']:.1f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_report(text, RESULTS, RUNS, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
