"""The kinds of model: one `ModelKind` each holds what differs between them.

A kind is an architecture (fastmdm.models) with an order: the bidirectional denoiser with a
static order, and the causal one with a static or a contextual order. Its denoiser, the
NELBO estimate it trains on, the estimators that estimate it, and its decoders live here,
so that `TabularMDM` and the trainer ask the kind (`model_kind`, `kind_of`) rather than
testing the model. This module sits above models, objective and decoding, which know
nothing of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .decoding.bidirectional import sample_bidirectional
from .decoding.causal import sample_chunks, sample_contextual
from .decoding.sampler import Decoder
from .decoding.speculative import sample_speculative
from .models import CausalTransformer, ColumnTransformer, TableDenoiser
from .objective import ESTIMATORS, LossOutput, causal_loss, contextual_loss, diffusion_loss, order_search_loss
from .schedules import PowerSchedule

#: A NELBO estimate, called as objective.diffusion_loss is.
Loss = Callable[..., LossOutput]


def _whole_orders(loss: Callable[..., LossOutput]) -> Loss:
    """`loss` (causal models: it scores whole orders, no masks) called as diffusion_loss is."""
    def call(denoiser, x, schedule, mask_id, offsets, *, estimator, num_samples, generator):
        return loss(denoiser, x, schedule, num_samples=num_samples, generator=generator)
    return call


@dataclass(frozen=True)
class ModelKind:
    """An architecture with an order, and what it takes to train and sample such a model."""

    architecture: str
    order: str
    denoiser: Callable[..., TableDenoiser]   # (cardinalities, **model options) -> a fresh denoiser
    bound: Loss                              # the NELBO estimate it trains on
    estimators: tuple[str, ...]              # TrainConfig.estimator values it accepts
    decode: Decoder                          # reveals the order in `steps` chunks a row
    speculative_decode: Decoder | None = None  # drafts and verifies columns (exact), if it can
    order_search: Loss | None = None         # the loss of a learned order's first epochs

    @property
    def name(self) -> str:
        return f"architecture={self.architecture!r}, order={self.order!r}"

    @property
    def contextual(self) -> bool:
        """True when the generation order depends on the values, so that only sampled rows show it."""
        return self.order == "contextual"

    def loss(self, denoiser: Callable[..., Tensor], x: Tensor, schedule: PowerSchedule, mask_id: Tensor,
             offsets: Tensor, *, estimator: str = "order", num_samples: int = 2,
             generator: torch.Generator | None = None, order_search: bool = False) -> LossOutput:
        """The NELBO estimate of rows x [B, L] (the `bound`); with `order_search`, the order
        search's loss for kinds that search."""
        self.check_estimator(estimator)
        loss = self.order_search if order_search and self.order_search is not None else self.bound
        return loss(denoiser, x, schedule, mask_id, offsets, estimator=estimator, num_samples=num_samples,
                    generator=generator)

    def check_estimator(self, estimator: str) -> None:
        """Refuse an estimator this kind cannot train with (before training, not at its first step)."""
        if estimator not in self.estimators:
            raise ValueError(f"estimator must be one of {self.estimators} for a model with {self.name} "
                             f"('order': order-space, 'tspace': t-space), got {estimator!r}")

    def decoder(self, speculative: int | None = None) -> Decoder:
        """The decoder for `fastmdm.decoding.sample_tokens`: the speculative one when
        `speculative` (columns drafted per round) is given."""
        if speculative is None:
            return self.decode
        if self.speculative_decode is None:
            raise ValueError("speculative decoding needs the causal denoiser with a static order "
                             f"(architecture='causal', order='static'); this model has {self.name}")
        return self.speculative_decode


KINDS = (
    ModelKind("causal", "static", partial(CausalTransformer, order="static"), bound=_whole_orders(causal_loss),
              estimators=("order",), decode=sample_chunks, speculative_decode=sample_speculative),
    ModelKind("bidirectional", "static", ColumnTransformer, bound=diffusion_loss, estimators=ESTIMATORS,
              decode=sample_bidirectional),
    ModelKind("causal", "contextual", partial(CausalTransformer, order="contextual"),
              bound=_whole_orders(contextual_loss), estimators=("order",), decode=sample_contextual,
              order_search=_whole_orders(order_search_loss)),
)


def model_kind(architecture: str | None, order: str, estimator: str | None = None) -> ModelKind:
    """The kind of the given architecture and order; architecture None takes the first kind
    of that order that trains with `estimator` (causal, unless the estimator is the t-space
    one, which only the bidirectional model has). An error names the valid choices."""
    architectures = list(dict.fromkeys(kind.architecture for kind in KINDS))
    orders = list(dict.fromkeys(kind.order for kind in KINDS))
    if order not in orders:
        raise ValueError(f"order must be one of {orders}, got {order!r}")
    if architecture is not None and architecture not in architectures:
        raise ValueError(f"architecture must be one of {architectures}, got {architecture!r}")
    for kind in KINDS:
        if (kind.order == order and architecture in (None, kind.architecture)
                and (architecture is not None or estimator is None or estimator in kind.estimators)):
            return kind
    fitting = " or ".join(kind.architecture for kind in KINDS if kind.order == order)
    valid = "; ".join(kind.name for kind in KINDS)
    raise ValueError(f"{order} orders need the {fitting} architecture, not {architecture!r} (models: {valid})")


def kind_of(denoiser: nn.Module) -> ModelKind:
    """The kind of a denoiser (seen through DistributedDataParallel)."""
    model = getattr(denoiser, "module", denoiser)
    return model_kind(model.architecture, model.order)


def model_loss(denoiser: Callable[..., Tensor], x: Tensor, schedule: PowerSchedule, mask_id: Tensor,
               offsets: Tensor, **options) -> LossOutput:
    """The NELBO estimate for this denoiser's kind (`ModelKind.loss`, same options)."""
    return kind_of(denoiser).loss(denoiser, x, schedule, mask_id, offsets, **options)
