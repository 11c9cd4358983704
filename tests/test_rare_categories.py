"""A categorical column's rare token is never drawn: exactness through TabularMDM.

The rule (fastmdm.decoding.ColumnLayout): every draw of a categorical cell comes from the
model's conditional renormalised over the column's frequent categories. Checked as in
test_api_promises, on its enumerable table (2 x 3 x 2 values) with large random weights,
except that the rare tokens keep the share the random weights give them (the promise tests
switch them off): the distribution the rule promises is computed by enumeration (every order,
each draw's probability divided by 1 - p(rare token)), and the sampled rows are compared with
it by Pearson's chi-square. Power: the same rows reject the model's distribution over the
table's rows with the rows that hold a rare token dropped (which a sampler that rejects
marker rows would give), and rows sampled with the marker kept reject the rule's distribution.
"""
import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from test_api_promises import ACCEPT, COLUMNS, NUM_ROWS, REJECT, SIZES, exact_distribution, p_value, peaky_model
from test_causal import all_rows, row_counts

from fastmdm.data import OTHER_LABEL
from fastmdm.decoding.common import ImportanceWeights


def with_rare_mass(model):
    """The peaky model with its rare tokens' head bias back at 0: the random weights give
    them a share of every conditional, different from cell to cell."""
    with torch.no_grad():
        model.denoiser.heads.bias[model.denoiser.offsets[1:] - 1] = 0.0
    return model


@pytest.fixture(scope="module", params=["bidirectional", "causal"])
def rare(request):
    return with_rare_mass(peaky_model(request.param, seed=1))


def renormalised_log_prob(denoiser, x: torch.Tensor, order: torch.Tensor, num_known: int) -> torch.Tensor:
    """log prod_{i >= num_known} p(x_{order_i} | prefix) / (1 - p(rare | prefix)) per row: the
    row's probability in this order when no draw takes a rare token."""
    ones = torch.ones(x.shape, dtype=torch.float64)
    rare_tokens = (denoiser.mask_ids - 1).expand_as(x)
    position = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1]).expand_as(order))
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(num_known, x.shape[1]):
        at = position == i
        if getattr(denoiser, "causal", False):
            def log_p(targets):
                return -denoiser(x, order, targets=targets, weight=ones, mask=at)
        else:
            x_t = torch.where(position < i, x, denoiser.mask_ids.expand_as(x))

            def log_p(targets):
                return -denoiser(x_t, targets=targets, weight=ones, mask=at)
        total += log_p(x) - torch.log1p(-log_p(rare_tokens).exp())
    return total


def redraw_distribution(model, *, known: dict[int, int] | None = None, first: tuple = (),
                        allowed: dict[int, list[int]] | None = None) -> torch.Tensor:
    """p(row) that the rule promises over the rows of the table (row_counts order) with the
    known columns {column: token}: the known columns first, then the columns `first` (set
    conditions: PL(w) among them), then the others (PL(w)); with `allowed` {column: tokens},
    normalised over the rows that satisfy it."""
    known, allowed = known or {}, allowed or {}
    denoiser = copy.deepcopy(model.denoiser).double()
    log_w = torch.log(model.schedule.w.detach().double())
    rows = all_rows(SIZES)
    for column, token in known.items():
        rows = rows[rows[:, column] == token]
    rest = [c for c in range(len(SIZES)) if c not in known and c not in first]

    def log_pl(columns):
        return sum((log_w[c] - torch.logsumexp(log_w[list(columns[i:])], 0) for i, c in enumerate(columns)),
                   torch.tensor(0.0, dtype=torch.float64))

    orders, weights = [], []
    for head in itertools.permutations(first):
        for tail in itertools.permutations(rest):
            orders.append(list(known) + list(head) + list(tail))
            weights.append(log_pl(head) + log_pl(tail))
    orders, weights = torch.tensor(orders), torch.stack(weights)
    x = rows.repeat_interleave(len(orders), 0)
    with torch.no_grad():
        log_p = renormalised_log_prob(denoiser, x, orders.repeat(len(rows), 1), len(known))
    probs = torch.logsumexp(log_p.view(len(rows), len(orders)) + weights, 1).exp()
    for column, values in allowed.items():
        probs = probs * torch.isin(rows[:, column], torch.tensor(values))
    return probs / probs.sum()


def counts_of(model, frame: pd.DataFrame, known: dict[int, int] | None = None) -> torch.Tensor:
    """Counts of the sampled rows in row_counts order (over the rows with the known columns)."""
    tokens = model.codec.encode(frame[COLUMNS])
    assert bool((tokens < torch.tensor(SIZES)).all())   # no rare token: no "(other)" cell
    counts = row_counts(tokens, SIZES)
    keep = torch.ones(len(counts), dtype=torch.bool)
    for column, token in (known or {}).items():
        keep &= all_rows(SIZES)[:, column] == token
    return counts[keep]


@pytest.mark.parametrize("options", [{}, dict(speculative=2)], ids=["exact", "speculative"])
def test_sample_draws_each_cell_from_the_conditional_without_the_rare_token(rare, options):
    if options and rare.architecture != "causal":
        pytest.skip("speculative decoding is causal")
    synth = rare.sample(NUM_ROWS, seed=11, **options)
    assert not (synth == OTHER_LABEL).any().any()
    counts = counts_of(rare, synth)
    expected = redraw_distribution(rare)
    assert p_value(counts, expected) > ACCEPT
    # Power: dropping the rows that hold a rare token is another distribution.
    assert p_value(counts, exact_distribution(rare)) < REJECT


def test_the_marker_setting_draws_the_rare_token(rare):
    """rare_marker=True: generated rare cells read "(other)", which the rule's distribution
    gives probability 0; the model itself is unchanged."""
    marked_model = copy.copy(rare)
    marked_model.rare_marker = True
    marked = marked_model.sample(2_000, seed=12)
    assert (marked == OTHER_LABEL).any().any()
    assert p_value(row_counts(rare.codec.encode(marked[COLUMNS]), [k + 1 for k in SIZES]),
                   torch.zeros(int(np.prod([k + 1 for k in SIZES])), dtype=torch.float64).index_put_(
                       (torch.from_numpy(np.ravel_multi_index(all_rows(SIZES).T.numpy(), [k + 1 for k in SIZES])),),
                       redraw_distribution(rare))) < REJECT


def test_impute_draws_without_the_rare_token(rare):
    holes = pd.DataFrame({"a": [None] * NUM_ROWS, "b": ["b2"] * NUM_ROWS, "c": [None] * NUM_ROWS})
    filled = rare.impute(holes, seed=13)
    assert (filled["b"] == "b2").all()
    assert p_value(counts_of(rare, filled, {1: 2}), redraw_distribution(rare, known={1: 2})) > ACCEPT


def test_set_conditions_weigh_rows_by_the_conditional_without_the_rare_token(rare, monkeypatch):
    """Two set conditions: both columns drawn first from their restricted conditionals, rows
    resampled by importance weights, each the share of the renormalised conditional the set
    lets through. The set of both of a's values forbids only the rare token, so its weight
    is 1 under the rule, and the model's own weight (1 - p(rare)) would bias the rows."""
    conditions = {"a": ["a0", "a1"], "b": ["b0", "b2"]}
    synth = rare.sample(NUM_ROWS, conditions=conditions, seed=14)
    assert synth["b"].isin(["b0", "b2"]).all()
    expected = redraw_distribution(rare, first=(0, 1), allowed={1: [0, 2]})
    assert p_value(counts_of(rare, synth), expected) > ACCEPT

    # Power: weights that are shares of the model's own conditional (rare token included).
    def draw_by_the_model_weights(self, heads, h, rows, columns, x, mask_id, temperature, generator):
        table, index = self.restrictions.cells(x, rows, columns, mask_id)
        values, log_mass = heads.sample(h, columns, temperature, generator, log_weights=table, restriction=index)
        self.log_weights.index_add_(0, rows, log_mass.double())
        return values
    monkeypatch.setattr(ImportanceWeights, "draw", draw_by_the_model_weights)
    biased = rare.sample(NUM_ROWS, conditions=conditions, seed=14)
    assert p_value(counts_of(rare, biased), expected) < REJECT
