"""Command line: fastmdm {demo, train, sample, impute, evaluate, plot}."""
from __future__ import annotations

import argparse
import os
import sys
import time


DEMO_EPOCHS = 20
DEMO_SAMPLE_ROWS = 10_000


def _add_training_options(parser: argparse.ArgumentParser, epochs: int | None) -> None:
    parser.add_argument("--architecture", choices=["bidirectional", "causal"], default=None,
                        help="denoiser: bidirectional (re-encodes the row every step; the default) or causal "
                             "(two-stream, KV-cached sampling, exact speculative decoding)")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="file to write: .csv (sample: also .parquet)")
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
                      learn_schedule=not args.fixed_schedule,
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


def cmd_sample(args) -> None:
    """Writes batch by batch (bounded memory); under torchrun each rank writes its own shard."""
    from .api import TabularMDM
    from .streaming import BlockPlan, parse_shard, shard_from_environment
    shard = parse_shard(args.shard) if args.shard else shard_from_environment()
    device = args.device
    if device == "auto" and shard[1] > 1 and "LOCAL_RANK" in os.environ:
        import torch
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    model = TabularMDM.load(args.model, device=device)
    start = time.perf_counter()
    path = model.sample_to(args.output, args.num_rows, shard=shard, steps=args.steps, speculative=args.speculative,
                           temperature=args.temperature, seed=args.seed, batch_size=args.batch_size, progress=True)
    rows = len(BlockPlan(args.num_rows, args.batch_size, 0, *shard).rows)
    print(f"wrote {rows:,} rows to {path} ({rows / (time.perf_counter() - start):,.0f} rows/s)")


def cmd_impute(args) -> None:
    from .api import TabularMDM
    from .datasets import load_csv
    model = TabularMDM.load(args.model, device=args.device)
    df = load_csv(args.data)
    filled = model.impute(df, steps=args.steps, speculative=args.speculative, temperature=args.temperature,
                          seed=args.seed)
    filled.to_csv(args.output, index=False)
    print(f"filled {int(df.isna().sum().sum())} missing cells; wrote {args.output}")


def cmd_evaluate(args) -> None:
    from .datasets import load_csv
    from .metrics import evaluate, format_report
    real, synth = load_csv(args.real), load_csv(args.synth)
    test = load_csv(args.test) if args.test else None
    print(format_report(evaluate(real, synth, test=test, target=args.target, task=args.task,
                                 reference=not args.no_reference, seed=args.seed, n_jobs=args.jobs)))


def cmd_plot(args) -> None:
    from .api import TabularMDM
    from .plots import plot_schedule
    model = TabularMDM.load(args.model, device="cpu")
    # A contextual model's orders depend on the values: show those of sampled rows.
    orders = model.generation_orders() if model.order == "contextual" else None
    plot_schedule(model.weights, args.output, orders=orders)
    print(f"wrote {args.output}")


def cmd_demo(args) -> None:
    """Train on the bundled UCI Adult table, sample, and report fidelity against the real data."""
    from . import datasets
    from .metrics import evaluate, format_report
    from .plots import plot_schedule
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
        synth.to_csv(args.output, index=False)
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
    demo.add_argument("-o", "--output", default=None, help="also write the synthetic rows to this CSV")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="fit a model to a table: a Parquet or CSV file or a directory of them")
    train.add_argument("data")
    train.add_argument("-o", "--output", required=True, help="model file to write")
    train.add_argument("--checkpoint", help="training checkpoint (default: OUTPUT.ckpt)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    train.add_argument("--token-store", help="directory for the encoded table, kept and reused "
                                             "(default: a temporary one)")
    _add_training_options(train, None)
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="generate rows from a trained model")
    sample.add_argument("model")
    sample.add_argument("-n", "--num-rows", type=int, required=True)
    _add_generation_options(sample)
    sample.add_argument("--batch-size", type=int, default=4096,
                        help="rows per batch: bounds memory; the rows depend on seed and batch size")
    sample.add_argument("--shard", metavar="K/N",
                        help="write only shard K of N (default under torchrun: RANK/WORLD_SIZE); "
                             "needs --seed; files are named OUT-0000K-of-0000N.parquet")
    sample.set_defaults(func=cmd_sample)

    impute = sub.add_parser("impute", help="fill the empty cells of a CSV")
    impute.add_argument("model")
    impute.add_argument("data")
    _add_generation_options(impute)
    impute.set_defaults(func=cmd_impute)

    evaluate = sub.add_parser("evaluate", help="fidelity of a synthetic CSV against a real one")
    evaluate.add_argument("real")
    evaluate.add_argument("synth")
    evaluate.add_argument("--test", help="real held-out CSV for MLE")
    evaluate.add_argument("--target", help="label column for MLE")
    evaluate.add_argument("--task", choices=["classification", "regression"], default=None,
                          help="MLE task (default: inferred from the target, as the codec types columns)")
    evaluate.add_argument("--no-reference", action="store_true",
                          help="skip the 'real vs real' column (a real sample scored the same way)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--jobs", type=int, default=2,
                          help="XGBoost threads; use 1 on a busy machine (spin-waiting threads can run 10x slower)")
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
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"fastmdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run resumes from its checkpoint with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
