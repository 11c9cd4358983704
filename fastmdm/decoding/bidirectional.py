"""The bidirectional decoder: every step re-encodes the whole row (O(L^2) token work per row)
and draws the columns of the step's chunk."""
from __future__ import annotations

import torch

from ..models.base import TableDenoiser
from .common import ColumnLayout, ImportanceWeights, conditions_first_order, gumbel_max, reveal_steps


def sample_bidirectional(denoiser, w, layout: ColumnLayout, steps, temperature, num_rows, known,
                          known_mask, generator, stats, restrictions=None):
    """With `restrictions` (fastmdm.conditions.TokenRestrictions) the restricted columns are
    drawn first from their restricted conditionals, then the rows are resampled by their
    importance weights (the effective sample size goes to stats.effective_sizes)."""
    if isinstance(denoiser, TableDenoiser) and denoiser.architecture != "bidirectional":
        raise ValueError(f"the bidirectional decoder cannot run a {denoiser.architecture} denoiser: pass its "
                         "kind's decoder, decode=fastmdm.kinds.kind_of(model).decoder()")
    if restrictions is None:
        step, num_restricted = reveal_steps(w, num_rows, steps, known_mask, generator), 0
    else:
        if not isinstance(denoiser, TableDenoiser):
            raise ValueError("set and range conditions need a fastmdm denoiser (they restrict its fused heads)")
        order, step_of_position, num_restricted = conditions_first_order(w, num_rows, steps, known_mask,
                                                                         restrictions.restricted, generator)
        step = torch.empty_like(order).scatter_(1, order, step_of_position)
        weights = ImportanceWeights(restrictions, layout, num_rows, w.device)
    x = layout.mask_id.expand(num_rows, w.numel()).clone()
    if known is not None:
        x = torch.where(known_mask, known, x)
    num_steps = int(step.max()) + 1
    for s in range(num_steps):
        if restrictions is not None and s == num_restricted:
            rows = weights.resample(generator, stats)
            x, step = x[rows], step[rows]
        reveal = step == s
        active = reveal.any(1)
        rows, cols = reveal.nonzero(as_tuple=True)
        if bool(active.all()):
            x_in, logit_rows = x, rows
        else:  # rows with nothing left to reveal skip the denoiser
            x_in, logit_rows = x[active], (active.cumsum(0) - 1)[rows]
        if isinstance(denoiser, TableDenoiser):   # our models: chunked heads, never full logits
            h = denoiser.states(x_in)[logit_rows, cols]
            if s < num_restricted:
                x[rows, cols] = weights.draw(denoiser.heads, h, rows, cols, x, layout.mask_id, temperature, generator)
            else:
                x[rows, cols] = layout.draw(denoiser.heads, h, cols, temperature, generator)
            continue
        logits = denoiser(x_in)
        if tuple(logits.shape) != (x_in.shape[0], layout.vocab):
            raise ValueError(f"denoiser returned logits of shape {tuple(logits.shape)} for "
                             f"{x_in.shape[0]} rows, expected ({x_in.shape[0]}, {layout.vocab})")
        # Gumbel-max over the segments revealed now only.
        x[rows, cols] = gumbel_max(layout.segments(logits, logit_rows, cols), temperature, generator)
    if restrictions is not None and num_restricted == num_steps:   # nothing but restricted columns to draw
        x = x[weights.resample(generator, stats)]
    return x
