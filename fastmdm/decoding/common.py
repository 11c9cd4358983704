"""What every sampler shares: orders with known columns first, chunks of ranks, uniforms and
Gumbel noise, the ragged column layout and the decoding statistics.

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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_positive_weights
from ..ops.reference import segment_layout
from ..schedules import exponential_keys


def uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
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
    keys = exponential_keys(w, uniforms((num_rows, w.numel()), generator, w.device))
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


def conditions_first_order(w: Tensor, num_rows: int, steps: int, known_mask: Tensor | None, restricted: Tensor,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, int]:
    """(order [num_rows, L], step [num_rows, L] at which each order position is revealed, -1
    for known columns, R): orders from PL(w) with the known columns first, then the restricted
    columns (bool [L]) that are not known, then the rest, PL among each group (PL restricted
    to a subset is PL over it).

    The restricted columns take steps 0..R-1, one per step, each drawn from its conditional
    given the known columns and the restricted ones before it; the remaining columns follow in
    `steps` chunks of ranks, as in `reveal_steps`. So every importance weight is complete
    after step R - 1, where the rows are resampled.
    """
    known_mask = (torch.zeros(num_rows, w.numel(), dtype=torch.bool, device=w.device) if known_mask is None
                  else known_mask)
    order, _ = known_first_order(w, num_rows, None, generator)
    group = torch.where(known_mask, 0, torch.where(restricted[None, :], 1, 2))
    order = order.gather(1, torch.argsort(group.gather(1, order), dim=1, stable=True))
    n_known = known_mask.sum(1)
    n_restricted = (restricted[None, :] & ~known_mask).sum(1)
    num_restricted = int(n_restricted.max()) if num_rows else 0
    position = torch.arange(w.numel(), device=w.device)[None, :]
    step = chunk_of_position(n_known + n_restricted, w.numel(), steps) + num_restricted
    step = torch.where(position < n_known[:, None], -1, step)
    drawn_first = (position >= n_known[:, None]) & (position < (n_known + n_restricted)[:, None])
    return order, torch.where(drawn_first, position - n_known[:, None], step), num_restricted


def resample(log_weights: Tensor, generator: torch.Generator | None) -> tuple[Tensor, float]:
    """(row indices, effective sample size): systematic resampling of rows by importance weights
    (log, [N]), which keeps each row's expected number of copies equal to N times its
    normalised weight with less noise than multinomial draws. Raises ValueError when every
    weight is zero: the conditions have probability zero under the model."""
    if not bool(torch.isfinite(log_weights).any()):
        raise ValueError("the conditions have probability zero under the model: no sampled row can satisfy them")
    weights = torch.softmax(log_weights.double(), 0)
    ess = float(1.0 / (weights ** 2).sum())
    n = log_weights.numel()
    positions = (uniforms((1,), generator, log_weights.device).double() + torch.arange(n, device=log_weights.device)) / n
    cumulative = weights.cumsum(0)
    cumulative[-1] = 1.0
    return torch.searchsorted(cumulative, positions).clamp(max=n - 1), ess


class ImportanceWeights:
    """The importance weights of rows whose restricted columns (set and range conditions,
    rules: fastmdm.conditions.TokenRestrictions) are drawn from restricted conditionals. Each
    such draw multiplies its row's weight by the probability its restriction let through, a
    share of the conditional the layout's `draw` would use (without the never-drawn tokens);
    once every restricted column is drawn, `resample` draws the rows by weight."""

    def __init__(self, restrictions, layout: "ColumnLayout", num_rows: int, device: torch.device):
        self.restrictions, self.layout = restrictions, layout
        self.log_weights = torch.zeros(num_rows, dtype=torch.float64, device=device)

    def draw(self, heads, h: Tensor, rows: Tensor, columns: Tensor, x: Tensor, mask_id: Tensor,
             temperature: float, generator: torch.Generator | None) -> Tensor:
        """Values of the cells (rows[i], columns[i]) with states h, given the rows' tokens so
        far x [N, L] (mask ids where not drawn), each from its restricted conditional."""
        table, index = self.restrictions.cells(x, rows, columns, mask_id)
        values, log_mass = heads.sample(h, columns, temperature, generator, log_weights=table, restriction=index)
        if self.layout.never_drawn is not None:
            _, allowed = heads.sample(h, columns, temperature, generator, log_weights=self.layout.never_drawn,
                                      restriction=self.layout.never_drawn_row[columns])
            log_mass = log_mass - allowed
        self.log_weights.index_add_(0, rows, log_mass.double())
        return values

    def resample(self, generator: torch.Generator | None, stats: "DecodeStats") -> Tensor:
        """The rows to keep (indices, with repeats); the effective sample size goes to stats."""
        rows, ess = resample(self.log_weights, generator)
        stats.effective_sizes.append((ess, self.log_weights.numel()))
        return rows


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise (float32): argmax(logits + noise) draws from softmax(logits)."""
    u = uniforms(shape, generator, device)
    return -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))  # u < 1: finite


def gumbel_max(segments: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One draw per row of segments [M, Kmax] (logits, padding at -inf) at a temperature;
    temperature 0 takes the argmax."""
    segments = segments.float()
    if temperature > 0:
        # = T * (logits / T + gumbel): the same argmax.
        segments = segments + temperature * gumbel_noise(tuple(segments.shape), generator, segments.device)
    return segments.argmax(-1)


class ColumnLayout(NamedTuple):
    """Where each column's values sit in the ragged [V] axis, as samplers need it, and which
    values no draw may take.

    Never-drawn tokens (a categorical column's rare token: `fastmdm.data.TableCodec.rare_tokens`)
    are the one rule every sampler applies through the layout: `draw` gives their probability
    to the column's other values in proportion (the model's conditional renormalised over
    them), and `segments` and the speculative decoder's logits put them at -inf like padding
    (`pad_invalid`). Cells under a set, range or rule restriction
    (`fastmdm.conditions.TokenRestrictions`) draw by their own pattern, which allows the rare
    token only for set values without a token of their own.
    """
    mask_id: Tensor      # [L] int64, K_l
    pad_index: Tensor    # [L, Kmax] flat index of each column's values (padding repeats one)
    pad_invalid: Tensor  # [L, Kmax] True at padding and at never-drawn tokens
    vocab: int           # V = sum_l K_l
    never_drawn: Tensor | None = None   # [1, V] float32 log weights: -inf at never-drawn tokens, else 0
    never_drawn_row: Tensor | None = None   # [L] int64: 0 for columns with a never-drawn token, else -1

    @classmethod
    def of(cls, mask_id: Tensor, offsets: Tensor, never_drawn: list[int] | Tensor | None = None) -> "ColumnLayout":
        vocab = int(offsets[-1])
        pad_index, valid = segment_layout(offsets.long(), vocab)
        invalid = ~valid
        weights = rows = None
        never = torch.as_tensor(never_drawn if never_drawn is not None else [], dtype=torch.int64,
                                device=offsets.device)
        if never.numel():
            forbidden = torch.zeros(vocab, dtype=torch.bool, device=offsets.device)
            forbidden[never] = True
            invalid = invalid | forbidden[pad_index]
            weights = torch.zeros(1, vocab, device=offsets.device).masked_fill(forbidden, float("-inf"))
            column = torch.searchsorted(offsets.long(), never, right=True) - 1
            rows = torch.full((len(offsets) - 1,), -1, dtype=torch.int64, device=offsets.device)
            rows[column] = 0
        return cls(mask_id.to(torch.int64), pad_index, invalid, vocab, weights, rows)

    def segments(self, logits: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
        """Logits [M, Kmax] of column columns[i] in row rows[i] of ragged logits [N, V];
        padding and never-drawn tokens at -inf."""
        return logits[rows[..., None], self.pad_index[columns]].masked_fill(self.pad_invalid[columns],
                                                                            float("-inf"))

    def draw(self, heads, h: Tensor, columns: Tensor, temperature: float,
             generator: torch.Generator | None) -> Tensor:
        """Values [M] of cells with states h [M, d] in columns [M], each drawn by the fused heads
        (`fastmdm.models.base.RaggedHeads.sample`) from its column's conditional without the
        never-drawn tokens."""
        if self.never_drawn is None:
            return heads.sample(h, columns, temperature, generator)
        values, _ = heads.sample(h, columns, temperature, generator, log_weights=self.never_drawn,
                                 restriction=self.never_drawn_row[columns])
        return values


@dataclass
class DecodeStats:
    """Counts a decoder adds to while it runs (speculative decoding reports acceptance here)."""
    rows: int = 0
    rounds: int = 0          # per-row draft-and-verify rounds, summed over rows
    columns: int = 0         # columns revealed by those rounds
    orders: list[Tensor] | None = None   # set to [] to collect causal models' orders [n, L] per batch
    # Set and range conditions: per batch, (effective sample size, rows) of the importance weights.
    effective_sizes: list[tuple[float, int]] = field(default_factory=list)

    @property
    def columns_per_round(self) -> float:
        return self.columns / max(1, self.rounds)
