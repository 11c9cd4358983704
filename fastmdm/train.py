"""The training loop: AdamW, EMA, validation NELBO, atomic checkpoints, exact resume, DDP.

`Trainer` works on token tensors (the `TableCodec` lives one layer up, in `fastmdm.api`).
Everything random flows from one seed through torch.Generator objects whose state is saved
in each checkpoint, so an interrupted run resumed from its last checkpoint ends with the
same parameters as an uninterrupted one. Under `torchrun` (WORLD_SIZE > 1) each process
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
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .kinds import model_loss
from .objective import ESTIMATORS
from .schedules import PowerSchedule


#: Share of a contextual model's epochs trained by the order search when `order_search_epochs`
#: is None: 10 of 26 found the switch table's orders on 5 seeds of 5 (docs/findings.md).
ORDER_SEARCH_SHARE = 0.4


@dataclass
class TrainConfig:
    """Optimization settings; defaults reach the paper's Adult NELBO range in minutes on CPU."""
    epochs: int = 30
    batch_size: int = 1024          # rows per step (all processes together)
    lr: float = 2e-3
    schedule_lr: float = 1e-2       # learning rate for log w (the schedule)
    order_lr: float = 1e-3          # learning rate for a contextual model's policy and posterior
    weight_decay: float = 0.0
    estimator: str = "order"        # "order" (ours, low variance) or "tspace" (the paper's)
    num_samples: int = 2            # masks per row (K); RLOO needs >= 2
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    warmup_steps: int = 100
    order_search_epochs: int | None = None  # a contextual model's first epochs train by objective.order_search_loss
    #                                 (None: ORDER_SEARCH_SHARE of the epochs)
    val_samples: int = 4            # masks per validation row for the validation NELBO
    seed: int = 0
    progress: bool = True
    bf16: bool = True               # on CUDA, run the forward under bfloat16 autocast

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("epochs", "batch_size", "num_samples", "val_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.order_search_epochs or 0) < 0:
            raise ValueError(f"order_search_epochs must be >= 0, got {self.order_search_epochs}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.schedule_lr < 0 or self.order_lr < 0:
            raise ValueError("learning rates must be positive")

    @property
    def order_search_epoch_count(self) -> int:
        """`order_search_epochs`, or ORDER_SEARCH_SHARE of the epochs when it is None (only a
        contextual model searches)."""
        if self.order_search_epochs is None:
            return round(ORDER_SEARCH_SHARE * self.epochs)
        return self.order_search_epochs


@dataclass
class EpochRecord:
    epoch: int
    train_nelbo: float
    val_nelbo: float | None
    seconds: float
    w: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        val = f"{self.val_nelbo:.4f}" if self.val_nelbo is not None else "-"
        return f"epoch {self.epoch:3d}  train NELBO {self.train_nelbo:.4f}  validation NELBO {val}  ({self.seconds:.1f} s)"


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
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        self.model = self.denoiser
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.denoiser, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.epoch = 0
        self.step = 0
        self.history: list[EpochRecord] = []

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly; loads with torch.load(weights_only=True)."""
        return {
            "denoiser": self.denoiser.state_dict(), "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict(), "ema_schedule": self.ema_schedule.state_dict(),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "epoch": self.epoch, "step": self.step,
            "history": [dataclasses.asdict(r) for r in self.history],
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

    # ---- training ----------------------------------------------------------------------
    def _set_lr(self) -> None:
        """Linear warmup, then cosine decay to 10% over the configured epochs."""
        total = max(1, self.total_steps)
        if self.step < self.config.warmup_steps:
            factor = (self.step + 1) / self.config.warmup_steps
        else:
            progress = min(1.0, (self.step - self.config.warmup_steps) / max(1, total - self.config.warmup_steps))
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for ema, live in ((self.ema, self.denoiser), (self.ema_schedule, self.schedule)):
                for e, p in zip(ema.state_dict().values(), live.state_dict().values()):
                    if e.dtype.is_floating_point:
                        e.lerp_(p, 1 - decay)
                    else:
                        e.copy_(p)

    def _train_step(self, batch: Tensor) -> float:
        self._set_lr()
        bf16 = self.device.type == "cuda" and self.config.bf16
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            out = model_loss(self.model, batch, self.schedule, self.mask_id, self.offsets,
                                 estimator=self.config.estimator, num_samples=self.config.num_samples,
                                 generator=self.generator,
                                 order_search=self.epoch < self.config.order_search_epoch_count)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.world > 1 and self.schedule.learnable:
            dist.all_reduce(self.schedule.log_w.grad)
            self.schedule.log_w.grad /= self.world
        nn.utils.clip_grad_norm_(self.clipped_params, self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        self._update_ema()
        return out.nelbo.mean().item()

    def fit(self, train_tokens: Tensor, val_tokens: Tensor | None = None,
            checkpoint_path: str | os.PathLike | None = None,
            extra_state: Callable[[], dict] | None = None) -> list[EpochRecord]:
        """Train until config.epochs, starting from self.epoch (so a loaded state resumes).

        After every epoch rank 0 writes `checkpoint_path` atomically; `extra_state()` adds
        caller data (the codec, the model config) to it.
        """
        config = self.config
        rows = train_tokens.shape[0]
        if rows == 0:
            raise ValueError("no training rows")
        per_rank = max(1, config.batch_size // self.world)
        steps_per_epoch = max(1, rows // config.batch_size)
        self.total_steps = steps_per_epoch * config.epochs
        bar = None
        if config.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", disable=None)
        try:
            while self.epoch < config.epochs:
                start = time.perf_counter()
                # The permutation depends on (seed, epoch) only: identical on every rank and on resume.
                order = torch.randperm(rows, generator=torch.Generator().manual_seed(config.seed + 7919 * self.epoch))
                total, count = 0.0, 0
                self.denoiser.train()
                for step in range(steps_per_epoch):
                    index = order[step * config.batch_size:(step + 1) * config.batch_size]
                    shard = index[self.rank * per_rank:(self.rank + 1) * per_rank]
                    total += self._train_step(train_tokens[shard].to(self.device))
                    count += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=self.epoch + 1, nelbo=f"{total / count:.3f}")
                self.epoch += 1
                val = self.validation_nelbo(val_tokens) if val_tokens is not None else None
                record = EpochRecord(self.epoch, total / count, val, time.perf_counter() - start,
                                     self.ema_schedule.w.tolist())
                self.history.append(record)
                if bar is not None and bar.disable:  # no live bar (a log, nohup, CI): one line per epoch
                    print(f"{record}  [{self.epoch}/{config.epochs}]", flush=True)
                if checkpoint_path is not None and self.rank == 0:
                    state = self.state_dict()
                    if extra_state is not None:
                        state.update(extra_state())
                    atomic_save(state, checkpoint_path)
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def validation_nelbo(self, tokens: Tensor) -> float:
        """Mean per-row NELBO (nats) of the EMA model on `tokens` (see `estimate_nelbo`)."""
        return estimate_nelbo(self.ema, self.ema_schedule, tokens, self.mask_id, self.offsets,
                              num_samples=self.config.val_samples, device=self.device)


@torch.no_grad()
def estimate_nelbo(denoiser: nn.Module, schedule: PowerSchedule, tokens: Tensor, mask_id: Tensor,
                   offsets: Tensor, *, num_samples: int = 4, seed: int = 12345,
                   device: torch.device | str = "cpu", batch_size: int = 4096) -> float:
    """Mean per-row NELBO (nats), order-space estimator with a fixed seed.

    The order-space estimator is unbiased for the same NELBO as the t-space one and has far
    lower variance, so it is the better ruler for models trained either way.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = denoiser.training
    denoiser.eval()
    fixed = PowerSchedule(schedule.num_columns, learnable=False).to(device)
    fixed.load_state_dict(schedule.state_dict())
    total = 0.0
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(device)
            out = model_loss(denoiser, batch, fixed, mask_id.to(device), offsets.to(device),
                                 estimator="order", num_samples=num_samples, generator=generator)
            total += out.nelbo.sum().item()
    finally:
        denoiser.train(was_training)
    return total / tokens.shape[0]
