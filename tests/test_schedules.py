"""PowerSchedule and the Plackett-Luce math: closed forms against autograd and sampling."""
import itertools
import math

import pytest
import torch

from fastmdm.schedules import (PowerSchedule, expm1_ratio, exponential_keys, mask_probability,
                               order_from_keys, plackett_luce_log_prob, plackett_luce_prefix_score,
                               sample_tspace_times, tspace_log_time_density, tspace_score)


def all_orders(num_columns: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(num_columns))))


def test_init_is_linear_schedule():
    schedule = PowerSchedule(5)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(schedule.w, torch.ones(5))
    assert torch.allclose(schedule.alpha(t), (1 - t)[:, None].expand(4, 5))
    assert torch.allclose(schedule.loss_weight(torch.tensor([0.5])), torch.full((1, 5), 2.0))


def test_fixed_schedule_has_no_gradient():
    assert PowerSchedule(3, learnable=False).learnable is False
    assert PowerSchedule(3).learnable is True


@pytest.mark.parametrize("bad", [dict(num_columns=0), dict(num_columns=3, init_w=0.0),
                                 dict(num_columns=3, init_w=float("nan"))])
def test_constructor_errors(bad):
    with pytest.raises(ValueError):
        PowerSchedule(**bad)


def test_time_errors():
    schedule = PowerSchedule(2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule.alpha(torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule.alpha(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="dtype"):
        schedule.alpha(torch.tensor([1]))
    with pytest.raises(ValueError, match="dimension"):
        schedule.alpha(torch.rand(2, 2))


def test_transition_times_have_power_law_cdf():
    """P(t* <= t) = t^w, checked at a few t against 200k draws (binomial 5-sigma bound)."""
    schedule = PowerSchedule(3)
    with torch.no_grad():
        schedule.log_w.copy_(torch.log(torch.tensor([0.3, 1.0, 4.0])))
    t_star = schedule.sample_transition_times(200_000, generator=torch.Generator().manual_seed(0))
    for t in (0.1, 0.5, 0.9):
        expected = torch.tensor(t) ** schedule.w.detach()
        observed = (t_star <= t).double().mean(0)
        bound = 5 * torch.sqrt(expected * (1 - expected) / t_star.shape[0]) + 1e-4
        assert ((observed - expected).abs() <= bound).all(), (t, observed, expected)


def test_sampled_orders_match_plackett_luce():
    """Orders from transition times follow PL(w); L=4, 24 orders."""
    schedule = PowerSchedule(4)
    with torch.no_grad():
        schedule.log_w.copy_(torch.log(torch.tensor([0.2, 1.0, 2.5, 6.0])))
    n = 400_000
    orders = schedule.sample_order(n, generator=torch.Generator().manual_seed(1))
    candidates = all_orders(4)
    exact = plackett_luce_log_prob(schedule.w.detach().double(), candidates).exp()
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-12)
    codes = (orders * torch.tensor([64, 16, 4, 1])).sum(1)
    candidate_codes = (candidates * torch.tensor([64, 16, 4, 1])).sum(1)
    observed = (codes[:, None] == candidate_codes[None, :]).double().mean(0)
    bound = 5 * torch.sqrt(exact * (1 - exact) / n) + 1e-5
    assert ((observed - exact).abs() <= bound).all()


def test_order_from_keys_rank_is_inverse_permutation():
    keys = torch.rand(50, 7)
    order, rank = order_from_keys(keys)
    assert torch.equal(order.gather(1, rank), torch.arange(7).expand(50, 7))
    assert (keys.gather(1, order).diff(dim=1) >= 0).all()


def test_exponential_keys_survive_zero_uniform():
    keys = exponential_keys(torch.tensor([1e-3, 1.0, 1e3]), torch.zeros(1, 3))
    assert torch.isfinite(keys).all()


@pytest.mark.parametrize("num_columns", [1, 2, 5])
def test_prefix_score_matches_autograd(num_columns):
    """Closed-form d/dw log P(prefix) against autograd of the PL log-probability, float64."""
    generator = torch.Generator().manual_seed(num_columns)
    w = (torch.rand(num_columns, generator=generator, dtype=torch.float64) * 3 + 0.05)
    rows = 30
    keys = torch.rand(rows, num_columns, generator=generator, dtype=torch.float64)
    order, rank = order_from_keys(keys)
    prefix_len = torch.randint(0, num_columns + 1, (rows,), generator=generator)
    closed = plackett_luce_prefix_score(w, rank, prefix_len)
    for b in range(rows):
        w_leaf = w.clone().requires_grad_(True)
        plackett_luce_log_prob(w_leaf, order[b:b + 1], prefix_len[b:b + 1]).sum().backward()
        torch.testing.assert_close(closed[b], w_leaf.grad, rtol=1e-10, atol=1e-10)


def test_pl_log_prob_gradcheck():
    w = torch.tensor([0.3, 1.2, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    order = all_orders(4)[::5]
    prefix = torch.tensor([0, 1, 2, 3, 4])
    assert torch.autograd.gradcheck(lambda v: plackett_luce_log_prob(v, order, prefix), (w,))


def tspace_log_q(w, t, mask):
    """log q(mask | t) = sum_l m log t^w + (1 - m) log(1 - t^w), float64."""
    a = w[None, :] * torch.log(t)[:, None]
    return torch.where(mask, a, torch.log(-torch.expm1(a))).sum(1)


def test_tspace_score_matches_autograd():
    generator = torch.Generator().manual_seed(3)
    w = torch.rand(6, generator=generator, dtype=torch.float64) * 4 + 0.01
    t = torch.rand(40, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    mask = torch.rand(40, 6, generator=generator) < 0.5
    w_leaf = w.clone().requires_grad_(True)
    tspace_log_q(w_leaf, t, mask).sum().backward()
    torch.testing.assert_close(tspace_score(w, torch.log(t), mask).sum(0), w_leaf.grad,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("w", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("log_t", [-3e4, -1e3, math.log(1e-7), math.log(1e-3), math.log(0.5),
                                   math.log1p(-1e-6), 0.0])
def test_tspace_score_edges_are_finite_and_accurate(w, log_t):
    """float32 guarded score against float64 evaluation (relative 1e-4: float32 log/exp error).

    log t = -3e4 is the most negative time the t-space sampler draws at w = 1e-3 (log(2^-24) /
    5e-4): t itself underflows float32 there, log t does not."""
    w32 = torch.tensor([w], dtype=torch.float32)
    log_t32 = torch.tensor([log_t], dtype=torch.float32)
    for masked in (True, False):
        mask = torch.tensor([[masked]])
        got = tspace_score(w32, log_t32, mask)
        want = tspace_score(w32.double(), log_t32.double(), mask)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


TSPACE_W = [[1.0], [1.0, 1.0, 1.0], [3.0, 1.0, 0.5, 0.2], [1e-3, 0.05, 1.0, 20.0, 1e3]]


@pytest.mark.parametrize("w", TSPACE_W)
def test_tspace_times_follow_the_proposal(w):
    """log t has CDF P(log t <= s) = mean_c exp(c s) over the 2L rates c in {w_l / 2, w_l} (a
    mixture of powers of uniforms): checked at quantile points against 100k float32 draws
    (binomial 5-sigma bound), and the time weight is 1 / (t p(t)), the reciprocal of that
    CDF's derivative."""
    w = torch.tensor(w)
    log_t, time_weight = sample_tspace_times(w, 100_000, torch.Generator().manual_seed(0))
    assert log_t.dtype == time_weight.dtype == torch.float32
    assert torch.isfinite(log_t).all() and (log_t <= 0).all() and torch.isfinite(time_weight).all()
    rates = torch.cat([w.double() / 2, w.double()])
    for s in torch.quantile(log_t.double(), torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)):
        expected = torch.exp(rates * s).mean()
        observed = (log_t.double() <= s).double().mean()
        assert abs(observed - expected) <= 5 * torch.sqrt(expected * (1 - expected) / log_t.numel()) + 1e-5
    density = (rates[None, :] * torch.exp(rates[None, :] * log_t.double()[:, None])).mean(1)
    torch.testing.assert_close(time_weight.double(), 1 / density, rtol=1e-4, atol=0)
    torch.testing.assert_close(tspace_log_time_density(w.double(), log_t.double()), torch.log(density))


@pytest.mark.parametrize("w", TSPACE_W)
def test_tspace_time_weight_is_unbiased_per_column(w):
    """E[t^{w_l} w_l time_weight] = int_0^1 t^{w_l} (w_l / t) dt = 1 for every column: the
    t-space NELBO of a constant CE of 1 per column. 200k draws in 40 batch means, 5 s.e."""
    w = torch.tensor(w)
    log_t, time_weight = sample_tspace_times(w, 200_000, torch.Generator().manual_seed(1))
    terms = torch.exp(w.double()[None, :] * log_t.double()[:, None]) * w.double() * time_weight.double()[:, None]
    batch_means = terms.view(40, -1, w.numel()).mean(1)
    stderr = batch_means.std(0) / 40 ** 0.5
    assert ((batch_means.mean(0) - 1).abs() < 5 * stderr).all(), (batch_means.mean(0), stderr)


def test_tspace_times_are_constants_for_autograd():
    """The proposal uses w detached: a fixed sampling density keeps the w-gradients unbiased."""
    w = torch.tensor([0.5, 2.0], requires_grad=True)
    log_t, time_weight = sample_tspace_times(w, 10)
    assert not log_t.requires_grad and not time_weight.requires_grad


def test_expm1_ratio_is_continuous_at_zero():
    a = torch.tensor([0.0, -1e-30, -1e-8, -1.0, -100.0, -1e4], dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0, 1.0, 1 / (1 - math.exp(-1)), 100.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(expm1_ratio(a), expected, rtol=1e-7, atol=0)


def test_mask_probability_at_the_ends():
    p = mask_probability(torch.tensor([1e-3, 0.5, 2.0, 1e3]), torch.tensor([0.0, 1.0]))
    assert (p[0] == 0).all() and (p[1] == 1).all()
