"""Sampling and imputation of token rows: checks the arguments, batches the rows, and runs
the decoder it is given (the denoiser's kind chooses it: fastmdm.kinds.ModelKind.decoder)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import (INT_DTYPES, check_offsets, check_positive_weights, check_same_device, check_tensor,
                       check_tokens)
from ..schedules import PowerSchedule
from .bidirectional import sample_bidirectional
from .common import ColumnLayout, DecodeStats

#: A decoder: (denoiser, w, layout, steps or columns drafted per round, temperature, num_rows,
#: known, known_mask, generator, stats) -> token rows [num_rows, L].
Decoder = Callable[..., Tensor]


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


def sample_tokens(denoiser: Callable[[Tensor], Tensor], w: Tensor | PowerSchedule, mask_id: Tensor,
                  offsets: Tensor, num_rows: int, *, decode: Decoder = sample_bidirectional,
                  steps: int | None = None,
                  speculative: int | None = None, temperature: float = 1.0,
                  known: Tensor | None = None, known_mask: Tensor | None = None,
                  batch_size: int = 4096, generator: torch.Generator | None = None,
                  progress: bool = False, stats: DecodeStats | None = None,
                  restrictions=None, never_drawn: list[int] | Tensor | None = None) -> Tensor:
    """Generate num_rows rows of token ids [num_rows, L] (int64, every value in 0..K_l-1).

    denoiser: a callable x_t [n, L] -> ragged logits [n, V], or a causal denoiser
    (fastmdm.models.CausalTransformer); a module is run in eval mode without autograd.
    decode: the decoder of the denoiser's kind (`fastmdm.kinds.kind_of(model).decoder()`);
    the default re-encodes the row every step, as a callable x_t -> logits needs.
    w: Plackett-Luce scores [L] (or the PowerSchedule holding them). mask_id [L] and
    offsets [L+1] describe the columns, as in `diffusion_loss`.
    steps: decoding steps per row, 1..L (default L, exact learned-order AR); fewer reveal
    chunks of the order in parallel (approximate).
    speculative: draft this many columns per round and verify them (exact: the rows follow
    the same joint as steps=L), with a speculative `decode`
    (`kind.decoder(speculative)`, causal static-order models). Excludes `steps`.
    temperature: logits are divided by it before sampling; 0 takes the argmax.
    known [num_rows, L] with known_mask ([num_rows, L] or [L], default known != mask_id):
    columns to condition on; they come first in the order and are returned unchanged.
    stats: a DecodeStats to add counts to (columns accepted per speculative round; the
    generation orders of a causal model when stats.orders is a list; the effective sample
    sizes of restricted sampling).
    restrictions: set and range conditions (fastmdm.conditions.TokenRestrictions), drawn
    first and followed by importance resampling within each batch; the same for every row.
    never_drawn: token ids of the flat [V] vocabulary that no draw takes (a categorical
    column's rare token, `fastmdm.data.TableCodec.rare_tokens`): each is drawn from the
    denoiser's conditional renormalised over the column's other values (see ColumnLayout).
    """
    w, steps = _validate(w, mask_id, offsets, num_rows, steps, temperature, batch_size)
    if speculative is not None:
        if not (isinstance(speculative, int) and speculative >= 1):
            raise ValueError(f"speculative must be an int >= 1 (columns drafted per round), got {speculative!r}")
        if steps != w.numel():
            raise ValueError("give either steps or speculative, not both")
    if known is not None:
        known, known_mask = _validate_known(known, known_mask, mask_id, offsets, num_rows)
    elif known_mask is not None:
        raise ValueError("known_mask was given without known values")
    if restrictions is not None and speculative is not None:
        raise ValueError("set and range conditions are drawn one column at a time: leave speculative unset")
    extra = {} if restrictions is None else {"restrictions": restrictions}
    layout = ColumnLayout.of(mask_id, offsets, never_drawn)
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
                out.append(decode(denoiser, w, layout, steps if speculative is None else speculative, temperature,
                                  stop - start, batch_known, batch_mask, generator, stats, **extra))
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
