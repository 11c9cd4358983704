"""Context-dependent orders (LoMDM): the policy p_psi, the posterior q_phi, the bound, the sampler.

On a tiny table everything is enumerable. The model's forward gives -log p(x, pi) =
-log p_theta(x | pi) - log p_psi(pi | x) for every order, so
- the bound is sum_pi q(pi | x) [-log p(x, pi) + log q(pi | x)] (compared with the
  Monte-Carlo estimate within 5 standard errors, and its phi-gradient with RLOO's);
- the order search's gradients must approach those of -log p(x) and of the inclusive KL
  sum_pi p(pi | x) log(p(pi | x) / q(pi | x)) as the number of orders grows;
- the sampler must draw (x, pi) pairs from p(x, pi) itself: a chi-square test on all
  (row, order) cells, at p > 1e-4 (seeded, so deterministic); one-step sampling, which is
  approximate, must be rejected, which shows the test has power.
"""
import pandas as pd
import pytest
import torch

import fastmdm.train
from fastmdm import TabularMDM
from fastmdm.models import CausalTransformer
from fastmdm.kinds import kind_of, model_loss
from fastmdm.objective import causal_loss, contextual_loss, order_search_loss
from fastmdm.decoding import DecodeStats, sample_tokens
from fastmdm.schedules import plackett_luce_log_prob
from test_causal import (SIZES, all_orders, all_rows, chi_square_p, order_nll, peaky_model, repeated_gradients,
                         schedule_with)

ROWS = torch.tensor([[0, 2, 1], [1, 0, 0], [1, 1, 1]])


def contextual_model(seed=0, **options):
    return peaky_model(SIZES, seed=seed, order="contextual", **options)


def neg_log_joint(model, x, order, w):
    """-log p(x, pi) per row: the model's loss with every column scored."""
    everywhere = torch.ones(x.shape, dtype=torch.bool)
    return model(x, order, targets=x, weight=everywhere.double(), mask=everywhere, order_prior=w)


def enumerated_bound(model, w, rows=ROWS):
    """Mean over rows of sum_pi q(pi | x) [-log p(x, pi) + log q(pi | x)] (differentiable in phi)."""
    orders = all_orders(model.num_columns)
    x = rows.repeat_interleave(len(orders), 0)
    order = orders.repeat(len(rows), 1)
    log_q = plackett_luce_log_prob(model.posterior_scores(x, w), order)
    with torch.no_grad():
        joint = neg_log_joint(model, x, order, w)
    return (log_q.exp() * (joint + log_q)).view(len(rows), -1).sum(1).mean()


# ----------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("w", [[1.0, 1.0, 1.0], [0.2, 1.0, 5.0], [0.05, 1.0, 20.0]])
def test_static_special_case_is_the_static_nelbo(w, monkeypatch):
    """With the posterior's factor at 1 (q = PL(w)) and the policy's context map at zero,
    every order's policy and posterior terms cancel: the bound is the static model's NELBO,
    sample by sample."""
    model = contextual_model()
    schedule = schedule_with(w).double()
    w_t = schedule.w.detach()
    with torch.no_grad():
        model.order_policy.context.weight.zero_()
    monkeypatch.setattr(model.order_posterior, "forward", lambda x: torch.ones(x.shape, dtype=torch.float64))
    x = ROWS.repeat(50, 1)
    with torch.no_grad():
        got = contextual_loss(model, x, schedule, generator=torch.Generator().manual_seed(5))
        want = causal_loss(model, x, schedule, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got.samples, want.samples, rtol=1e-12, atol=1e-12)
        orders = all_orders(3)
        log_pl = plackett_luce_log_prob(w_t, orders)
        # The static NELBO sum_pi PL(pi; w) * -log p_theta(x | pi), from the conditionals alone
        # (no order prior: the policy is not run), so it shares no term with the bound's expression.
        exact_static = sum((log_pl.exp() * order_nll(model, r.expand(6, -1), orders)).sum() for r in ROWS)
    torch.testing.assert_close(enumerated_bound(model, w_t).detach(), exact_static / len(ROWS), rtol=1e-12, atol=1e-12)


def test_estimate_is_unbiased_for_the_bound():
    model = contextual_model()
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    exact = enumerated_bound(model, w).item()
    with torch.no_grad():
        out = model_loss(model, ROWS.repeat(8_000, 1), schedule_with(w.tolist()).double(), model.mask_ids,
                         model.offsets, num_samples=2, generator=torch.Generator().manual_seed(3))
    samples = out.samples.flatten()
    stderr = samples.std() / samples.numel() ** 0.5
    assert abs(samples.mean() - exact) < 5 * stderr, (samples.mean(), exact, stderr)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train, centred by the batch"])
def test_posterior_rloo_gradient_matches_enumerated_gradient(training):
    """The score-function part of the gradient (phi's, and w's through the posterior) against
    the gradient of the enumerated bound with the denoiser and policy terms held fixed. In
    training the posterior is centred by the batch's mean, so its gradient also flows through
    the mean; both batches hold the three rows in equal shares, so the means agree."""
    model = contextual_model(seed=1)
    with torch.no_grad():     # scores off tanh's flat ends, where the gradient vanishes and says nothing
        model.order_posterior.out.weight.mul_(0.2)
    model.order_posterior.train(training)
    schedule = schedule_with([0.5, 1.0, 3.0]).double()
    w = schedule.w.detach()
    parameter = model.order_posterior.out.weight
    (exact_grad,) = torch.autograd.grad(enumerated_bound(model, w), parameter)
    generator = torch.Generator().manual_seed(4)
    grads = repeated_gradients(lambda: contextual_loss(model, ROWS.repeat(1_000, 1), schedule, num_samples=2,
                                                       generator=generator).loss, parameter, [model, schedule])
    stderr = grads.std(0) / len(grads) ** 0.5
    exact_grad = exact_grad.flatten()
    assert exact_grad.abs().max() > 10 * stderr.max()          # the comparison below is not vacuous
    assert ((grads.mean(0) - exact_grad).abs() < 5 * stderr + 1e-9).all(), (grads.mean(0), exact_grad, stderr)


def test_order_search_gradients_are_those_of_the_likelihood_and_the_inclusive_kl():
    """With K orders per row, half from q and half uniform, the search loss's gradient tends to
    that of mean_rows [-log sum_pi p(x, pi) - sum_pi p(pi | x) log q(pi | x)] (p(pi | x) held
    fixed): the weights p(x, pi) / r(pi) undo the mixture r the orders come from. Tolerance:
    3% of the gradient's norm for the mean of 8 draws at K = 2,000 (one draw is off by 1-4%,
    the mean by about 0.6%; self-normalizing adds a bias of order 1/K). Weights p(x, pi) alone,
    which ignore r, would be off by 16%: the test can fail."""
    model = contextual_model(seed=1).train()
    schedule = schedule_with([0.5, 1.0, 3.0]).double()
    w = schedule.w.detach()
    orders = all_orders(3)
    x, order = ROWS.repeat_interleave(len(orders), 0), orders.repeat(len(ROWS), 1)
    log_q = plackett_luce_log_prob(model.posterior_scores(x, w), order).view(len(ROWS), -1)
    joint = neg_log_joint(model, x, order, w).view(len(ROWS), -1)
    posterior = torch.softmax(-joint.detach(), 1)
    proposal = 0.5 * log_q.detach().exp() + 0.5 / len(orders)
    ignoring_proposal = proposal * posterior / (proposal * posterior).sum(1, keepdim=True)
    parameters = [model.order_posterior.out.weight, model.order_policy.context.weight, model.column_embedding]

    def gradient(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters, retain_graph=True)])

    exact = gradient((-torch.logsumexp(-joint, 1)).mean() - (posterior * log_q).sum(1).mean())
    wrong = gradient((ignoring_proposal * joint).sum(1).mean() - (ignoring_proposal * log_q).sum(1).mean())
    generator = torch.Generator().manual_seed(7)
    draws = torch.stack([gradient(order_search_loss(model, ROWS, schedule, num_samples=2_000, generator=generator).loss)
                         for _ in range(8)])
    assert (draws.mean(0) - exact).norm() < 0.03 * exact.norm(), ((draws.mean(0) - exact).norm(), exact.norm())
    assert (wrong - exact).norm() > 0.1 * exact.norm()


@pytest.fixture
def search_calls(monkeypatch):
    """order_search of every training step's loss, in order."""
    calls = []
    original = fastmdm.train.model_loss

    def recording(*args, order_search=False, **kwargs):
        if torch.is_grad_enabled():
            calls.append(order_search)
        return original(*args, order_search=order_search, **kwargs)

    monkeypatch.setattr(fastmdm.train, "model_loss", recording)
    return calls


def small_search_run(epochs, **options):
    """A tiny contextual model and a 64-row table it trains on in 2 steps an epoch."""
    table = pd.DataFrame({"a": torch.randint(0, 3, (64,)).tolist(), "b": torch.randint(0, 2, (64,)).tolist()})
    model = TabularMDM(order="contextual", model=dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=16),
                       epochs=epochs, batch_size=32, progress=False, **options)
    return model, table


def test_trainer_searches_orders_for_the_first_epochs(search_calls):
    model, table = small_search_run(3, order_search_epochs=2)
    model.fit(table, validation=None)
    assert search_calls == [True] * 4 + [False] * 2


def test_a_resumed_run_keeps_its_search_epochs(search_calls, tmp_path):
    """The default search share is of the run's epochs: resumed with more epochs, a run that
    searched 1 of 3 does not go back into the search (40% of 10 would be 4)."""
    model, table = small_search_run(3)
    model.fit(table, validation=None, checkpoint=tmp_path / "run.pt")
    assert search_calls == [True] * 2 + [False] * 4
    search_calls.clear()
    resumed, _ = small_search_run(10)
    resumed.fit(table, validation=None, checkpoint=tmp_path / "run.pt", resume=True)
    assert search_calls == [False] * 14 and resumed.config.order_search_epochs == 1


def test_posterior_is_centred_per_column():
    """In training, log r_phi(x) sums to zero over the batch in every
    column (q's static preference is w's alone) and the running mean follows the batch's; in
    eval mode the running mean is subtracted instead, so a row's factor does not depend on
    its batch."""
    posterior = contextual_model().order_posterior
    x = torch.randint(0, 2, (64, 3))
    raw = torch.log(posterior.eval()(x))              # column_mean is 0 before training
    posterior.train()
    centred = torch.log(posterior(x))
    torch.testing.assert_close(centred, raw - raw.mean(0), rtol=0, atol=1e-12)
    for _ in range(400):                              # the running mean's lag: 0.95^400 ~ 1e-9
        posterior(x)
    torch.testing.assert_close(posterior.column_mean, raw.mean(0), rtol=0, atol=1e-7)
    posterior.eval()
    torch.testing.assert_close(torch.log(posterior(x[:5])), centred[:5], rtol=0, atol=1e-7)


def test_gradient_reaches_policy_posterior_and_prior():
    model = contextual_model()
    model.train()
    schedule = schedule_with([0.5, 1.0, 3.0]).double()
    contextual_loss(model, ROWS, schedule, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
    assert bool(schedule.log_w.grad.abs().sum() > 0)


@pytest.mark.parametrize("num_layers, policy_depth", [(1, 1), (2, 1), (3, 2)])
def test_policy_reads_the_states_at_policy_depth(num_layers, policy_depth):
    """log p_psi(pi | x) depends on the blocks before `policy_depth` and on no block after it:
    the states one block before the last, where the target embedding is added; a one-block
    model's policy reads that block."""
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    orders = all_orders(3)
    x = ROWS.repeat_interleave(len(orders), 0)
    order = orders.repeat(len(ROWS), 1)

    def log_policy(model):
        everywhere = torch.ones(x.shape, dtype=torch.bool)
        with torch.no_grad():
            theta = model(x, order, targets=x, weight=everywhere.double(), mask=everywhere)
            return theta - neg_log_joint(model, x, order, w)

    model = contextual_model(num_layers=num_layers)
    assert model.policy_depth == policy_depth
    before = log_policy(model)
    for index, block in enumerate(model.blocks):
        with torch.no_grad():
            block.ff[2].bias.add_(torch.randn(block.ff[2].bias.shape, dtype=torch.float64))
        moved = not torch.allclose(log_policy(model), before, rtol=0, atol=1e-9)
        assert moved == (index < policy_depth), index
        before = log_policy(model)


# ----------------------------------------------------------------------------- the sampler
NUM_SAMPLES = 40_000


def draw_with_orders(model, w, **options):
    stats = DecodeStats(orders=[])
    tokens = sample_tokens(model, w, model.mask_ids, model.offsets, NUM_SAMPLES, batch_size=NUM_SAMPLES // 2,
                           decode=kind_of(model).decoder(options.get("speculative")),
                           generator=torch.Generator().manual_seed(0), stats=stats, **options)
    return tokens, torch.cat(stats.orders)


def pair_index(tokens, orders, sizes):
    """One cell per (row value, order) pair: row index * L! + order index."""
    table = {tuple(o.tolist()): i for i, o in enumerate(all_orders(len(sizes)))}
    order_index = torch.tensor([table[tuple(o)] for o in orders.tolist()])
    return row_index(tokens, sizes) * len(table) + order_index


def row_index(tokens, sizes):
    index = torch.zeros(tokens.shape[0], dtype=torch.long)
    for col, k in enumerate(sizes):
        index = index * k + tokens[:, col]
    return index


def exact_pairs(model, w):
    """p(x, pi) for every (row, order) cell, in pair_index's layout."""
    rows, orders = all_rows(SIZES), all_orders(3)
    x = rows.repeat_interleave(len(orders), 0)
    with torch.no_grad():
        return torch.exp(-neg_log_joint(model, x, orders.repeat(len(rows), 1), w))


@pytest.mark.parametrize("steps, exact, num_layers",
                         [(3, True, 2), (3, True, 1), (1, False, 2)],
                         ids=["steps=L", "steps=L, policy after the only block", "steps=1 (rejected)"])
def test_sampled_rows_and_orders_follow_the_joint(steps, exact, num_layers):
    """The decoder reads the policy's states where the training pass does: after the first of
    two blocks, or after the last block of a one-block model."""
    model = contextual_model(num_layers=num_layers)
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    tokens, orders = draw_with_orders(model, w, steps=steps)
    cells = pair_index(tokens, orders, SIZES)
    probs = exact_pairs(model, w)
    counts = torch.bincount(cells, minlength=probs.numel()).double()
    assert (chi_square_p(counts, probs) > 1e-4) == exact


def test_order_depends_on_the_values():
    """The point of the model: the first revealed column is fixed by the policy's start
    state, but the second one's distribution changes with the first value."""
    model = contextual_model(seed=4)
    w = torch.ones(3, dtype=torch.float64)
    tokens, orders = draw_with_orders(model, w)
    first = orders[:, 0] == 1                       # rows that revealed column 1 first
    second = orders[first, 1]
    value = tokens[first, 1]
    shares = [(second[value == v] == 0).double().mean().item() for v in range(3)]
    assert max(shares) - min(shares) > 0.1, shares


def test_conditioned_sampling_puts_known_columns_first():
    """Known column 1 = 2: it is revealed first, kept, and the rest follows
    p(x_0, x_2, order | x_1) = p(x, pi) / p(pi_0 = 1) (the start state is value-free)."""
    model = contextual_model()
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    known = torch.tensor([[0, 2, 0]]).expand(NUM_SAMPLES, -1)
    known_mask = torch.tensor([False, True, False])
    tokens, orders = draw_with_orders(model, w, known=known, known_mask=known_mask)
    assert bool((tokens[:, 1] == 2).all()) and bool((orders[:, 0] == 1).all())
    cells = pair_index(tokens, orders, SIZES)
    probs = exact_pairs(model, w)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    rows, all_o = all_rows(SIZES), all_orders(3)
    keep.view(len(rows), len(all_o))[:] = (rows[:, 1] == 2)[:, None] & (all_o[:, 0] == 1)[None, :]
    counts = torch.bincount(cells, minlength=probs.numel()).double()
    assert counts[~keep].sum() == 0
    assert chi_square_p(counts[keep], probs[keep]) > 1e-4


def test_errors():
    with pytest.raises(ValueError, match="order must be one of"):
        CausalTransformer(SIZES, order="dynamic")
    model = contextual_model()
    x = ROWS
    with pytest.raises(ValueError, match="contextual"):
        kind_of(model).decoder(speculative=2)
    with pytest.raises(ValueError, match="num_samples"):
        contextual_loss(model, x, schedule_with([1.0, 1.0, 1.0]).double(), num_samples=1)
    with pytest.raises(ValueError, match="order_search_epochs"):
        TabularMDM(order="static", order_search_epochs=2)
    with pytest.raises(ValueError, match="order_search_epochs"):
        TabularMDM(order="contextual", order_search_epochs=-1)
    with pytest.raises(ValueError, match="num_samples"):
        order_search_loss(model, x, schedule_with([1.0, 1.0, 1.0]).double(), num_samples=1)
