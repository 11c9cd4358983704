"""Learned-order parallel decoding (docs/design.md), conditioning, imputation.

Each row draws its reveal order pi ~ Plackett-Luce(w) from exponential keys (the smallest key is
revealed first; the same as revealing by decreasing transition time t* = U^{1/w}). The ranks of
the unknown columns are split into `steps` chunks of near-equal size and each chunk is revealed
in parallel, every column drawn from the denoiser's conditional given the values visible so far.
steps = L is exact learned-order autoregressive sampling; fewer steps trade fidelity for speed.

Why chunks of ranks and not a uniform grid over time: with a time grid, a step reveals the
columns whose t* falls in its interval. The counts per interval are random and t* clusters
(near 1 for large w, near 0 for small w), so some steps reveal nothing, wasting a denoiser
call, while others reveal many columns at once, which is where parallel decoding loses
fidelity. Rank chunks use every call and reveal at most ceil(L / steps) columns together.
The order, which is what the schedule learns, is the same either way.

This module holds what every sampler shares (orders with known columns first, chunks of
ranks, Gumbel-max, validation, batching) and the bidirectional decoder; the causal
denoiser's KV-cached and speculative decoders live in `fastmdm.causal_decoding`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from ._checks import (INT_DTYPES, check_offsets, check_positive_weights, check_same_device, check_tensor,
                      check_tokens)
from .models.base import TableDenoiser
from .ops.reference import segment_layout
from .schedules import PowerSchedule, exponential_keys


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniforms drawn on the generator's device (a CPU generator may drive a GPU sampler)."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def known_first_order(w: Tensor, num_rows: int, known_mask: Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Reveal orders [num_rows, L] drawn from PL(w) given that known columns come first.

    Returns (order, n_known): order[r, p] is the column revealed at position p of row r and
    n_known[r] the number of known columns, which fill positions 0..n_known-1 (in PL order
    among themselves). PL restricted to a subset is PL over it, so this is PL(w)
    conditioned on the known columns preceding the unknown ones.
    """
    check_positive_weights(w)
    keys = exponential_keys(w, _uniform((num_rows, w.numel()), generator, w.device))
    order = torch.argsort(keys, dim=1, stable=True)
    if known_mask is None:
        return order, torch.zeros(num_rows, dtype=torch.int64, device=w.device)
    unknown_in_order = (~known_mask).gather(1, order).to(torch.int8)
    order = order.gather(1, torch.argsort(unknown_in_order, dim=1, stable=True))
    return order, known_mask.sum(1)


def chunk_of_position(n_known: Tensor, num_columns: int, steps: int) -> Tensor:
    """Step [rows, L] at which each order position is revealed; -1 for known positions.

    A row with m unknown columns uses min(steps, m) steps; its unknown position of rank r
    (0-based, among unknown columns) goes to step floor(r * min(steps, m) / m), so chunk
    sizes differ by at most one.
    """
    if not 1 <= steps <= num_columns:
        raise ValueError(f"steps must lie in 1..L={num_columns}, got {steps}")
    rank = torch.arange(num_columns, device=n_known.device)[None, :] - n_known[:, None]
    unknown = (num_columns - n_known)[:, None]
    step = rank.clamp(min=0) * unknown.clamp(max=steps) // unknown.clamp(min=1)
    return step.masked_fill(rank < 0, -1)


def reveal_steps(w: Tensor, num_rows: int, steps: int, known_mask: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Step at which each column is revealed, [num_rows, L] int64; -1 for known columns."""
    order, n_known = known_first_order(w, num_rows, known_mask, generator)
    step_by_position = chunk_of_position(n_known, w.numel(), steps)
    return torch.empty_like(order).scatter_(1, order, step_by_position)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise (float32): argmax(logits + noise) draws from softmax(logits)."""
    u = _uniform(shape, generator, device)
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))  # u < 1: finite


def gumbel_max(segments: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One draw per row of segments [M, Kmax] (logits, padding at -inf) at a temperature;
    temperature 0 takes the argmax."""
    segments = segments.float()
    if temperature > 0:
        # = T * (logits / T + gumbel): the same argmax.
        segments = segments + temperature * gumbel_noise(tuple(segments.shape), generator, segments.device)
    return segments.argmax(-1)


def _validate(w, mask_id, offsets, num_rows, steps, temperature, batch_size):
    if isinstance(w, PowerSchedule):
        w = w.w.detach()
    check_positive_weights(w)
    check_tensor("mask_id", mask_id, ndim=1, dtypes=INT_DTYPES)
    check_tensor("offsets", offsets, ndim=1, dtypes=INT_DTYPES)
    num_columns = w.numel()
    if mask_id.numel() != num_columns:
        raise ValueError(f"w has {num_columns} columns but mask_id has {mask_id.numel()} entries")
    check_offsets(offsets.long(), num_columns, int(offsets[-1]))  # int32 offsets are fine here
    check_same_device(w=w, mask_id=mask_id, offsets=offsets)
    steps = num_columns if steps is None else steps
    if not (isinstance(steps, int) and 1 <= steps <= num_columns):
        raise ValueError(f"steps must be an int in 1..L={num_columns}, got {steps!r}")
    if not (isinstance(num_rows, int) and num_rows >= 1):
        raise ValueError(f"num_rows must be an int >= 1, got {num_rows!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return w, steps


def _validate_known(known, known_mask, mask_id, offsets, num_rows):
    num_columns = mask_id.numel()
    check_tokens("known", known, num_columns)
    if known.shape[0] != num_rows:
        raise ValueError(f"known has {known.shape[0]} rows, expected num_rows={num_rows}")
    check_same_device(known=known, mask_id=mask_id)
    if known_mask is None:
        known_mask = known != mask_id
    check_tensor("known_mask", known_mask, dtypes=(torch.bool,))
    if known_mask.shape not in ((num_columns,), (num_rows, num_columns)):
        raise ValueError(f"known_mask must have shape ({num_columns},) or ({num_rows}, {num_columns}), "
                         f"got {tuple(known_mask.shape)}")
    known_mask = known_mask.to(known.device).expand(num_rows, num_columns)
    sizes = offsets[1:] - offsets[:-1]
    if bool((known_mask & ((known < 0) | (known >= sizes))).any()):
        raise ValueError("known holds values outside 0..K_l-1 at known positions")
    return known.to(torch.int64), known_mask


@contextlib.contextmanager
def _eval_mode(denoiser):
    """Eval mode and no autograd for the duration; a module's training flag is restored after.

    no_grad rather than inference_mode, so the returned tokens are ordinary tensors that the
    caller may modify in place.
    """
    was_training = isinstance(denoiser, nn.Module) and denoiser.training
    if was_training:
        denoiser.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            denoiser.train()


class ColumnLayout(NamedTuple):
    """Where each column's values sit in the ragged [V] axis, as samplers need it."""
    mask_id: Tensor      # [L] int64, K_l
    pad_index: Tensor    # [L, Kmax] flat index of each column's values (padding repeats one)
    pad_invalid: Tensor  # [L, Kmax] True at padding
    vocab: int           # V = sum_l K_l

    @classmethod
    def of(cls, mask_id: Tensor, offsets: Tensor) -> "ColumnLayout":
        vocab = int(offsets[-1])
        pad_index, valid = segment_layout(offsets.long(), vocab)
        return cls(mask_id.to(torch.int64), pad_index, ~valid, vocab)

    def segments(self, logits: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
        """Logits [M, Kmax] of column columns[i] in row rows[i] of ragged logits [N, V];
        padding at -inf."""
        return logits[rows[..., None], self.pad_index[columns]].masked_fill(self.pad_invalid[columns],
                                                                            float("-inf"))


@dataclass
class DecodeStats:
    """Counts a decoder adds to while it runs (speculative decoding reports acceptance here)."""
    rows: int = 0
    rounds: int = 0          # per-row draft-and-verify rounds, summed over rows
    columns: int = 0         # columns revealed by those rounds
    orders: list[Tensor] | None = None   # set to [] to collect causal models' orders [n, L] per batch

    @property
    def columns_per_round(self) -> float:
        return self.columns / max(1, self.rounds)


def _sample_bidirectional(denoiser, w, layout: ColumnLayout, steps, temperature, num_rows, known,
                          known_mask, generator, stats):
    step = reveal_steps(w, num_rows, steps, known_mask, generator)
    x = layout.mask_id.expand(num_rows, w.numel()).clone()
    if known is not None:
        x = torch.where(known_mask, known, x)
    num_steps = int(step.max()) + 1
    for s in range(num_steps):
        reveal = step == s
        active = reveal.any(1)
        rows, cols = reveal.nonzero(as_tuple=True)
        if bool(active.all()):
            x_in, logit_rows = x, rows
        else:  # rows with nothing left to reveal skip the denoiser
            x_in, logit_rows = x[active], (active.cumsum(0) - 1)[rows]
        if isinstance(denoiser, TableDenoiser):   # our models: chunked heads, never full logits
            x[rows, cols] = denoiser.heads.sample(denoiser.states(x_in)[logit_rows, cols], cols, temperature,
                                                  generator)
            continue
        logits = denoiser(x_in)
        if tuple(logits.shape) != (x_in.shape[0], layout.vocab):
            raise ValueError(f"denoiser returned logits of shape {tuple(logits.shape)} for "
                             f"{x_in.shape[0]} rows, expected ({x_in.shape[0]}, {layout.vocab})")
        # Gumbel-max over the segments revealed now only.
        x[rows, cols] = gumbel_max(layout.segments(logits, logit_rows, cols), temperature, generator)
    return x


def sample_tokens(denoiser: Callable[[Tensor], Tensor], w: Tensor | PowerSchedule, mask_id: Tensor,
                  offsets: Tensor, num_rows: int, *, steps: int | None = None,
                  speculative: int | None = None, temperature: float = 1.0,
                  known: Tensor | None = None, known_mask: Tensor | None = None,
                  batch_size: int = 4096, generator: torch.Generator | None = None,
                  progress: bool = False, stats: DecodeStats | None = None) -> Tensor:
    """Generate num_rows rows of token ids [num_rows, L] (int64, every value in 0..K_l-1).

    denoiser: a callable x_t [n, L] -> ragged logits [n, V], or a causal denoiser
    (fastmdm.models.CausalTransformer); a module is run in eval mode without autograd.
    w: Plackett-Luce scores [L] (or the PowerSchedule holding them). mask_id [L] and
    offsets [L+1] describe the columns, as in `diffusion_loss`.
    steps: decoding steps per row, 1..L (default L, exact learned-order AR); fewer reveal
    chunks of the order in parallel (approximate).
    speculative: causal denoisers only; draft this many columns per round and verify them
    (exact: the rows follow the same joint as steps=L). Excludes `steps`.
    temperature: logits are divided by it before sampling; 0 takes the argmax.
    known [num_rows, L] with known_mask ([num_rows, L] or [L], default known != mask_id):
    columns to condition on; they come first in the order and are returned unchanged.
    stats: a DecodeStats to add counts to (columns accepted per speculative round; the
    generation orders of a causal model when stats.orders is a list).
    """
    from . import causal_decoding
    w, steps = _validate(w, mask_id, offsets, num_rows, steps, temperature, batch_size)
    causal = getattr(denoiser, "causal", False)
    contextual = getattr(denoiser, "contextual", False)
    if speculative is not None:
        if not causal:
            raise ValueError("speculative decoding needs the causal denoiser (architecture='causal')")
        if contextual:
            raise ValueError("speculative decoding needs a static order; this model's order is contextual")
        if not (isinstance(speculative, int) and speculative >= 1):
            raise ValueError(f"speculative must be an int >= 1 (columns drafted per round), got {speculative!r}")
        if steps != w.numel():
            raise ValueError("give either steps or speculative, not both")
    if known is not None:
        known, known_mask = _validate_known(known, known_mask, mask_id, offsets, num_rows)
    elif known_mask is not None:
        raise ValueError("known_mask was given without known values")
    layout = ColumnLayout.of(mask_id, offsets)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        # disable=None: a bar on terminals, none in redirected logs.
        bar = tqdm(total=num_rows, desc="sampling", unit="row", disable=None)
    stats = stats if stats is not None else DecodeStats()
    out = []
    try:
        with _eval_mode(denoiser):
            for start in range(0, num_rows, batch_size):
                stop = min(start + batch_size, num_rows)
                batch_known = None if known is None else known[start:stop]
                batch_mask = None if known is None else known_mask[start:stop]
                if speculative is not None:
                    out.append(causal_decoding.sample_speculative(
                        denoiser, w, layout, speculative, temperature, stop - start, batch_known,
                        batch_mask, generator, stats))
                else:
                    decode = (causal_decoding.sample_contextual if contextual
                              else causal_decoding.sample_chunks if causal else _sample_bidirectional)
                    out.append(decode(denoiser, w, layout, steps, temperature, stop - start, batch_known,
                                      batch_mask, generator, stats))
                stats.rows += stop - start
                if bar is not None:
                    bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out)


def impute_tokens(denoiser: Callable[[Tensor], Tensor], w: Tensor | PowerSchedule, mask_id: Tensor,
                  offsets: Tensor, tokens: Tensor, known_mask: Tensor | None = None,
                  **kwargs) -> Tensor:
    """Fill the unknown entries of tokens [N, L] by sampling them given the known ones.

    known_mask ([N, L] or [L]) defaults to tokens != mask_id, so rows with MASK ids in their
    missing cells can be passed as they are. Other keyword arguments go to `sample_tokens`.
    """
    check_tokens("tokens", tokens, mask_id.numel())
    return sample_tokens(denoiser, w, mask_id, offsets, tokens.shape[0], known=tokens,
                         known_mask=known_mask, **kwargs)
