"""Seeded training is bitwise reproducible on several threads, for every model kind.

Two threads, so that any operation whose additions depend on thread timing (atomics, a
reduction split by whichever thread comes first) shows up as different weights. The table
and batch are large enough for torch's parallel CPU kernels to engage (an indexed add over
rows x columns x d_model above torch's grain size of 32,768 elements).
"""
import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

from fastmdm import TabularMDM

# The contextual model searches orders for a fixed number of epochs (by default a share of
# the run's, which would differ between the 1-epoch and the 2-epoch run of the resume test).
KINDS = {"bidirectional": dict(architecture="bidirectional"),
         "causal-static": dict(architecture="causal", order="static"),
         "causal-contextual": dict(architecture="causal", order="contextual", order_search_epochs=1)}


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wide_table(rows: int = 512, columns: int = 12, seed: int = 0) -> pd.DataFrame:
    """Categorical columns of 3-6 values, each column a noisy copy of the previous one."""
    rng = np.random.default_rng(seed)
    data, previous = {}, rng.integers(0, 3, rows)
    for c in range(columns):
        size = 3 + c % 4
        value = np.where(rng.random(rows) < 0.7, previous % size, rng.integers(0, size, rows))
        data[f"c{c}"] = value.astype(str)
        previous = value
    return pd.DataFrame(data)


def model(kind: dict, epochs: int) -> TabularMDM:
    return TabularMDM(**kind, model=dict(d_model=16, num_layers=2, num_heads=2, dim_feedforward=32),
                      epochs=epochs, batch_size=256, seed=3, progress=False, warmup_steps=2,
                      device="cpu")


def assert_same_weights(a: TabularMDM, b: TabularMDM) -> None:
    for (name, x), y in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()):
        assert torch.equal(x, y), name
    assert torch.equal(a.schedule.log_w, b.schedule.log_w)


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_two_seeded_runs_on_two_threads_end_with_the_same_weights(kind):
    table = wide_table()
    with threads(2):
        first = model(kind, epochs=2).fit(table, validation=None)
        second = model(kind, epochs=2).fit(table, validation=None)
    assert_same_weights(first, second)


@pytest.mark.parametrize("kind", list(KINDS.values())[1:], ids=list(KINDS)[1:])
def test_a_resumed_run_on_two_threads_equals_an_uninterrupted_one(kind, tmp_path):
    table = wide_table()
    with threads(2):
        straight = model(kind, epochs=2).fit(table, validation=None)
        model(kind, epochs=1).fit(table, validation=None, checkpoint=tmp_path / "run.pt")
        resumed = model(kind, epochs=2).fit(table, validation=None, checkpoint=tmp_path / "run.pt", resume=True)
    assert_same_weights(straight, resumed)


def test_fit_leaves_the_callers_random_streams_as_they_were():
    """Training seeds its own streams: a caller's torch and numpy draws after fit() are the
    ones they would have been without it."""
    from test_api import correlated_table
    table = correlated_table(120, seed=1)
    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    TabularMDM(epochs=1, batch_size=64, progress=False,
               model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=16)).fit(table)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
