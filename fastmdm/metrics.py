"""Fidelity and utility metrics for synthetic tables, computed the way TabSyn / TabDiff report them.

* ``shape`` / ``trend``: sdmetrics QualityReport "Column Shapes" / "Column Pair Trends".
* ``alpha`` / ``beta``: the "naive" alpha-precision / beta-recall of Alaa et al. (2022) as
  synthcity's ``AlphaPrecision`` computes them on TabDiff's one-hot + min-max embedding.
* ``c2st``: sdmetrics ``LogisticDetection`` (1 = a logistic regression cannot tell real from synthetic).
* ``c2st_xgb``: the same score from a gradient-boosted classifier (XGBoost), which sees interactions
  a logistic regression cannot: independently shuffled columns score ~.99 on ``c2st``, far less here.
* ``mle``: machine-learning efficiency, train XGBoost on synthetic rows and test on real held-out rows
  (ROC AUC for classification, RMSE for regression; the task follows the target's type).
* ``dcr_share`` / ``exact_copies``: privacy (``privacy``), both need held-out rows: the share of
  synthetic rows closer to the training rows than to as many held-out rows (TabSyn's DCR score;
  .5 = the generator is no closer to what it trained on than to unseen data, 1 = it copies), and
  the share of synthetic rows equal to a training row.

``evaluate`` scores a synthetic table and, in a second row, real rows the generator never saw by the
same code ("real vs real"): each number can then be read against the ceiling it has on this data.
``score`` and ``evaluate`` take any table ``TabularMDM.fit`` takes and compare its columns as
``_comparable`` says: datetimes and timedeltas as numbers (counts of their unit), nullable
integers as numbers, every other non-numeric column (bool, category, text, a column mixing
numbers and text) as text, with None and NaN one missing value. A metric that is undefined on
so few rows (``_MIN_ROWS``) is NaN.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.metrics import mean_squared_error, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder

from .data import infer_categorical, to_plain
from .data.types import check_finite, times_as_numbers
from .data.privacy import MIN_ROWS_PER_VALUE

__all__ = [
    "ALL_METRICS",
    "REFERENCE_ROW",
    "shape_and_trend",
    "alpha_precision_beta_recall",
    "c2st",
    "c2st_xgb",
    "mle",
    "privacy",
    "infer_task",
    "score",
    "score_reference",
    "evaluate",
    "format_report",
    "rare_pool_shares",
]

ALL_METRICS = ("shape", "trend", "alpha", "beta", "c2st", "c2st_xgb", "mle", "dcr_share", "exact_copies")
_PRIVACY = ("dcr_share", "exact_copies")
SYNTHETIC_ROW = "synthetic"
REFERENCE_ROW = "real vs real"
_TASKS = ("classification", "regression")
# A classifier with more classes than this is refused: XGBoost grows one tree per class per
# round, so diamonds' price (11,602 integer values) as classes had not finished after 5 minutes.
_MAX_CLASSES = 100
# Categories beyond this many per column share one one-hot column (sklearn's "infrequent"),
# so a column with thousands of values (tail numbers) does not blow up the dense features.
# Above every column of the bundled tables (Adult's native-country has 42), so their scores
# are the plain one-hot ones TabSyn / TabDiff compute.
_MAX_ONE_HOT = 100
# XGBoost detector: a fixed, moderately deep booster; 3 folds as sdmetrics' LogisticDetection.
_DETECTOR = {"n_estimators": 100, "max_depth": 6, "learning_rate": 0.1, "tree_method": "hist"}
_DETECTOR_FOLDS = 3
# Number of alpha levels on synthcity's precision / recall curves.
_N_ALPHAS = 30
# TabSyn-style grid for the MLE booster, kept small so Adult-size data trains in well under a minute
# on two cores.
_MLE_GRID = {"max_depth": (4, 8), "n_estimators": (50, 150), "min_child_weight": (1, 10)}
# Fewest rows each table needs for a metric to be defined (below it the score is NaN): alpha
# and beta compare a real row with its nearest other real row; the detectors' folds are
# stratified, so each fold needs a row of each table.
_MIN_ROWS = {"alpha": 2, "beta": 2, "c2st": _DETECTOR_FOLDS, "c2st_xgb": _DETECTOR_FOLDS}


def _is_numerical(column: pd.Series) -> bool:
    """Numbers are numerical, everything else (strings, booleans, categories) categorical."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _sdmetrics_metadata(real: pd.DataFrame) -> dict:
    """Single-table sdmetrics metadata inferred from the real frame's dtypes."""
    return {
        "columns": {
            name: {"sdtype": "numerical" if _is_numerical(real[name]) else "categorical"}
            for name in real.columns
        }
    }


def _comparable(real: pd.DataFrame, *others: pd.DataFrame | None) -> list[pd.DataFrame | None]:
    """``real`` and ``others`` (in real's column order; None passes through) as the metrics
    compare them, whatever dtypes a table came in with (``_validate`` has checked them): column
    names as text (sklearn and sdmetrics take no other), numerical columns (by real's dtype:
    numbers, datetimes and timedeltas as counts of their unit) as float64 with NaN for missing
    (nullable ``Int64`` included), every other column as text with NaN for missing. So None and
    NaN are one missing value (a Parquet and a CSV file of one table compare equal), a
    ``boolean`` column's True is "True" in either, and a column mixing numbers and text is
    text, as the codec codes it. Applying it twice changes nothing."""
    names = [str(c) for c in real.columns]
    if len(set(names)) < len(names):
        raise ValueError(f"column names that print alike cannot be told apart: {list(real.columns)}; rename them")
    real = times_as_numbers(real)
    numerical = [_is_numerical(real[c]) for c in real.columns]
    out = []
    for frame in (real, *others):
        if frame is None:
            out.append(None)
            continue
        frame = times_as_numbers(frame[list(real.columns)])
        columns = {}
        for name, c, is_number in zip(names, real.columns, numerical):
            column = frame[c].astype(object)
            columns[name] = (_as_float(frame[[c]])[:, 0] if is_number
                             else column.astype(str).where(column.notna(), np.nan))
        out.append(pd.DataFrame(columns, index=frame.index))
    return out


def _one_hot() -> OneHotEncoder:
    return OneHotEncoder(handle_unknown="infrequent_if_exist", max_categories=_MAX_ONE_HOT, sparse_output=False)


def _as_float(frame: pd.DataFrame) -> np.ndarray:
    """Float matrix with NaN for missing values, also for nullable dtypes (``Int64`` with ``pd.NA``)."""
    return frame.to_numpy(dtype=float, na_value=np.nan)


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """sdmetrics draws from NumPy's global RNG (unseeded CV folds); pin it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def shape_and_trend(real: pd.DataFrame, synth: pd.DataFrame, metadata: dict | None = None) -> dict:
    """Column Shapes and Column Pair Trends scores (both in [0, 1], 1 = identical).

    sdmetrics >= 0.18 averages Column Pair Trends only over pairs whose real correlation /
    association exceeds a threshold; the thresholds are set to 0 so every pair counts, as in the
    sdmetrics versions TabSyn and TabDiff were evaluated with.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the single-table report is deprecated
        from sdmetrics.reports.single_table import QualityReport

    report = QualityReport()
    report.real_correlation_threshold = 0
    report.real_association_threshold = 0
    with warnings.catch_warnings():  # scipy notes it switched KS to the asymptotic method on ties
        warnings.filterwarnings("ignore", message="ks_2samp: Exact calculation unsuccessful")
        report.generate(real, synth, metadata or _sdmetrics_metadata(real), verbose=False)
    scores = report.get_properties().set_index("Property")["Score"]
    return {"shape": float(scores["Column Shapes"]), "trend": float(scores["Column Pair Trends"])}


def _embed(real: pd.DataFrame, synth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """TabDiff's embedding: [numerical | one-hot(categorical)] min-max scaled, all fit on real.

    Categorical values are compared as strings (missing becomes its own "nan" category); missing
    numbers are mean-imputed (synthcity would fail on them). synthcity's ``GenericDataLoader``
    takes the last column as the target and the naive variant drops it, so TabDiff's numbers are
    computed without the last one-hot column; it is dropped here too so results match theirs
    (unless it is the only feature).
    """
    numerical = [c for c in real.columns if _is_numerical(real[c])]
    categorical = [c for c in real.columns if c not in numerical]
    blocks_real, blocks_synth = [], []
    if numerical:
        imputer = SimpleImputer(strategy="mean", keep_empty_features=True)
        blocks_real.append(imputer.fit_transform(_as_float(real[numerical])))
        blocks_synth.append(imputer.transform(_as_float(synth[numerical])))
    if categorical:
        encoder = _one_hot()
        blocks_real.append(encoder.fit_transform(real[categorical].astype(str)))
        blocks_synth.append(encoder.transform(synth[categorical].astype(str)))
    x_real, x_synth = np.hstack(blocks_real), np.hstack(blocks_synth)
    if x_real.shape[1] > 1:  # a one-column table keeps its only feature
        x_real, x_synth = x_real[:, :-1], x_synth[:, :-1]
    scaler = MinMaxScaler().fit(x_real)
    return scaler.transform(x_real), scaler.transform(x_synth)


def _curve_score(alphas: np.ndarray, curve: np.ndarray) -> float:
    """1 - normalised area between a calibration curve and the diagonal (1 = perfectly calibrated)."""
    return float(1 - np.abs(alphas - curve).sum() / alphas.sum())


def alpha_precision_beta_recall(
    real: pd.DataFrame, synth: pd.DataFrame, *, max_rows: int = 20_000, seed: int = 0
) -> dict:
    """Naive alpha-precision and beta-recall (Alaa et al. 2022, synthcity's ``*_naive`` keys).

    alpha: for each level a, the fraction of synthetic rows inside the ball around the real mean
    that holds a fraction a of the real rows, compared with a.
    beta: for each level b, the fraction of real rows whose nearest synthetic row is closer than
    their nearest other real row and lies inside the b-quantile ball around the synthetic mean.
    synthcity needs equally many real and synthetic rows, so both are subsampled (seeded) to
    ``min(len(real), len(synth), max_rows)``; the cost is quadratic in that number.
    """
    n = min(len(real), len(synth), max_rows)
    real = real.sample(n=n, random_state=seed) if len(real) > n else real
    synth = synth.sample(n=n, random_state=seed) if len(synth) > n else synth
    x_real, x_synth = _embed(real, synth)
    alphas = np.linspace(0, 1, _N_ALPHAS)

    center = x_real.mean(axis=0)
    radii = np.quantile(np.linalg.norm(x_real - center, axis=1), alphas)
    synth_to_center = np.linalg.norm(x_synth - center, axis=1)
    precision_curve = (synth_to_center[None, :] <= radii[:, None]).mean(axis=1)

    real_to_real = NearestNeighbors(n_neighbors=2).fit(x_real).kneighbors(x_real)[0][:, 1]
    real_to_synth, nearest = NearestNeighbors(n_neighbors=1).fit(x_synth).kneighbors(x_real)
    real_to_synth, nearest = real_to_synth[:, 0], nearest[:, 0]
    nearest_to_synth_center = np.linalg.norm(x_synth[nearest] - x_synth.mean(axis=0), axis=1)
    synth_radii = np.quantile(nearest_to_synth_center, alphas)
    covered = real_to_synth <= real_to_real
    inside = nearest_to_synth_center[None, :] <= synth_radii[:, None]
    recall_curve = (covered[None, :] & inside).mean(axis=1)

    return {"alpha": _curve_score(alphas, precision_curve), "beta": _curve_score(alphas, recall_curve)}


def _replace_unseen_categories(real: pd.DataFrame, synth: pd.DataFrame) -> pd.DataFrame:
    """Synthetic categories absent from `real` (missing counts as a category) become real's
    most frequent one.

    sdmetrics' detection encoders are fit on the real rows and fail on any other category;
    a generator can legitimately emit a rare training category, or a missing value, that a
    real subsample lacks.
    """
    synth = synth.copy()
    for name in real.columns:
        if _is_numerical(real[name]):
            continue
        unseen = ~synth[name].isin(real[name].unique())
        if unseen.any():
            synth.loc[unseen, name] = real[name].mode(dropna=False).iloc[0]
    return synth


def c2st(real: pd.DataFrame, synth: pd.DataFrame, metadata: dict | None = None, *, seed: int = 0) -> float:
    """sdmetrics LogisticDetection: 1 - (2 * AUC - 1) of a 3-fold logistic real-vs-synthetic classifier."""
    from sdmetrics.single_table import LogisticDetection

    synth = _replace_unseen_categories(real, synth)
    real, synth = _within_float32(real, synth)
    with _global_numpy_seed(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # sdmetrics' lbfgs stops at 100 iterations
        return float(LogisticDetection.compute(real, synth, metadata or _sdmetrics_metadata(real)))


def c2st_xgb(real: pd.DataFrame, synth: pd.DataFrame, *, seed: int = 0, n_jobs: int = 2,
             max_rows: int = 20_000) -> float:
    """Detection by XGBoost: 1 - (2 * AUC - 1) from out-of-fold predictions of a 3-fold
    real-vs-synthetic classifier (AUC below 0.5 counts as 0.5), the scale of ``c2st``.

    Features are ``mle``'s (numbers as they are, one-hot categoricals fit on both tables).
    Each table is subsampled (seeded) to ``min(len(real), len(synth), max_rows)`` rows, so the
    classes are balanced and the cost bounded.
    """
    from xgboost import XGBClassifier

    real, synth = times_as_numbers(real), times_as_numbers(synth[list(real.columns)])
    n = min(len(real), len(synth), max_rows)
    both = pd.concat([real.sample(n=n, random_state=seed), synth.sample(n=n, random_state=seed + 1)],
                     ignore_index=True)
    numerical = [c for c in both.columns if _is_numerical(real[c])]
    categorical = [c for c in both.columns if c not in numerical]
    encoder = _one_hot().fit(both[categorical].astype(str)) if categorical else None
    x = _features(both, encoder, numerical, categorical)
    y = np.repeat([0, 1], n)
    detector = XGBClassifier(**_DETECTOR, n_jobs=n_jobs, random_state=seed)
    folds = StratifiedKFold(_DETECTOR_FOLDS, shuffle=True, random_state=seed)
    p_synth = cross_val_predict(detector, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(2 - 2 * max(0.5, roc_auc_score(y, p_synth)))


def _order_keeping_log(x: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|): numbers beyond float32's range (~3.4e38) brought within it, in
    the same order, so a detector splits or scales them alike."""
    return np.sign(x) * np.log1p(np.abs(x))


def _within_float32(real: pd.DataFrame, synth: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both frames with each numeric column that holds a number beyond float32's range, in
    either, passed through `_order_keeping_log` (sdmetrics' scalers overflow on them and drop
    the column)."""
    beyond = [c for c in real.columns if _is_numerical(real[c]) and max(
        np.nanmax(np.abs(_as_float(frame[[c]])), initial=0) for frame in (real, synth)) > np.finfo(np.float32).max]
    if not beyond:
        return real, synth
    tame = lambda frame: frame.assign(**{c: _order_keeping_log(_as_float(frame[[c]])[:, 0]) for c in beyond})  # noqa: E731
    return tame(real), tame(synth)


def _features(
    frame: pd.DataFrame, encoder: OneHotEncoder, numerical: list[str], categorical: list[str]
) -> np.ndarray:
    """Numbers as they are (XGBoost routes NaN itself) next to one-hot categoricals. XGBoost
    holds features as float32, where a number beyond ~3.4e38 is infinite and refused: a column
    holding one goes in as sign(x) * log1p(|x|), which keeps the order, so trees split it alike."""
    numbers = _as_float(frame[numerical])
    beyond = np.nanmax(np.abs(numbers), axis=0, initial=0) > np.finfo(np.float32).max
    numbers[:, beyond] = _order_keeping_log(numbers[:, beyond])
    blocks = [numbers]
    if categorical:
        blocks.append(encoder.transform(frame[categorical].astype(str)))
    return np.hstack(blocks)


def _ovr_auc(labels: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in ``labels`` (sklearn's ``ovr`` average,
    equal to the plain AUC when binary); a class the model never saw gets a constant score."""
    column = {label: i for i, label in enumerate(classes)}
    no_score = np.zeros(len(labels))
    return float(np.mean([
        roc_auc_score(labels == label, probabilities[:, column[label]] if label in column else no_score)
        for label in np.unique(labels)
    ]))


def infer_task(target: pd.Series, task: str | None = None) -> str:
    """Classification when the codec would type the target as categorical (text, bool, category,
    or integers with few values), else regression; an explicit ``task`` that contradicts the
    target fails here, before any model trains."""
    if task is not None and task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS} or None (inferred from the target), got {task!r}")
    name, plain = target.name, to_plain(target.name, target, target.dtype)
    numerical = _is_numerical(plain)
    inferred = "classification" if infer_categorical(target) else "regression"
    if task == "regression" and not numerical:
        raise ValueError(f"task='regression' but target {name!r} holds {target.dtype} values, not numbers; "
                         "use task='classification' (or leave task=None to infer it)")
    classes = target.nunique()
    if (task or inferred) == "classification" and classes > _MAX_CLASSES:
        hint = ("; it is numeric, so use task='regression' (or leave task=None to infer it)" if numerical
                else "; group its rare values or pick another target")
        raise ValueError(f"target {name!r} has {classes:,} distinct values: a classifier with more than "
                         f"{_MAX_CLASSES} classes is refused{hint}")
    return task or inferred


def mle(
    synth: pd.DataFrame,
    test: pd.DataFrame,
    target: str,
    task: str | None = None,
    *,
    seed: int = 0,
    n_jobs: int = 2,
) -> float:
    """Train XGBoost on synthetic rows, score on real test rows: ROC AUC (one-vs-rest when
    multiclass) for classification, RMSE for regression.

    ``task=None`` infers it from the real test target (``infer_task``: the codec's typing rule).
    Rows whose target is missing (flights' arr_delay of cancelled flights) are left out of both.
    Hyperparameters come from a small grid picked on a 20 % validation split of the synthetic
    rows, as TabSyn does. Test labels the synthetic data never produced score as never predicted.
    On a machine busy with other work use ``n_jobs=1``: XGBoost's OpenMP threads spin-wait and an
    oversubscribed two-thread fit can run ten times slower than a single-thread one.
    """
    from xgboost import XGBClassifier, XGBRegressor

    for name, frame in (("synth", synth), ("test", test)):
        if target not in frame.columns:
            raise ValueError(f"target column {target!r} is missing from {name}")
        if frame[target].notna().sum() < 2:
            raise ValueError(f"target column {target!r} of {name} has fewer than 2 non-missing values")
    synth, test = synth[synth[target].notna()], test[test[target].notna()]  # a missing label is no label
    task = infer_task(test[target], task)
    synth, test = times_as_numbers(synth), times_as_numbers(test)
    features = [c for c in synth.columns if c != target]
    numerical = [c for c in features if _is_numerical(synth[c])]
    categorical = [c for c in features if c not in numerical]
    encoder = _one_hot()
    if categorical:
        encoder.fit(synth[categorical].astype(str))
    x = _features(synth, encoder, numerical, categorical)
    x_test = _features(test, encoder, numerical, categorical)

    if task == "regression":
        y, y_test = synth[target].to_numpy(float), test[target].to_numpy(float)
        if max(np.abs(y).max(), np.abs(y_test).max()) > np.finfo(np.float32).max:
            raise ValueError(f"target column {target!r} holds numbers beyond XGBoost's float32 range (~3.4e38); "
                             "rescale it (say, to its logarithm) to score MLE on it")
        x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=0.2, random_state=seed)
        models = [XGBRegressor(**params) for params in _mle_grid(seed, n_jobs)]
        for model in models:
            model.fit(x_fit, y_fit)
        best = min(models, key=lambda m: mean_squared_error(y_val, m.predict(x_val)))
        return float(np.sqrt(mean_squared_error(y_test, best.predict(x_test))))

    y = synth[target].astype(str).to_numpy()
    y_test = test[target].astype(str).to_numpy()
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"synthetic target {target!r} has a single class {y[0]!r}; cannot train a classifier"
        )
    if len(np.unique(y_test)) < 2:
        raise ValueError(f"test target {target!r} has a single class {y_test[0]!r}; AUC is undefined")
    # A stratified split needs two rows of each class and room for every class on both sides.
    counts = pd.Series(y).value_counts()
    validation_rows = math.ceil(0.2 * len(y))
    stratify = counts.min() >= 2 and min(validation_rows, len(y) - validation_rows) >= len(counts)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y if stratify else None
    )
    classes, codes = np.unique(y_fit, return_inverse=True)  # XGBoost wants labels 0..k-1
    models = [XGBClassifier(**params) for params in _mle_grid(seed, n_jobs)]
    for model in models:
        model.fit(x_fit, codes)
    best = max(models, key=lambda m: _ovr_auc(y_val, m.predict_proba(x_val), classes))
    return _ovr_auc(y_test, best.predict_proba(x_test), classes)


def _privacy_embedding(train: pd.DataFrame, *others: pd.DataFrame) -> list[np.ndarray]:
    """Rows as points for nearest-neighbour distances: numbers min-max scaled on the training
    rows (missing ones at the training mean, plus a 0/1 missing column), categories one-hot
    (compared as text, missing as its own value); so one differing category counts as much as
    a number moved across its whole range. Fitted on ``train``, applied to every frame."""
    train, others = times_as_numbers(train), [times_as_numbers(o[list(train.columns)]) for o in others]
    numerical = [c for c in train.columns if _is_numerical(train[c])]
    categorical = [c for c in train.columns if c not in numerical]
    blocks: list[list[np.ndarray]] = [[] for _ in range(1 + len(others))]
    frames = [train, *others]
    if numerical:
        imputer = SimpleImputer(strategy="mean", keep_empty_features=True, add_indicator=True)
        scaler = MinMaxScaler()
        scaler.fit(imputer.fit_transform(_as_float(train[numerical])))
        for block, frame in zip(blocks, frames):
            block.append(scaler.transform(imputer.transform(_as_float(frame[numerical]))))
    if categorical:
        encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
        encoder.fit(train[categorical].astype(str))
        for block, frame in zip(blocks, frames):
            block.append(encoder.transform(frame[categorical].astype(str)))
    return [np.hstack(block) for block in blocks]


def _row_keys(frame: pd.DataFrame) -> pd.Index:
    """One hashable key per row, equal for equal rows whatever the dtypes (numbers as float64,
    the rest as text, missing as missing)."""
    frame = times_as_numbers(frame)
    plain = {c: (_as_float(frame[[c]])[:, 0] if _is_numerical(frame[c])
                 else frame[c].astype(object).where(frame[c].notna(), None).to_numpy(dtype=object).astype(str))
             for c in frame.columns}
    return pd.Index(pd.util.hash_pandas_object(pd.DataFrame(plain), index=False).to_numpy())


def privacy(train: pd.DataFrame, holdout: pd.DataFrame, synth: pd.DataFrame) -> dict[str, float]:
    """``dcr_share``: TabSyn's DCR score, the share of ``synth`` rows whose nearest training row
    is closer than their nearest ``holdout`` row (L1 distance on ``_privacy_embedding``; a tie,
    a row equal to a row of both, counts one half, so that tables with duplicate rows across
    splits, such as Adult, still score .5 for real rows). TabSyn compares sets of equal size,
    where an ideal generator scores .5 and one copying its training rows 1. With all rows of
    sets of different sizes the odds of the nearest row being a training row grow with the
    training set's size, so the share is reported at equal size: its odds are multiplied by
    len(holdout) / len(train). (Subsampling the training rows instead would hide copies of
    the rows left out.)
    ``exact_copies``: the share of ``synth`` rows equal to some training row.
    """
    x_train, x_holdout, x_synth = _privacy_embedding(train, holdout, synth)
    to_train = NearestNeighbors(n_neighbors=1, metric="manhattan").fit(x_train).kneighbors(x_synth)[0][:, 0]
    to_holdout = NearestNeighbors(n_neighbors=1, metric="manhattan").fit(x_holdout).kneighbors(x_synth)[0][:, 0]
    tie = np.isclose(to_train, to_holdout, rtol=0, atol=1e-12)
    share = float(np.where(tie, 0.5, to_train < to_holdout).mean())
    closer, farther = share * len(holdout), (1 - share) * len(train)
    copies = _row_keys(synth[list(train.columns)]).isin(_row_keys(train))
    return {"dcr_share": closer / (closer + farther), "exact_copies": float(copies.mean())}


def rare_pool_shares(real: pd.DataFrame) -> pd.Series:
    """Per categorical column of ``real`` (the codec's typing rule), the share of its rows with
    a value that hold one fewer than ``MIN_ROWS_PER_VALUE`` rows hold: the rows a model fitted
    on ``real`` puts in the column's rare pool, whose values it neither stores nor generates
    (``fastmdm.data.privacy``)."""
    shares = {}
    for name in real.columns:
        if infer_categorical(real[name]):
            present = real[name].dropna().astype(object)
            counts = present.map(present.value_counts())
            shares[name] = float((counts < MIN_ROWS_PER_VALUE).mean()) if len(present) else 0.0
    return pd.Series(shares, dtype=float, name="rare_pool_share")


def _mle_grid(seed: int, n_jobs: int) -> list[dict]:
    """Every combination of ``_MLE_GRID`` as XGBoost keyword arguments."""
    fixed = {"tree_method": "hist", "n_jobs": n_jobs, "random_state": seed}
    return [dict(zip(_MLE_GRID, values), **fixed) for values in itertools.product(*_MLE_GRID.values())]


def _validate(real: pd.DataFrame, other: pd.DataFrame, label: str = "synth") -> None:
    """Fail early, naming the offending columns, instead of deep inside sdmetrics or sklearn."""
    for name, frame in (("real", real), (label, other)):
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
        if frame.empty:
            raise ValueError(f"{name} is empty ({frame.shape[0]} rows x {frame.shape[1]} columns)")
    missing = [c for c in real.columns if c not in other.columns]
    extra = [c for c in other.columns if c not in real.columns]
    if missing or extra:
        raise ValueError(f"{label} columns differ from real: missing {missing}, extra {extra}")
    real, other = times_as_numbers(real), times_as_numbers(other)
    # A column of numbers in `other` where real has text is compared as text (a CSV reads a
    # text column whose sampled values all look like numbers as numbers); the reverse cannot be.
    mismatched = [
        f"{c!r} (real {real[c].dtype}, {label} {other[c].dtype})"
        for c in real.columns
        if _is_numerical(real[c]) and not _is_numerical(other[c]) and other[c].notna().any()
    ]
    if mismatched:
        raise ValueError(f"columns hold numbers in real but not in {label}: {', '.join(mismatched)}; "
                         "compare tables with the same columns")
    for name, frame in (("real", real), (label, other)):
        for c in real.columns:
            if _is_numerical(real[c]):
                try:
                    check_finite(c, frame[c])
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None


def score(
    real: pd.DataFrame,
    synth: pd.DataFrame,
    *,
    test: pd.DataFrame | None = None,
    target: str | None = None,
    task: str | None = None,
    metrics: Iterable[str] = ALL_METRICS,
    seed: int = 0,
    n_jobs: int = 2,
    mle_train: pd.DataFrame | None = None,
) -> dict[str, float]:
    """Scores of one table ``synth`` against ``real``; ``mle`` runs only when both ``test`` and
    ``target`` are given, training on ``mle_train`` (default: ``synth``); the privacy scores
    run when ``test`` is given (``privacy`` with ``test`` as the holdout).

    ``real`` is the data the generator was trained on; ``test`` is real data it never saw.
    ``task`` None infers classification or regression from ``real[target]`` (``infer_task``).
    ``n_jobs`` is passed to the XGBoost models (see ``mle``).
    """
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    _validate(real, synth)
    run_mle = "mle" in metrics and test is not None and target is not None
    if run_mle:
        if str(target) not in [str(c) for c in real.columns]:
            raise ValueError(f"target column {target!r} is not in real; columns: {list(real.columns)}")
        if real.shape[1] == 1:
            raise ValueError(f"MLE predicts target column {target!r} from the other columns, and the table has "
                             "no other; leave out target (or the 'mle' metric)")
    if test is not None:
        _validate(real, test, label="test")
    real, synth, test, mle_train = _comparable(real, synth, test, mle_train)
    target = None if target is None else str(target)
    if run_mle:
        task = infer_task(real[target], task)  # fail fast, before the slow metrics run
    results: dict[str, float] = {}
    rows = min(len(real), len(synth))
    results.update({name: np.nan for name, needed in _MIN_ROWS.items() if rows < needed})
    metadata = _sdmetrics_metadata(real)
    if {"shape", "trend"} & set(metrics):
        results.update(shape_and_trend(real, synth, metadata))
    if {"alpha", "beta"} & set(metrics) and "alpha" not in results:
        results.update(alpha_precision_beta_recall(real, synth, seed=seed))
    if "c2st" in metrics and "c2st" not in results:
        results["c2st"] = c2st(real, synth, metadata, seed=seed)
    if "c2st_xgb" in metrics and "c2st_xgb" not in results:
        results["c2st_xgb"] = c2st_xgb(real, synth, seed=seed, n_jobs=n_jobs)
    if run_mle:
        results["mle"] = mle(synth if mle_train is None else mle_train, test, target, task, seed=seed, n_jobs=n_jobs)
    if set(_PRIVACY) & set(metrics) and test is not None:
        results.update(privacy(real, test, synth))
    return {name: results[name] for name in metrics if name in results}


def score_reference(
    real: pd.DataFrame, num_rows: int, *, test: pd.DataFrame | None = None, seed: int = 0, **options
) -> tuple[str, dict[str, float]]:
    """The "real vs real" row: up to ``num_rows`` real rows scored by ``score`` in place of a
    synthetic table, with a label saying which rows they are.

    Fidelity scores held-out rows (``test``, sampled without replacement; all of them when it has
    fewer than ``num_rows``) against ``real``. Without held-out rows, ``real`` is split: up to
    ``num_rows`` of its rows (at most half) are scored against the others. Never a bootstrap:
    duplicated rows are what a detector learns to spot (MAGIC: XGBoost C2ST .19 for its test
    split resampled to the train size, 1.0 for the test split as it is) and they lower beta.
    MLE trains on up to ``num_rows`` rows of ``real`` (the usual "train on real" ceiling) and
    tests on ``test``. Privacy scores held-out rows that are not in the privacy holdout: the
    scored rows are those of ``test`` in the first half of its shuffled order, the holdout
    the second half. ``options`` are ``score``'s. A one-row ``real`` without ``test`` has no
    rows to split off: every score is NaN.
    """
    real, test = _comparable(real, test)
    order = np.random.default_rng(seed).permutation(len(real if test is None else test))
    if test is None:
        rows = min(num_rows, len(real) // 2)
        compared, sample, kind = real.iloc[order[rows:]], real.iloc[order[:rows]], "split of real"
        if rows == 0:
            return f"{REFERENCE_ROW} ({kind})", {name: np.nan for name in options.get("metrics", ALL_METRICS)
                                                    if name not in (*_PRIVACY, "mle")}
    else:
        rows = min(num_rows, len(test))
        compared, sample = real, test.iloc[order[:rows]]
        kind = "held-out" if rows == num_rows else f"held-out, {rows:,} rows"
    mle_train = real.sample(n=min(num_rows, len(real)), random_state=seed)
    scores = score(compared, sample.reset_index(drop=True), test=test, seed=seed, mle_train=mle_train,
                   **{**options, "metrics": [m for m in options.get("metrics", ALL_METRICS) if m not in _PRIVACY]})
    if test is not None and len(test) > 1 and set(_PRIVACY) & set(options.get("metrics", ALL_METRICS)):
        half = len(test) // 2
        scores.update(privacy(real, test.iloc[order[half:]], test.iloc[order[:min(half, num_rows)]]))
    return f"{REFERENCE_ROW} ({kind})", scores


def evaluate(
    real: pd.DataFrame,
    synth: pd.DataFrame,
    *,
    test: pd.DataFrame | None = None,
    target: str | None = None,
    task: str | None = None,
    metrics: Iterable[str] = ALL_METRICS,
    reference: bool = True,
    seed: int = 0,
    n_jobs: int = 2,
    report: str | None = None,
    report_model=None,
) -> pd.DataFrame:
    """Scores of ``synth`` (row "synthetic") and, with ``reference``, of real rows the generator
    never saw, scored the same way (row "real vs real (...)", see ``score_reference``); one column
    per metric.
    Arguments as in ``score``; ``report``: also write an HTML report with figures to this path
    (``fastmdm.report.write_report``), with the schedule of ``report_model`` (a TabularMDM) if given.
    """
    options = dict(target=target, task=task, metrics=metrics, n_jobs=n_jobs)
    rows = {SYNTHETIC_ROW: score(real, synth, test=test, seed=seed, **options)}
    if reference:
        label, scores = score_reference(real, len(synth), test=test, seed=seed, **options)
        rows[label] = scores
    results = pd.DataFrame.from_dict(rows, orient="index")
    results.attrs["rare_pool_shares"] = rare_pool_shares(real)
    if report is not None:
        from .report import write_report
        write_report(report, real, synth, results, embed=_privacy_embedding, descriptions=_DESCRIPTIONS, test=test,
                     model=report_model, seed=seed)
    return results


_DESCRIPTIONS = {
    "shape": "column shapes (sdmetrics), higher is better",
    "trend": "column pair trends (sdmetrics), higher is better",
    "alpha": "alpha-precision (naive), higher is better",
    "beta": "beta-recall (naive), higher is better",
    "c2st": "logistic detection, 1 = indistinguishable",
    "c2st_xgb": "XGBoost detection, 1 = indistinguishable",
    "mle": "XGBoost on synthetic -> real test: AUC higher / RMSE lower is better",
    "dcr_share": "rows closer to train than to held-out rows, .5 = no memorising",
    "exact_copies": "rows equal to a training row, lower is more private",
}


def format_report(results: pd.DataFrame | Mapping[str, float]) -> str:
    """Aligned ``metric  value(s)  meaning`` lines for logs and the CLI: one value column per row of
    ``evaluate``'s frame (or for a single dict of scores)."""
    table = results if isinstance(results, pd.DataFrame) else pd.DataFrame([results], index=["value"])
    names = [str(n) for n in table.index]
    metric_width = max([len("metric"), *(len(m) for m in table.columns)])
    widths = [max(8, len(n)) for n in names]
    header = f"{'metric':<{metric_width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))
    lines = [header.rstrip() + "  meaning"] if isinstance(results, pd.DataFrame) else []
    for metric in table.columns:
        values = "  ".join(f"{'':>{w}}" if pd.isna(v) else f"{v:>{w}.4f}" for v, w in zip(table[metric], widths))
        lines.append(f"{metric:<{metric_width}}  {values}  {_DESCRIPTIONS.get(metric, '')}".rstrip())
    pooled = table.attrs.get("rare_pool_shares", pd.Series(dtype=float)).loc[lambda shares: shares > 0]
    if len(pooled):
        lines.append(f"rare pool (rows holding a value fewer than {MIN_ROWS_PER_VALUE} real rows hold; never generated): "
                     + ", ".join(f"{name} {share:.1%}" for name, share in pooled.items()))
    return "\n".join(lines)
