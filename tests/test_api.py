"""End to end: TabularMDM fit / sample / condition / impute / save / load, resume, DDP, CLI."""
import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fastmdm import TabularMDM
from fastmdm.cli import main as cli_main
from fastmdm.train import TrainConfig

TINY_MODEL = dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32)


def correlated_table(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """color determines size's range; amount is a float with missing values; count an int."""
    rng = np.random.default_rng(seed)
    color = rng.choice(["red", "green", "blue"], size=rows, p=[0.5, 0.3, 0.2])
    size = np.where(color == "red", rng.integers(0, 3, rows), rng.integers(5, 9, rows))
    amount = rng.gamma(2.0, 10.0, rows) + (color == "blue") * 50
    amount[rng.random(rows) < 0.1] = np.nan
    return pd.DataFrame({"color": color, "size": size, "amount": amount,
                         "count": rng.integers(0, 1000, rows)})


def tiny(**options) -> TabularMDM:
    defaults = dict(model=TINY_MODEL, epochs=3, batch_size=128, progress=False, warmup_steps=5)
    defaults.update(options)
    return TabularMDM(**defaults)


@pytest.fixture(scope="module")
def fitted():
    return tiny(epochs=12, lr=5e-3).fit(correlated_table(), validation=0.2)


def test_training_lowers_validation_nelbo(fitted):
    history = fitted.history
    assert len(history) == 12
    assert history[-1].val_nelbo < history[0].val_nelbo - 0.5
    assert all(np.isfinite(r.train_nelbo) for r in history)


def test_sample_has_schema_and_learned_dependency(fitted):
    synth = fitted.sample(2000, seed=0)
    assert list(synth.columns) == ["color", "size", "amount", "count"]
    assert synth["size"].dtype.kind == "i" and synth["count"].dtype.kind == "i"
    assert set(synth["color"]) <= {"red", "green", "blue"}
    assert 0.02 < synth["amount"].isna().mean() < 0.25
    red = synth[synth["color"] == "red"]
    # In the data red always has size < 3 and others >= 5. Sampling the columns independently
    # would give about 0.5 for both rates; a tiny model after 12 epochs reaches ~0.8.
    assert (red["size"] < 3).mean() > 0.7 and (synth.loc[synth.color != "red", "size"] >= 5).mean() > 0.7


def test_conditioning_fixes_columns(fitted):
    synth = fitted.sample(300, conditions={"color": "blue"}, seed=1, steps=2)
    assert (synth["color"] == "blue").all()
    assert (synth["size"] >= 5).mean() > 0.7
    assert (fitted.sample(10, conditions={"color": "purple"}, seed=1)["color"] == "purple").all()  # unseen: "other"
    with pytest.raises(ValueError, match="does not have"):
        fitted.sample(10, conditions={"flavor": "sweet"})


def test_known_values_come_back_exactly_not_redrawn_from_their_token():
    """A numeric token is a bin and a rare category shares one token, so decoding draws a value
    from it: conditioned and imputed cells must be put back as given instead."""
    rng = np.random.default_rng(1)
    df = correlated_table(400).assign(shop=rng.choice([f"s{i}" for i in range(40)], 400))
    model = tiny(epochs=1, category_cap=5).fit(df, validation=None)   # most shops share the rare token
    rare = df["shop"].value_counts().index[-1]
    synth = model.sample(30, conditions={"amount": 12.3456, "shop": rare, "count": 17}, seed=0)
    assert (synth["amount"] == 12.3456).all() and (synth["shop"] == rare).all() and (synth["count"] == 17).all()
    assert synth["count"].dtype == df["count"].dtype
    frame = pd.DataFrame({"amount": [np.nan, 7.25, "3.5"], "shop": [rare, None, rare]})   # text, as from a CSV
    rows = model.sample(3, conditions=frame, seed=0)
    assert rows["amount"].tolist()[1:] == [7.25, 3.5] and rows["shop"].tolist()[::2] == [rare, rare]
    holes = df.iloc[:20].copy()
    holes.loc[holes.index[::2], "amount"] = np.nan
    filled = model.impute(holes, seed=0)
    known = holes["amount"].notna()
    assert (filled.loc[known, ["amount", "shop"]] == holes.loc[known, ["amount", "shop"]]).all().all()
    assert (filled["shop"] == holes["shop"]).all()


def test_impute_fills_only_missing(fitted):
    df = correlated_table(50, seed=5).drop(columns=[])
    df.loc[::3, "size"] = np.nan
    df.loc[1::4, "color"] = np.nan
    filled = fitted.impute(df, seed=0)
    assert filled["size"].notna().all() and filled["color"].notna().all()
    assert df["size"].dtype == np.float64 and filled["size"].dtype == np.int64  # the fitted dtype, holes filled
    known = df["size"].notna()
    assert (filled.loc[known, "size"] == df.loc[known, "size"]).all()
    assert filled.index.equals(df.index)


def test_save_load_round_trip(fitted, tmp_path):
    path = tmp_path / "model.pt"
    fitted.save(path)
    loaded = TabularMDM.load(path)
    pd.testing.assert_series_equal(loaded.weights, fitted.weights)
    pd.testing.assert_frame_equal(loaded.sample(40, seed=2), fitted.sample(40, seed=2))
    assert loaded.nelbo(correlated_table(200, seed=9)) == pytest.approx(fitted.nelbo(correlated_table(200, seed=9)))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"hello": 1}, path)
    with pytest.raises(ValueError, match="not a fastmdm model"):
        TabularMDM.load(path)


def test_unfitted_model_and_bad_arguments_raise(fitted):
    with pytest.raises(RuntimeError, match="not fitted"):
        TabularMDM().sample(5)
    with pytest.raises(ValueError, match="positive"):
        fitted.sample(0)
    with pytest.raises(ValueError, match="estimator"):
        TabularMDM(estimator="bogus")
    with pytest.raises(TypeError, match="DataFrame"):
        tiny().fit([[1, 2]])
    with pytest.raises(ValueError, match="no rows"):
        tiny().fit(correlated_table().iloc[:0])
    with pytest.raises(ValueError, match="schema"):
        fitted.nelbo(correlated_table().drop(columns=["count"]))


def test_resume_after_interruption_gives_identical_result(tmp_path):
    """Train 4 epochs straight vs 2 epochs, 'crash', resume to 4: same parameters bit for bit."""
    df = correlated_table(300)
    straight = tiny(epochs=4).fit(df, validation=None)
    path = tmp_path / "run.ckpt"
    tiny(epochs=2).fit(df, validation=None, checkpoint=path)
    resumed = tiny(epochs=4).fit(df, validation=None, checkpoint=path, resume=True)
    for (name, a), b in zip(straight.denoiser.state_dict().items(), resumed.denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.schedule.log_w, resumed.schedule.log_w)
    assert [r.train_nelbo for r in straight.history] == [r.train_nelbo for r in resumed.history]


@pytest.mark.parametrize("estimator, learn", [("tspace", True), ("order", False)])
def test_other_training_modes_run(estimator, learn):
    """Both estimators train (the validation NELBO falls); a fixed schedule keeps w = 1 exactly."""
    model = tiny(estimator=estimator, learn_schedule=learn, epochs=4, lr=5e-3).fit(correlated_table(300),
                                                                                    validation=0.2)
    assert model.history[-1].val_nelbo < model.history[0].val_nelbo - 0.2
    w = model.weights
    assert (w == 1.0).all() if not learn else (abs(np.log(w)) > 1e-3).all()


@pytest.mark.parametrize("order", ["static", "contextual"])
def test_torchrun_ddp_two_processes_stay_in_sync(tmp_path, order):
    """Launched by torchrun with gloo on CPU: both ranks end with identical, trained weights
    (for a contextual model, its order posterior's too: it is called outside DDP's forward)."""
    worker = os.path.join(os.path.dirname(__file__), "_ddp_train.py")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", worker, str(tmp_path), "-", order],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(a["log_w"], b["log_w"])
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert (a["log_w"] != 0).any()


def test_cli_train_sample_evaluate(tmp_path, capsys):
    data = tmp_path / "data.csv"
    correlated_table(300).to_csv(data, index=False)
    model = tmp_path / "model.pt"
    assert cli_main(["train", str(data), "-o", str(model), "--epochs", "2", "--batch-size", "128"]) == 0
    synth = tmp_path / "synth.csv"
    assert cli_main(["sample", str(model), "-n", "200", "-o", str(synth), "--steps", "2", "--seed", "0"]) == 0
    assert len(pd.read_csv(synth)) == 200
    assert cli_main(["evaluate", str(data), str(synth), "--no-reference", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "shape" in out and "real vs real" not in out
    png = tmp_path / "w.png"
    assert cli_main(["plot", str(model), "-o", str(png)]) == 0 and png.stat().st_size > 1000
    holes = tmp_path / "holes.csv"
    df = correlated_table(20, seed=4)
    df.loc[::2, "color"] = np.nan
    df.to_csv(holes, index=False)
    assert cli_main(["impute", str(model), str(holes), "-o", str(tmp_path / "filled.csv")]) == 0
    assert pd.read_csv(tmp_path / "filled.csv")["color"].notna().all()


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    assert cli_main(["train", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "m.pt")]) == 2
    assert "no such CSV" in capsys.readouterr().err


def test_train_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_fit_logs_one_line_per_epoch_without_a_terminal(capsys, monkeypatch, terminal):
    """With stderr not a terminal (a log, nohup, CI) there is no live bar: fit prints each
    epoch; on a terminal the bar shows progress instead. stderr is set here, so the outcome
    does not depend on how pytest was run (-s on a terminal or not)."""
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    tiny(epochs=2, progress=True).fit(correlated_table(300), validation=0.2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    if terminal:
        assert lines == [] and "training" in stderr.getvalue()
    else:
        assert len(lines) == 2 and lines[1].endswith("[2/2 steps]") and "validation NELBO" in lines[0]
        assert stderr.getvalue() == ""


def test_datetime_and_nullable_columns_end_to_end():
    rng = np.random.default_rng(0)
    df = correlated_table(400).assign(
        when=pd.Timestamp("2024-03-01", tz="Europe/Paris") + pd.to_timedelta(rng.integers(0, 10**6, 400), unit="s"),
        wait=pd.to_timedelta(rng.exponential(60, 400).round(), unit="s"),
        vip=pd.array(np.where(rng.random(400) < 0.2, None, rng.random(400) < 0.5), dtype="boolean"),
        count=lambda d: d["count"].astype("Int64"))
    model = tiny(epochs=1).fit(df, validation=None)
    synth = model.sample(50, seed=0)
    assert synth.dtypes.equals(df.dtypes)
    condition = "2024-03-05T12:00:00+01:00"  # text, as from a CSV or a form
    pinned = model.sample(20, conditions={"when": condition, "wait": "90s"}, seed=0)
    assert pinned.dtypes.equals(df.dtypes)
    assert (pinned["when"] == pd.Timestamp(condition)).all() and (pinned["wait"] == pd.Timedelta(90, "s")).all()
