"""The denoiser: a small transformer over the columns of a masked row.

It is time-independent on purpose: the optimal denoiser of a masked diffusion model depends
only on the visible values (masking ignores the data), and dropping t is what makes the
NELBO equal to the learned-order autoregressive likelihood (DESIGN.md section 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import INT_DTYPES, check_tensor
from .ops.reference import segment_layout


class _Block(nn.Module):
    """Pre-norm transformer block; attention is bidirectional (every column sees all)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(),
                                nn.Linear(dim_feedforward, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        rows, length, width = h.shape
        q, k, v = (self.qkv(self.norm_attn(h))
                   .view(rows, length, 3, self.num_heads, width // self.num_heads)
                   .permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(attended.transpose(1, 2).reshape(rows, length, width)))
        return h + self.drop(self.ff(self.norm_ff(h)))


class ColumnTransformer(nn.Module):
    """Denoiser x_t [N, L] -> ragged logits [N, V], V = sum_l K_l (column l at offsets[l]:offsets[l+1]).

    Inputs: column l holds a value in 0..K_l-1 or its MASK id K_l. Each (column, value) pair,
    mask included, has its own embedding row, so "masked" means something different per
    column; a learned column embedding plays the role of position. Output heads are per
    column and ragged; they are evaluated as one batched product against a padded
    [L, Kmax, d] view of the weights and the valid entries gathered back to [N, V].

    The defaults (d_model=48, 3 layers, 4 heads, feed-forward 96) give about 100K parameters
    on Adult-like tables (15 columns, K_l between 2 and ~100), the size of the paper's ~86K
    models.
    """

    def __init__(self, cardinalities: list[int], d_model: int = 48, num_layers: int = 3,
                 num_heads: int = 4, dim_feedforward: int = 96, dropout: float = 0.0):
        super().__init__()
        cardinalities = [int(k) for k in cardinalities]
        if not cardinalities or min(cardinalities) < 1:
            raise ValueError(f"cardinalities must be a non-empty list of positive ints, got {cardinalities}")
        if d_model < 1 or num_layers < 0 or dim_feedforward < 1 or num_heads < 1:
            raise ValueError("d_model, num_heads, dim_feedforward must be >= 1 and num_layers >= 0")
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self._config = dict(cardinalities=cardinalities, d_model=d_model, num_layers=num_layers,
                            num_heads=num_heads, dim_feedforward=dim_feedforward, dropout=dropout)
        sizes = torch.tensor(cardinalities, dtype=torch.int64)
        offsets = torch.zeros(len(cardinalities) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(sizes, 0)
        embed_offsets = torch.cumsum(sizes + 1, 0) - (sizes + 1)  # K_l + 1 rows per column
        vocab = int(offsets[-1])
        pad_index, valid = segment_layout(offsets, vocab)          # [L, Kmax]
        width = pad_index.shape[1]
        flat = torch.arange(len(cardinalities))[:, None] * width + torch.arange(width)[None, :]

        self.register_buffer("offsets", offsets)
        self.register_buffer("mask_ids", sizes.clone())
        self.register_buffer("_embed_offsets", embed_offsets, persistent=False)
        self.register_buffer("_pad_index", pad_index, persistent=False)
        self.register_buffer("_flat_index", flat[valid], persistent=False)  # [V] into L*Kmax

        self.token_embedding = nn.Embedding(int((sizes + 1).sum()), d_model)
        self.column_embedding = nn.Parameter(torch.zeros(len(cardinalities), d_model))
        self.blocks = nn.ModuleList(_Block(d_model, num_heads, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(d_model)
        self.out_weight = nn.Parameter(torch.empty(vocab, d_model))
        self.out_bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.column_embedding, std=0.02)
        nn.init.normal_(self.out_weight, std=d_model ** -0.5)

    @property
    def cardinalities(self) -> list[int]:
        return list(self._config["cardinalities"])

    @property
    def config(self) -> dict:
        """Constructor arguments: `ColumnTransformer(**model.config)` rebuilds the architecture."""
        return dict(self._config, cardinalities=self.cardinalities)

    @property
    def num_columns(self) -> int:
        return len(self._config["cardinalities"])

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, x_t: Tensor) -> Tensor:
        check_tensor("x_t", x_t, ndim=2, dtypes=INT_DTYPES)
        rows, length = x_t.shape
        if length != self.num_columns:
            raise ValueError(f"x_t has {length} columns, the model was built for {self.num_columns}")
        if bool(((x_t < 0) | (x_t > self.mask_ids)).any()):
            raise ValueError("x_t holds token ids outside 0..K_l (K_l is column l's mask id)")
        h = self.token_embedding(x_t + self._embed_offsets) + self.column_embedding
        for block in self.blocks:
            h = block(h)
        h = self.norm_out(h)
        # Padded heads: [N, L, d] x [L, Kmax, d] -> [N, L, Kmax]; padding slots duplicate a
        # real row and are dropped by the gather, so they get no gradient.
        padded = torch.einsum("nld,lkd->nlk", h, self.out_weight[self._pad_index])
        return padded.reshape(rows, -1).index_select(1, self._flat_index) + self.out_bias

    def extra_repr(self) -> str:
        return f"columns={self.num_columns}, vocab={self.out_bias.numel()}"
