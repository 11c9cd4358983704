"""Context-dependent generation orders (learned orders in the manner of LoMDM, for tables).

A contextual causal model carries two extra pieces:
- `OrderPolicy` p_psi(next column | values revealed so far): logits log w_l + a linear map
  of the causal model's state of the token after the last revealed position (read one
  block before the last, see CausalTransformer.policy_depth), over the columns not yet revealed.
  With the linear map at zero (its initialization) this is static PL(w); in the causal
  model token i's state there has seen exactly x_{pi_<i}, so one pass
  scores every step of an order.
- `OrderPosterior` q_phi(pi | x) = PL(w * r_phi(x)) from the whole clean row, used only in
  training: a two-layer MLP on the sum of the row's value embeddings. The factor is
  r_l(x) = exp(g_l(x)), g = R tanh(raw / R) bounded by ORDER_RANGE R, so q's scores are the
  schedule's log w shifted per row, as the policy's logits are. g starts at zero, so at
  initialization q = p_psi = PL(w), the static model. g is centred per column (over the
  batch in training, by a running mean otherwise, as batch norm does), so q's static
  preference is w's alone and the posterior can only learn how rows differ from it:
  uncentred, the static direction, the strongest and cheapest signal, is learned first
  and q tends to settle on one static order for every row.
  Why not LoMDM's bounded scores, c1 + c2 (sigmoid(g) - mean sigmoid(g)): their ratios
  stay within (c1 + c2) / (c1 - c2) (27 at the reported 0.7 / 0.65), while a learned w
  spans 1,000x and more, so neither those scores alone nor those scores as a factor on w
  can put a column of small w before one of large w (docs/findings.md).

The bound, E_q[sum_i log p_theta(x_pi_i | .) + sum_i (log p_psi(pi_i | .) - log q(pi_i | .))],
is in `fastmdm.objective.contextual_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Bound R on |g_phi(x)|: the posterior can multiply a column's w by up to e^2R relative to
#: the column's mean factor (e^8 ~ 3,000).
ORDER_RANGE = 8.0
#: Weight of each training batch in the running per-column mean of g that eval mode subtracts.
CENTRING_MOMENTUM = 0.05


class OrderPolicy(nn.Module):
    """p_psi(next column | prefix): log-probabilities over columns from a prefix's state."""

    def __init__(self, d_model: int, num_columns: int):
        super().__init__()
        self.context = nn.Linear(d_model, num_columns, bias=False)
        nn.init.zeros_(self.context.weight)

    def log_probs(self, log_prior: Tensor, state: Tensor, revealed: Tensor) -> Tensor:
        """log p_psi over columns [..., L] from states [..., d]; revealed columns [..., L]
        (True) get -inf, so each row is a distribution over the columns still hidden."""
        logits = log_prior.to(state.dtype) + self.context(state)
        return torch.log_softmax(logits.masked_fill(revealed, float("-inf")), -1)


class OrderPosterior(nn.Module):
    """The factor r_phi(x) [B, L] of q_phi(pi | x) = PL(w * r_phi(x)), from clean rows [B, L].

    A value embedding per (column, value), as the denoiser has, summed over the row, then a
    two-layer MLP that gives a score per column (no attention over the row's L tokens: a
    training step costs 1.03-1.07x a static one's). The bounded scores are centred per
    column (module docstring): in training by the batch's mean, which also updates
    `column_mean`, the running mean that eval mode (validation, saved models) subtracts.
    """

    def __init__(self, cardinalities: list[int], d_model: int = 32):
        super().__init__()
        sizes = torch.tensor(cardinalities, dtype=torch.int64)
        self.register_buffer("_value_offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.value_embedding = nn.Embedding(int(sizes.sum()), d_model)
        self.norm = nn.LayerNorm(d_model)
        self.hidden = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, len(cardinalities))
        self.register_buffer("column_mean", torch.zeros(len(cardinalities)))
        nn.init.normal_(self.value_embedding.weight, std=0.02)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        embedded = self.value_embedding(x + self._value_offsets)
        raw = self.out(F.gelu(self.hidden(self.norm(embedded.sum(1)))))
        g = ORDER_RANGE * torch.tanh(raw / ORDER_RANGE)
        if not self.training:
            return torch.exp(g - self.column_mean.to(g.dtype))
        mean = g.mean(0)
        with torch.no_grad():
            self.column_mean.lerp_(mean.to(self.column_mean.dtype), CENTRING_MOMENTUM)
        return torch.exp(g - mean)
