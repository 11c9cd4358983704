"""The training loop: a budget sized to the table, AdamW, EMA, validation NELBO with early
stopping, atomic checkpoints, exact resume, DDP.

`Trainer` works on token tensors (the `TableCodec` lives one layer up, in `fastmdm.api`).
Everything random flows from one seed through torch.Generator objects whose state is saved
in each checkpoint, so an interrupted run resumed from its last checkpoint ends with the
same parameters as an uninterrupted one. The default budget (`TrainConfig.budget`) is in
optimizer steps and follows the table's size; the validation NELBO is checked about
CHECKS_PER_BUDGET times, the best EMA weights are kept, and training stops once the
validation NELBO has not improved for `patience` checks. Under `torchrun` (WORLD_SIZE > 1) each process
trains on its shard of every batch and gradients are averaged (DistributedDataParallel for
the denoiser, an explicit all-reduce for the schedule, whose gradient arrives outside the
denoiser's forward).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import values_checked
from .kinds import model_loss
from .objective import ESTIMATORS
from .schedules import PowerSchedule


#: Share of a contextual model's epochs trained by the order search when `order_search_epochs`
#: is None: 10 of 26 found the switch table's orders on 5 seeds of 5 (docs/findings.md).
ORDER_SEARCH_SHARE = 0.4

#: Largest default batch, in rows; smaller tables get about a sixteenth of their rows, so
#: that an epoch is ~16 optimizer steps: small tables need steps more than rows per step.
MAX_BATCH_SIZE = 1024
MIN_BATCH_SIZE = 32
#: The default budget is in compute: cells seen, rows seen (steps x batch) times columns, since
#: every column is a token of every row's pass. Tables train for LARGE_TABLE_EPOCHS epochs,
#: but for at most MAX_CELLS_SEEN cells: about 2.5 default Adult runs (30 epochs of 29,305
#: rows x 15 columns are 13M cells), so that the budget stops growing with a table that holds
#: more rows than the model can learn from (10M rows x 15 columns: 2,084 steps, not 293,000).
#: Smaller tables see at least MIN_ROWS_SEEN rows or MIN_CELLS_SEEN cells, whichever takes
#: fewer steps, in at most MAX_FLOOR_STEPS steps: 30 epochs of a table of a few thousand rows
#: are a few dozen steps, too few to learn its dependencies, and early stopping keeps the
#: extra epochs from overfitting it. MIN_CELLS_SEEN is MIN_ROWS_SEEN rows of 15 columns
#: (Adult's width): a table wider than that reaches the floor in fewer rows, each of which
#: brings more cells to learn from and costs more.
LARGE_TABLE_EPOCHS = 30
MAX_CELLS_SEEN = 32_000_000
MIN_ROWS_SEEN = 256_000
MIN_CELLS_SEEN = 3_840_000
MAX_FLOOR_STEPS = 2000
#: Learning-rate warm-up as a share of the steps, when `warmup_steps` is None.
WARMUP_SHARE = 0.1
#: Steps between readings of the training NELBO for the progress bar: each reading is a host
#: synchronisation, which a step itself never makes.
LOG_EVERY = 25
#: Validation checks (and checkpoints) per budget, at whole epochs (within epochs when the
#: cap on cells seen cuts a large table's default run short of LARGE_TABLE_EPOCHS epochs).
CHECKS_PER_BUDGET = 30
#: "Still falling" warning: over the last FALLING_WINDOW of the steps, the validation NELBO
#: fell by more than FALLING_SHARE of its fall since the first check.
FALLING_WINDOW = 0.2
FALLING_SHARE = 0.1
#: "Marginal level" warning: the best validation NELBO is within this share of the NELBO of
#: a model that draws each column independently from its marginal.
MARGINAL_SHARE = 0.01


@dataclass(frozen=True)
class Budget:
    """What a run does, resolved from a TrainConfig and the number of training rows."""
    batch_size: int
    steps: int
    steps_per_epoch: int
    warmup_steps: int
    check_every: int          # steps between validation checks and checkpoints

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)


def default_batch_size(rows: int) -> int:
    """About a sixteenth of the rows, a power of two in [MIN_BATCH_SIZE, MAX_BATCH_SIZE]."""
    sixteenth = max(1, rows / 16)
    return int(min(MAX_BATCH_SIZE, max(MIN_BATCH_SIZE, 2 ** round(math.log2(sixteenth)))))


def default_steps(rows: int, columns: int, batch_size: int) -> int:
    """LARGE_TABLE_EPOCHS epochs, at least the small-table floor (MIN_ROWS_SEEN rows or
    MIN_CELLS_SEEN cells, at most MAX_FLOOR_STEPS steps) and at most MAX_CELLS_SEEN cells."""
    steps_per_epoch = max(1, rows // batch_size)
    cells_per_step = batch_size * columns
    floor = min(MAX_FLOOR_STEPS, math.ceil(MIN_ROWS_SEEN / batch_size), math.ceil(MIN_CELLS_SEEN / cells_per_step))
    cap = math.ceil(MAX_CELLS_SEEN / cells_per_step)
    return min(max(LARGE_TABLE_EPOCHS * steps_per_epoch, floor), cap)


@dataclass
class TrainConfig:
    """Optimization settings. The budget fields left at None follow the table (see `budget`):
    `fit(df)` with no settings trains a table of 1,000 rows as well as one of 30,000, and one
    of 10 million rows in hours."""
    steps: int | None = None        # optimizer steps (None: `epochs`, or default_steps)
    epochs: int | None = None       # passes over the table, when `steps` is None
    batch_size: int | None = None   # rows per step, all processes together (None: default_batch_size)
    lr: float = 2e-3
    schedule_lr: float = 1e-2       # learning rate for log w (the schedule)
    order_lr: float = 1e-3          # learning rate for a contextual model's policy and posterior
    weight_decay: float = 0.0
    estimator: str = "order"        # "order" (ours, low variance) or "tspace" (the paper's)
    num_samples: int = 2            # masks (orders) per row (K); RLOO's baseline for w: a row's
    #                                 other samples, or with K = 1 the batch's other rows
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    warmup_steps: int | None = None  # None: WARMUP_SHARE of the steps
    patience: int | None = 5        # stop after this many validation checks without a new best (None: never)
    order_search_epochs: int | None = None  # a contextual model's first epochs train by objective.order_search_loss
    #                                 (None: ORDER_SEARCH_SHARE of the epochs)
    val_samples: int = 4            # masks per validation row for the validation NELBO
    seed: int = 0
    progress: bool = True
    bf16: bool = True               # on CUDA, run the forward under bfloat16 autocast

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("steps", "epochs", "batch_size", "patience", "num_samples", "val_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps or epochs, not both (got steps={self.steps}, epochs={self.epochs})")
        for name in ("warmup_steps", "order_search_epochs"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.schedule_lr < 0 or self.order_lr < 0:
            raise ValueError("learning rates must be positive")

    def budget(self, rows: int, columns: int) -> Budget:
        """The run's batch size, steps, warm-up and check interval for `rows` training rows
        of `columns` columns."""
        batch_size = self.batch_size or default_batch_size(rows)
        steps_per_epoch = max(1, rows // batch_size)
        if self.steps is not None:
            steps = self.steps
        elif self.epochs is not None:
            steps = self.epochs * steps_per_epoch
        else:
            steps = default_steps(rows, columns, batch_size)
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, round(WARMUP_SHARE * steps))
        epochs = math.ceil(steps / steps_per_epoch)
        if self.steps is None and self.epochs is None and steps < LARGE_TABLE_EPOCHS * steps_per_epoch:
            # The cap on cells cut the default run short of its epochs (a large table): checks
            # within epochs, so that early stopping and checkpoints still come often.
            check_every = max(1, round(steps / CHECKS_PER_BUDGET))
        else:
            check_every = steps_per_epoch * max(1, round(epochs / CHECKS_PER_BUDGET))
        return Budget(batch_size, steps, steps_per_epoch, warmup, check_every)

    def order_search_epoch_count(self, epochs: int) -> int:
        """`order_search_epochs`, or ORDER_SEARCH_SHARE of a run of `epochs` epochs when it is
        None (only a contextual model searches)."""
        if self.order_search_epochs is None:
            return round(ORDER_SEARCH_SHARE * epochs)
        return self.order_search_epochs


@dataclass
class EpochRecord:
    """One validation check: the epochs and optimizer steps done, the mean training NELBO
    since the previous check, the EMA model's validation NELBO, the seconds since the
    previous check, and the schedule's w."""
    epoch: int
    train_nelbo: float
    val_nelbo: float | None
    seconds: float
    w: list[float] = field(default_factory=list)
    step: int | None = None   # None in files written before steps were recorded

    def __str__(self) -> str:
        val = f"{self.val_nelbo:.4f}" if self.val_nelbo is not None else "-"
        step = f"  step {self.step:5d}" if self.step is not None else ""
        return (f"epoch {self.epoch:3d}{step}  train NELBO {self.train_nelbo:.4f}  validation NELBO {val}"
                f"  ({self.seconds:.1f} s)")


def _distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Trains a denoiser and a PowerSchedule on token rows with one of the NELBO estimators."""

    def __init__(self, denoiser: nn.Module, schedule: PowerSchedule, mask_id: Tensor,
                 offsets: Tensor, config: TrainConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.rank, self.world = _distributed()
        self.denoiser = denoiser.to(self.device)
        self.schedule = schedule.to(self.device)
        self.mask_id = mask_id.to(self.device)
        self.offsets = offsets.to(self.device)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.ema_schedule = copy.deepcopy(self.schedule).requires_grad_(False)
        # w learns at schedule_lr, a contextual model's policy and posterior at order_lr:
        # faster, the posterior collapses onto a static order before it can depend on the
        # values (docs/findings.md). The order's parameters are not clipped: their
        # RLOO gradients are noisy and, clipped together with the denoiser's, would shrink
        # the denoiser's steps.
        order_params = self.denoiser.order_parameters()
        order_ids = {id(p) for p in order_params}
        self.clipped_params = [p for p in self.denoiser.parameters() if id(p) not in order_ids]
        groups = [{"params": self.clipped_params, "lr": config.lr}]
        if order_params:
            groups.append({"params": order_params, "lr": config.order_lr})
        if self.schedule.learnable:
            groups.append({"params": [self.schedule.log_w], "lr": config.schedule_lr, "weight_decay": 0.0})
        # Fused: one kernel for every parameter, and the step counters stay tensors on the
        # device (the unfused AdamW reads each as a Python number: a host sync per parameter).
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=True)
        self.base_lrs = [g["lr"] for g in groups]
        self.model = self.denoiser
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.denoiser, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # On the host: the losses draw their random numbers with it on the CPU and copy them to
        # the device (a copy to the device, no synchronisation).
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        # Floating EMA tensors and their live ones (views of the modules' storage), for one
        # foreach update a step; integer buffers are copied.
        pairs = [(e, p) for ema, live in ((self.ema, self.denoiser), (self.ema_schedule, self.schedule))
                 for e, p in zip(ema.state_dict().values(), live.state_dict().values())]
        self._ema_floats = ([e for e, p in pairs if e.dtype.is_floating_point],
                            [p for e, p in pairs if e.dtype.is_floating_point])
        self._ema_others = [(e, p) for e, p in pairs if not e.dtype.is_floating_point]
        self.epoch = 0
        self.step = 0
        self.history: list[EpochRecord] = []
        self.budget: Budget | None = None    # set by fit from the number of training rows
        # Early stopping: the best validation NELBO so far, its step, and the EMA weights then.
        self.best: dict | None = None
        self.stopped_early = False

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly; loads with torch.load(weights_only=True)."""
        return {
            "denoiser": self.denoiser.state_dict(), "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict(), "ema_schedule": self.ema_schedule.state_dict(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "epoch": self.epoch, "step": self.step,
            "history": [dataclasses.asdict(r) for r in self.history],
            "best": self.best, "stopped_early": self.stopped_early,
            "budget": dataclasses.asdict(self.budget) if self.budget is not None else None,
            "train_config": dataclasses.asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.denoiser.load_state_dict(state["denoiser"])
        self.schedule.load_state_dict(state["schedule"])
        self.ema.load_state_dict(state["ema"])
        self.ema_schedule.load_state_dict(state["ema_schedule"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.best = state.get("best")
        self.stopped_early = state.get("stopped_early", False)

    # ---- training ----------------------------------------------------------------------
    def _set_lr(self) -> None:
        """Linear warmup, then cosine decay to 10% over the budget's steps."""
        total, warmup = self.budget.steps, self.budget.warmup_steps
        if self.step < warmup:
            factor = (self.step + 1) / warmup
        else:
            progress = min(1.0, (self.step - warmup) / max(1, total - warmup))
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(*self._ema_floats, 1 - decay)
            for e, p in self._ema_others:
                e.copy_(p)

    def _train_step(self, batch: Tensor) -> Tensor:
        """One optimizer step on a batch of token rows; returns the batch's mean NELBO as a
        device scalar, never read here: the step has no host synchronisation (the value
        checks are skipped: `fit` checks the token table once), so a GPU never waits on the host."""
        self._set_lr()
        bf16 = self.device.type == "cuda" and self.config.bf16
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
        with autocast, values_checked():
            out = model_loss(self.model, batch, self.schedule, self.mask_id, self.offsets,
                                 estimator=self.config.estimator, num_samples=self.config.num_samples,
                                 generator=self.generator,
                                 order_search=self.epoch < self.config.order_search_epoch_count(self.budget.epochs))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.world > 1 and self.schedule.learnable:
            dist.all_reduce(self.schedule.log_w.grad)
            self.schedule.log_w.grad /= self.world
        nn.utils.clip_grad_norm_(self.clipped_params, self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        self._update_ema()
        return out.nelbo.mean()

    def fit(self, train_tokens: Tensor, val_tokens: Tensor | None = None,
            checkpoint_path: str | os.PathLike | None = None,
            extra_state: Callable[[], dict] | None = None) -> list[EpochRecord]:
        """Train until the budget's steps are done or early stopping ends the run, starting
        from self.step (so a loaded state resumes); the EMA model then holds the weights of
        the best validation check.

        At every check rank 0 writes `checkpoint_path` atomically; `extra_state()` adds
        caller data (the codec, the model config) to it. Warns (see `_warn_if_unconverged`)
        when the validation NELBO says the budget was too short.
        """
        config = self.config
        rows = train_tokens.shape[0]
        if rows == 0:
            raise ValueError("no training rows")
        self._check_tokens("training tokens", train_tokens)
        if val_tokens is not None:
            self._check_tokens("validation tokens", val_tokens)
        budget = self.budget = config.budget(rows, train_tokens.shape[1])
        per_rank = max(1, budget.batch_size // self.world)
        order_epoch = order = None
        bar = None
        if config.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=budget.steps, initial=self.step, desc="training", unit="step", disable=None)
        try:
            while self.step < budget.steps and not self.stopped_early:
                start = time.perf_counter()
                total, count = torch.zeros((), device=self.device), 0
                self.denoiser.train()
                while True:
                    self.epoch, position = divmod(self.step, budget.steps_per_epoch)
                    if order_epoch != self.epoch:
                        # The permutation depends on (seed, epoch) only: identical on every rank and on resume.
                        order_epoch, order = self.epoch, torch.randperm(
                            rows, generator=torch.Generator().manual_seed(config.seed + 7919 * self.epoch))
                    index = order[position * budget.batch_size:(position + 1) * budget.batch_size]
                    shard = index[self.rank * per_rank:(self.rank + 1) * per_rank]
                    total += self._train_step(train_tokens[shard].to(self.device))
                    count += 1
                    if bar is not None:
                        bar.update(1)
                        if self.step % LOG_EVERY == 0:
                            bar.set_postfix(epoch=self.epoch + 1, nelbo=f"{self._read_nelbo(total) / count:.3f}")
                    if self.step % budget.check_every == 0 or self.step >= budget.steps:
                        break
                self.epoch = math.ceil(self.step / budget.steps_per_epoch)
                train_nelbo = self._read_nelbo(total) / count
                val = self.validation_nelbo(val_tokens) if val_tokens is not None else None
                record = EpochRecord(self.epoch, train_nelbo, val, time.perf_counter() - start,
                                     self.ema_schedule.w.tolist(), self.step)
                self.history.append(record)
                self._track_best(record)
                if bar is not None and bar.disable:  # no live bar (a log, nohup, CI): one line per check
                    print(f"{record}  [{self.step}/{budget.steps} steps]", flush=True)
                if checkpoint_path is not None and self.rank == 0:
                    state = self.state_dict()
                    if extra_state is not None:
                        state.update(extra_state())
                    atomic_save(state, checkpoint_path)
        finally:
            if bar is not None:
                bar.close()
        if self.best is not None:
            self.ema.load_state_dict(self.best["ema"])
            self.ema_schedule.load_state_dict(self.best["ema_schedule"])
        if val_tokens is not None and self.rank == 0:
            self._warn_if_unconverged(marginal_nelbo(train_tokens, self.mask_id))
        return self.history

    def _check_tokens(self, name: str, tokens: Tensor, chunk_rows: int = 65536) -> None:
        """Check a token table once, before training: the steps skip the value checks."""
        for start in range(0, tokens.shape[0], chunk_rows):
            self.denoiser.check_tokens(name, torch.as_tensor(tokens[start:start + chunk_rows]).long(), allow_mask=False)

    def _read_nelbo(self, total: Tensor) -> float:
        """The training NELBO summed over steps, read on the host (a synchronisation: at
        most every LOG_EVERY steps). The steps check no values, so a loss that went NaN or
        infinite is caught here."""
        value = float(total)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training NELBO became {value} by step {self.step}: training diverged; "
                f"lower the learning rate (lr={self.config.lr}) or clip gradients harder "
                f"(grad_clip={self.config.grad_clip})")
        return value

    def _track_best(self, record: EpochRecord) -> None:
        """Keep the EMA weights of the best validation check; stop after `patience` checks
        without a new best."""
        if record.val_nelbo is None:
            return
        if self.best is None or record.val_nelbo < self.best["val_nelbo"]:
            self.best = {"val_nelbo": record.val_nelbo, "step": record.step, "checks": len(self.history),
                         "ema": copy.deepcopy(self.ema.state_dict()),
                         "ema_schedule": copy.deepcopy(self.ema_schedule.state_dict())}
        elif self.config.patience is not None:
            self.stopped_early = len(self.history) - self.best["checks"] >= self.config.patience

    def _warn_if_unconverged(self, marginal: float) -> None:
        """Warn when the validation NELBO was still falling fast at the end of the budget, or
        never went clearly below `marginal`, the NELBO of independent columns."""
        vals = [(r.step, r.val_nelbo) for r in self.history if r.step is not None and r.val_nelbo is not None]
        if not vals:
            return
        best = min(v for _, v in vals)
        if best >= marginal * (1 - MARGINAL_SHARE):
            warnings.warn(
                f"training did not converge: the best validation NELBO ({best:.3f} nats/row) never went "
                f"below {marginal:.3f}, the NELBO of a model that draws each column from its marginal; the "
                f"model learned no dependence between columns. If the columns are related, train longer "
                f"(steps={2 * self.step}) or with a larger learning rate (lr).", stacklevel=3)
            return
        if self.stopped_early or len(vals) < 3:
            return
        last_step, last = vals[-1]
        earlier = [v for s, v in vals if s <= last_step - FALLING_WINDOW * last_step]
        if earlier and earlier[-1] - last > FALLING_SHARE * (vals[0][1] - last):
            warnings.warn(
                f"training may not have converged: the validation NELBO was still falling at the end of "
                f"the {last_step} steps ({earlier[-1]:.3f} -> {last:.3f} nats/row over the last "
                f"{FALLING_WINDOW:.0%}); train longer (steps={2 * last_step}).", stacklevel=3)

    def validation_nelbo(self, tokens: Tensor) -> float:
        """Mean per-row NELBO (nats) of the EMA model on `tokens` (see `estimate_nelbo`)."""
        return estimate_nelbo(self.ema, self.ema_schedule, tokens, self.mask_id, self.offsets,
                              num_samples=self.config.val_samples, device=self.device)


def marginal_nelbo(tokens: Tensor, cardinalities: Tensor, chunk_rows: int = 65536) -> float:
    """NELBO (nats/row) of a model that draws each column independently from its marginal in
    `tokens`: the sum of the columns' entropies. A model whose NELBO stays at this level has
    learned no dependence between columns."""
    cardinalities = cardinalities.cpu()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(cardinalities, 0)[:-1]])
    counts = torch.zeros(int(cardinalities.sum()), dtype=torch.float64)
    for start in range(0, tokens.shape[0], chunk_rows):
        chunk = torch.as_tensor(tokens[start:start + chunk_rows]).long()
        counts += torch.bincount((chunk + offsets).flatten(), minlength=counts.numel()).double()
    entropy = 0.0
    for column in torch.split(counts, cardinalities.tolist()):
        p = column[column > 0] / column.sum()
        entropy -= float((p * p.log()).sum())
    return entropy


def estimate_nelbo(denoiser: nn.Module, schedule: PowerSchedule, tokens: Tensor, mask_id: Tensor,
                   offsets: Tensor, **options) -> float:
    """Mean per-row NELBO (nats): the mean of `row_nelbo` (same options)."""
    return float(row_nelbo(denoiser, schedule, tokens, mask_id, offsets, **options).mean())


@torch.no_grad()
def row_nelbo(denoiser: nn.Module, schedule: PowerSchedule, tokens: Tensor, mask_id: Tensor,
              offsets: Tensor, *, num_samples: int = 4, seed: int = 12345,
              device: torch.device | str = "cpu", batch_sequences: int = 2048) -> Tensor:
    """NELBO (nats) of each row, float64 [N] on the CPU: the order-space estimator, the mean of
    `num_samples` draws per row from a fixed seed. Its expectation bounds -log p(row) from above.

    The order-space estimator is unbiased for the same NELBO as the t-space one and has far
    lower variance, so it is the better ruler for models trained either way. A pass scores
    at most `batch_sequences` row copies (rows x num_samples), as many as a training step of
    the default batch (1,024 rows, 2 samples), so validation never holds more activations
    than training: on a 10,000-category table 4,096 rows at 4 samples a pass raised the
    fit's peak memory by 0.5 GB and took 3x longer (benchmarks/results/default_path.md).
    """
    batch_size = max(1, batch_sequences // num_samples)
    generator = torch.Generator().manual_seed(seed)
    was_training = denoiser.training
    denoiser.eval()
    fixed = PowerSchedule(schedule.num_columns, learnable=False).to(device)
    fixed.load_state_dict(schedule.state_dict())
    parts = []
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(device)
            out = model_loss(denoiser, batch, fixed, mask_id.to(device), offsets.to(device),
                             estimator="order", num_samples=num_samples, generator=generator)
            parts.append(out.nelbo.double().cpu())
    finally:
        denoiser.train(was_training)
    return torch.cat(parts)
