"""Save, load and resume for every model kind, with settings away from the defaults.

A model written by save() must load to the same weights, the same samples for a seed and
the same NELBO; a run interrupted after its first epoch and resumed from its checkpoint
must end bit for bit where an uninterrupted run ends, and save and load like one. A file
of another format version is refused with a message naming both versions.
"""
import dataclasses

import pandas as pd
import pytest
import torch

from fastmdm import TabularMDM
from test_api import correlated_table

#: One entry per model kind (architecture x order), each with non-default settings.
KINDS = {
    "bidirectional": dict(architecture="bidirectional", estimator="tspace", num_bins=7,
                          model=dict(d_model=24, num_layers=2, num_heads=2, dim_feedforward=32)),
    "causal": dict(architecture="causal", learn_schedule=False, num_bins=5,
                   model=dict(d_model=16, num_layers=2, num_heads=4, dim_feedforward=24)),
    "contextual": dict(order="contextual", order_search_epochs=1, order_lr=3e-3,
                       model=dict(d_model=16, num_layers=2, num_heads=2, dim_feedforward=16)),
}
TABLE = correlated_table(160, seed=3)
EPOCHS = 2


def build(kind: str, epochs: int = EPOCHS) -> TabularMDM:
    return TabularMDM(epochs=epochs, batch_size=64, warmup_steps=2, progress=False, **KINDS[kind])


def assert_same_model(loaded: TabularMDM, original: TabularMDM) -> None:
    """Same settings, weights, history (but its timings), samples for a seed and NELBO."""
    assert (loaded.architecture, loaded.order, loaded.learn_schedule) == \
        (original.architecture, original.order, original.learn_schedule)
    model_settings = lambda m: (m.model_options, m.num_bins, m.category_cap,   # noqa: E731
                                dataclasses.replace(m.config, progress=True, bf16=True))
    assert model_settings(loaded) == model_settings(original)
    assert loaded.codec.cardinalities == original.codec.cardinalities
    for (name, want), got in zip(original.denoiser.state_dict().items(), loaded.denoiser.state_dict().values()):
        assert torch.equal(got, want), name
    assert torch.equal(loaded.schedule.log_w, original.schedule.log_w)
    untimed = lambda history: [dataclasses.replace(r, seconds=0.0) for r in history]   # noqa: E731
    assert untimed(loaded.history) == untimed(original.history)
    pd.testing.assert_frame_equal(loaded.sample(40, seed=5), original.sample(40, seed=5))
    assert loaded.nelbo(TABLE) == original.nelbo(TABLE)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_save_load_round_trip(kind, tmp_path):
    model = build(kind).fit(TABLE, validation=0.2)
    model.save(tmp_path / "model.pt")
    assert_same_model(TabularMDM.load(tmp_path / "model.pt"), model)


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_equals_an_uninterrupted_one_and_round_trips(kind, tmp_path):
    straight = build(kind).fit(TABLE, validation=0.2)
    checkpoint = tmp_path / "run.ckpt"
    build(kind, epochs=1).fit(TABLE, validation=0.2, checkpoint=checkpoint)   # interrupted after epoch 1
    resumed = build(kind).fit(TABLE, validation=0.2, checkpoint=checkpoint, resume=True)
    assert_same_model(resumed, straight)
    assert_same_model(TabularMDM.load(checkpoint), straight)   # the last checkpoint loads as a model
    resumed.save(tmp_path / "model.pt")
    assert_same_model(TabularMDM.load(tmp_path / "model.pt"), straight)


def test_a_file_of_another_format_version_is_refused_by_name(tmp_path):
    model = build("causal", epochs=1)
    model.fit(TABLE, validation=None, checkpoint=tmp_path / "run.ckpt")
    model.save(tmp_path / "model.pt")
    current = torch.load(tmp_path / "model.pt", weights_only=True)["format"]
    for name in ("model.pt", "run.ckpt"):
        state = torch.load(tmp_path / name, weights_only=True)
        state["format"] = "fastmdm-tabular-0"
        torch.save(state, tmp_path / name)
    message = f"format 'fastmdm-tabular-0'.*reads '{current}'"
    with pytest.raises(ValueError, match=message):
        TabularMDM.load(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=message):
        build("causal").fit(TABLE, validation=None, checkpoint=tmp_path / "run.ckpt", resume=True)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastmdm model file"):
        TabularMDM.load(tmp_path / "other.pt")


def test_every_setting_is_restored_by_load_and_run_time_choices_are_not_saved(tmp_path):
    """Codec settings (bins, category cap) come back with the model; `progress` and `bf16`
    are how this process runs, not part of the model, so a file does not carry them."""
    model = TabularMDM(num_bins=6, category_cap=7, epochs=1, batch_size=64, progress=False, bf16=False,
                       model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=16)).fit(TABLE)
    model.save(tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "progress" not in saved["train_config"] and "bf16" not in saved["train_config"]
    loaded = TabularMDM.load(tmp_path / "model.pt")
    assert (loaded.num_bins, loaded.category_cap) == (6, 7)
    assert loaded.config.progress and loaded.config.bf16   # this process's defaults
