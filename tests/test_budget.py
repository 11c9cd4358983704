"""Training budgets that follow the table, early stopping on the validation NELBO, the
convergence warnings, and the steps a model records."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import fastmdm.train
from fastmdm import TabularMDM
from fastmdm.data import TableCodec
from fastmdm.data.privacy import MIN_ROWS_PER_VALUE
from fastmdm.train import (LARGE_TABLE_EPOCHS, MAX_CELLS_SEEN, MAX_FLOOR_STEPS, MIN_CELLS_SEEN, MIN_ROWS_SEEN,
                           TrainConfig, marginal_nelbo)

TINY_MODEL = dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32)


def pairs(rows: int, shift: int, seed: int) -> pd.DataFrame:
    """b = a + shift (mod 5): shift 0 in training and 1 in validation makes the validation
    NELBO rise once the model learns the training rows' dependence."""
    a = np.random.default_rng(seed).integers(0, 5, rows)
    return pd.DataFrame({"a": a.astype(str), "b": ((a + shift) % 5).astype(str)})


def small(**options) -> TabularMDM:
    return TabularMDM(**{"model": TINY_MODEL, "progress": False, "lr": 5e-3, **options})


def convergence_warnings(fit) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    return [str(w.message) for w in caught if "converge" in str(w.message)]


@pytest.mark.parametrize("rows, columns, batch_size, steps", [
    (40, 15, 32, 2000), (270, 15, 32, 2000), (1_350, 15, 64, 2000), (4_500, 15, 256, 1000),
    (9_000, 15, 512, 510), (15_400, 15, 1024, 450), (29_300, 15, 1024, 840),
    (300_000, 15, 1024, 2084), (10_000_000, 15, 1024, 2084), (10_000_000, 100, 1024, 313),
    (1_350, 74, 64, 811), (4_500, 2, 256, 1000)])
def test_default_budget_follows_the_table(rows, columns, batch_size, steps):
    """Small tables get small batches and at least the floor of rows or cells seen (capped in
    steps); from ~15,000 rows, 30 epochs of 1,024-row batches, up to the cap on cells seen,
    which the largest tables reach whatever their rows; warm-up and checks scale with the steps."""
    budget = TrainConfig().budget(rows, columns)
    assert (budget.batch_size, budget.steps) == (batch_size, steps)
    assert budget.steps_per_epoch == max(1, rows // budget.batch_size)
    cells_per_step = budget.batch_size * columns
    assert budget.steps <= math.ceil(MAX_CELLS_SEEN / cells_per_step)
    floor = min(MAX_FLOOR_STEPS, MIN_ROWS_SEEN / budget.batch_size, MIN_CELLS_SEEN / cells_per_step)
    assert budget.steps >= min(max(floor, LARGE_TABLE_EPOCHS * budget.steps_per_epoch),
                               MAX_CELLS_SEEN / cells_per_step)
    assert budget.warmup_steps == round(0.1 * budget.steps)
    capped = budget.steps < LARGE_TABLE_EPOCHS * budget.steps_per_epoch
    assert capped or budget.check_every % budget.steps_per_epoch == 0     # whole epochs unless capped
    assert 20 <= budget.steps / budget.check_every <= 45


def test_explicit_budgets_and_errors():
    assert TrainConfig(epochs=3, batch_size=100).budget(1000, 10).steps == 30
    assert TrainConfig(steps=7).budget(1000, 10).steps == 7
    assert TrainConfig(steps=7, warmup_steps=2).budget(1000, 10).warmup_steps == 2
    with pytest.raises(ValueError, match="steps or epochs"):
        TrainConfig(steps=10, epochs=2)
    for name in ("steps", "epochs", "batch_size", "patience"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: 0})


def test_marginal_nelbo_is_the_sum_of_column_entropies():
    """Against pandas' value counts on a table with a missing value and an infrequent category
    (each value repeated MIN_ROWS_PER_VALUE times, so that it has a token of its own)."""
    df = pd.concat([pd.DataFrame({"a": ["x", "y", "y", "z", "y", "x", None, "y"], "b": [1, 1, 2, 2, 2, 2, 2, 2]})]
                   * MIN_ROWS_PER_VALUE, ignore_index=True)
    codec = TableCodec.fit(df, categorical=["a", "b"])
    expected = sum(-(p * np.log(p)).sum() for p in (df[c].value_counts(normalize=True, dropna=False)
                                                    for c in df.columns))
    assert marginal_nelbo(codec.encode(df), codec.mask_ids, chunk_rows=3) == pytest.approx(expected, rel=1e-12)


def test_early_stopping_keeps_the_best_weights():
    """The validation NELBO rises after the first check: training stops `patience` checks
    after the best one, and the model holds the EMA weights of that check (its NELBO on the
    validation rows is the best one recorded, to the bit: same estimator, same seed)."""
    val = pairs(100, 1, 1)
    model = small(steps=300).fit(pairs(300, 0, 0), validation=val)
    vals = [r.val_nelbo for r in model.history]
    best = int(np.argmin(vals))
    assert vals[-1] > vals[best] + 0.5
    assert len(vals) == best + 1 + model.config.patience and model.training_steps < 300
    assert model.nelbo(val) == vals[best]


def test_warnings_fire_on_undertrained_runs_only():
    train, val = pairs(300, 0, 0), pairs(100, 0, 1)
    # (lr so small the model stays near its start, the uniform NELBO: 2 log 5 nats, the marginal level)
    marginal = convergence_warnings(lambda: small(steps=5, lr=1e-6).fit(train, validation=val))
    assert len(marginal) == 1 and "marginal" in marginal[0] and "steps=10" in marginal[0]
    falling = convergence_warnings(lambda: small(steps=40).fit(train, validation=val))
    assert len(falling) == 1 and "still falling" in falling[0] and "steps=80" in falling[0]
    converged = small(steps=300)
    assert convergence_warnings(lambda: converged.fit(train, validation=val)) == []
    assert converged.training_steps < 300          # early stopping ended it
    assert convergence_warnings(lambda: small(steps=2).fit(train, validation=None)) == []   # nothing to judge by


def test_steps_are_logged_saved_and_reloaded(tmp_path, capsys):
    model = small(steps=20, progress=True).fit(pairs(300, 0, 0), validation=0.2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert model.training_steps == 20 and lines[-1].endswith("[20/20 steps]") and "step    20" in lines[-1]
    assert [r.step for r in model.history] == sorted({r.step for r in model.history})
    model.save(tmp_path / "m.pt")
    loaded = TabularMDM.load(tmp_path / "m.pt")
    assert loaded.training_steps == 20 and loaded.history == model.history


def test_cli_train_prints_the_steps(tmp_path, capsys):
    from fastmdm.cli import main as cli_main
    pairs(300, 0, 0).to_csv(tmp_path / "t.csv", index=False)
    assert cli_main(["train", str(tmp_path / "t.csv"), "-o", str(tmp_path / "m.pt"), "--steps", "9"]) == 0
    assert "trained 9 steps" in capsys.readouterr().out


def test_resume_with_early_stopping_is_exact(tmp_path, monkeypatch):
    """A run that stops early, killed at its third check (after its best one) and resumed,
    ends bit for bit where an uninterrupted run does, stopping at the same step."""
    train, val = pairs(300, 0, 0), pairs(100, 1, 1)
    straight = small(steps=300).fit(train, validation=val)
    save, saves = fastmdm.train.atomic_save, []

    def save_then_crash_at_third(*args):
        save(*args)
        saves.append(1)
        if len(saves) == 3:
            raise KeyboardInterrupt

    path = tmp_path / "run.ckpt"
    monkeypatch.setattr(fastmdm.train, "atomic_save", save_then_crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        small(steps=300).fit(train, validation=val, checkpoint=path)
    monkeypatch.setattr(fastmdm.train, "atomic_save", save)
    resumed = small(steps=300).fit(train, validation=val, checkpoint=path, resume=True)
    for (name, a), b in zip(straight.denoiser.state_dict().items(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    def curve(model):
        return [(r.step, r.train_nelbo, r.val_nelbo, r.w) for r in model.history]
    assert curve(resumed) == curve(straight) and resumed.training_steps == straight.training_steps < 300


def test_a_diverged_loss_stops_training_with_an_error(monkeypatch):
    """Steps check no values, so a NaN loss is caught where the NELBO is read, at the check."""
    def diverged_step(trainer, batch):
        trainer.step += 1
        return torch.tensor(float("nan"))
    monkeypatch.setattr(fastmdm.train.Trainer, "_train_step", diverged_step)
    with pytest.raises(FloatingPointError, match="diverged.*lower the learning rate"):
        small(steps=3, batch_size=8).fit(pairs(64, 0, seed=0), validation=None)
