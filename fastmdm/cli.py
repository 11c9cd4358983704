"""Command line: fastmdm {demo, train, sample, impute, predict, evaluate, plot}.

Every table a command reads or writes is a .csv or .parquet file (by its extension) or, to
read, a directory of them: read and written by fastmdm.data.files, as `fit(path)` and
`sample_to` do.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


DEMO_EPOCHS = 20
DEMO_SAMPLE_ROWS = 10_000
# evaluate scores at most this many rows of each table (a seeded uniform sample beyond it):
# the metrics' cost grows with the rows (nearest neighbours, detectors), their precision
# hardly at all past tens of thousands.
EVALUATE_MAX_ROWS = 50_000
TABLE = "a .csv or .parquet file, or a directory of them"


def _add_training_options(parser: argparse.ArgumentParser, epochs: int | None) -> None:
    parser.add_argument("--architecture", choices=["bidirectional", "causal"], default=None,
                        help="denoiser: causal (the default: one pass per order, KV-cached sampling, exact "
                             "speculative decoding) or bidirectional (the paper's; re-encodes the row every step; "
                             "the default with --estimator tspace)")
    parser.add_argument("--order", choices=["static", "contextual"], default="static",
                        help="generation order: one learned PL(w) for the table (default), or contextual: "
                             "the next column depends on the values so far (implies --architecture causal)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: from the table's size; training stops early once "
                             "the validation NELBO stops improving)")
    parser.add_argument("--epochs", type=int, default=epochs, help="passes over the table, instead of --steps")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per step (default: about a sixteenth of the rows, 32 to 1024)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--estimator", choices=["order", "tspace"], default="order",
                        help="order-space (low variance, default) or the paper's t-space estimator")
    parser.add_argument("--fixed-schedule", action="store_true",
                        help="keep w = 1 (linear MDM) instead of learning the schedule")
    parser.add_argument("--num-bins", type=int, default=None, help="quantile bins per numeric column")
    parser.add_argument("--rare-marker", action="store_true",
                        help="let the model generate a categorical column's rare pool (values too few training "
                             "rows hold to be stored) and write it as '(other)' in text columns, missing elsewhere; "
                             "by default those cells are drawn among the frequent categories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="table to write: .csv or .parquet")
    parser.add_argument("--steps", type=int, default=None, help="denoiser calls per row (default: columns)")
    parser.add_argument("--speculative", type=int, default=None, metavar="K",
                        help="causal models: draft K columns per round and verify them (exact)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")


def _model_from_args(args):
    from .api import TabularMDM
    from .data import DEFAULT_NUM_BINS
    return TabularMDM(architecture=args.architecture, order=args.order, num_bins=args.num_bins or DEFAULT_NUM_BINS,
                      learn_schedule=not args.fixed_schedule, rare_marker=args.rare_marker,
                      device=args.device, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr,
                      estimator=args.estimator, seed=args.seed)


def _print_history(model) -> None:
    """The per-epoch lines, unless training already logged them (it does when stderr, where the
    progress bar would go, is not a terminal)."""
    if sys.stderr.isatty():
        for record in model.history:
            print(record)


def cmd_train(args) -> None:
    model = _model_from_args(args)
    # Streamed from disk (fastmdm.token_store): the table never has to fit in memory.
    model.fit(args.data, checkpoint=args.checkpoint or f"{args.output}.ckpt", resume=args.resume,
              token_store=args.token_store)
    model.save(args.output)
    _print_history(model)
    print(f"trained {model.training_steps:,} steps; saved model to {args.output}")


def _conditions(model, args):
    """(conditions or None, rows to sample): --condition (repeatable) applies to every row;
    --conditions holds one row per sampled row, some of the model's columns, empty cells
    free, and -n, if given, must match its rows."""
    from .conditions import parse_condition_text
    from .data.files import read_table
    if args.condition and args.conditions is not None:
        raise ValueError("give --condition (the same for every row) or a --conditions table, not both")
    if args.condition:
        if args.num_rows is None:
            raise ValueError("give the number of rows to sample (-n)")
        return dict(parse_condition_text(text) for text in args.condition), args.num_rows
    if args.conditions is None:
        if args.num_rows is None:
            raise ValueError("give the number of rows to sample (-n), or a --conditions table")
        return None, args.num_rows
    conditions, rows = read_table(args.conditions)
    unknown = [c for c in conditions.columns if c not in model.codec.columns]
    if unknown:
        raise ValueError(f"{args.conditions!r} has columns the model does not have: {unknown}; "
                         f"its columns: {model.codec.columns}")
    if args.num_rows is not None and args.num_rows != rows:
        raise ValueError(f"-n {args.num_rows} but {args.conditions!r} has {rows} rows (one per sampled row)")
    return conditions, rows


def cmd_sample(args) -> None:
    """Writes batch by batch (bounded memory); under torchrun each rank writes its own shard."""
    from .api import TabularMDM
    from .sample_blocks import BlockPlan, parse_shard, shard_from_environment
    from .data.files import table_format
    shard = parse_shard(args.shard) if args.shard else shard_from_environment()
    device = args.device
    if device == "auto" and shard[1] > 1 and "LOCAL_RANK" in os.environ:
        import torch
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    table_format(args.output)
    model = TabularMDM.load(args.model, device=device)
    conditions, num_rows = _conditions(model, args)
    start = time.perf_counter()
    path = model.sample_to(args.output, num_rows, shard=shard, steps=args.steps, speculative=args.speculative,
                           temperature=args.temperature, conditions=conditions, rules=args.rule, seed=args.seed,
                           batch_size=args.batch_size, progress=True)
    rows = len(BlockPlan(num_rows, args.batch_size, 0, *shard).rows)
    print(f"wrote {rows:,} rows to {path} ({rows / (time.perf_counter() - start):,.0f} rows/s)")


def cmd_impute(args) -> None:
    """Fills the table a chunk of rows at a time (bounded memory) into a file that appears only
    when complete. With --seed, chunk k draws from a seed derived from (seed, k), so the output
    depends on the seed alone."""
    import numpy as np
    import torch
    from .api import TabularMDM
    from .data.files import TableWriter, read_chunks, table_files, table_format
    table_format(args.output)
    model = TabularMDM.load(args.model, device=args.device)
    chunks = read_chunks(table_files(args.data))
    # One real value per column and no missing one fixes the Parquet schema (a chunk whose
    # column is all missing would give it a null type), as in TabularMDM.sample_to.
    example = model.codec.decode(torch.zeros(1, model.codec.num_columns, dtype=torch.int64),
                                 generator=torch.Generator().manual_seed(0))
    rows = holes = 0
    with TableWriter(args.output, example) as writer:
        for index, chunk in enumerate(chunks):
            seed = None if args.seed is None else int(np.random.SeedSequence([args.seed, index]).generate_state(1)[0])
            writer.write(model.impute(chunk, steps=args.steps, speculative=args.speculative,
                                      temperature=args.temperature, seed=seed))
            rows, holes = rows + len(chunk), holes + int(chunk.isna().sum().sum())
    print(f"filled {holes:,} missing cells in {rows:,} rows; wrote {args.output}")


def _predictions(model, chunk, args):
    """One chunk's output rows for `predict`: a column per class (probabilities), or for a
    numeric target its median and a column per --quantile, named q<level>."""
    options = {} if args.orders is None else {"orders": args.orders}
    if args.target in model.codec.columns and model.codec.column(args.target).is_numeric:
        frame = model.predict(chunk, target=args.target, quantiles=[0.5, *args.quantile], **options)
        return frame.set_axis([args.target] + [f"q{level:g}" for level in args.quantile], axis=1)
    if args.quantile:
        raise ValueError(f"--quantile needs a numeric target; {args.target!r} is categorical")
    probs = model.predict_proba(chunk, target=args.target, **options)
    return probs.set_axis([str(name) for name in probs.columns], axis=1)


def cmd_predict(args) -> None:
    """Reads and writes a chunk of rows at a time (bounded memory), into a file that appears
    only when complete."""
    import contextlib
    from .api import TabularMDM
    from .data.files import TableWriter, read_chunks, table_files, table_format
    table_format(args.output)
    model = TabularMDM.load(args.model, device=args.device)
    rows = 0
    with contextlib.ExitStack() as stack:
        writer = None
        for chunk in read_chunks(table_files(args.data)):
            out = _predictions(model, chunk, args)
            if writer is None:   # the first chunk's columns and dtypes fix the file's schema
                writer = stack.enter_context(TableWriter(args.output, out))
            writer.write(out)
            rows += len(chunk)
    print(f"predicted {args.target!r} for {rows:,} rows; wrote {args.output}")


def _read_for_evaluation(role: str, path: str, max_rows: int, seed: int):
    """A table for evaluate, sampled down to max_rows rows; prints how many rows it used."""
    from .data.files import read_table
    frame, rows = read_table(path, max_rows=max_rows, seed=seed)
    used = f"all {rows:,} rows" if len(frame) == rows else f"{len(frame):,} of {rows:,} rows (uniform, seed {seed})"
    print(f"{role}: {used} of {path}")
    return frame


def cmd_evaluate(args) -> None:
    from .metrics import evaluate, format_report
    model = None
    if args.model:
        if not args.report:
            raise ValueError("--model is drawn in the report: give --report report.html too")
        from .api import TabularMDM
        model = TabularMDM.load(args.model, device="cpu")
    tables = {"real": args.real, "synthetic": args.synth, "test": args.test}
    real, synth, test = (_read_for_evaluation(role, path, args.max_rows, args.seed) if path else None
                         for role, path in tables.items())
    print(format_report(evaluate(real, synth, test=test, target=args.target, task=args.task,
                                 reference=not args.no_reference, seed=args.seed, n_jobs=args.jobs,
                                 report=args.report, report_model=model)))
    if args.report:
        print(f"wrote {args.report}")


def cmd_plot(args) -> None:
    from .api import TabularMDM
    from .plots import plot_schedule
    model = TabularMDM.load(args.model, device="cpu")
    # A contextual model's orders depend on the values: show those of sampled rows.
    orders = model.generation_orders() if model.kind.contextual else None
    plot_schedule(model.weights, args.output, orders=orders)
    print(f"wrote {args.output}")


def cmd_demo(args) -> None:
    """Train on the bundled UCI Adult table, sample, and report fidelity against the real data."""
    from . import datasets
    from .metrics import evaluate, format_report
    from .plots import plot_schedule
    from .data.files import table_format, write_table
    if args.output:
        table_format(args.output)
    train, test = datasets.load("adult")
    print(f"UCI Adult: {len(train):,} training rows, {len(test):,} test rows, {train.shape[1]} columns")
    model = _model_from_args(args)
    start = time.perf_counter()
    model.fit(train, validation=0.1)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    _print_history(model)
    print("learned schedule w (higher = generated earlier):")
    print(model.weights.sort_values(ascending=False).round(3).to_string())
    start = time.perf_counter()
    synth = model.sample(args.num_rows, seed=args.seed, progress=True)
    print(f"sampled {len(synth):,} rows in {time.perf_counter() - start:.1f} s")
    if args.output:
        write_table(args.output, synth)
        model.save(f"{args.output}.model.pt")
        plot_schedule(model.weights, f"{args.output}.schedule.png")
        print(f"wrote {args.output}, its model and a schedule plot beside it")
    real = train.sample(n=min(len(train), args.num_rows), random_state=args.seed)
    print("fidelity against real training rows (and MLE on the real test split); the last column scores\n"
          "as many real test rows by the same code, the ceiling for each number:")
    print(format_report(evaluate(real, synth, test=test, target=datasets.TARGETS["adult"], seed=args.seed)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmdm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on UCI Adult, sample, print fidelity")
    _add_training_options(demo, DEMO_EPOCHS)
    demo.add_argument("-n", "--num-rows", type=int, default=DEMO_SAMPLE_ROWS)
    demo.add_argument("-o", "--output", default=None, help="also write the synthetic rows here (.csv or .parquet)")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help=f"fit a model to a table: {TABLE}")
    train.add_argument("data", help=f"the table: {TABLE}")
    train.add_argument("-o", "--output", required=True, help="model file to write")
    train.add_argument("--checkpoint", help="training checkpoint (default: OUTPUT.ckpt)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    train.add_argument("--token-store", help="directory for the encoded table, kept and reused "
                                             "(default: a temporary one)")
    _add_training_options(train, None)
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="generate rows from a trained model")
    sample.add_argument("model")
    sample.add_argument("-n", "--num-rows", type=int, default=None,
                        help="rows to sample (default with --conditions: one per row of it)")
    _add_generation_options(sample)
    sample.add_argument("--conditions", metavar="TABLE",
                        help=f"values to sample around ({TABLE}): one row per sampled row holding some of the "
                             "model's columns; empty cells are sampled, the others kept")
    sample.add_argument("--condition", action="append", default=[], metavar="COLUMN=SPEC",
                        help="a condition for every row, repeatable: COLUMN=VALUE, COLUMN=A|B|C (one of "
                             "these values), COLUMN=LOW..HIGH (a closed range; leave an end empty to open it, "
                             "e.g. price=..500)")
    sample.add_argument("--rule", action="append", default=[], metavar="'A <= B'",
                        help="a comparison between two columns every row obeys, repeatable (<= or >=)")
    sample.add_argument("--batch-size", type=int, default=4096,
                        help="rows per batch: bounds memory; the rows depend on seed and batch size")
    sample.add_argument("--shard", metavar="K/N",
                        help="write only shard K of N (default under torchrun: RANK/WORLD_SIZE); "
                             "needs --seed; files are named OUT-0000K-of-0000N.parquet")
    sample.set_defaults(func=cmd_sample)

    impute = sub.add_parser("impute", help="fill the empty cells of a table")
    impute.add_argument("model")
    impute.add_argument("data", help=f"the table with empty cells: {TABLE}")
    _add_generation_options(impute)
    impute.set_defaults(func=cmd_impute)

    predict = sub.add_parser("predict", help="predict a column from the others: class probabilities, or a "
                                             "number's median and quantiles")
    predict.add_argument("model")
    predict.add_argument("data", help=f"the rows ({TABLE}); the target column may be absent, empty cells are unknown")
    predict.add_argument("--target", required=True, help="the column to predict")
    predict.add_argument("-o", "--output", required=True,
                         help="table to write (.csv or .parquet): one row per input row, a column per class "
                              "of a categorical target, or the median (and --quantile columns) of a numeric one")
    predict.add_argument("--quantile", type=float, action="append", default=[], metavar="Q",
                         help="numeric targets: also write this quantile, repeatable (e.g. 0.05 and 0.95)")
    predict.add_argument("--orders", type=int, default=None,
                         help="causal models: orders of the known cells averaged (default 8)")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="fidelity of a synthetic table against a real one")
    evaluate.add_argument("real", help=f"the training table: {TABLE}")
    evaluate.add_argument("synth", help=f"the synthetic table: {TABLE}")
    evaluate.add_argument("--test", help="real held-out table for MLE and the 'real vs real' row")
    evaluate.add_argument("--target", help="label column for MLE")
    evaluate.add_argument("--task", choices=["classification", "regression"], default=None,
                          help="MLE task (default: inferred from the target, as the codec types columns)")
    evaluate.add_argument("--no-reference", action="store_true",
                          help="skip the 'real vs real' column (a real sample scored the same way)")
    evaluate.add_argument("--max-rows", type=int, default=EVALUATE_MAX_ROWS,
                          help="score a seeded uniform sample of this many rows of a larger table "
                               f"(default {EVALUATE_MAX_ROWS:,}), read without loading the rest")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the row samples and the metrics")
    evaluate.add_argument("--jobs", type=int, default=2,
                          help="XGBoost threads; use 1 on a busy machine (spin-waiting threads can run 10x slower)")
    evaluate.add_argument("--report", metavar="HTML",
                          help="also write a report with figures to this HTML file (one file, figures inside)")
    evaluate.add_argument("--model", help="with --report: the model file, whose schedule and orders are drawn")
    evaluate.set_defaults(func=cmd_evaluate)

    plot = sub.add_parser("plot", help="PNG of the learned schedule of a model (and, for a contextual "
                                       "model, the orders its sampled rows took)")
    plot.add_argument("model")
    plot.add_argument("-o", "--output", required=True)
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"fastmdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run resumes from its checkpoint with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
