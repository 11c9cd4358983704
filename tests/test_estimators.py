"""Exactness of the NELBO estimators and the RLOO gradient on a tiny enumerable problem.

For a time-independent denoiser the NELBO equals the Plackett-Luce-weighted autoregressive
loss, which for L <= 4 we compute exactly by enumerating all orders. Both Monte-Carlo
estimators (t-space and order-space) must converge to it, and their w-gradients (pathwise +
RLOO score-function) must converge to the gradient of the exact expression. Bounds are 5
standard errors of the Monte-Carlo mean, the standard error taken from 40 batch means: the
t-space estimate has finite variance but a heavy right tail (P(X > x) ~ x^-3), so the spread
of batch means is a steadier yardstick than the per-sample std.
"""
import itertools

import pytest
import torch

from fastmdm import ops
from fastmdm.objective import diffusion_loss
from fastmdm.schedules import PowerSchedule, plackett_luce_log_prob

SIZES = [2, 3, 2, 4]


class LookupDenoiser:
    """Logits of every column = bias + a random table entry per visible (column, value)."""

    def __init__(self, sizes, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.sizes = torch.tensor(sizes)
        vocab = int(self.sizes.sum())
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.sizes.cumsum(0)])
        self.bias = torch.randn(vocab, generator=generator, dtype=torch.float64)
        self.tables = [torch.randn(k, vocab, generator=generator, dtype=torch.float64) * 1.5
                       for k in sizes]

    def __call__(self, x_t, targets=None, weight=None, mask=None):
        """Ragged logits [N, V]; with targets, the per-row weighted cross entropy (the
        contract of `diffusion_loss`), here through the reference op."""
        if targets is not None:
            return ops.weighted_ce(self(x_t), targets, weight, mask, self.offsets)
        logits = self.bias.expand(x_t.shape[0], -1).clone()
        for col, table in enumerate(self.tables):
            visible = x_t[:, col] < self.sizes[col]
            value = x_t[:, col].clamp(max=table.shape[0] - 1)
            logits += torch.where(visible[:, None], table[value], torch.zeros(()))
        return logits


def exact_nelbo(denoiser, rows, w):
    """Mean over rows of E_{pi~PL(w)} sum_i -log p(x_{pi_i} | x_{pi_<i}), differentiable in w."""
    num_columns = rows.shape[1]
    orders = torch.tensor(list(itertools.permutations(range(num_columns))))
    order_prob = plackett_luce_log_prob(w, orders).exp()                 # [L!]
    total = 0.0
    for x in rows:
        ar_loss = torch.zeros(len(orders), dtype=torch.float64)
        for step in range(num_columns):
            x_t = x.expand(len(orders), -1).clone()
            for later in range(step, num_columns):              # hide pi_step..pi_L
                x_t.scatter_(1, orders[:, later:later + 1], denoiser.sizes[orders[:, later:later + 1]])
            logits = denoiser(x_t)
            for col in range(num_columns):                      # column-wise log-softmax
                scored = orders[:, step] == col
                segment = logits[:, denoiser.offsets[col]:denoiser.offsets[col + 1]]
                log_prob = torch.log_softmax(segment, dim=1)[:, x[col]]
                ar_loss = ar_loss - torch.where(scored, log_prob, torch.zeros(()))
        total = total + (order_prob * ar_loss).sum()
    return total / len(rows)


@pytest.fixture(scope="module")
def problem():
    denoiser = LookupDenoiser(SIZES, seed=0)
    rows = torch.tensor([[0, 2, 1, 3], [1, 0, 0, 1], [1, 1, 1, 2]])
    return denoiser, rows


def schedule_with(w):
    schedule = PowerSchedule(len(w))
    with torch.no_grad():
        schedule.log_w.copy_(torch.log(torch.tensor(w)))
    return schedule


# The t-space cases span what breaks a naive estimator: w <= 1 (infinite variance with t
# uniform), w = 0.05 and 1e-3 (a clamp t >= 1e-5 drops 1e-5^w = 56% and 99% of that column's
# weight), w = 20 and w = 1e3 next to w = 1e-3 (t far below float32's range).
CASES = [("order", [0.3, 1.0, 2.5, 6.0]), ("order", [1.0, 1.0, 1.0, 1.0]),
         ("tspace", [1.0, 1.0, 1.0, 1.0]), ("tspace", [3.0, 1.0, 0.5, 0.2]),
         ("tspace", [0.05, 1.0, 1.0, 1.0]), ("tspace", [20.0, 1.0, 0.5, 2.0]),
         ("tspace", [1e-3, 1.0, 1e3, 1.0])]
BATCHES = 40


@pytest.mark.parametrize("estimator, w", CASES)
def test_estimator_is_unbiased_for_exact_nelbo(problem, estimator, w):
    """600k draws (3 rows x 100k x K = 2) through the default dispatch (C++ masking on CPU)."""
    denoiser, rows = problem
    schedule = schedule_with(w)
    exact = exact_nelbo(denoiser, rows, schedule.w.detach().double()).item()
    x = rows.repeat(100_000, 1)
    with torch.no_grad():
        out = diffusion_loss(denoiser, x, schedule, denoiser.sizes, denoiser.offsets,
                             estimator=estimator, num_samples=2,
                             generator=torch.Generator().manual_seed(1))
    batch_means = out.samples.flatten().double().view(BATCHES, -1).mean(1)   # each holds every row
    estimate, stderr = batch_means.mean().item(), batch_means.std().item() / BATCHES ** 0.5
    assert abs(estimate - exact) < 5 * stderr, (estimate, exact, stderr)


@pytest.mark.parametrize("estimator, w, num_samples", [(*case, 2) for case in CASES] + [("order", CASES[0][1], 1)])
def test_rloo_gradient_is_unbiased(problem, estimator, w, num_samples):
    """Mean of (pathwise + RLOO) w-gradients over independent batches = grad of the exact NELBO;
    with one sample a row, the baseline is the batch's other rows."""
    denoiser, rows = problem
    schedule = schedule_with(w)
    log_w = schedule.log_w.detach().double().requires_grad_(True)
    (exact_grad,) = torch.autograd.grad(exact_nelbo(denoiser, rows, log_w.exp()), log_w)
    generator = torch.Generator().manual_seed(2)
    grads = []
    with ops.use_backend("reference"):
        for _ in range(40):
            schedule.zero_grad()
            x = rows.repeat(3_000, 1)
            diffusion_loss(denoiser, x, schedule, denoiser.sizes, denoiser.offsets,
                           estimator=estimator, num_samples=num_samples, generator=generator).loss.backward()
            grads.append(schedule.log_w.grad.clone().double())
    grads = torch.stack(grads)
    stderr = grads.std(0) / len(grads) ** 0.5
    assert ((grads.mean(0) - exact_grad).abs() < 5 * stderr + 1e-4).all(), (grads.mean(0), exact_grad, stderr)


def test_gradient_is_not_trivially_zero(problem):
    """Guard for the test above: the exact gradient it matches is clearly non-zero."""
    denoiser, rows = problem
    log_w = torch.log(torch.tensor([0.3, 1.0, 2.5, 6.0], dtype=torch.float64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_nelbo(denoiser, rows, log_w.exp()), log_w)
    assert grad.abs().max() > 0.05


def test_fixed_schedule_gets_no_w_gradient(problem):
    denoiser, rows = problem
    schedule = PowerSchedule(4, learnable=False)
    out = diffusion_loss(denoiser, rows, schedule, denoiser.sizes, denoiser.offsets)
    assert schedule.log_w.grad is None and out.samples.shape == (3, 2)


def test_unknown_estimator_is_rejected(problem):
    denoiser, rows = problem
    with pytest.raises(ValueError, match="estimator"):
        diffusion_loss(denoiser, rows, PowerSchedule(4), denoiser.sizes, denoiser.offsets,
                       estimator="bogus")
