"""The bidirectional denoiser: every column of a masked row attends to every other.

It is time-independent on purpose: the optimal denoiser of a masked diffusion model depends
only on the visible values (masking ignores the data), and dropping t is what makes the
NELBO equal to the learned-order autoregressive likelihood (docs/design.md). The price
is at sampling time: the whole row is re-encoded for every step, O(L^2) token work per row.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import TableDenoiser


class ColumnTransformer(TableDenoiser):
    """Denoiser x_t [N, L] -> ragged logits [N, V] (column l at offsets[l]:offsets[l+1]).

    The defaults (d_model=48, 3 layers, 4 heads, feed-forward 96) give about 100K parameters
    on Adult-like tables (15 columns, K_l between 2 and ~100), the size of the paper's ~86K
    models.
    """

    architecture = "bidirectional"

    def states(self, x_t: Tensor) -> Tensor:
        """Final states [N, L, d] of masked rows x_t [N, L], column l at position l."""
        self.check_tokens("x_t", x_t, allow_mask=True)
        columns = torch.arange(self.num_columns, device=x_t.device)
        h = self.embed_values(x_t, columns)
        for block in self.blocks:
            h = block(h)
        return self.norm_out(h)

    def forward(self, x_t: Tensor, targets: Tensor | None = None, weight: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        return self.loss_or_logits(self.states(x_t), targets, weight, mask)
