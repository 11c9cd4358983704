"""Set and range conditions (fastmdm.conditions) through TabularMDM.sample.

Exactness is checked as in test_api_promises, for both architectures: a model fitted through
the API on a table small enough to enumerate (columns a: 0..2, b: 0..2 as integer categories,
c: c0/c1), given large
random weights so that its conditionals disagree between orders, and the sampled rows are
compared by chi-square with the distribution the conditions promise, computed by enumeration:
the restricted columns first in the order (PL(w) among themselves, then among the rest), each
row's probability times the indicator of the conditions, normalised. Each test also shows its
power against what a broken sampler would give.
"""
import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_api_promises import ACCEPT, REJECT, TINY_MODEL, order_log_prob, p_value, peaky_model
from test_causal import all_rows, row_counts

import fastmdm.decoding.common as decoding_common
from fastmdm import TabularMDM
from fastmdm.conditions import parse_condition_text
from fastmdm.decoding.common import resample

SIZES = [3, 3, 2]
W = [0.3, 1.0, 4.0]
NUM_ROWS = 20_000


def enumerable_table(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.integers(0, 3, rows), "b": rng.integers(0, 3, rows),
                         "c": rng.choice(["c0", "c1"], rows)})


@pytest.fixture(scope="module", params=["bidirectional", "causal"])
def peaky(request):
    return peaky_model(request.param, enumerable_table(), SIZES, W, seed=1)   # integer categories, then "other"


def conditional_distribution(model: TabularMDM, allowed: dict[int, list[int]], keep=None) -> torch.Tensor:
    """p(row | conditions) over all rows (row_counts order): orders with the restricted columns
    first, PL(w) among them and then among the others; rows outside the conditions (or, with
    `keep`, rows [R, L] -> bool [R] false) get 0."""
    denoiser = model.denoiser.double()
    log_w = torch.log(model.schedule.w.detach().double())
    rows = all_rows(SIZES)
    first, rest = list(allowed), [c for c in range(len(SIZES)) if c not in allowed]

    def log_pl(columns):
        return sum(log_w[c] - torch.logsumexp(log_w[list(columns[i:])], 0) for i, c in enumerate(columns))

    orders, weights = [], []
    for head in itertools.permutations(first):
        for tail in itertools.permutations(rest):
            orders.append(list(head) + list(tail))
            weights.append(log_pl(head) + log_pl(tail))
    orders, weights = torch.tensor(orders), torch.stack(weights)
    x = rows.repeat_interleave(len(orders), 0)
    with torch.no_grad():
        log_p = order_log_prob(denoiser, x, orders.repeat(len(rows), 1), 0).view(len(rows), len(orders))
    model.denoiser.float()
    probs = torch.logsumexp(log_p + weights, 1).exp()
    for column, values in allowed.items():
        probs = probs * torch.isin(rows[:, column], torch.tensor(values))
    if keep is not None:
        probs = probs * keep(rows)
    return probs / probs.sum()


def counts_of(model, synth):
    return row_counts(model.codec.encode(synth), SIZES)


def test_a_range_is_sampled_from_the_model_restricted_to_it(peaky):
    synth = peaky.sample(NUM_ROWS, conditions={"a": (1, 2)}, seed=3)
    assert synth["a"].between(1, 2).all()
    assert synth.attrs["effective_sample_size"] == pytest.approx(NUM_ROWS)   # one column first: equal weights
    counts = counts_of(peaky, synth)
    assert p_value(counts, conditional_distribution(peaky, {0: [1, 2]})) > ACCEPT
    # Power: the unconditional rows with a written back would follow another distribution.
    free = peaky.sample(NUM_ROWS, seed=3)
    rewritten = free.assign(a=np.where(free["a"] == 0, 1, free["a"]))
    assert p_value(counts, counts_of(peaky, rewritten).double() / NUM_ROWS) < REJECT


def test_two_conditions_are_exact_with_importance_resampling(peaky, monkeypatch):
    conditions = {"a": [0, 2], "b": (1, 2)}
    expected = conditional_distribution(peaky, {0: [0, 2], 1: [1, 2]})
    synth = peaky.sample(NUM_ROWS, conditions=conditions, seed=4)
    assert synth["a"].isin([0, 2]).all() and synth["b"].between(1, 2).all()
    assert 0.2 * NUM_ROWS < synth.attrs["effective_sample_size"] < NUM_ROWS
    assert p_value(counts_of(peaky, synth), expected) > ACCEPT
    # Power: without the weights (each column from its own restricted conditional, no
    # resampling) the same test rejects.
    def keep_every_row(log_weights, generator):
        return torch.arange(log_weights.numel()), float(log_weights.numel())
    monkeypatch.setattr(decoding_common, "resample", keep_every_row)
    unweighted = peaky.sample(NUM_ROWS, conditions=conditions, seed=4)
    assert p_value(counts_of(peaky, unweighted), expected) < REJECT


def test_a_rule_between_two_columns_is_exact(peaky, monkeypatch):
    """rules=["a <= b"] on integer columns (a token is a value, so the rule is exact): both
    columns first, b restricted to b >= a (or a to a <= b), rows resampled by the weights."""
    expected = conditional_distribution(peaky, {0: [0, 1, 2], 1: [0, 1, 2]}, keep=lambda r: r[:, 0] <= r[:, 1])
    synth = peaky.sample(NUM_ROWS, rules=["a <= b"], seed=5)
    assert (synth["a"] <= synth["b"]).all()
    assert p_value(counts_of(peaky, synth), expected) > ACCEPT
    monkeypatch.setattr(decoding_common, "resample",
                        lambda log_weights, generator: (torch.arange(log_weights.numel()), 1.0))
    assert p_value(counts_of(peaky, peaky.sample(NUM_ROWS, rules=["a <= b"], seed=5)), expected) < REJECT


# ------------------------------------------------------------------------------ any table
def mixed_table(rows: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    price = np.round(rng.lognormal(4, 1, rows), 2)
    return pd.DataFrame({
        "color": rng.choice(["red", "green", "blue", "black"], rows),
        "count": rng.integers(0, 500, rows),
        "price": np.where(rng.random(rows) < 0.1, np.nan, price),
        "level": rng.integers(1, 6, rows),
        "day": pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 365, rows), unit="D"),
    })


@pytest.fixture(scope="module")
def mixed():
    table = mixed_table()
    return TabularMDM(model=TINY_MODEL, epochs=2, batch_size=64, progress=False).fit(table, validation=None), table


@settings(max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow,
                                                                                    HealthCheck.function_scoped_fixture])
@given(count=st.tuples(st.integers(0, 499), st.integers(0, 499)),
       price=st.tuples(st.one_of(st.none(), st.floats(0, 400)), st.one_of(st.none(), st.floats(0, 400))),
       colors=st.sets(st.sampled_from(["red", "green", "blue", "black"]), min_size=1),
       level=st.tuples(st.integers(1, 5), st.integers(1, 5)), day=st.integers(0, 364), which=st.integers(1, 31),
       rules=st.lists(st.sampled_from(["count >= level", "price <= count", "level <= price", "count <= price"]),
                      max_size=2, unique=True))
def test_every_sampled_row_satisfies_its_conditions(mixed, count, price, colors, level, day, which, rules):
    model, _ = mixed
    low_day = pd.Timestamp("2020-01-01") + pd.Timedelta(days=day)
    candidates = {"count": tuple(sorted(count)), "price": price, "color": sorted(colors),
                  "level": tuple(sorted(level)), "day": (low_day, None)}
    conditions = {name: spec for bit, (name, spec) in enumerate(candidates.items()) if which >> bit & 1}
    if "price" in conditions and None not in price and price[0] > price[1]:
        with pytest.raises(ValueError, match="empty"):
            model.sample(10, conditions=conditions)
        return
    # A range is infeasible when it holds no value at the column's precision (counts: whole
    # numbers, price: cents) that rounds from the span of the column's quantile sketch.
    columns = {c["name"]: c for c in model.codec.state_dict()["columns"]}
    for name, half in (("count", 0.5), ("price", 0.005)):
        if name not in conditions:
            continue
        low, high = conditions[name]
        scale = 1 / (2 * half)
        low = -np.inf if low is None else np.ceil(low * scale) / scale
        high = np.inf if high is None else np.floor(high * scale) / scale
        sketch = columns[name]["sketch"]
        if low > high or low - half >= float(sketch[-1]) or high + half <= float(sketch[0]):
            with pytest.raises(ValueError, match="no value"):
                model.sample(10, conditions=conditions)
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            synth = model.sample(200, conditions=conditions, rules=rules, seed=0, batch_size=64)
        except ValueError as err:   # rules and ranges that contradict each other leave no row
            assert rules and "probability zero" in str(err)
            return
    for rule in rules:
        left, op, right = rule.split()
        assert ((synth[left] <= synth[right]) if op == "<=" else (synth[left] >= synth[right])).all(), rule
    checks = {"count": lambda s: s.between(*conditions["count"]),
              "price": lambda s: s.between(price[0] if price[0] is not None else -np.inf,
                                           price[1] if price[1] is not None else np.inf),
              "color": lambda s: s.isin(conditions["color"]),
              "level": lambda s: s.between(*conditions["level"]),
              "day": lambda s: s >= low_day}
    for name in conditions:
        assert checks[name](synth[name]).all(), (name, conditions[name], synth[name][~checks[name](synth[name])])
    if "price" in conditions:
        assert np.array_equal(np.round(synth["price"], 2), synth["price"])   # at the column's precision


def test_infeasible_conditions_fail_fast(mixed):
    model, _ = mixed
    with pytest.raises(ValueError, match="empty"):
        model.sample(5, conditions={"count": (10, 5)})
    with pytest.raises(ValueError, match="never had 'purple'"):
        model.sample(5, conditions={"color": ["red", "purple"]})
    with pytest.raises(ValueError, match="no category of the column lies in the range"):
        model.sample(5, conditions={"level": (7, 9)})
    with pytest.raises(ValueError, match="no value .* at the column's precision"):
        model.sample(5, conditions={"price": (10.001, 10.009)})
    with pytest.raises(ValueError, match="holds categories"):
        model.sample(5, conditions={"color": (1, 2)})
    assert model.sample(50, conditions={"color": ("b", "c")}, seed=0)["color"].isin(["black", "blue"]).all()
    with pytest.raises(ValueError, match="not a set"):
        model.sample(5, conditions={"price": [1.0, 2.0]})
    for rule, message in [("count < price", "a rule is"), ("count <= weight", "does not have"),
                          ("count <= count", "itself"), ("color <= count", "not numbers"),
                          ("day >= count", "times compare only with times")]:
        with pytest.raises(ValueError, match=message):
            model.sample(5, rules=[rule])
    # Conditions the model gives probability zero leave every importance weight at zero.
    with pytest.raises(ValueError, match="probability zero"):
        resample(torch.full((4,), -torch.inf), None)


def test_a_range_on_a_number_keeps_the_model_s_shape_inside_it(mixed):
    """Partly covered cells are weighted by the share inside the range: the conditioned
    values spread over the whole range, not only the cells entirely inside it."""
    model, table = mixed
    synth = model.sample(3000, conditions={"count": (100, 180)}, seed=5)
    assert synth["count"].between(100, 180).all()
    assert synth["count"].min() <= 105 and synth["count"].max() >= 175


def test_condition_text():
    assert parse_condition_text("age=30..40") == ("age", ("30", "40"))
    assert parse_condition_text("price=..500") == ("price", (None, "500"))
    assert parse_condition_text("workclass=Private|State-gov") == ("workclass", ["Private", "State-gov"])
    assert parse_condition_text("sex=Male") == ("sex", "Male")
    with pytest.raises(ValueError, match="column=value"):
        parse_condition_text("age")
