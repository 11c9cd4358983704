"""The public API's promises, checked where users call them (TabularMDM.sample, .impute, .save).

The sampler tests hand w and the denoiser to `sample_tokens` directly, so they cannot see the
API forgetting to pass the learned weights, the known cells or the temperature. Here a model
is fitted through the API on a 3-column table (2 x 3 x 2 values, every row enumerable), then
given large random weights: its conditionals are far from uniform and disagree between orders,
so the joint it samples depends on the order distribution PL(w) (a trained model's consistent
conditionals would hide the order). The exact distribution every promise implies is computed
by enumeration from the denoiser's own cross entropy, and the sampled rows are compared with
it by Pearson's chi-square at p > 1e-4 (seeded, so deterministic). Each test also shows its
power: the distribution a broken API would give (uniform order, temperature ignored, known
cells ignored) must be rejected at p < 1e-6 by the same rows.
"""
import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from test_causal import all_rows, chi_square_p, row_counts

from fastmdm import TabularMDM

SIZES = [2, 3, 2]
COLUMNS = ["a", "b", "c"]
W = [0.2, 1.0, 5.0]
NUM_ROWS = 20_000
TINY_MODEL = dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=16)
ACCEPT, REJECT = 1e-4, 1e-6


def small_table(rows: int = 200, seed: int = 0) -> pd.DataFrame:
    """Column a takes values a0, a1; b: b0..b2; c: c0, c1 (encoded as tokens 0..K-1)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({name: rng.choice([f"{name}{v}" for v in range(k)], rows)
                         for name, k in zip(COLUMNS, SIZES)})


def peaky_model(architecture: str, table: pd.DataFrame | None = None, sizes=SIZES, w=W, seed: int = 0) -> TabularMDM:
    """A model fitted through the API (one epoch) on `table` (default `small_table()`, whose
    columns have `sizes` values), then given large random weights (from `seed`) and w."""
    model = TabularMDM(architecture=architecture, model=TINY_MODEL, epochs=1, batch_size=64,
                       progress=False).fit(small_table() if table is None else table, validation=None)
    assert model.codec.cardinalities == [k + 1 for k in sizes]   # the values, then "other"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.denoiser.named_parameters():
            if "norm" not in name:
                parameter.copy_(0.8 * torch.randn(parameter.shape, generator=generator))
        # Training never shows these uncapped columns' "other" token, and a trained model gives
        # it almost no mass; the random weights would give it a share, so it is switched off
        # and the enumeration covers the table's values.
        other = model.denoiser.offsets[1:] - 1
        model.denoiser.heads.bias[other] = -1e4
        model.schedule.log_w.copy_(torch.log(torch.tensor(w)))
    return model


@pytest.fixture(scope="module")
def bidirectional():
    return peaky_model("bidirectional")


@pytest.fixture(scope="module")
def causal():
    return peaky_model("causal")


def order_log_prob(denoiser, x: torch.Tensor, order: torch.Tensor, num_known: int) -> torch.Tensor:
    """log prod_{i >= num_known} p(x_{order_i} | x_{order_<i}) per row, from the model's own
    weighted cross entropy (one call per position for the bidirectional model, whose input
    masks the columns not yet revealed; one call for the causal model, which reads the order)."""
    ones = torch.ones(x.shape, dtype=torch.float64)
    position = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1]).expand_as(order))
    if getattr(denoiser, "causal", False):
        return -denoiser(x, order, targets=x, weight=ones, mask=position >= num_known)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(num_known, x.shape[1]):
        x_t = torch.where(position < i, x, denoiser.mask_ids.expand_as(x))
        total -= denoiser(x_t, targets=x, weight=ones, mask=position == i)
    return total


def exact_distribution(model: TabularMDM, *, w=None, temperature: float = 1.0,
                       known: dict[int, int] | None = None) -> torch.Tensor:
    """p(row) that sample() promises, for every row of the table with the known columns
    {column: token} (in row_counts order): sum over orders pi, the known columns first and
    the others ~ PL(w) among themselves, of prod_i softmax(logits / temperature)(x_pi_i).
    Dividing the logits by T is dividing the heads' weight and bias by T; temperature 0 is
    the limit (argmax), taken as T = 1e-6 in float64."""
    known = known or {}
    denoiser = copy.deepcopy(model.denoiser).double()
    with torch.no_grad():
        scale = 1e6 if temperature == 0 else 1 / temperature
        denoiser.heads.weight.mul_(scale)
        denoiser.heads.bias.mul_(scale)
    log_w = torch.log(model.schedule.w.detach().double() if w is None else torch.tensor(w, dtype=torch.float64))
    free = [c for c in range(len(SIZES)) if c not in known]
    rows = all_rows(SIZES)
    for column, token in known.items():
        rows = rows[rows[:, column] == token]
    orders, log_pl = [], []
    for suffix in itertools.permutations(free):
        orders.append(list(known) + list(suffix))
        log_pl.append(sum(log_w[c] - torch.logsumexp(log_w[list(suffix[i:])], 0) for i, c in enumerate(suffix)))
    orders, log_pl = torch.tensor(orders), torch.stack(log_pl)
    x = rows.repeat_interleave(len(orders), 0)
    with torch.no_grad():
        log_p = order_log_prob(denoiser, x, orders.repeat(len(rows), 1), len(known)).view(len(rows), len(orders))
    return torch.logsumexp(log_p + log_pl, 1).exp()


def p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """chi_square_p over the rows of positive probability; 0 if a row of probability 0 occurs
    (at temperature 0 most rows are impossible; with one possible row, every draw is it)."""
    possible = probs > 1e-12
    if counts[~possible].sum() > 0:
        return 0.0
    if possible.sum() == 1:
        return 1.0
    return chi_square_p(counts[possible], probs[possible])


def tokens_of(model: TabularMDM, frame: pd.DataFrame) -> torch.Tensor:
    return model.codec.encode(frame[COLUMNS])


def free_counts(tokens: torch.Tensor, known: dict[int, int]) -> torch.Tensor:
    """Counts of the rows with the known columns set, in the order of exact_distribution(known=...)."""
    counts = row_counts(tokens, SIZES)
    rows = all_rows(SIZES)
    keep = torch.ones(len(rows), dtype=torch.bool)
    for column, token in known.items():
        keep &= rows[:, column] == token
    return counts[keep]


def test_a_seed_reproduces_the_rows_and_no_seed_draws_fresh_ones(bidirectional):
    first = bidirectional.sample(50, seed=3)
    pd.testing.assert_frame_equal(bidirectional.sample(50, seed=3), first)
    assert not bidirectional.sample(50, seed=4).equals(first)
    assert not bidirectional.sample(50).equals(bidirectional.sample(50))
    holes = pd.DataFrame({"a": [None] * 50, "b": [None] * 50, "c": [None] * 50})
    filled = bidirectional.impute(holes, seed=3)
    pd.testing.assert_frame_equal(bidirectional.impute(holes, seed=3), filled)
    assert not bidirectional.impute(holes, seed=4).equals(filled)
    assert not bidirectional.impute(holes).equals(bidirectional.impute(holes))


def test_one_step_draws_every_column_from_the_empty_prefix(bidirectional):
    """steps=1 reveals all columns in one denoiser call: the rows follow the product of the
    all-masked conditionals, which the exact joint (steps = L) rejects."""
    counts = row_counts(tokens_of(bidirectional, bidirectional.sample(NUM_ROWS, steps=1, seed=5)), SIZES)
    rows = all_rows(SIZES)
    denoiser = copy.deepcopy(bidirectional.denoiser).double()
    with torch.no_grad():
        masked = denoiser.mask_ids.expand_as(rows)
        product = torch.exp(-denoiser(masked, targets=rows, weight=torch.ones(rows.shape, dtype=torch.float64),
                                      mask=torch.ones(rows.shape, dtype=torch.bool)))
    assert p_value(counts, product) > ACCEPT
    assert p_value(counts, exact_distribution(bidirectional)) < REJECT


def test_speculative_decoding_is_refused_for_the_bidirectional_model(bidirectional):
    holes = pd.DataFrame({"a": [None], "b": ["b1"], "c": [None]})
    with pytest.raises(ValueError, match="causal"):
        bidirectional.sample(5, speculative=2)
    with pytest.raises(ValueError, match="causal"):
        bidirectional.impute(holes, speculative=2)


def test_sample_follows_the_learned_order_distribution(bidirectional):
    """sample() draws each row's order from PL(model.weights): the rows follow the mixture over
    orders with those weights, not the one with uniform orders (w = 1)."""
    torch.testing.assert_close(torch.tensor(bidirectional.weights.to_numpy()), torch.tensor(W))
    counts = row_counts(tokens_of(bidirectional, bidirectional.sample(NUM_ROWS, seed=0)), SIZES)
    assert p_value(counts, exact_distribution(bidirectional)) > ACCEPT
    assert p_value(counts, exact_distribution(bidirectional, w=[1.0, 1.0, 1.0])) < REJECT


@pytest.mark.parametrize("temperature", [0.5, 0.0])
@pytest.mark.parametrize("architecture, options", [("bidirectional", {}), ("causal", dict(speculative=2))],
                         ids=["bidirectional", "causal-speculative"])
def test_temperature_reshapes_every_conditional(request, architecture, options, temperature):
    """Each column is drawn from softmax(logits / T), T = 0 the argmax (every order then gives
    one row); speculative decoding stays exact at any temperature."""
    model = request.getfixturevalue(architecture)
    synth = model.sample(NUM_ROWS, temperature=temperature, seed=1, **options)
    counts = row_counts(tokens_of(model, synth), SIZES)
    assert p_value(counts, exact_distribution(model, temperature=temperature)) > ACCEPT
    assert p_value(counts, exact_distribution(model)) < REJECT


@pytest.mark.parametrize("architecture, options", [("bidirectional", {}), ("causal", dict(speculative=2))],
                         ids=["bidirectional", "causal-speculative"])
def test_conditions_are_sampled_given(request, architecture, options):
    """conditions={"b": "b2"}: b is kept, and a, c follow the model's conditional given b = b2
    (b first in every order), not the free marginal with b written back afterwards."""
    model = request.getfixturevalue(architecture)
    synth = model.sample(NUM_ROWS, conditions={"b": "b2"}, seed=2, **options)
    assert (synth["b"] == "b2").all()
    counts = free_counts(tokens_of(model, synth), {1: 2})
    assert p_value(counts, exact_distribution(model, known={1: 2})) > ACCEPT
    free_marginal = exact_distribution(model).view(SIZES).sum(1).flatten()
    assert p_value(counts, free_marginal) < REJECT


def test_impute_samples_each_row_given_its_known_cells(bidirectional):
    """Rows with different missing cells: each row's NaNs follow the conditional given that
    row's known cells, which are returned as given."""
    half = NUM_ROWS // 2
    holes = pd.DataFrame({"a": [None] * half + ["a1"] * half, "b": ["b2"] * half + [None] * half,
                          "c": [None] * half + ["c0"] * half}, index=np.arange(NUM_ROWS) * 3)
    filled = bidirectional.impute(holes, seed=3)
    assert filled.index.equals(holes.index) and filled.notna().all().all()
    known = holes.notna()
    assert (filled[known] == holes[known]).sum().sum() == known.sum().sum()
    tokens = tokens_of(bidirectional, filled)
    for part, given in ((slice(0, half), {1: 2}), (slice(half, None), {0: 1, 2: 0})):
        counts = free_counts(tokens[part], given)
        assert p_value(counts, exact_distribution(bidirectional, known=given)) > ACCEPT
    free_marginal = exact_distribution(bidirectional).view(SIZES).sum(1).flatten()
    assert p_value(free_counts(tokens[:half], {1: 2}), free_marginal) < REJECT
    greedy = tokens_of(bidirectional, bidirectional.impute(holes.iloc[:half], temperature=0, seed=4))
    assert p_value(free_counts(greedy, {1: 2}), exact_distribution(bidirectional, temperature=0, known={1: 2})) > ACCEPT


def test_fitted_and_saved_weights_are_the_averaged_ones(tmp_path):
    """fit() ends on the EMA weights (denoiser and schedule), and save() writes those: the
    checkpoint written alongside holds both sets, and they differ."""
    checkpoint, saved = tmp_path / "run.ckpt", tmp_path / "model.pt"
    model = TabularMDM(model=TINY_MODEL, epochs=2, batch_size=64, progress=False, ema_decay=0.9)
    model.fit(small_table(), validation=None, checkpoint=checkpoint)
    model.save(saved)
    run, written = (torch.load(p, weights_only=True) for p in (checkpoint, saved))
    assert any(not torch.equal(run["ema"][k], run["denoiser"][k]) for k in run["ema"])
    for key, value in run["ema"].items():
        assert torch.equal(written["denoiser"][key], value), key
    assert torch.equal(written["schedule"]["log_w"], run["ema_schedule"]["log_w"])
    assert not torch.equal(run["schedule"]["log_w"], run["ema_schedule"]["log_w"])
    loaded = TabularMDM.load(saved)
    pd.testing.assert_series_equal(loaded.weights, model.weights)
    assert loaded.history == model.history and len(model.history) == 2
