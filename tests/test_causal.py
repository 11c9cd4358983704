"""The causal denoiser, its whole-order objective and its KV-cached samplers.

On a tiny table everything is enumerable: the model's NELBO is
sum_pi PL(pi; w) * -log p(x | pi), and its joint (a mixture over orders) is
sum_pi PL(pi; w) * p(x | pi). Monte-Carlo estimates are compared to these within 5
standard errors; sampled joints are compared with a chi-square test at p > 1e-4 (seeded,
so each test is deterministic; a broken sampler gives p-values far below that, checked by
the cross-check tests at the end which must reject a wrong joint).
"""
import itertools

import pytest
import torch
from scipy.stats import chisquare

from fastmdm import ops
from fastmdm.decoding.speculative import cell_logits
from fastmdm.models import CausalTransformer
from fastmdm.kinds import kind_of, model_loss
from fastmdm.models.layers import attend
from fastmdm.ops import reference
from fastmdm.objective import causal_loss
from fastmdm.decoding.causal import order_tokens
from fastmdm.decoding import ColumnLayout, DecodeStats, known_first_order, sample_tokens
from fastmdm.schedules import PowerSchedule, plackett_luce_log_prob

SIZES = [2, 3, 2]


def peaky_model(sizes, seed=0, dtype=torch.float64, **options):
    """A small causal model with large random weights, so conditionals are far from uniform
    and strongly depend on the prefix (a random-init model would be nearly uniform)."""
    torch.manual_seed(seed)
    model = CausalTransformer(sizes, **{**dict(d_model=8, num_layers=2, num_heads=2, dim_feedforward=16), **options})
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.8)
    return model.to(dtype).eval()


def schedule_with(w):
    schedule = PowerSchedule(len(w))
    with torch.no_grad():
        schedule.log_w.copy_(torch.log(torch.tensor(w)))
    return schedule


def all_rows(sizes):
    return torch.tensor(list(itertools.product(*[range(k) for k in sizes])))


def all_orders(num_columns):
    return torch.tensor(list(itertools.permutations(range(num_columns))))


def order_nll(model, x, order, mask=None):
    """-log p(x | order) per row (restricted to the columns in `mask`)."""
    mask = torch.ones(x.shape, dtype=torch.bool) if mask is None else mask
    with torch.no_grad():
        return model(x, order, targets=x, weight=torch.ones(x.shape, dtype=torch.float64), mask=mask)


def exact_joint(model, w):
    """p(x) = sum_pi PL(pi; w) p(x | pi) for every row x of the table, [prod K_l]."""
    rows, orders = all_rows(model.cardinalities), all_orders(model.num_columns)
    log_pl = plackett_luce_log_prob(w.double(), orders)
    x = rows.repeat_interleave(len(orders), 0)
    order = orders.repeat(len(rows), 1)
    log_p = -order_nll(model, x, order).view(len(rows), len(orders))
    return torch.logsumexp(log_p + log_pl, 1).exp()


def row_counts(tokens, sizes):
    index = torch.zeros(tokens.shape[0], dtype=torch.long)
    for col, k in enumerate(sizes):
        index = index * k + tokens[:, col]
    return torch.bincount(index, minlength=int(torch.tensor(sizes).prod())).double()


def chi_square_p(counts, probs):
    """Pearson's test of counts against probs, with the cells expected fewer than 5 times
    pooled into one (the chi-square approximation fails there: one draw of a cell expected
    0.016 times alone would add 61 to the statistic)."""
    expected = probs / probs.sum() * counts.sum()
    rare = expected < 5
    if rare.any():
        counts = torch.cat([counts[~rare], counts[rare].sum().view(1)])
        expected = torch.cat([expected[~rare], expected[rare].sum().view(1)])
    return chisquare(counts.numpy(), expected.numpy()).pvalue


def repeated_gradients(loss, parameter, modules, repeats=16):
    """[repeats, numel] gradients of `parameter` from `repeats` fresh draws of loss()."""
    grads = []
    with ops.use_backend("reference"):
        for _ in range(repeats):
            for module in modules:
                module.zero_grad()
            loss().backward()
            grads.append(parameter.grad.flatten().clone())
    return torch.stack(grads)


# ----------------------------------------------------------------------------- the model
def test_conditionals_depend_only_on_the_prefix():
    model = peaky_model([3, 2, 4, 2])
    order = torch.tensor([[2, 0, 3, 1]])
    x = torch.tensor([[1, 0, 2, 1]])
    base = model(x, order)
    for changed_position in range(4):
        y = x.clone()
        col = order[0, changed_position]
        y[0, col] = (y[0, col] + 1) % model.cardinalities[col]
        other = model(y, order)
        for position in range(4):     # p(x_{pi_i} | x_{pi_<i}) moves only when i > changed
            c = order[0, position]
            same = torch.allclose(base[0, model.offsets[c]:model.offsets[c + 1]],
                                  other[0, model.offsets[c]:model.offsets[c + 1]])
            assert same == (position <= changed_position), (changed_position, position)


def test_cached_steps_equal_one_full_pass():
    """Writing one token at a time gives the full pass's conditionals; a query (a token not
    written) at position p for the column at position L-1 gives the full pass of the order
    with those two positions swapped; padding tokens (position L) change nothing."""
    model = peaky_model([3, 2, 4, 2, 5])
    generator = torch.Generator().manual_seed(0)
    rows = 6
    x = torch.stack([torch.randint(0, k, (rows,), generator=generator) for k in model.cardinalities], 1)
    order = torch.stack([torch.randperm(5, generator=generator) for _ in range(rows)])
    layout = ColumnLayout.of(model.mask_ids, model.offsets)
    full = layout.segments(model(x, order), torch.arange(rows)[:, None], order)      # [N, L, Kmax]
    length = model.num_columns
    cache = model.empty_cache(rows)
    x_ord = x.gather(1, order)
    with torch.no_grad():
        for position in range(length):
            swapped = order.clone()
            swapped[:, [position, length - 1]] = order[:, [length - 1, position]]
            expected = layout.segments(model(x, swapped), torch.arange(rows)[:, None], swapped)[:, position]
            # the order's next token, a padding token and the query
            targets = torch.tensor([position, length, length - 1]).expand(rows, 3)
            positions = torch.tensor([position, length, position]).expand(rows, 3)
            written = torch.tensor([True, False, False]).expand(rows, 3)
            cache, h, _ = model.extend(cache, *order_tokens(order, x_ord, targets, positions), written)
            step = cell_logits(model, layout, h[:, 0], order[:, position])
            torch.testing.assert_close(step, full[:, position], rtol=1e-9, atol=1e-9)
            query = cell_logits(model, layout, h[:, 2], order[:, length - 1])
            torch.testing.assert_close(query, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sizes, shape", [([1, 4, 2, 9, 3], (7, 3)), ([300, 2, 5], (11,)), ([2, 2], (0, 2))])
def testcell_logits_equal_the_full_logits_segments(sizes, shape):
    """Speculative decoding's per-column logits against the [M, V] product sliced by
    ColumnLayout.segments: random states and columns (some columns absent, a 1-value one, an
    empty batch); float64, so both sum the same d products and agree to rounding (1e-12)."""
    model = peaky_model(sizes)
    generator = torch.Generator().manual_seed(1)
    columns = torch.randint(0, len(sizes) - 1, shape, generator=generator)   # the last column absent
    h = torch.randn(*shape, model.heads.weight.shape[1], generator=generator, dtype=torch.float64)
    layout = ColumnLayout.of(model.mask_ids, model.offsets)
    full = h.reshape(-1, h.shape[-1]) @ model.heads.weight.T + model.heads.bias
    expected = layout.segments(full, torch.arange(full.shape[0]), columns.reshape(-1)).view(*shape, max(sizes))
    torch.testing.assert_close(cell_logits(model, layout, h, columns), expected, rtol=1e-12, atol=1e-12)


def permuted_copy(model, perm):
    """The same model for a table whose column j is column perm[j] of the original."""
    sizes = [model.cardinalities[p] for p in perm]
    clone = CausalTransformer(sizes, **{k: v for k, v in model.config.items() if k != "cardinalities"})
    clone = clone.to(torch.float64)
    state = dict(model.state_dict())
    embed_start = torch.cumsum(torch.tensor([0] + [k + 1 for k in model.cardinalities]), 0)
    embed_rows = torch.cat([torch.arange(embed_start[p], embed_start[p + 1]) for p in perm])
    head_rows = torch.cat([torch.arange(model.offsets[p], model.offsets[p + 1]) for p in perm])
    state["token_embedding.weight"] = state["token_embedding.weight"][embed_rows]
    state["column_embedding"] = state["column_embedding"][perm]
    state["target_embedding"] = state["target_embedding"][perm]
    state["heads.weight"] = state["heads.weight"][head_rows]
    state["heads.bias"] = state["heads.bias"][head_rows]
    state["offsets"], state["mask_ids"] = clone.offsets, clone.mask_ids
    clone.load_state_dict(state)
    return clone.eval()


def test_permuting_columns_with_the_order_changes_nothing():
    model = peaky_model([3, 2, 4, 2])
    perm = torch.tensor([2, 0, 3, 1])
    clone = permuted_copy(model, perm)
    inverse = torch.argsort(perm)
    generator = torch.Generator().manual_seed(1)
    x = torch.stack([torch.randint(0, k, (8,), generator=generator) for k in model.cardinalities], 1)
    order = torch.stack([torch.randperm(4, generator=generator) for _ in range(8)])
    torch.testing.assert_close(order_nll(clone, x[:, perm], inverse[order]), order_nll(model, x, order))


def test_gradient_reaches_every_parameter():
    model = CausalTransformer([3, 2, 4], d_model=8, num_layers=2, num_heads=2, dim_feedforward=8,
                              token_positions=[None, None, [0.1, 0.3, 0.6, float("nan")]])
    x = torch.stack([torch.randint(0, k, (32,)) for k in model.cardinalities], 1)
    out = causal_loss(model, x, PowerSchedule(3), num_samples=2, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_input_errors():
    model = CausalTransformer([3, 2], d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    x = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="permutation"):
        model(x, torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.tensor([[0, 1, 2]]))
    with pytest.raises(TypeError, match="dtype"):
        model(x, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]))   # 2 is column 1's MASK id
    with pytest.raises(ValueError, match="order-space"):
        model_loss(model, x, PowerSchedule(2), model.mask_ids, model.offsets, estimator="tspace")


# ----------------------------------------------------------------------------- the objective
W_CASES = [[1.0, 1.0, 1.0], [0.2, 1.0, 5.0], [0.05, 1.0, 20.0]]


@pytest.mark.parametrize("w", W_CASES)
def test_whole_order_estimate_is_unbiased(w):
    model = peaky_model(SIZES)
    rows = torch.tensor([[0, 2, 1], [1, 0, 0], [1, 1, 1]])
    orders = all_orders(3)
    w_t = torch.tensor(w, dtype=torch.float64)
    exact = sum((plackett_luce_log_prob(w_t, orders).exp()
                 * order_nll(model, x.expand(len(orders), -1), orders)).sum() for x in rows) / len(rows)
    with torch.no_grad():
        out = causal_loss(model, rows.repeat(8_000, 1), schedule_with(w).double(), num_samples=2,
                          generator=torch.Generator().manual_seed(3))
    samples = out.samples.flatten()
    stderr = samples.std() / samples.numel() ** 0.5
    assert abs(samples.mean() - exact) < 5 * stderr, (samples.mean(), exact, stderr)


@pytest.mark.parametrize("w", W_CASES[1:])
def test_rloo_gradient_matches_enumerated_gradient(w):
    model = peaky_model(SIZES, seed=1)
    rows = torch.tensor([[0, 2, 1], [1, 0, 0], [1, 1, 1]])
    orders = all_orders(3)
    log_w = torch.log(torch.tensor(w, dtype=torch.float64)).requires_grad_(True)
    nll = torch.stack([order_nll(model, x.expand(len(orders), -1), orders) for x in rows])  # [B, L!]
    exact = (plackett_luce_log_prob(log_w.exp(), orders).exp() * nll).sum(1).mean()
    (exact_grad,) = torch.autograd.grad(exact, log_w)
    schedule = schedule_with(w).double()
    generator = torch.Generator().manual_seed(4)
    grads = repeated_gradients(lambda: causal_loss(model, rows.repeat(1_000, 1), schedule, num_samples=2,
                                                   generator=generator).loss, schedule.log_w, [schedule])
    stderr = grads.std(0) / len(grads) ** 0.5
    assert exact_grad.abs().max() > 0.05          # the comparison below is not vacuous
    assert ((grads.mean(0) - exact_grad).abs() < 5 * stderr + 1e-6).all(), (grads.mean(0), exact_grad, stderr)


# ----------------------------------------------------------------------------- the samplers
NUM_SAMPLES = 40_000


def draw(model, w, **options):
    return sample_tokens(model, w, model.mask_ids, model.offsets, NUM_SAMPLES, batch_size=NUM_SAMPLES,
                         decode=kind_of(model).decoder(options.get("speculative")), generator=torch.Generator().manual_seed(options.pop("seed", 0)), **options)


@pytest.mark.parametrize("options", [dict(), dict(speculative=1), dict(speculative=2), dict(speculative=5)],
                         ids=["steps=L", "speculative=1", "speculative=2", "speculative=5"])
def test_exact_samplers_follow_the_models_joint(options):
    model = peaky_model(SIZES)
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    stats = DecodeStats()
    tokens = draw(model, w, stats=stats, **options)
    assert chi_square_p(row_counts(tokens, SIZES), exact_joint(model, w)) > 1e-4
    if "speculative" in options:
        assert 1 <= stats.columns_per_round <= min(options["speculative"] + 1, 3)


@pytest.mark.parametrize("options", [dict(), dict(steps=2), dict(speculative=2)],
                         ids=["steps=L", "steps=2", "speculative=2"])
def test_static_samplers_record_the_orders_they_use(options):
    """stats.orders gets each batch's orders: the PL(w) draws with known columns first that the
    sampler makes first from its generator, so a generator seeded alike gives them again."""
    model = peaky_model(SIZES)
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    known = torch.tensor([[1, 0, 0]]).repeat(10, 1)
    known_mask = torch.zeros(10, 3, dtype=torch.bool)
    known_mask[:5, 2] = True

    def recorded(batch_size):
        stats = DecodeStats(orders=[])
        sample_tokens(model, w, model.mask_ids, model.offsets, 10, batch_size=batch_size, known=known,
                      known_mask=known_mask, decode=kind_of(model).decoder(options.get("speculative")), generator=torch.Generator().manual_seed(3), stats=stats, **options)
        return stats.orders

    batches = recorded(4)
    assert [len(o) for o in batches] == [4, 4, 2]
    orders = torch.cat(batches)
    assert (orders.sort(1).values == torch.arange(3)).all() and (orders[:5, 0] == 2).all()
    (whole,) = recorded(10)
    expected, _ = known_first_order(w, 10, known_mask, torch.Generator().manual_seed(3))
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)


def test_speculative_decoding_reveals_several_columns_per_round():
    model = peaky_model([2, 2, 2, 2, 2, 2], seed=3)
    with torch.no_grad():   # near-independent columns: drafts should mostly be accepted
        model.heads.weight.mul_(0.05)
    stats = DecodeStats()
    sample_tokens(model, torch.ones(6, dtype=torch.float64), model.mask_ids, model.offsets, 2000,
                  speculative=4, decode=kind_of(model).decoder(4), stats=stats, generator=torch.Generator().manual_seed(0))
    assert stats.columns_per_round > 2.5 and stats.rows == 2000


def test_chunked_sampler_is_approximate_not_exact():
    """Guard for the chi-square tests: one step (all columns from the empty prefix) gives the
    product of first-position marginals, which the exact joint rejects."""
    model = peaky_model(SIZES)
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    tokens = draw(model, w, steps=1)
    assert chi_square_p(row_counts(tokens, SIZES), exact_joint(model, w)) < 1e-6


@pytest.mark.parametrize("options", [dict(), dict(speculative=2)], ids=["steps=L", "speculative=2"])
def test_conditioned_samplers_follow_the_conditional(options):
    """Known column 1 = 2: the rest follows sum over PL orders of the unknown columns, placed
    after the known one, of p(x_unknown | x_known, order)."""
    model = peaky_model(SIZES)
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    known = torch.tensor([[0, 2, 0]]).expand(NUM_SAMPLES, -1)
    known_mask = torch.tensor([False, True, False])
    tokens = draw(model, w, known=known, known_mask=known_mask, **options)
    assert bool((tokens[:, 1] == 2).all())
    rows = all_rows(SIZES)
    rows = rows[rows[:, 1] == 2]
    unknown_orders = torch.tensor([[1, 0, 2], [1, 2, 0]])
    log_pl = plackett_luce_log_prob(w[[0, 2]], torch.tensor([[0, 1], [1, 0]]))
    x = rows.repeat_interleave(2, 0)
    order = unknown_orders.repeat(len(rows), 1)
    log_p = -order_nll(model, x, order, mask=~known_mask.expand_as(x)).view(len(rows), 2)
    probs = torch.logsumexp(log_p + log_pl, 1).exp()
    counts = row_counts(tokens, SIZES)[row_counts(rows, SIZES) > 0]
    assert chi_square_p(counts, probs) > 1e-4


def test_speculative_needs_the_causal_model_and_excludes_steps():
    from fastmdm.models import ColumnTransformer
    bidirectional = ColumnTransformer(SIZES, d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    w = torch.ones(3)
    with pytest.raises(ValueError, match="causal"):
        kind_of(bidirectional).decoder(speculative=2)
    model = peaky_model(SIZES)
    with pytest.raises(ValueError, match="not both"):
        sample_tokens(model, w.double(), model.mask_ids, model.offsets, 4, steps=2, speculative=2,
                      decode=kind_of(model).decoder(2))
    with pytest.raises(ValueError, match="speculative"):
        sample_tokens(model, w.double(), model.mask_ids, model.offsets, 4, speculative=0,
                      decode=kind_of(model).decoder(0))


@pytest.mark.parametrize("rows, heads, queries, slots, width", [(5, 4, 2, 17, 12), (3, 1, 1, 3, 1), (1, 2, 7, 9, 5)])
def test_cached_attention_equals_sdpa(rows, heads, queries, slots, width):
    """The decoding step's attention (reference: batched matmuls, additive mask, each query's
    own key) against SDPA over the slots followed by the queries' own keys, with the boolean
    mask: random values and positions, a query that may see only slot 0, float64, so both
    compute the same sums and agree to rounding (1e-12). No token is written (slot S - 1 is
    the trash slot, beyond every position)."""
    generator = torch.Generator().manual_seed(rows * 100 + slots)
    q, k, v, own_k, own_v = (torch.randn(rows, heads, length, width, generator=generator, dtype=torch.float64)
                             for length in (queries, slots, slots, queries, queries))
    sees = torch.randint(0, slots - 1, (rows, queries), generator=generator)
    sees[0, 0] = 0
    allowed = (torch.arange(slots) <= sees[..., None]).unsqueeze(1)
    itself = torch.eye(queries, dtype=torch.bool).expand(rows, 1, -1, -1)
    expected = attend(q, torch.cat([k, own_k], 2), torch.cat([v, own_v], 2), torch.cat([allowed, itself], -1))
    trash = torch.full((rows, queries), slots - 1)
    attended, _, _ = reference.cached_attention(q, own_k, own_v, k, v.clone(), sees, trash)
    torch.testing.assert_close(attended, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_cached_attention_writes_like_scatter(grad):
    """Cache writes against scatter along the slot axis, for random per-row slots (and no
    token at all): in place without autograd, into a copy (the given cache intact) with it."""
    generator = torch.Generator().manual_seed(int(grad))
    for tokens_per_row in (3, 1, 0):
        keys, values = (torch.randn(6, 4, 9, 5, generator=generator, dtype=torch.float64) for _ in range(2))
        q, k, v = (torch.randn(6, 4, tokens_per_row, 5, generator=generator, dtype=torch.float64) for _ in range(3))
        slots = torch.stack([torch.randperm(9, generator=generator)[:tokens_per_row] for _ in range(6)])
        positions = torch.zeros(6, tokens_per_row, dtype=torch.long)
        expected = [cache.scatter(2, slots[:, None, :, None].expand_as(k), tokens)
                    for cache, tokens in ((keys, k), (values, v))]
        before = [keys.clone(), values.clone()]
        with torch.set_grad_enabled(grad):
            _, *written = ops.cached_attention(q.requires_grad_(grad), k, v, keys, values, positions, slots)
        for new, given, old, want in zip(written, (keys, values), before, expected):
            torch.testing.assert_close(new, want, rtol=0, atol=0)
            assert (new.data_ptr() == given.data_ptr()) != grad
            torch.testing.assert_close(given, old if grad else want, rtol=0, atol=0)
