"""predict_proba, predict and log_prob against the model's own joint, enumerated.

The models are the promise tests' (tests/test_api_promises.py): fitted through the API on a
3-column table (2 x 3 x 2 values), then given large random weights, so that their
conditionals are far from uniform and disagree between orders. Each exact quantity is
computed from the denoiser's own cross entropy for every row and order.
"""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from test_api_promises import COLUMNS, SIZES, W, peaky_model, small_table
from test_causal import all_rows

from fastmdm import TabularMDM
from fastmdm.data.numeric import NumericColumn
from fastmdm.predict import numeric_quantiles

TARGET = 2   # column c


@pytest.fixture(scope="module", params=["causal", "bidirectional"])
def model(request):
    return peaky_model(request.param)


def frame_of(model: TabularMDM, tokens: torch.Tensor) -> pd.DataFrame:
    return model.codec.decode(tokens, generator=torch.Generator().manual_seed(0))


def next_log_prob(model: TabularMDM, x: torch.Tensor, order: list[int], num_known: int) -> torch.Tensor:
    """log p(x_{order[num_known]} | x_{order[:num_known]}) per row of x, the known cells in that
    order (the causal model reads it; the bidirectional one sees them as a set)."""
    denoiser = model.denoiser.double()
    position = torch.empty(len(order), dtype=torch.long)
    position[order] = torch.arange(len(order))
    ones = torch.ones(x.shape, dtype=torch.float64)
    scored = (position == num_known).expand_as(x)
    with torch.no_grad():
        if denoiser.causal:
            out = -denoiser(x, torch.tensor(order).expand_as(x), targets=x, weight=ones, mask=scored)
        else:
            x_t = torch.where(position < num_known, x, denoiser.mask_ids.expand_as(x))
            out = -denoiser(x_t, targets=x, weight=ones, mask=scored)
    model.denoiser.float()
    return out


def exact_conditional(model: TabularMDM, prefix: torch.Tensor, known: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(c | the known cells) [rows, 2] averaged over the known cells' orders by their PL(w)
    probability, the largest difference between two orders' conditionals [rows]), for rows
    holding the `known` columns' tokens in `prefix` [rows, L]; the cells not known come after c."""
    w = torch.tensor(W, dtype=torch.float64)
    rest = [c for c in range(len(SIZES)) if c not in known and c != TARGET]
    per_order, weights = [], []
    for known_order in itertools.permutations(known):
        weight = 1.0
        for i, column in enumerate(known_order):
            weight *= float(w[column] / w[list(known_order[i:])].sum())
        order = list(known_order) + [TARGET] + rest
        columns = []
        for value in range(SIZES[TARGET]):
            x = prefix.clone()
            x[:, TARGET] = value
            columns.append(next_log_prob(model, x, order, len(known)).exp())
        per_order.append(torch.stack(columns, 1))
        weights.append(weight)
    stacked = torch.stack(per_order)
    spread = (stacked.amax(0) - stacked.amin(0)).amax(1)
    return (stacked * torch.tensor(weights, dtype=torch.float64)[:, None, None]).sum(0), spread


def test_predict_proba_is_the_models_exact_conditional(model):
    """Every (a, b) with c predicted: equal to the conditional enumerated from the model's own
    cross entropy (for the causal model, the average over the two orders of a and b, which
    predict_proba estimates from `orders` draws: within 5 standard errors of that draw); the
    marginal p(c), a predictor that ignores the features, is not."""
    rows = all_rows(SIZES)
    rows = rows[rows[:, TARGET] == 0]
    orders = 4096
    probs = model.predict_proba(frame_of(model, rows).drop(columns="c"), target="c", orders=orders)
    assert list(probs.columns) == ["c0", "c1"]
    expected, spread = exact_conditional(model, rows, known=[0, 1])
    error = torch.tensor(probs.to_numpy()) - expected
    tolerance = 5 * spread * 0.5 / orders ** 0.5 + 1e-9 if model.denoiser.causal else torch.full_like(spread, 1e-6)
    assert bool((error.abs().amax(1) <= tolerance).all()), (error, tolerance)
    if model.denoiser.causal:
        assert float(spread.max()) > 0.01   # the orders disagree: the average is what is checked
    nothing_known = model.predict_proba(pd.DataFrame(index=range(len(rows))), target="c").to_numpy()
    marginal_error = torch.tensor(nothing_known) - expected
    assert float(marginal_error.abs().max()) > 0.1
    assert np.allclose(probs.sum(1), 1.0)


def test_cells_left_unknown_come_after_the_target(model):
    """b missing (NaN) or absent: c is predicted from a alone, b marginalised by coming after c."""
    rows = all_rows(SIZES)
    rows = rows[(rows[:, 1] == 0) & (rows[:, TARGET] == 0)]
    expected, _ = exact_conditional(model, rows, known=[0])
    frame = frame_of(model, rows).assign(b=np.nan)
    for given in (frame, frame.drop(columns=["b", "c"])):
        probs = model.predict_proba(given, target="c", orders=3)
        np.testing.assert_allclose(probs.to_numpy(), expected.numpy(), atol=1e-6)


def test_predict_takes_the_most_likely_class_and_keeps_the_index(model):
    frame = small_table(50, seed=3).set_index(pd.Index(np.arange(50) * 7))
    probs = model.predict_proba(frame, target="a")
    labels = model.predict(frame, target="a")
    assert labels.index.equals(frame.index) and probs.index.equals(frame.index)
    assert (labels == probs.idxmax(axis=1)).all()
    pd.testing.assert_frame_equal(model.predict_proba(frame, target="a"), probs)   # seeded


def elbo_and_log_p(model: TabularMDM) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the table, E_pi log p(x | pi) (the ELBO) and log E_pi p(x | pi) = log p(x),
    pi ~ PL(w), by enumerating the 6 orders."""
    rows = all_rows(SIZES)
    log_w = torch.log(torch.tensor(W, dtype=torch.float64))
    per_order, log_pl = [], []
    for order in itertools.permutations(range(len(SIZES))):
        log_pl.append(sum(log_w[c] - torch.logsumexp(log_w[list(order[i:])], 0) for i, c in enumerate(order)))
        per_order.append(sum(next_log_prob(model, rows, list(order), i) for i in range(len(SIZES))))
    log_p_orders = torch.stack(per_order, 1)
    log_pl = torch.stack(log_pl)
    return (log_p_orders * log_pl.exp()).sum(1), torch.logsumexp(log_p_orders + log_pl, 1)


def test_log_prob_is_the_rows_elbo_below_log_p(model):
    """Per row, log_prob estimates the enumerated ELBO (within 5 standard errors of its draws),
    which lies below the exact log p(row); a model's rows' p sum to 1."""
    rows = all_rows(SIZES)
    elbo, log_p = elbo_and_log_p(model)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-6)
    assert bool((elbo <= log_p + 1e-9).all()) and float((log_p - elbo).max()) > 0.01
    frame = frame_of(model, rows)
    repeats = 400
    draws = torch.tensor(model.log_prob(pd.concat([frame] * repeats), num_samples=1).to_numpy()).view(repeats, -1)
    error = draws.std(0) / repeats ** 0.5
    estimate = torch.tensor(model.log_prob(frame, num_samples=repeats, seed=1000).to_numpy())
    assert bool(((draws.mean(0) - elbo).abs() <= 5 * error + 1e-9).all())
    assert bool(((estimate - elbo).abs() <= 5 * error + 1e-9).all())


def test_log_prob_averages_to_minus_nelbo(model):
    frame = small_table(300, seed=4)
    scores = model.log_prob(frame)
    assert scores.index.equals(frame.index) and scores.name == "log_prob"
    assert scores.mean() == pytest.approx(-model.nelbo(frame), rel=1e-9)
    other = model.log_prob(frame, seed=7)
    assert not np.allclose(other, scores)
    assert abs(other.mean() - scores.mean()) < 5 * other.std() / len(frame) ** 0.5


def test_numeric_quantiles_follow_the_bins_and_the_sketch():
    """One bin certain: every quantile inside that bin's values, increasing with the level. The
    bins' training shares: the column's own quantiles, within a bin's width."""
    values = pd.Series(np.random.default_rng(0).gamma(2.0, 10.0, 5000))
    column = NumericColumn.fit("x", values, has_missing=False, num_bins=16)
    low, high = column.value_bounds()
    one_hot = np.eye(column.num_values)[[3, 9]]
    quantiles = numeric_quantiles(column, one_hot, [0.1, 0.5, 0.9])
    for row, k in enumerate([3, 9]):
        assert low[k] <= quantiles[row, 0] < quantiles[row, 1] < quantiles[row, 2] <= high[k]
    shares = np.bincount(column.encode(values, np.zeros(len(values), dtype=bool)), minlength=column.num_values)
    levels = [0.25, 0.5, 0.75]
    found = numeric_quantiles(column, shares[None, :] / shares.sum(), levels)[0]
    width = (high - low).max()
    np.testing.assert_allclose(found, values.quantile(levels).to_numpy(), atol=width / 8)


def test_predict_gives_a_numeric_targets_median_and_intervals():
    rng = np.random.default_rng(1)
    group = rng.choice(["low", "high"], 500)
    table = pd.DataFrame({"group": group, "x": np.where(group == "low", 10.0, 50.0) + rng.normal(0, 2, 500)})
    model = TabularMDM(model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32), steps=60,
                       batch_size=64, progress=False, num_bins=16).fit(table, validation=None)
    given = pd.DataFrame({"group": ["low", "high"]})
    median = model.predict(given, target="x")
    assert median.name == "x" and median.dtype == np.float64
    assert 5 < median[0] < 15 and 45 < median[1] < 55
    intervals = model.predict(given, target="x", quantiles=[0.05, 0.95])
    assert list(intervals.columns) == [0.05, 0.95]
    assert ((intervals[0.05] < median) & (median < intervals[0.95])).all()


def test_bad_input_is_refused_by_name(model):
    frame = small_table(5)
    with pytest.raises(ValueError, match="'income' is not a column"):
        model.predict_proba(frame, target="income")
    with pytest.raises(ValueError, match=r"not fitted on: \['d'\]"):
        model.predict_proba(frame.assign(d=1), target="c")
    with pytest.raises(ValueError, match="quantiles need a numeric target"):
        model.predict(frame, target="c", quantiles=[0.5])
    with pytest.raises(ValueError, match="orders must be"):
        model.predict_proba(frame, target="c", orders=0)
    with pytest.raises(ValueError, match="num_samples must be"):
        model.log_prob(frame, num_samples=0)
    with pytest.raises(TypeError, match="DataFrame"):
        model.predict_proba(frame.to_numpy(), target="c")
    assert list(frame.columns) == COLUMNS


def test_numeric_targets_refuse_predict_proba_and_bad_quantiles():
    table = pd.DataFrame({"g": ["a", "b"] * 50, "x": np.arange(100.0)})
    model = TabularMDM(model=dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=16), steps=2,
                       progress=False).fit(table, validation=None)
    with pytest.raises(ValueError, match="'x' is numeric"):
        model.predict_proba(table, target="x")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        model.predict(table, target="x", quantiles=[0.5, 1.0])


def test_the_command_line_writes_the_probabilities_and_quantiles(tmp_path, capsys):
    from fastmdm import cli
    rng = np.random.default_rng(2)
    table = pd.DataFrame({"g": rng.choice(["a", "b"], 200), "h": rng.choice(["u", "v", "w"], 200),
                          "x": rng.normal(0, 1, 200)})
    model = TabularMDM(model=dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=16), steps=3,
                       progress=False).fit(table, validation=None)
    model.save(tmp_path / "model.pt")
    rows = table.drop(columns="g").iloc[:20]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert cli.main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "rows.csv"), "--target", "g",
                     "-o", str(tmp_path / "out.parquet")]) == 0
    written = pd.read_parquet(tmp_path / "out.parquet")
    expected = model.predict_proba(pd.read_csv(tmp_path / "rows.csv"), target="g")
    np.testing.assert_allclose(written[["a", "b"]].to_numpy(), expected.to_numpy())
    assert cli.main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "rows.csv"), "--target", "x",
                     "--quantile", "0.1", "--quantile", "0.9", "-o", str(tmp_path / "x.csv")]) == 0
    numbers = pd.read_csv(tmp_path / "x.csv")
    assert list(numbers.columns) == ["x", "q0.1", "q0.9"] and len(numbers) == 20
    assert ((numbers["q0.1"] <= numbers["x"]) & (numbers["x"] <= numbers["q0.9"])).all()
    assert cli.main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "rows.csv"), "--target", "income",
                     "-o", str(tmp_path / "bad.csv")]) == 2
    assert "'income' is not a column" in capsys.readouterr().err
    assert not (tmp_path / "bad.csv").exists()
