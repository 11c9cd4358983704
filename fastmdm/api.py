"""TabularMDM: fit a DataFrame, sample rows, condition, impute, score, save and load."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from . import predict as prediction
from .conditions import Rule, TokenRestrictions, split_conditions
from .data import DEFAULT_CATEGORY_CAP, DEFAULT_NUM_BINS, OTHER_LABEL, TableCodec
from .data.privacy import MIN_ROWS_PER_VALUE
from .decoding import DecodeStats, known_first_order, sample_tokens
from .kinds import ModelKind, model_kind
from .models import TableDenoiser
from .schedules import PowerSchedule
from .sample_blocks import BlockPlan, fresh_seed, shard_path
from .data.files import TableWriter
from .token_store import prepare_token_store
from .train import Budget, EpochRecord, TrainConfig, Trainer, atomic_save, estimate_nelbo, row_nelbo

#: The version of the files save() and checkpoints write; load() and resume read this one only.
_FORMAT = "fastmdm-tabular-6"
#: The architecture of a static-order model when none is named.
DEFAULT_ARCHITECTURE = model_kind(None, "static").architecture
#: TrainConfig fields that say how this process runs (a progress bar, bfloat16 on CUDA), not
#: what the model is: model files and checkpoints do not carry them.
RUN_TIME_FIELDS = ("progress", "bf16")


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TabularMDM:
    """Masked diffusion model of a table with a learned (or fixed linear) per-column schedule.

    >>> model = TabularMDM().fit(train_df)
    >>> synth = model.sample(10_000)
    >>> filled = model.impute(df_with_nans)

    Arguments: `architecture` "causal" (the default: one pass scores a whole order, sampling
    runs through a key/value cache) or "bidirectional" (the paper's denoiser; the default
    with estimator="tspace"); see fastmdm.models. `order` "static" (one learned order
    distribution PL(w) for the table) or "contextual" (the next column depends on the values
    generated so far; causal only; see fastmdm.models.orders);
    `num_bins` quantile bins per numeric column; `category_cap` most tokens per
    categorical column (a memory bound: a value gets a token only when at least
    MIN_ROWS_PER_VALUE training rows hold it, and rarer values share a rare token; see
    TableCodec.fit); `rare_marker` False (the default) draws a generated rare cell among the
    column's frequent categories from the model's conditional for its row, True lets the
    model generate the rare token and writes it as OTHER_LABEL in text columns (missing
    elsewhere), which shows where the long tail was; `learn_schedule` learns w
    (False keeps w = 1, the linear MDM); `estimator` "order" (order-space, low variance) or
    "tspace" (the paper's; bidirectional only); `model` keyword arguments of the denoiser
    (d_model, num_layers, num_heads, dim_feedforward, dropout); the rest are TrainConfig
    fields (steps, epochs, batch_size, lr, seed, ...). Left unset, the budget, batch size and
    warm-up follow the table's size, and training stops early, keeping the best weights, once
    the validation NELBO stops improving (see fastmdm.train.TrainConfig.budget); it warns when
    the budget looks too short. `save` writes, and `load` and a resumed `fit`
    read, files of one format version (`_FORMAT`); another version is refused by name.
    """

    def __init__(self, *, architecture: str | None = None, order: str = "static",
                 num_bins: int = DEFAULT_NUM_BINS,
                 category_cap: int | None = DEFAULT_CATEGORY_CAP, rare_marker: bool = False,
                 learn_schedule: bool = True, device: str | torch.device = "auto", model: Mapping | None = None,
                 **train_options):
        self.config = TrainConfig(**train_options)
        self.kind: ModelKind = model_kind(architecture, order, self.config.estimator)
        self.num_bins = num_bins
        self.category_cap = category_cap
        if not isinstance(rare_marker, bool):
            raise TypeError(f"rare_marker must be True or False, got {rare_marker!r}")
        self.rare_marker = rare_marker
        self.learn_schedule = learn_schedule
        self.device = _resolve_device(device)
        self.model_options = dict(model or {})
        self.kind.check_estimator(self.config.estimator)
        if self.config.order_search_epochs and self.kind.order_search is None:
            raise ValueError("order_search_epochs searches a contextual model's orders; this model's order is "
                             f"{order!r}")
        self.codec: TableCodec | None = None
        self.denoiser: TableDenoiser | None = None
        self.schedule: PowerSchedule | None = None
        self.history: list[EpochRecord] = []

    @property
    def architecture(self) -> str:
        """The denoiser's architecture, "bidirectional" or "causal" (from the model's kind)."""
        return self.kind.architecture

    @property
    def order(self) -> str:
        """The generation orders, "static" or "contextual" (from the model's kind)."""
        return self.kind.order

    # ------------------------------------------------------------------------- training
    def fit(self, data: pd.DataFrame | str | os.PathLike, *, validation=0.1,
            categorical: list[str] | None = None, checkpoint: str | os.PathLike | None = None,
            resume: bool = False, token_store: str | os.PathLike | None = None) -> "TabularMDM":
        """Train on `data`. `validation`: a held-out frame, a fraction of data to hold out, or None.

        `data` may also be the path of a Parquet or CSV file, or of a directory of them, for
        tables larger than memory (see fastmdm.token_store): the codec learns from a bounded
        reservoir sample plus an exact pass over categories, the rows are encoded a chunk at a
        time into a memory-mapped token store in `token_store` (a directory, reused while
        its recipe matches; default a temporary one), and training reads batches from it.
        `validation` is then a fraction (a seeded coin per row), a path, or None.

        With `checkpoint`, the full training state is written there after every epoch; with
        `resume=True` and an existing checkpoint, training continues from it and ends with
        the same result as an uninterrupted run.
        """
        from_files = isinstance(data, (str, os.PathLike))
        if not from_files and not isinstance(data, pd.DataFrame):
            raise TypeError(f"data must be a pandas DataFrame or the path of Parquet/CSV files, "
                            f"got {type(data).__name__}")
        state = None
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            state = torch.load(checkpoint, weights_only=True, map_location="cpu")
            budget = dict(steps=self.config.steps, epochs=self.config.epochs)
            self._restore(state, checkpoint)
            # Only the budget comes from this call. A contextual run's search epochs were a share
            # of its epochs: a run resumed with more keeps them, and does not go back into
            # the search after the bound.
            search = None
            if self.kind.order_search is not None:
                run_epochs = Budget(**state["budget"]).epochs if state.get("budget") else self.config.epochs
                search = self.config.order_search_epoch_count(run_epochs)
            self.config = dataclasses.replace(self.config, order_search_epochs=search, **budget)
        with contextlib.ExitStack() as cleanup:
            if from_files:
                self.codec, train_tokens, val_tokens = prepare_token_store(
                    data, token_store, cleanup=cleanup, validation=validation,
                    codec=self.codec if state is not None else None, seed=self.config.seed,
                    progress=self.config.progress, num_bins=self.num_bins, categorical=categorical,
                    category_cap=self.category_cap)
            else:
                train_tokens, val_tokens = self._encode_frame(data, validation, categorical, fit_codec=state is None)
            self._report_rare_pools()
            # Training seeds the global stream (initial weights, dropout) from its own seed, in a
            # fork of the caller's streams, which are as they were when fit returns.
            cleanup.enter_context(torch.random.fork_rng(
                devices=[self.device.index or 0] if self.device.type == "cuda" else []))
            torch.manual_seed(self.config.seed)
            if state is None:
                self._build_model()
            trainer = Trainer(self.denoiser, self.schedule, self.codec.mask_ids, self.codec.offsets,
                              self.config, self.device)
            if state is not None:
                trainer.load_state_dict(state)
            self._trainer = trainer
            self.history = trainer.fit(train_tokens, val_tokens, checkpoint, extra_state=self._metadata)
        self._use_ema(trainer)
        return self

    def _report_rare_pools(self) -> None:
        """The fit log's account of each categorical column's rare pool: the share of its rows
        holding a value with no token (printed with `progress`), and a warning for a column
        where no value has one, since no value of it can be generated."""
        empty = [column for column in self.codec.columns
                 if not self.codec.is_numeric[self.codec.columns.index(column)]
                 and not self.codec.column(column).categories]
        if empty:
            shown = f"{OTHER_LABEL!r} in text columns, else missing" if self.rare_marker else "missing"
            warnings.warn(f"no value of column(s) {empty} is held by {MIN_ROWS_PER_VALUE} or more training rows, so "
                          f"none may be generated (fastmdm.data.privacy): they come back {shown}. Drop them before "
                          "fitting, or group their values into coarser ones", stacklevel=3)
        shares = {name: share for name, share in self.codec.rare_shares().items() if share > 0}
        first_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if shares and self.config.progress and first_rank:
            generated = repr(OTHER_LABEL) if self.rare_marker else "frequent categories"
            print(f"rare pool (share of rows holding a value fewer than {MIN_ROWS_PER_VALUE} rows hold or beyond "
                  f"category_cap; not stored, generated as {generated}): "
                  + ", ".join(f"{name!r} {share:.1%}" for name, share in shares.items()), flush=True)

    def _build_model(self) -> None:
        """A fresh denoiser and schedule for the codec's columns, from this model's settings."""
        self.denoiser = self.kind.denoiser(self.codec.cardinalities, token_positions=self.codec.token_positions(),
                                           **self.model_options)
        self.schedule = PowerSchedule(self.codec.num_columns, learnable=self.learn_schedule)

    def _encode_frame(self, df: pd.DataFrame, validation, categorical, fit_codec: bool):
        """(train tokens, validation tokens or None) of an in-memory table, fitting the codec first if asked."""
        train_df, val_df = self._split(df, validation)
        if fit_codec:
            # The vocabulary comes from every row given, so a category seen only in the
            # validation rows is not an error; bins and parameters still learn from train only.
            vocab_df = df if not isinstance(validation, pd.DataFrame) else pd.concat([df, validation])
            self.codec = TableCodec.fit(vocab_df, num_bins=self.num_bins, categorical=categorical,
                                        category_cap=self.category_cap)
        return self.codec.encode(train_df), (self.codec.encode(val_df) if val_df is not None else None)

    def _split(self, df: pd.DataFrame, validation):
        if validation is None:
            return df, None
        if isinstance(validation, pd.DataFrame):
            return df, validation
        if not 0 < float(validation) < 1:
            raise ValueError(f"validation fraction must lie in (0, 1), got {validation}")
        order = np.random.default_rng(self.config.seed).permutation(len(df))
        n_val = int(round(len(df) * float(validation)))
        if n_val == 0 or n_val == len(df):
            return df, None
        return df.iloc[order[n_val:]], df.iloc[order[:n_val]]

    def _use_ema(self, trainer: Trainer) -> None:
        """The averaged weights are the ones that generalize; sample and score with them."""
        self.denoiser = trainer.ema
        self.schedule = trainer.ema_schedule

    def _metadata(self) -> dict:
        """The model's settings as a file holds them; `RUN_TIME_FIELDS` are this process's
        choices and stay out."""
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in RUN_TIME_FIELDS}
        return {"format": _FORMAT, "codec": self.codec.state_dict(), "architecture": self.architecture,
                "order": self.order, "model_options": self.model_options, "learn_schedule": self.learn_schedule,
                "num_bins": self.num_bins, "category_cap": self.category_cap, "rare_marker": self.rare_marker,
                "train_config": config}

    # ------------------------------------------------------------------------- using it
    def _require_fitted(self) -> None:
        if self.denoiser is None:
            raise RuntimeError("the model is not fitted: call fit(df) or TabularMDM.load(path) first")

    @property
    def training_steps(self) -> int | None:
        """Optimizer steps the model trained for (early stopping may end a run before its
        budget); None for a model file written before steps were recorded."""
        return self.history[-1].step if self.history else None

    @property
    def weights(self) -> pd.Series:
        """Learned schedule weights w per column (higher = revealed earlier in generation).

        For a contextual model these are the policy's prior scores: its preference before
        the values move it (see `generation_orders` for the orders it actually takes)."""
        self._require_fitted()
        return pd.Series(self.schedule.w.detach().cpu().numpy(), index=self.codec.columns, name="w")

    def generation_orders(self, num_rows: int = 2000, *, seed: int = 0) -> pd.DataFrame:
        """The order in which generation reveals the columns, for num_rows sampled rows: a
        frame whose column i names the column revealed i-th (1 = first). For a static model
        these are draws from PL(w); a contextual model's depend on each row's values, so they
        come from sampling rows."""
        self._require_fitted()
        generator = torch.Generator().manual_seed(seed)
        if self.kind.contextual:
            stats = DecodeStats(orders=[])
            self._sample_tokens(num_rows, None, None, generator=generator, stats=stats)
            orders = torch.cat(stats.orders)
        else:
            orders, _ = known_first_order(self.schedule.w.detach().cpu(), num_rows, generator=generator)
        names = np.asarray(self.codec.columns, dtype=object)[orders.numpy()]
        return pd.DataFrame(names, columns=range(1, orders.shape[1] + 1))

    def sample(self, num_rows: int, *, steps: int | None = None, speculative: int | None = None,
               temperature: float = 1.0,
               conditions: Mapping[str, object] | pd.DataFrame | None = None, rules: list[str] | None = None,
               seed: int | None = None, batch_size: int = 4096, progress: bool = False) -> pd.DataFrame:
        """Generate rows. `steps` denoiser calls per row (default: number of columns, exact);
        fewer reveal chunks of columns at once (approximate). `speculative=k` (causal
        architecture only) drafts k columns a round and verifies them: exact and faster.

        `conditions`: a mapping applied to every row, {column: value}, {column: [values]} (a
        set) or {column: (low, high)} (a closed range, None for an open end; numbers, times,
        or a categorical column of numbers), or a DataFrame of num_rows rows holding some
        columns (NaN = free). Values are kept as given; sets and ranges restrict the columns
        when they are drawn, with importance resampling when the weights differ (see
        fastmdm.conditions); the result's attrs["effective_sample_size"] says how many
        independent rows they were worth, and a warning comes when that falls below a tenth.
        `rules`: comparisons between two columns of numbers or times that every row obeys,
        such as "check_in <= check_out" (or >=); the columns are drawn first, each token
        restricted to those that keep the rule satisfiable, with the same resampling. Exact
        for columns whose tokens are single values (small integer columns); a number drawn
        inside a bin that overlaps the other column's is drawn again, bounded by the other
        value, when it breaks the rule.
        An empty range, a category the table never had, or conditions the model gives
        probability zero raise ValueError.
        The rows are those of `iter_samples` with the same seed and batch_size, concatenated.
        """
        frames = list(self.iter_samples(num_rows, steps=steps, speculative=speculative, temperature=temperature,
                                        conditions=conditions, rules=rules, seed=seed, batch_size=batch_size,
                                        progress=progress))
        sizes = [f.attrs.get("effective_sample_size") for f in frames]
        out = pd.concat(frames)
        if sizes and None not in sizes:
            out.attrs["effective_sample_size"] = float(sum(sizes))
        return out

    def iter_samples(self, num_rows: int, *, steps: int | None = None, speculative: int | None = None,
                     temperature: float = 1.0, conditions: Mapping[str, object] | pd.DataFrame | None = None,
                     rules: list[str] | None = None, seed: int | None = None, batch_size: int = 4096,
                     shard: tuple[int, int] | None = None, progress: bool = False) -> Iterator[pd.DataFrame]:
        """Generate rows a batch at a time: DataFrames of up to batch_size rows, indexed by row number.

        Memory is one batch, whatever num_rows. Block b of batch_size rows draws from a seed
        derived from (seed, b) (see fastmdm.sample_blocks), so the rows depend on seed and
        batch_size only, and `shard=(k, n)` yields the k-th of n contiguous runs of blocks:
        the n shards concatenated are the rows of shard=None. Sharding needs a seed.
        Other arguments as in `sample`.
        """
        self._require_fitted()
        shard, num_shards = shard or (0, 1)
        if num_shards > 1 and seed is None:
            raise ValueError("sharded sampling needs a seed, so that all shards come from one run")
        plan = BlockPlan(num_rows, batch_size, fresh_seed() if seed is None else seed, shard, num_shards)
        if isinstance(conditions, pd.DataFrame) and len(conditions) != num_rows:
            raise ValueError(f"conditions has {len(conditions)} rows but num_rows is {num_rows}")
        restricted = []
        if isinstance(conditions, Mapping):
            conditions, restricted = split_conditions(self.codec, conditions)
        if isinstance(rules, str):
            raise TypeError("rules must be a list of strings such as ['check_in <= check_out']")
        rules = [Rule.parse(text, self.codec) for text in rules or ()]
        restrictions = TokenRestrictions(self.codec, restricted, self.device, rules) if restricted or rules else None
        options = dict(steps=steps, speculative=speculative, temperature=temperature)
        if isinstance(conditions, Mapping) and not conditions:
            conditions = None
        return self._generate_blocks(plan, conditions, restrictions, options, progress)

    def _generate_blocks(self, plan: BlockPlan, conditions, restrictions: TokenRestrictions | None, options: dict,
                         progress: bool) -> Iterator[pd.DataFrame]:
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(plan.rows), desc="sampling", unit="row", unit_scale=True, disable=None)
        try:
            for block in plan.blocks:
                rows = plan.rows_of(block)
                generator = plan.generator(block)
                given = known = known_mask = None
                if conditions is not None:
                    part = conditions.iloc[rows.start:rows.stop] if isinstance(conditions, pd.DataFrame) else conditions
                    given = self._condition_frame(part, len(rows))
                    known, known_mask = (t.to(self.device) for t in self.codec.encode_partial(given))
                stats = DecodeStats()
                tokens = self._sample_tokens(len(rows), known, known_mask, batch_size=len(rows),
                                             generator=generator, restrictions=restrictions, stats=stats, **options)
                if restrictions is None:
                    frame = self.codec.decode(tokens, generator=generator, rare_marker=self.rare_marker)
                else:
                    frame = self.codec.decode(tokens, generator=generator, ranges=restrictions.ranges,
                                              choices=restrictions.choices, rare_marker=self.rare_marker)
                    frame = restrictions.enforce_rules(self.codec, tokens, frame, generator)
                if given is not None:
                    frame = self.codec.keep_given(given, frame)
                frame.index = pd.RangeIndex(rows.start, rows.stop)
                if stats.effective_sizes:
                    ess = sum(size for size, _ in stats.effective_sizes)
                    frame.attrs["effective_sample_size"] = ess
                    if ess < 0.1 * len(rows):
                        warnings.warn(f"the conditions are hard for the model: {len(rows):,} rows sampled under them "
                                      f"are worth {ess:,.1f} independent rows (effective sample size), so many "
                                      "rows repeat the conditioned values of a few", stacklevel=3)
                if bar is not None:
                    bar.update(len(rows))
                yield frame
        finally:
            if bar is not None:
                bar.close()

    def sample_to(self, path: str | os.PathLike, num_rows: int, *, shard: tuple[int, int] | None = None,
                  **options) -> str:
        """Generate rows straight into a Parquet or CSV file (by its suffix), a batch at a time.

        Memory is one batch, whatever num_rows. `shard=(k, n)` writes shard k of n (see
        `iter_samples`) to out-0000k-of-0000n.parquet beside `path`. Other keyword
        arguments as in `iter_samples`. Returns the path written.
        """
        frames = self.iter_samples(num_rows, shard=shard, **options)
        target = shard_path(path, *(shard or (0, 1)))
        # One real value per column, no missing ones: it fixes the Parquet schema.
        example = self.codec.decode(torch.zeros(1, self.codec.num_columns, dtype=torch.int64),
                                    generator=torch.Generator().manual_seed(0))
        with TableWriter(target, example) as writer:
            for frame in frames:
                writer.write(frame)
        return os.fspath(target)

    def _sample_tokens(self, num_rows: int, known, known_mask, **options) -> torch.Tensor:
        """Token rows from the fitted denoiser and schedule, returned on the CPU; the rare
        tokens are never drawn unless the model keeps the marker."""
        return sample_tokens(self.denoiser, self.schedule.w.detach(), self.codec.mask_ids.to(self.device),
                             self.codec.offsets.to(self.device), num_rows, known=known, known_mask=known_mask,
                             decode=self.kind.decoder(options.get("speculative")),
                             never_drawn=None if self.rare_marker else self.codec.rare_tokens(), **options).cpu()

    def _condition_frame(self, conditions, num_rows: int) -> pd.DataFrame:
        """The conditions as num_rows rows of the model's columns; NaN marks a free cell."""
        if isinstance(conditions, Mapping):
            unknown = [c for c in conditions if c not in self.codec.columns]
            if unknown:
                raise ValueError(f"conditions name columns the model does not have: {unknown}")
            frame = pd.DataFrame({c: [conditions.get(c, np.nan)] * num_rows for c in self.codec.columns})
        elif isinstance(conditions, pd.DataFrame):
            if len(conditions) != num_rows:
                raise ValueError(f"conditions has {len(conditions)} rows but num_rows is {num_rows}")
            frame = conditions.reindex(columns=self.codec.columns)
        else:
            raise TypeError("conditions must be a mapping {column: value} or a DataFrame")
        return frame.astype({c: object for c in frame.columns if frame[c].isna().all()})

    def impute(self, df: pd.DataFrame, *, steps: int | None = None, speculative: int | None = None,
               temperature: float = 1.0, seed: int | None = None, batch_size: int = 4096) -> pd.DataFrame:
        """Fill every NaN of `df` by sampling it given the row's known values."""
        self._require_fitted()
        tokens, known = self.codec.encode_partial(df)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        filled = self._sample_tokens(len(df), tokens.to(self.device), known.to(self.device), steps=steps,
                                     speculative=speculative, temperature=temperature, batch_size=batch_size, generator=generator)
        decoded = self.codec.decode(filled, generator=generator, rare_marker=self.rare_marker)
        decoded.index = df.index
        return self.codec.keep_given(df, decoded)   # known cells exactly, in the fitted dtypes

    def nelbo(self, df: pd.DataFrame) -> float:
        """Mean per-row negative ELBO (nats) of df: an upper bound on -log p(row)."""
        self._require_fitted()
        return estimate_nelbo(self.denoiser, self.schedule, self.codec.encode(df), self.codec.mask_ids,
                              self.codec.offsets, num_samples=self.config.val_samples, device=self.device)

    # ------------------------------------------------------------------------- prediction
    def predict_proba(self, df: pd.DataFrame, *, target: str, orders: int = prediction.DEFAULT_ORDERS, seed: int = 0,
                      batch_size: int = 4096) -> pd.DataFrame:
        """p(target | each row's known cells) of a categorical target: a frame with df's index
        and one column per class, named by the class (a capped column's rare values share the
        column "(other)"; a column fitted with missing values adds "(missing)").

        `df` holds the model's columns, the target among them or not (its values are
        ignored); NaN cells and absent columns are unknown, marginalised as `impute` does.
        This is the conditional impute draws the target from when it is the first unknown
        cell revealed (fastmdm.predict). A causal model averages `orders` orders of the
        known cells drawn from PL(w) with `seed`; a bidirectional model needs one pass.
        """
        probs = self._target_probabilities(df, target, orders, seed, batch_size)
        column = self.codec.column(target)
        if column.is_numeric:
            raise ValueError(f"target {target!r} is numeric: use predict(df, target={target!r}) for its median, "
                             "or quantiles=[...] for intervals")
        return prediction.class_probabilities(column, probs, self.rare_marker).set_axis(df.index)

    def predict(self, df: pd.DataFrame, *, target: str, quantiles: list[float] | None = None,
                orders: int = prediction.DEFAULT_ORDERS, seed: int = 0,
                batch_size: int = 4096) -> pd.Series | pd.DataFrame:
        """The target predicted from each row's known cells (see `predict_proba`): the most
        likely class of a categorical target ("(missing)" predicted is NaN), the conditional
        median of a numeric one, or with `quantiles` (numeric only) a frame with a column per
        quantile, such as [0.05, 0.95] for a 90% interval. Numbers are float64 (times keep
        their dtype); a numeric target's chance of being missing is left out."""
        column = self.codec.column(target) if target in self.codec.columns else None
        if quantiles is not None and column is not None and not column.is_numeric:
            raise ValueError(f"quantiles need a numeric target; {target!r} is categorical (use predict_proba)")
        levels = prediction.check_quantiles(quantiles if quantiles is not None else 0.5)
        probs = self._target_probabilities(df, target, orders, seed, batch_size)
        if not column.is_numeric:
            classes = prediction.class_probabilities(column, probs, self.rare_marker)
            best = classes.to_numpy().argmax(1)
            labels = pd.Series(classes.columns.to_numpy(dtype=object)[best], index=df.index, name=target)
            return labels.mask(labels == prediction.MISSING_LABEL)
        values = prediction.numeric_quantiles(column, probs, levels)
        if quantiles is None:
            return prediction.as_column_values(column, values[:, 0]).set_axis(df.index).rename(target)
        return pd.DataFrame({level: prediction.as_column_values(column, values[:, j]).to_numpy()
                             for j, level in enumerate(levels)}, index=df.index)

    def _target_probabilities(self, df: pd.DataFrame, target: str, orders: int, seed: int,
                              batch_size: int) -> np.ndarray:
        """The target's token probabilities [N, tokens] given each row's known cells, batch by batch."""
        self._require_fitted()
        prediction.check_target(self.codec, df, target)
        if isinstance(orders, bool) or not isinstance(orders, int) or orders < 1:
            raise ValueError(f"orders must be an integer >= 1, got {orders!r}")
        tokens, known = self.codec.encode_partial(prediction.feature_frame(self.codec, df, target))
        generator = torch.Generator().manual_seed(seed)
        rows = max(1, batch_size // (orders if self.denoiser.causal else 1))
        parts = [prediction.target_probabilities(self.denoiser, self.schedule.w.detach(),
                                              tokens[start:start + rows].to(self.device),
                                              known[start:start + rows].to(self.device),
                                              self.codec.columns.index(target), orders=orders,
                                              generator=generator).cpu()
                 for start in range(0, len(df), rows)]
        return torch.cat(parts).numpy()

    def log_prob(self, df: pd.DataFrame, *, num_samples: int | None = None, seed: int = 12345) -> pd.Series:
        """log p(row) bounded from below, in nats, for each row of df (higher = more typical):
        minus the row's NELBO, estimated from `num_samples` orders (default: as `nelbo`) drawn
        from `seed`, so that its mean over df is -nelbo(df); its expectation is the bound. For
        outlier detection and row scoring; more samples give less noisy scores."""
        self._require_fitted()
        samples = self.config.val_samples if num_samples is None else num_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        nelbo = row_nelbo(self.denoiser, self.schedule, self.codec.encode(df), self.codec.mask_ids,
                          self.codec.offsets, num_samples=samples, seed=seed, device=self.device)
        return pd.Series(-nelbo.numpy(), index=df.index, name="log_prob")

    # ------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model (codec, denoiser, schedule, history) atomically."""
        self._require_fitted()
        atomic_save({**self._metadata(), "denoiser": self.denoiser.state_dict(),
                     "schedule": self.schedule.state_dict(),
                     "history": [dataclasses.asdict(r) for r in self.history]}, path)

    def _restore(self, state, path) -> None:
        """Take the settings, the codec and a fresh denoiser and schedule from a model file or
        checkpoint: the one way load() and a resumed fit rebuild a saved model."""
        found = state.get("format") if isinstance(state, dict) else None
        if found is None:
            raise ValueError(f"{os.fspath(path)!r} is not a fastmdm model file")
        if found != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is a fastmdm file of format {found!r}; this version of "
                             f"fastmdm reads {_FORMAT!r} only: train the model again")
        self.kind = model_kind(state["architecture"], state["order"])
        self.learn_schedule = state["learn_schedule"]
        self.rare_marker = state["rare_marker"]
        self.model_options = dict(state["model_options"])
        self.num_bins, self.category_cap = state["num_bins"], state["category_cap"]
        run_time = {name: getattr(self.config, name) for name in RUN_TIME_FIELDS}
        self.config = TrainConfig(**state["train_config"], **run_time)
        self.codec = TableCodec.from_state_dict(state["codec"])
        self._build_model()
        self.history = [EpochRecord(**r) for r in state.get("history", [])]

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> "TabularMDM":
        """Load a model written by save() (or a training checkpoint); safe: weights_only."""
        state = torch.load(path, weights_only=True, map_location="cpu")
        self = cls(device=device)
        self._restore(state, path)
        # A checkpoint holds the live and the EMA weights: prefer the EMA ones.
        self.denoiser.load_state_dict(state.get("ema", state["denoiser"]))
        self.schedule.load_state_dict(state.get("ema_schedule", state["schedule"]))
        self.schedule.requires_grad_(False)
        self.denoiser.to(self.device).eval()
        self.schedule.to(self.device)
        return self
