"""Per-column power schedules alpha_l(t) = 1 - t^{w_l} and the Plackett-Luce order they imply.

Column l is masked at time t with probability t^{w_l}. Its transition time t*_l = U^{1/w_l}
has -log t*_l ~ Exponential(w_l), so the order in which generation reveals columns (by
decreasing t*) is Plackett-Luce with scores w. Everything here is plain torch and is the
single source of truth for the math; the fused kernels in `fastmdm.ops` are tested against it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import FLOAT_DTYPES, INT_DTYPES, check_positive_weights, check_tensor


def mask_probability(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """P(column l masked at time t) = t^{w_l}, shape [B, L] for t of shape [B] (exact at t=0)."""
    return torch.pow(t[:, None].to(w.dtype), w[None, :])


def expm1_ratio(a: torch.Tensor) -> torch.Tensor:
    """a / expm1(a), continuous at a = 0 (value 1); finite for every a <= 0."""
    safe = torch.where(a == 0, torch.ones_like(a), a)
    return torch.where(a == 0, torch.ones_like(a), safe / torch.expm1(safe))


def tspace_score(w: torch.Tensor, log_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d/dw_l log q(mask | t) from log t: log t where masked, t^w log t / (t^w - 1) where visible.

    The visible branch is written t^w * (a / expm1(a)) / w with a = w log t, which is exact,
    finite at t = 1 (a = 0, value 1/w) and for any finite log t, however negative (t^w -> 0).
    Taking log t rather than t keeps times that underflow float32 (t = U^{1/c} with c ~ 1e-3)
    exact.
    """
    log_t = log_t.to(w.dtype)[:, None]
    a = w[None, :] * log_t
    visible_score = torch.exp(a) * expm1_ratio(a) / w[None, :]
    return torch.where(mask, log_t.expand_as(a), visible_score)


def _proposal_rates(w: torch.Tensor) -> torch.Tensor:
    """Rates c of the t-space proposal's 2L equally likely components c t^{c-1}: w_l / 2 and w_l."""
    return torch.cat([w / 2, w])


def tspace_log_time_density(w: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """log density of s = log t under the t-space proposal for schedule w, shape [B].

    The proposal is the equal mixture of the 2L densities c t^{c-1}, c in {w_l / 2, w_l}, so
    the density of s is mean_c c exp(c s) = t p(t), computed as a logsumexp.
    """
    rates = _proposal_rates(w)
    terms = torch.log(rates)[None, :] + rates[None, :] * log_t.to(w.dtype)[:, None]
    return torch.logsumexp(terms, 1) - math.log(rates.numel())


def sample_tspace_times(w: torch.Tensor, num_rows: int, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log t, time weight) per row for the t-space NELBO estimator, both [B], on w's device.

    The NELBO is int_0^1 E[sum_l 1[masked] (w_l / t) CE_l] dt. Drawing t uniformly (the paper)
    gives a column's term infinite variance when w_l <= 1 (its second moment is
    w^2 int t^{w-2} dt), and clamping t away from 0 biases it. Instead t is drawn by importance
    from the mixture of `tspace_log_time_density` (pick one of its 2L components uniformly,
    then log t = log(U) / c with U in (0, 1]) and the weight becomes (w_l / t) / p(t) =
    w_l * time_weight, time_weight = 1 / (t p(t)). This is exact for every w > 0.

    Why these components: with constant CE the variance-optimal density is proportional to
    sqrt(E[(sum_l 1[masked] w_l)^2 | t]) / t. Where few columns are masked that is
    ~ sqrt(sum_l w_l^2 t^{w_l}) / t, whose column-l part is the c = w_l / 2 component; where
    many are masked it is ~ sum_l w_l t^{w_l - 1}, the c = w_l components. Each column's term
    has second moment <= 8 L max CE^2 whatever the spread of w: bounding p(t) below by the
    column's own c = w_l / 2 component (weight 1 / 2L) gives 2L w^2 / (c (w - c)) = 8L.
    The tail stays heavy, P(term > x) ~ x^-3, so moments above the second are infinite.
    The proposal uses w detached: it is a fixed sampling density, so the pathwise and
    score-function w-gradients (which condition on t) stay unbiased.
    """
    rates = _proposal_rates(w.detach())
    component = torch.randint(0, rates.numel(), (num_rows,), generator=generator).to(w.device)
    u = 1.0 - torch.rand(num_rows, generator=generator, dtype=w.dtype).to(w.device)  # (0, 1]
    log_t = torch.log(u) / rates[component]
    return log_t, torch.exp(-tspace_log_time_density(w.detach(), log_t))


def order_from_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reveal order (argsort of keys, smallest first) and each column's rank in it."""
    order = torch.argsort(keys, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return order, rank


def exponential_keys(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """-log t*_l = -log(u_l) / w_l ~ Exponential(w_l); the smallest key is revealed first.

    w is [L] (one schedule) or [B, L] (a row's own scores, as the contextual order posterior gives)."""
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(u.clamp(min=tiny)) / w


def _in_order(w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """w_{pi_k} per row, [B, L], for shared scores w [L] or per-row scores [B, L]."""
    return w[order] if w.dim() == 1 else w.gather(1, order)


def _suffix_sums(w_perm: torch.Tensor) -> torch.Tensor:
    """D_k = sum_{j >= k} w_perm[:, j]: the PL normalizer at step k of each order."""
    return torch.flip(torch.cumsum(torch.flip(w_perm, [1]), 1), [1])


def plackett_luce_log_prob(w: torch.Tensor, order: torch.Tensor,
                           prefix_len: torch.Tensor | None = None) -> torch.Tensor:
    """log P(pi_1..pi_n) under Plackett-Luce(w) for each row; n = L (whole order) by default.

    P(prefix) = prod_{k<n} w_{pi_k} / sum_{j>=k} w_{pi_j}. Differentiable in w, which is
    [L] or, one per row, [B, L].
    """
    check_positive_weights(w.reshape(-1))
    check_tensor("order", order, ndim=2, dtypes=INT_DTYPES)
    w_perm = _in_order(w, order)                              # [B, L]
    terms = torch.log(w_perm) - torch.log(_suffix_sums(w_perm))
    if prefix_len is not None:
        steps = torch.arange(order.shape[1], device=order.device)
        terms = torch.where(steps[None, :] < prefix_len[:, None], terms, torch.zeros_like(terms))
    return terms.sum(1)


def plackett_luce_prefix_score(w: torch.Tensor, rank: torch.Tensor,
                               prefix_len: torch.Tensor) -> torch.Tensor:
    """d/dw_l log P(first `prefix_len` revealed columns) in closed form, shape [B, L].

    With D_k = sum of w over columns of rank >= k and C_r = sum_{k<=r, k<n} 1/D_k:
    score_l = 1[rank_l < n] / w_l - C_{rank_l}. Only the revealed prefix matters.
    w is [L] or, one per row, [B, L].
    """
    order = torch.argsort(rank, dim=1)
    suffix = _suffix_sums(_in_order(w, order))               # D_k
    steps = torch.arange(rank.shape[1], device=rank.device)
    in_prefix = steps[None, :] < prefix_len[:, None]
    inv = torch.where(in_prefix, 1.0 / suffix, torch.zeros_like(suffix))
    cumulative = torch.cumsum(inv, 1)                        # C_k, indexed by step k
    revealed = rank < prefix_len[:, None]
    return revealed.to(w.dtype) / w - cumulative.gather(1, rank)


class PowerSchedule(nn.Module):
    """Learnable per-column schedule alpha_l(t) = 1 - t^{w_l}, w = exp(log_w), init w = 1.

    `learnable=False` keeps w fixed: with init 1 that is the usual linear MDM schedule.
    The log parameterization keeps w > 0 and makes steps scale-free, which suits
    Plackett-Luce scores (only ratios of w matter for the order).
    """

    def __init__(self, num_columns: int, learnable: bool = True, init_w: float = 1.0):
        super().__init__()
        if num_columns < 1:
            raise ValueError(f"num_columns must be >= 1, got {num_columns}")
        if not (init_w > 0 and math.isfinite(init_w)):
            raise ValueError(f"init_w must be positive and finite, got {init_w}")
        self.log_w = nn.Parameter(torch.full((num_columns,), math.log(init_w)),
                                  requires_grad=learnable)

    @property
    def num_columns(self) -> int:
        return self.log_w.numel()

    @property
    def learnable(self) -> bool:
        return self.log_w.requires_grad

    @property
    def w(self) -> torch.Tensor:
        return self.log_w.exp()

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        check_tensor("t", t, ndim=1, dtypes=FLOAT_DTYPES)
        if bool(((t < 0) | (t > 1) | torch.isnan(t)).any()):
            raise ValueError("t must lie in [0, 1]")
        return t

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha_l(t) = t^{w_l}, shape [B, L]."""
        return mask_probability(self.w, self._time(t))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_l(t) = 1 - t^{w_l}: probability that column l is still visible."""
        return 1.0 - self.mask_prob(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'_l(t) / (1 - alpha_l(t)) = w_l / t, the NELBO weight at time t, shape [B, L]."""
        return self.w[None, :] / self._time(t)[:, None]

    def sample_transition_times(self, num_rows: int, generator: torch.Generator | None = None
                                ) -> torch.Tensor:
        """t*_l = U^{1/w_l} per row: column l is masked at every t >= t*_l, revealed below it."""
        u = torch.rand(num_rows, self.num_columns, generator=generator, device=self.log_w.device)
        return torch.exp(-exponential_keys(self.w.detach(), u))

    def sample_order(self, num_rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reveal orders pi ~ Plackett-Luce(w), shape [B, L] (column ids, first revealed first)."""
        u = torch.rand(num_rows, self.num_columns, generator=generator, device=self.log_w.device)
        order, _ = order_from_keys(exponential_keys(self.w.detach(), u))
        return order

    def order_log_prob(self, order: torch.Tensor, prefix_len: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Plackett-Luce log-probability of each row's order (or of its first prefix_len steps)."""
        return plackett_luce_log_prob(self.w, order, prefix_len)

    def extra_repr(self) -> str:
        return f"num_columns={self.num_columns}, learnable={self.learnable}"
