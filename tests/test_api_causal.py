"""TabularMDM with the causal architecture end to end: fit, sample (exact, chunked and
speculative), condition, impute, save/load and the CLI flag."""
import numpy as np
import pandas as pd
import pytest
import torch

from fastmdm import TabularMDM
from fastmdm.cli import main as cli_main
from test_api import TINY_MODEL, correlated_table, tiny


@pytest.fixture(scope="module")
def causal():
    return tiny(architecture="causal", epochs=12, lr=5e-3).fit(correlated_table(), validation=0.2)


def test_causal_model_learns_and_samples_the_dependency(causal):
    assert causal.history[-1].val_nelbo < causal.history[0].val_nelbo - 0.5
    for options in (dict(), dict(speculative=3), dict(steps=2)):
        synth = causal.sample(1500, seed=0, **options)
        assert list(synth.columns) == ["color", "size", "amount", "count"]
        red = synth[synth["color"] == "red"]
        if "steps" not in options:   # exact modes keep the learned dependency (see test_api)
            assert (red["size"] < 3).mean() > 0.7, options


def test_conditions_and_impute(causal):
    synth = causal.sample(200, conditions={"color": "blue"}, seed=1, speculative=2)
    assert (synth["color"] == "blue").all()
    holes = correlated_table(50, seed=5)
    holes.loc[::2, "size"] = np.nan
    filled = causal.impute(holes, seed=0)
    assert filled["size"].notna().all()
    pd.testing.assert_series_equal(filled["color"], holes["color"])


def test_save_load_keeps_the_architecture(causal, tmp_path):
    causal.save(tmp_path / "m.pt")
    loaded = TabularMDM.load(tmp_path / "m.pt")
    assert loaded.architecture == "causal" and loaded.denoiser.causal
    pd.testing.assert_frame_equal(loaded.sample(30, seed=2), causal.sample(30, seed=2))


def test_unknown_architecture_and_bad_estimator():
    with pytest.raises(ValueError, match="architecture"):
        TabularMDM(architecture="recurrent")
    with pytest.raises(ValueError, match="order-space"):
        tiny(architecture="causal", estimator="tspace", epochs=1).fit(correlated_table(100))


def train_with_cli(tmp_path, *flags):
    """Train one epoch on a small CSV through the command line; the model's path."""
    data = tmp_path / "t.csv"
    correlated_table(200).to_csv(data, index=False)
    model = tmp_path / "m.pt"
    assert cli_main(["train", str(data), "-o", str(model), "--epochs", "1", *flags]) == 0
    return model


def test_cli_trains_a_causal_model(tmp_path):
    model = train_with_cli(tmp_path, "--architecture", "causal")
    assert TabularMDM.load(model).architecture == "causal"
    out = tmp_path / "s.csv"
    assert cli_main(["sample", str(model), "-n", "20", "-o", str(out), "--speculative", "2"]) == 0
    assert len(pd.read_csv(out)) == 20


# ----------------------------------------------------------------------------- contextual orders
@pytest.fixture(scope="module")
def contextual():
    return tiny(order="contextual", epochs=12, lr=5e-3).fit(correlated_table(), validation=0.2)


def test_contextual_model_end_to_end(contextual, tmp_path):
    assert contextual.architecture == "causal" and contextual.denoiser.contextual
    assert contextual.history[-1].val_nelbo < contextual.history[0].val_nelbo - 0.5
    synth = contextual.sample(1500, seed=0)
    red = synth[synth["color"] == "red"]
    assert (red["size"] < 3).mean() > 0.7
    assert (contextual.sample(100, conditions={"color": "blue"}, seed=1, steps=2)["color"] == "blue").all()
    holes = correlated_table(50, seed=5)
    holes.loc[::2, "size"] = np.nan
    filled = contextual.impute(holes, seed=0)
    assert filled["size"].notna().all()
    pd.testing.assert_series_equal(filled["color"], holes["color"])
    orders = contextual.generation_orders(200, seed=0)
    assert orders.shape == (200, 4) and all(sorted(row) == sorted(synth.columns) for row in orders.to_numpy())
    contextual.save(tmp_path / "m.pt")
    loaded = TabularMDM.load(tmp_path / "m.pt")
    assert loaded.order == "contextual"
    pd.testing.assert_frame_equal(loaded.sample(30, seed=2), contextual.sample(30, seed=2))
    pd.testing.assert_frame_equal(loaded.generation_orders(30, seed=3), contextual.generation_orders(30, seed=3))
    with pytest.raises(ValueError, match="static order"):
        contextual.sample(10, speculative=2)


def test_the_posterior_keeps_its_running_mean_through_save_and_load(tmp_path):
    model = tiny(order="contextual", epochs=1).fit(correlated_table(300), validation=None)
    mean = model.denoiser.order_posterior.column_mean
    assert bool(mean.abs().max() > 0)
    model.save(tmp_path / "m.pt")
    loaded = TabularMDM.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded.denoiser.order_posterior.column_mean, mean, rtol=0, atol=0)


def order_moved(model) -> dict:
    """Which order parameters left their start (w = 1, the zero-initialized output layers of a
    contextual model's policy and posterior)."""
    moved = dict(w=bool(model.schedule.log_w.detach().abs().max() > 0))
    if model.order == "contextual":
        moved.update(policy=bool(model.denoiser.order_policy.context.weight.detach().abs().max() > 0),
                     posterior=bool(model.denoiser.order_posterior.out.weight.detach().abs().max() > 0))
    return moved


def test_a_contextual_policy_and_posterior_learn_at_order_lr_and_w_at_schedule_lr():
    """A contextual model's policy and posterior learn at order_lr, w at schedule_lr (each
    rate touches only its own); a static model's w learns at schedule_lr (order_lr does not
    touch it)."""
    table = correlated_table(300)
    no_order_lr = tiny(order="contextual", epochs=1, order_lr=0.0).fit(table, validation=None)
    assert order_moved(no_order_lr) == dict(w=True, policy=False, posterior=False)
    no_schedule_lr = tiny(order="contextual", epochs=1, schedule_lr=0.0).fit(table, validation=None)
    assert order_moved(no_schedule_lr) == dict(w=False, policy=True, posterior=True)
    static = tiny(epochs=1, order_lr=0.0).fit(table, validation=None)
    assert order_moved(static) == dict(w=True)
    static_held = tiny(epochs=1, schedule_lr=0.0).fit(table, validation=None)
    assert order_moved(static_held) == dict(w=False)
    with pytest.raises(ValueError, match="learning rates"):
        tiny(order_lr=-1e-3)


def test_contextual_needs_the_causal_architecture():
    with pytest.raises(ValueError, match="causal architecture"):
        TabularMDM(architecture="bidirectional", order="contextual")
    with pytest.raises(ValueError, match="order must be"):
        TabularMDM(order="learned")


def test_cli_trains_and_plots_a_contextual_model(tmp_path):
    model = train_with_cli(tmp_path, "--order", "contextual")
    assert TabularMDM.load(model).order == "contextual"
    assert cli_main(["plot", str(model), "-o", str(tmp_path / "orders.png")]) == 0
    assert (tmp_path / "orders.png").stat().st_size > 10_000
