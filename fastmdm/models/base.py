"""What every denoiser shares: the column layout, token and column embeddings, the blocks,
and the ragged per-column output heads."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import INT_DTYPES, check_tensor, value_checks_enabled
from ..ops import ragged_head_ce, ragged_head_sample
from ..ops.reference import segment_layout
from .layers import Block

#: Cosine features cos(pi j u), j = 1..ORDINAL_FEATURES, of an ordered token's position u in
#: [0, 1]: the finest swings over 1/16 of a column's quantiles; finer detail is left to each
#: bin's own row.
ORDINAL_FEATURES = 16


class OrdinalTokens(nn.Module):
    """Smooth functions of where a token sits in its ordered column, added to its rows of a
    token table.

    A numeric column's tokens are quantile bins; learned one row each, a bin knows nothing of
    its neighbours, so the model must learn from scratch that bin 17 is like bin 18, and
    relations inside a column's order (a price tracking a rate) are learned bin by bin. Here
    an ordered column l gets a table A_l [ORDINAL_FEATURES, width], and its token at position
    u (the bin's middle in the column's distribution function) gets phi(u) A_l added to its
    own row, phi the cosine features: neighbouring bins share what they learn, and a row's
    own part is free to depart from the smooth curve. A_l starts at zero.

    `rows` are the table rows of the ordered tokens, `columns` their ordered-column index
    (ascending). The features sit in a [columns, most tokens, ORDINAL_FEATURES] block so that
    one batched product gives every column's curve: no per-token copy of A_l is made, which on
    a table of a thousand numeric columns would be 64,000 copies of a 16 x width table.
    """

    def __init__(self, rows: Tensor, columns: Tensor, positions: Tensor, width: int):
        super().__init__()
        count = int(columns.max()) + 1 if len(columns) else 0
        counts = torch.bincount(columns, minlength=count)
        slot = torch.arange(len(columns)) - (torch.cumsum(counts, 0) - counts)[columns]   # index within its column
        longest = int(counts.max()) if count else 0
        frequencies = torch.arange(1, ORDINAL_FEATURES + 1, dtype=torch.float32)
        features = torch.zeros(count, longest, ORDINAL_FEATURES)
        features[columns, slot] = torch.cos(torch.pi * positions[:, None].float() * frequencies)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("block_index", columns * longest + slot, persistent=False)   # [R] into the block
        # A table with no ordered column holds no parameter (so none goes without a gradient).
        self.table = nn.Parameter(torch.zeros(count, ORDINAL_FEATURES, width)) if count else None

    def add_to(self, rows_table: Tensor) -> Tensor:
        """rows_table [R, width] with phi(u) A_l added to the ordered rows (a new tensor)."""
        if self.table is None:
            return rows_table
        curves = torch.bmm(self.features.to(self.table.dtype), self.table)           # [columns, longest, width]
        shift = curves.flatten(0, 1).index_select(0, self.block_index)
        return rows_table.index_add(0, self.rows, shift.to(rows_table.dtype))


def ordinal_layout(token_positions: list[list[float] | None] | None, row_starts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, ordered-column index, position) of every token with a finite position, for a
    table whose column l starts at row_starts[l]; a column of None (categories) has none, and
    a NaN position (a numeric column's missing token) is not ordered. None: nothing ordered."""
    ordered = [(column, values) for column, values in enumerate(token_positions or []) if values is not None]
    rows, columns, positions = [], [], []
    for index, (column, values) in enumerate(ordered):
        for k, u in enumerate(values):
            if not math.isnan(u):
                rows.append(int(row_starts[column]) + k)
                columns.append(index)
                positions.append(float(u))
    return (torch.tensor(rows, dtype=torch.int64), torch.tensor(columns, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.float64))


class RaggedHeads(nn.Module):
    """One linear head per column, stored ragged: column l owns rows offsets[l]:offsets[l+1]
    of a [V, d] weight.

    Training (`loss`) and sampling (`sample`) go through fused ops that evaluate each cell
    against its own column's head only, in vocabulary chunks, and never build logits: the
    work is sum_l K_l per cell instead of L * Kmax. `logits` evaluates every head on every
    column state as one batched product against a padded [L, Kmax, d] view and gathers the
    valid entries back to [N, V] (for callers that need the distributions themselves).

    Tokens of ordered columns (see `OrdinalTokens`) add a smooth function of their position
    to their weight and bias rows; `weight_and_bias` is what every path scores against.
    """

    def __init__(self, offsets: Tensor, d_model: int, token_positions: list[list[float] | None] | None = None):
        super().__init__()
        vocab = int(offsets[-1])
        pad_index, valid = segment_layout(offsets, vocab)          # [L, Kmax]
        width = pad_index.shape[1]
        flat = torch.arange(len(offsets) - 1)[:, None] * width + torch.arange(width)[None, :]
        self.register_buffer("offsets", offsets.clone(), persistent=False)
        self.register_buffer("_pad_index", pad_index, persistent=False)
        self.register_buffer("_flat_index", flat[valid], persistent=False)  # [V] into L*Kmax
        self.weight = nn.Parameter(torch.empty(vocab, d_model))
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.weight, std=d_model ** -0.5)
        layout = ordinal_layout(token_positions, offsets)
        self.ordinal_weight = OrdinalTokens(*layout, d_model)
        self.ordinal_bias = OrdinalTokens(*layout, 1)

    def weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """The heads' [V, d] weight and [V] bias, ordered tokens' smooth parts included."""
        return (self.ordinal_weight.add_to(self.weight),
                self.ordinal_bias.add_to(self.bias[:, None]).squeeze(1))

    def logits(self, h: Tensor) -> Tensor:
        """h [N, L, d] (column l's state at position l) -> ragged logits [N, V]."""
        weight, bias = self.weight_and_bias()
        # Padding slots duplicate a real row and are dropped by the gather: no gradient.
        padded = torch.einsum("nld,lkd->nlk", h, weight[self._pad_index])
        return padded.reshape(h.shape[0], -1).index_select(1, self._flat_index) + bias

    def loss(self, h: Tensor, targets: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
        """Per-row sum_l mask * weight * -log p(targets_l | h_l), shape [N], for h [N, L, d]."""
        head_weight, head_bias = self.weight_and_bias()
        return ragged_head_ce(h, head_weight, head_bias, self.offsets, targets, weight, mask)

    def sample(self, h: Tensor, columns: Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None, *, log_weights: Tensor | None = None,
               restriction: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Values [M] (int64, 0..K_l-1) for M cells with states h [M, d] in columns [M].

        Each is drawn from softmax(logits / temperature) of its own column by Gumbel-max
        over vocabulary chunks, without logits; temperature 0 takes the argmax. The noise
        comes from one seed drawn from `generator`, so a seeded generator reproduces a draw.
        With log_weights [C, V] and restriction [M] (see `fastmdm.ops.ragged_head_sample`)
        cell m's values are reweighted by its pattern row and the call returns
        (values, log_mass), log_mass the log of the probability the pattern let through.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
        weight, bias = self.weight_and_bias()
        return ragged_head_sample(h, columns, weight, bias, self.offsets, temperature, seed,
                                  log_weights=log_weights, restriction=restriction)


class TableDenoiser(nn.Module):
    """Base of the denoisers: x [N, L] tokens -> ragged logits [N, V], V = sum_l K_l.

    Column l holds a value in 0..K_l-1 or its MASK id K_l. Each (column, value) pair, mask
    included, has its own embedding row, so "masked" means something different per column;
    a learned column embedding plays the role of position. `token_positions[l]`, for an
    ordered (numeric) column, gives each token's place in [0, 1] (NaN for its missing token;
    None for a column of categories): those tokens' embedding and head rows add a smooth
    function of it (`OrdinalTokens`).

    Calling the model with `targets`, `weight` and `mask` returns the per-row weighted
    cross entropy sum_l mask * weight * -log p(targets_l) instead of the logits, so that
    training goes through one call (and so through DistributedDataParallel's forward).
    """

    #: True for models whose forward takes a generation order (see models.causal).
    causal = False
    #: The architecture's name and the kind of order it generates in; with them
    #: fastmdm.kinds finds the model's loss and decoder.
    architecture: str
    order = "static"

    def __init__(self, cardinalities: list[int], d_model: int = 48, num_layers: int = 3,
                 num_heads: int = 4, dim_feedforward: int = 96, dropout: float = 0.0,
                 token_positions: list[list[float] | None] | None = None):
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
        if token_positions is not None:
            token_positions = [None if p is None else [float(u) for u in p] for p in token_positions]
            if [len(p) for p in token_positions if p is not None] != [k for p, k in zip(token_positions, cardinalities)
                                                                       if p is not None]:
                raise ValueError("token_positions must give one position per token of each ordered column")
        self._config = dict(cardinalities=cardinalities, d_model=d_model, num_layers=num_layers,
                            num_heads=num_heads, dim_feedforward=dim_feedforward, dropout=dropout,
                            token_positions=token_positions)
        sizes = torch.tensor(cardinalities, dtype=torch.int64)
        offsets = torch.zeros(len(cardinalities) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(sizes, 0)
        self.register_buffer("offsets", offsets)
        self.register_buffer("mask_ids", sizes.clone())
        # K_l + 1 embedding rows per column: its values, then its MASK id.
        self.register_buffer("_embed_offsets", torch.cumsum(sizes + 1, 0) - (sizes + 1), persistent=False)
        self.token_embedding = nn.Embedding(int((sizes + 1).sum()), d_model)
        self.column_embedding = nn.Parameter(torch.zeros(len(cardinalities), d_model))
        self.blocks = nn.ModuleList(Block(d_model, num_heads, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(d_model)
        self.heads = RaggedHeads(offsets, d_model, token_positions)
        self.ordinal_embedding = OrdinalTokens(*ordinal_layout(token_positions, self._embed_offsets), d_model)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.column_embedding, std=0.02)

    def order_parameters(self) -> list[nn.Parameter]:
        """The parameters of a learned order model, which the trainer gives their own
        learning rate and leaves out of gradient clipping; a static order has none."""
        return []

    @property
    def cardinalities(self) -> list[int]:
        return list(self._config["cardinalities"])

    @property
    def config(self) -> dict:
        """Constructor arguments: `type(model)(**model.config)` rebuilds the architecture."""
        positions = self._config["token_positions"]
        return dict(self._config, cardinalities=self.cardinalities,
                    token_positions=None if positions is None else [None if p is None else list(p) for p in positions])

    @property
    def num_columns(self) -> int:
        return len(self._config["cardinalities"])

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Model size. All parameters by default: a fitted model's EMA copy is frozen."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def check_tokens(self, name: str, x: Tensor, allow_mask: bool) -> None:
        """Integer [N, L] tokens within 0..K_l (0..K_l-1 unless `allow_mask`)."""
        check_tensor(name, x, ndim=2, dtypes=INT_DTYPES)
        if x.shape[1] != self.num_columns:
            raise ValueError(f"{name} has {x.shape[1]} columns, the model was built for {self.num_columns}")
        top = self.mask_ids if allow_mask else self.mask_ids - 1
        if value_checks_enabled() and bool(((x < 0) | (x > top)).any()):
            bound = "K_l (K_l is column l's mask id)" if allow_mask else "K_l - 1"
            raise ValueError(f"{name} holds token ids outside 0..{bound}")

    def embed_values(self, x: Tensor, columns: Tensor) -> Tensor:
        """Embedding of value x (or MASK) in column `columns`, same shapes, plus [..., d]."""
        table = self.ordinal_embedding.add_to(self.token_embedding.weight)
        return F.embedding(x + self._embed_offsets[columns], table) + self.embed_columns(columns)

    def embed_columns(self, columns: Tensor) -> Tensor:
        """The column embedding of each id in `columns`, plus [..., d].

        A lookup rather than `column_embedding[columns]`: on several CPU threads, indexing's
        backward adds the gradients of repeated ids with atomics (index_put_ with
        accumulate), in an order that changes from run to run; the lookup's backward adds
        each row's gradients in index order, so seeded training is bitwise reproducible.
        """
        return F.embedding(columns, self.column_embedding)

    def loss_or_logits(self, h: Tensor, targets: Tensor | None, weight: Tensor | None,
                       mask: Tensor | None) -> Tensor:
        """Logits [N, V] of column-ordered states h [N, L, d], or the per-row weighted CE
        (fused with the heads: no logits are built)."""
        if targets is None:
            return self.heads.logits(h)
        return self.heads.loss(h, targets, weight, mask)

    def extra_repr(self) -> str:
        return f"columns={self.num_columns}, vocab={int(self.offsets[-1])}"
