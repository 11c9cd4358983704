"""Where the default training step's time goes, its FLOPs and the matmul rate at its shapes,
and training rows/s against another checkout.

    python benchmarks/train_step.py                                # writes benchmarks/results/train_step.md
    python benchmarks/train_step.py --baseline /path/to/other/checkout

The step is the default model's (causal, static order, default size), on Adult at the
default batch (1,024 rows, 2 sampled orders a row), as `TabularMDM().fit` runs it. Each
version runs in its own child processes (benchmarks/checkouts.py), one per (version, thread
count, round), interleaved round by round so that load on a shared machine hits both alike:
- speed: the median wall and CPU time of `--steps` steps after 3 warm-up steps (training
  rows/s = 1,024 / step seconds; on a loaded machine CPU time, summed over the threads, is
  the steadier measure of work: it leaves out the time the process waits for a core), and
  the host reads of one step (`.item()`, `bool(tensor)`,
  `nonzero`: each a synchronisation on a GPU), counted with a TorchDispatchMode;
- profile (this checkout, once per thread count): the step's self CPU time by op
  (torch.profiler, 3 steps), its FLOPs (torch.utils.flop_counter for the matmuls, plus the
  attention's, which SDPA's CPU kernel does not report: 4 T^2 d a layer and sequence
  forward, twice that backward, counting the causal mask's zeros), and the rate of torch's
  matmul at the step's shapes (forward and backward products of every linear layer, same
  FLOPs as in the step) on this machine, both per CPU second (summed over threads: what the
  step gets of the cores, whatever else runs on them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

from checkouts import run_in, versions, write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train_step.md"
RUNS = HERE / "results" / "train_step_runs.jsonl"

SETUP = r"""
import json, statistics, sys, time
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from fastmdm import TabularMDM, datasets
torch.set_num_threads(int(sys.argv[1]))
train, _ = datasets.load("adult")
model = TabularMDM(epochs=1, batch_size=1024, seed=0, progress=False)
model.fit(train.head(2048), validation=None)      # the cost does not depend on the weights
batch = model.codec.encode(train.head(1024))
trainer = model._trainer
for _ in range(3):
    trainer._train_step(batch)
"""

SPEED = SETUP + r"""
steps = int(sys.argv[2])

class HostReads(TorchDispatchMode):
    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}
    count = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))

with HostReads() as reads:
    trainer._train_step(batch)
walls, cpus = [], []
for _ in range(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    trainer._train_step(batch)
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
print(json.dumps(dict(step_seconds=statistics.median(walls), cpu_seconds=statistics.median(cpus),
                      host_reads=reads.count)))
"""

PROFILE = SETUP + r"""
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
with FlopCounterMode(display=False) as counter:
    trainer._train_step(batch)
matmul_flops = counter.get_total_flops()
denoiser = model.denoiser
sequences, tokens = 1024 * model.config.num_samples, denoiser.num_columns + 1
d, layers = denoiser._config["d_model"], denoiser._config["num_layers"]
attention_flops = 3 * 4 * tokens * tokens * d * layers * sequences
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3):
        trainer._train_step(batch)
ops = sorted(((e.key, e.self_cpu_time_total / 3e3) for e in prof.key_averages()), key=lambda kv: -kv[1])
times = []
for _ in range(10):
    start = time.process_time()
    trainer._train_step(batch)
    times.append(time.process_time() - start)
step = statistics.median(times)
# torch's matmul at the step's shapes: every linear layer's forward (x W^T), input gradient
# (g W) and weight gradient (g^T x), for the N = sequences x tokens rows of the pass.
n = sequences * tokens
shapes = []
for block in denoiser.blocks:
    for linear in (block.qkv, block.proj, block.ff[0], block.ff[2]):
        out_f, in_f = linear.weight.shape
        shapes += [(n, in_f, out_f), (n, out_f, in_f), (out_f, n, in_f)]
seconds = flops = 0.0
for m, k, p in shapes:
    a, b = torch.randn(m, k), torch.randn(k, p)
    a @ b
    runs = []
    for _ in range(5):
        start = time.process_time()
        a @ b
        runs.append(time.process_time() - start)
    seconds += statistics.median(runs)
    flops += 2 * m * k * p
print(json.dumps(dict(cpu_seconds=step, matmul_flops=matmul_flops, attention_flops=attention_flops,
                      matmul_rate=flops / seconds, ops=ops[:14],
                      total_ms=sum(ms for _, ms in ops))))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare against")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    pairs = versions(args.baseline)
    records = []
    for threads in args.threads:
        for round_ in range(args.rounds):
            for label, source in pairs:
                result = run_in(source, SPEED, [threads, args.steps], threads)
                records.append(dict(kind="speed", version=label, threads=threads, round=round_, **result))
                print(json.dumps(records[-1]), flush=True)
        result = run_in(pairs[-1][1], PROFILE, [threads], threads)
        records.append(dict(kind="profile", version=pairs[-1][0], threads=threads, **result))
        print(json.dumps(records[-1]), flush=True)
        # After each thread count, so that a run cut short still leaves the counts it finished.
        write_report(report(records, args), RESULTS, RUNS, [], append=True)
    write_report(report(records, args), RESULTS, RUNS, records)


def report(records: list[dict], args) -> str:
    labels = list(dict.fromkeys(r["version"] for r in records if r["kind"] == "speed"))
    lines = [
        "# The default training step: where the time goes, FLOPs, and rows/s",
        "",
        f"Machine: {platform.machine()} CPU, 2 cores shared with other jobs, so read the ratios "
        f"(both versions ran interleaved, round by round); {datetime.date.today()}.",
        "Command: `python benchmarks/train_step.py" + (f" --baseline {args.baseline}" if args.baseline else "")
        + f" --threads {' '.join(map(str, args.threads))} --rounds {args.rounds} --steps {args.steps}` "
        "(records appended to `train_step_runs.jsonl`).",
        "",
        "The default model (causal, static order, d_model 48, 3 layers) on Adult, a step of 1,024 rows "
        "with 2 sampled orders a row (forward, backward, AdamW, EMA).",
        "",
        "## Training rows/s (median over rounds of each child's median step)",
        "",
        "Per wall second, and per CPU second (summed over threads).",
        "",
        "| threads | measure | " + " | ".join(labels) + (" | ratio |" if len(labels) > 1 else ""),
        "|---|---|" + "---|" * (len(labels) + (len(labels) > 1)),
    ]
    for threads in sorted({r["threads"] for r in records if r["kind"] == "speed"}):
        for measure, key in (("wall", "step_seconds"), ("CPU", "cpu_seconds")):
            rates = [statistics.median(1024 / r[key] for r in records if r["kind"] == "speed"
                                       and r["version"] == label and r["threads"] == threads) for label in labels]
            cells = " | ".join(f"{rate:,.0f}" for rate in rates)
            ratio = f" | {rates[-1] / rates[0]:.2f}x |" if len(labels) > 1 else ""
            lines.append(f"| {threads} | {measure} | {cells}{ratio}")
    lines += ["", "Host reads in one training step (each a synchronisation on a GPU): "
              + ", ".join(f"{label}: {next(r['host_reads'] for r in records if r['version'] == label)}"
                          for label in labels) + ".", ""]
    for r in (r for r in records if r["kind"] == "profile"):
        flops = r["matmul_flops"] + r["attention_flops"]
        rate = flops / r["cpu_seconds"]
        lines += [
            f"## Profile at {r['threads']} thread(s) ({r['version']})", "",
            f"- FLOPs a row (forward and backward, both orders): {flops / 1024 / 1e6:.1f} M "
            f"({r['matmul_flops'] / 1024 / 1e6:.1f} M in the linear layers, "
            f"{r['attention_flops'] / 1024 / 1e6:.1f} M in attention)",
            f"- step {r['cpu_seconds'] * 1e3:.0f} CPU ms = {1024 / r['cpu_seconds']:,.0f} rows per CPU second = "
            f"{rate / 1e9:.1f} GFLOP per CPU second; torch's matmul at the step's shapes: "
            f"{r['matmul_rate'] / 1e9:.1f} GFLOP/s, so the step runs at "
            f"**{rate / r['matmul_rate']:.0%} of the matmul rate**",
            "",
            "| op (self CPU time, under the profiler) | ms a step | share |",
            "|---|---|---|",
        ]
        lines += [f"| `{name}` | {ms:.1f} | {ms / r['total_ms']:.0%} |" for name, ms in r["ops"]]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
