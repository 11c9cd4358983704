"""A visual report of a synthetic table against the real one: one self-contained HTML file.

`write_report` writes the metrics table (each number beside its real-vs-real ceiling, with a
line on how to read it), every column's real and synthetic distributions ranked worst first
by its shape score (the per-column score of sdmetrics' Column Shapes: KS complement for
numbers and times, total variation complement for categories), pairwise associations of the
real and the synthetic rows and their difference, the distances of synthetic and of held-out
rows to their closest training row, and, given a model, its schedule and generation orders.
Figures are PNGs drawn by matplotlib and embedded as base64, so the file opens without a
network and can be mailed as it is.

Wide tables stay bounded: the `MAX_COLUMN_FIGURES` worst columns get figures and the rest a
table row each, associations are computed over at most `MAX_PAIR_COLUMNS` columns (the worst
by shape when there are more) and drawn over at most `MAX_HEATMAP_COLUMNS`, and figures and
distances use at most `MAX_ROWS` rows of each table (distances: `MAX_DISTANCE_QUERIES` synthetic and
held-out rows, against fewer training rows on wide tables: `MAX_DISTANCE_WORK`).
"""
from __future__ import annotations

import base64
import html
import io
import os
import warnings
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from .data.types import is_numeric_plain, times_as_numbers

MAX_COLUMN_FIGURES = 50
MAX_PAIR_COLUMNS = 100
MAX_HEATMAP_COLUMNS = 40
MAX_ROWS = 10_000
#: Synthetic rows, and held-out rows, whose distance to the closest training row is drawn.
MAX_DISTANCE_QUERIES = 1_000
#: Brute-force nearest neighbours cost training rows x queries x embedded columns; the training
#: rows searched (at most MAX_ROWS) are cut to keep that product under this, and never below
#: MIN_DISTANCE_TRAINING_ROWS (a wide table's embedding holds a column per category).
MAX_DISTANCE_WORK = 5 * 10**9
MIN_DISTANCE_TRAINING_ROWS = 500
#: Categories drawn per categorical column (the most frequent real ones); the rest share a bar.
TOP_CATEGORIES = 10
#: Quantile bins a number is cut into for its association with a category (as Trend's
#: contingency tables cut numbers).
ASSOCIATION_BINS = 10
WORST_PAIRS = 15
FIGURE_DPI = 72
REAL_COLOR, SYNTH_COLOR, HELDOUT_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"


def write_report(path: str | os.PathLike, real: pd.DataFrame, synth: pd.DataFrame, results: pd.DataFrame, *,
                 embed: Callable[..., list[np.ndarray]], descriptions: Mapping[str, str],
                 test: pd.DataFrame | None = None, model=None, seed: int = 0) -> str:
    """Write the HTML report of `synth` against `real` (the training rows) to `path`.

    `fastmdm.metrics.evaluate(..., report=path)` calls it with its results, the privacy
    metrics' row embedding `embed(train, *others)` (points for nearest-neighbour distances) and
    `descriptions`, a line on how to read each metric. `test`: real rows the generator never saw,
    the held-out side of the distance plot (without it, half of `real` plays that part and
    the other half the training rows). `model`: a fitted TabularMDM whose schedule and orders
    are drawn. Returns the path written.
    """
    if not isinstance(real, pd.DataFrame) or not isinstance(synth, pd.DataFrame):
        raise TypeError("real and synth must be pandas DataFrames")
    rng = np.random.default_rng(seed)
    real_rows, synth_rows = _rows(real, rng), _rows(synth[list(real.columns)], rng)
    scores = column_scores(real, synth[list(real.columns)])
    sections = [
        _metrics_section(results, descriptions),
        _columns_section(real_rows, synth_rows, scores),
        _pairs_section(real_rows, synth_rows, scores),
        _privacy_section(real, synth[list(real.columns)], test, embed, rng),
    ]
    if model is not None:
        sections.append(_model_section(model))
    page = _PAGE.format(title=html.escape(f"fastmdm report: {len(synth):,} synthetic rows, {real.shape[1]} columns"),
                        body="\n".join(sections))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return os.fspath(path)


def _rows(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """At most MAX_ROWS rows of frame, a uniform sample (seeded), index reset."""
    if len(frame) > MAX_ROWS:
        frame = frame.iloc[np.sort(rng.choice(len(frame), MAX_ROWS, replace=False))]
    return frame.reset_index(drop=True)


def column_scores(real: pd.DataFrame, synth: pd.DataFrame) -> pd.DataFrame:
    """Per column: its kind, its shape score (sdmetrics' KS complement for numbers and times,
    TV complement for categories; 1 = same distribution, missing values left out) and the
    missing shares, sorted worst first."""
    from sdmetrics.single_column import KSComplement, TVComplement
    real_plain, synth_plain = times_as_numbers(real), times_as_numbers(synth)
    records = []
    for name in real.columns:
        numeric = is_numeric_plain(real_plain[name].dtype)
        kind = "time" if real_plain[name].dtype != real[name].dtype else ("number" if numeric else "category")
        r, s = real_plain[name], synth_plain[name]
        if r.notna().any() and s.notna().any():
            if numeric:
                score = KSComplement.compute(r.astype("float64"), pd.to_numeric(s, errors="coerce").astype("float64"))
            else:
                score = TVComplement.compute(r.astype(str).where(r.notna()), s.astype(str).where(s.notna()))
        else:
            score = float(r.isna().all() == s.isna().all())
        records.append({"column": name, "kind": kind, "shape score": float(score),
                        "real missing": float(r.isna().mean()), "synthetic missing": float(s.isna().mean())})
    return pd.DataFrame(records).sort_values("shape score", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    """A matplotlib Figure outside pyplot: no backend is chosen or changed for the caller, and
    nothing is left open."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def _png(fig) -> str:
    """The figure as an <img> with its PNG inline (base64)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}">'


def _column_figure(name, kind: str, real: pd.Series, synth: pd.Series) -> str:
    fig = _figure(5.0, 2.6)
    ax = fig.subplots()
    if kind == "category":
        _category_bars(ax, real, synth)
    else:
        _histograms(ax, real, synth, kind)
    ax.set_title(_short(str(name), 60), fontsize=9)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.98, top=0.88, bottom=0.3)   # fixed margins: no layout pass
    return _png(fig)


def _histograms(ax, real: pd.Series, synth: pd.Series, kind: str) -> None:
    """Overlaid densities on shared bins spanning the real values' 0.5-99.5% range (times as
    dates on the axis), missing shares in the legend."""
    if kind == "time":
        as_number = lambda s: times_as_numbers(s.to_frame())[s.name].astype("float64")   # noqa: E731
    else:
        as_number = lambda s: pd.to_numeric(s, errors="coerce").astype("float64")          # noqa: E731
    r, s = as_number(real).dropna().to_numpy(), as_number(synth).dropna().to_numpy()
    low, high = (np.quantile(r, [0.005, 0.995]) if len(r) else (0.0, 1.0))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, 41)
    for values, color, label, missing in ((r, REAL_COLOR, "real", real.isna().mean()),
                                          (s, SYNTH_COLOR, "synthetic", synth.isna().mean())):
        if len(values):
            ax.hist(np.clip(values, low, high), bins=edges, density=True, histtype="step", linewidth=1.5,
                    color=color, label=f"{label} ({missing:.1%} missing)")
    if kind == "time" and pd.api.types.is_datetime64_any_dtype(real.dtype):
        ticks = np.linspace(low, high, 4)
        unit = np.datetime_data(_naive(real).dtype)[0]
        ax.set_xticks(ticks, [str(np.datetime64(int(t), unit).astype("datetime64[D]")) for t in ticks], fontsize=7)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)


def _naive(series: pd.Series) -> pd.Series:
    return series.dt.tz_convert("UTC").dt.tz_localize(None) if getattr(series.dt, "tz", None) else series


def _category_bars(ax, real: pd.Series, synth: pd.Series) -> None:
    """Shares of the TOP_CATEGORIES most frequent real categories, the rest, and missing."""
    r, s = real.astype(object).where(real.notna()).astype(str), synth.astype(object).where(synth.notna()).astype(str)
    r[real.isna().to_numpy()], s[synth.isna().to_numpy()] = "(missing)", "(missing)"
    top = [c for c in r.value_counts().index if c != "(missing)"][:TOP_CATEGORIES]
    labels = top + ["(rest)", "(missing)"]
    shares = []
    for values in (r, s):
        counts = values.value_counts(normalize=True)
        kept = [float(counts.get(c, 0.0)) for c in top]
        missing = float(counts.get("(missing)", 0.0))
        shares.append(kept + [max(0.0, 1.0 - sum(kept) - missing), missing])
    keep = [i for i, label in enumerate(labels) if shares[0][i] > 0 or shares[1][i] > 0]
    positions = np.arange(len(keep))
    ax.bar(positions - 0.2, [shares[0][i] for i in keep], width=0.4, color=REAL_COLOR, label="real")
    ax.bar(positions + 0.2, [shares[1][i] for i in keep], width=0.4, color=SYNTH_COLOR, label="synthetic")
    ax.set_xticks(positions, [_short(labels[i]) for i in keep], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("share of rows", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --------------------------------------------------------------------------- associations
def _association_codes(real: pd.Series, synth: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Both columns as small integer codes on the real column's terms: numbers in
    ASSOCIATION_BINS real quantile bins, categories by their TOP_CATEGORIES * 2 most frequent
    real values and one code for the rest; missing is a code of its own."""
    if is_numeric_plain(real.dtype):
        r, s = (pd.to_numeric(column, errors="coerce").astype("float64") for column in (real, synth))
        edges = np.unique(np.nanquantile(r, np.linspace(0, 1, ASSOCIATION_BINS + 1)[1:-1])) if r.notna().any() else []
        codes = [np.where(v.isna(), len(edges) + 1, np.searchsorted(edges, v.fillna(0), side="right")) for v in (r, s)]
    else:
        r, s = (column.astype(object).where(column.notna()).astype(str) for column in (real, synth))
        top = pd.Index(r[real.notna().to_numpy()].value_counts().index[:2 * TOP_CATEGORIES])
        codes = []
        for values, original in ((r, real), (s, synth)):
            code = top.get_indexer(values)
            code = np.where(code < 0, len(top), code)
            codes.append(np.where(original.isna().to_numpy(), len(top) + 1, code))
    return codes[0].astype(np.int64), codes[1].astype(np.int64)


def _cramers_v(a: np.ndarray, b: np.ndarray) -> float:
    """Cramér's V of two code columns: 0 = independent, 1 = one determines the other."""
    width = int(b.max()) + 1
    table = np.bincount(a * width + b, minlength=(int(a.max()) + 1) * width).reshape(-1, width).astype(np.float64)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if min(table.shape) < 2:
        return 0.0
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    return float(np.sqrt(chi2 / table.sum() / (min(table.shape) - 1)))


def association_matrices(real: pd.DataFrame, synth: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(real, synthetic, measure name) per pair of columns: Pearson correlation for two numbers
    (times as numbers), Cramér's V of the contingency table otherwise (numbers cut into real
    quantile bins), the measures Trend compares."""
    real, synth = times_as_numbers(real), times_as_numbers(synth)
    columns = list(real.columns)
    numeric = [is_numeric_plain(real[c].dtype) for c in columns]
    codes = [_association_codes(real[c], synth[c]) for c in columns]
    numbers = [c for c, is_number in zip(columns, numeric) if is_number]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # constant columns: NaN correlation
        correlations = [frame[numbers].apply(pd.to_numeric, errors="coerce").astype("float64").corr().to_numpy()
                        for frame in (real, synth)]
    number_index = {c: i for i, c in enumerate(numbers)}
    matrices = [np.eye(len(columns)) for _ in range(2)]
    measure = np.full((len(columns), len(columns)), "", dtype=object)
    for i in range(len(columns)):
        for j in range(i + 1, len(columns)):
            if numeric[i] and numeric[j]:
                a, b = number_index[columns[i]], number_index[columns[j]]
                values = [c[a, b] for c in correlations]
                measure[i, j] = measure[j, i] = "Pearson r"
            else:
                values = [_cramers_v(codes[i][k], codes[j][k]) for k in range(2)]
                measure[i, j] = measure[j, i] = "Cramér's V"
            for matrix, value in zip(matrices, values):
                matrix[i, j] = matrix[j, i] = 0.0 if np.isnan(value) else value
    frame = lambda values: pd.DataFrame(values, index=columns, columns=columns)   # noqa: E731
    return frame(matrices[0]), frame(matrices[1]), frame(measure)


def _heatmaps(real: pd.DataFrame, synth: pd.DataFrame) -> str:
    size = max(4.0, 0.16 * len(real))
    fig = _figure(3 * size + 1.5, size + 0.8)
    axes = fig.subplots(1, 3)
    for ax, matrix, title in zip(axes, (real, synth, synth - real),
                                 ("real", "synthetic", "difference (synthetic - real)")):
        image = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        labels = [_short(str(c), 14) for c in matrix.columns]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.92, wspace=0.45, bottom=0.2)
    fig.colorbar(image, ax=axes, fraction=0.02)
    return _png(fig)


# --------------------------------------------------------------------------- sections
def _table(frame: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    return frame.to_html(border=0, classes="data", float_format=float_format.format, na_rep="")


def _metrics_section(results: pd.DataFrame, descriptions: Mapping[str, str]) -> str:
    reading = "".join(f"<li><b>{html.escape(str(name))}</b>: {html.escape(descriptions.get(name, ''))}</li>"
                      for name in results.columns)
    return (f"<h2>Metrics</h2><p>Each number beside the same score of real rows the generator never saw "
            f"(the <i>real vs real</i> row): the ceiling on this data.</p>{_table(results)}<ul>{reading}</ul>")


def _columns_section(real: pd.DataFrame, synth: pd.DataFrame, scores: pd.DataFrame) -> str:
    figures = []
    for record in scores.head(MAX_COLUMN_FIGURES).itertuples(index=False):
        name = record.column
        figures.append(f'<div class="figure"><p><b>{html.escape(str(name))}</b> ({record.kind}): shape score '
                       f'{record[2]:.3f}</p>{_column_figure(name, record.kind, real[name], synth[name])}</div>')
    rest = len(scores) - MAX_COLUMN_FIGURES
    note = (f"<p>The {MAX_COLUMN_FIGURES} worst columns have figures; the other {rest:,} are in the table "
            "only.</p>" if rest > 0 else "")
    return ("<h2>Columns, worst first</h2><p>Shape score per column (sdmetrics' Column Shapes): 1 - the "
            "Kolmogorov-Smirnov distance for numbers and times, 1 - the total variation distance for categories; "
            "1 = the same distribution, missing values left out (their shares are beside them). Figures use "
            f"at most {MAX_ROWS:,} rows of each table.</p>{note}<div class='figures'>{''.join(figures)}</div>"
            f"<h3>Every column</h3>{_table(scores.set_index('column'), '{:.3f}')}")


def _pairs_section(real: pd.DataFrame, synth: pd.DataFrame, scores: pd.DataFrame) -> str:
    columns = list(real.columns)
    chosen = columns if len(columns) <= MAX_PAIR_COLUMNS else list(scores["column"].head(MAX_PAIR_COLUMNS))
    real_assoc, synth_assoc, measure = association_matrices(real[chosen], synth[chosen])
    difference = synth_assoc - real_assoc
    upper = np.triu(np.ones(difference.shape, dtype=bool), 1)
    pairs = pd.DataFrame({"column a": np.repeat(chosen, len(chosen)), "column b": np.tile(chosen, len(chosen)),
                          "measure": measure.to_numpy().ravel(), "real": real_assoc.to_numpy().ravel(),
                          "synthetic": synth_assoc.to_numpy().ravel(),
                          "difference": difference.to_numpy().ravel()})[upper.ravel()]
    pairs = pairs.reindex(pairs["difference"].abs().sort_values(ascending=False, kind="stable").index)
    worst = pairs.head(WORST_PAIRS).reset_index(drop=True)
    shown = chosen
    if len(chosen) > MAX_HEATMAP_COLUMNS:
        involved = pd.unique(pairs[["column a", "column b"]].to_numpy().ravel())
        shown = [c for c in chosen if c in set(involved[:MAX_HEATMAP_COLUMNS])]
    scope = (f"<p>Associations are computed over the {len(chosen)} worst columns by shape (of "
             f"{len(columns):,}).</p>" if len(chosen) < len(columns) else "")
    drawn = (f"<p>The heatmaps show the {len(shown)} columns of the largest differences.</p>"
             if len(shown) < len(chosen) else "")
    figure = _heatmaps(real_assoc.loc[shown, shown], synth_assoc.loc[shown, shown]) if len(shown) > 1 else ""
    return ("<h2>Pairs of columns</h2><p>Association of each pair, measured as Column Pair Trends compares "
            "them: Pearson correlation for two numbers (times as numbers), Cramér's V of the contingency table "
            f"otherwise (numbers cut into {ASSOCIATION_BINS} real quantile bins, missing a value of its own). "
            f"The difference shows which relations the synthetic rows lost or made up.</p>{scope}{drawn}"
            f"{figure}<h3>Largest differences</h3>{_table(worst, '{:.3f}')}")


def _privacy_section(real: pd.DataFrame, synth: pd.DataFrame, test: pd.DataFrame | None,
                     embed: Callable[..., list[np.ndarray]], rng: np.random.Generator) -> str:
    """Distances (L1 on the privacy metric's embedding) from synthetic rows and from held-out
    rows to their closest training row."""
    from sklearn.neighbors import NearestNeighbors
    if test is None:
        order = rng.permutation(len(real))
        train, heldout, source = real.iloc[order[len(real) // 2:]], real.iloc[order[:len(real) // 2]], "half of real"
    else:
        train, heldout, source = real, test[list(real.columns)], "test"
    heldout_rows = _rows(heldout, rng).iloc[:MAX_DISTANCE_QUERIES]
    synth_rows = _rows(synth, rng).iloc[:len(heldout_rows)]
    # The embedding's width: a number is one column (two with missing values), a category one per value.
    width = sum(1 + int(train[c].isna().any()) if is_numeric_plain(train[c].dtype) else train[c].nunique() + 1
                for c in train.columns)
    affordable = MAX_DISTANCE_WORK // (2 * len(heldout_rows) * max(width, 1))
    train = _rows(train, rng).iloc[:max(MIN_DISTANCE_TRAINING_ROWS, affordable)]
    x_train, x_synth, x_heldout = embed(train, synth_rows, heldout_rows)
    neighbours = NearestNeighbors(n_neighbors=1, metric="manhattan").fit(x_train)
    to_synth, to_heldout = (neighbours.kneighbors(x)[0][:, 0] for x in (x_synth, x_heldout))
    fig = _figure(6.0, 3.0)
    ax = fig.subplots()
    high = float(np.quantile(np.concatenate([to_synth, to_heldout]), 0.99)) or 1.0
    edges = np.linspace(0, high, 41)
    for values, color, label in ((to_synth, SYNTH_COLOR, "synthetic rows"), (to_heldout, HELDOUT_COLOR,
                                                                                f"held-out real rows ({source})")):
        ax.hist(np.clip(values, 0, high), bins=edges, density=True, histtype="step", linewidth=1.5, color=color,
                label=f"{label}: median {np.median(values):.3f}, {np.mean(values == 0):.1%} at 0")
    ax.set_xlabel("distance to the closest training row", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.17)
    return ("<h2>Privacy: distance to the closest training row</h2><p>L1 distance with numbers min-max scaled and "
            "categories one-hot (the privacy metrics' embedding), for synthetic rows and for as many real rows the "
            "generator never saw. A synthetic curve shifted toward 0, or a spike at 0 (copies), means training rows "
            f"are reproduced; matching curves mean synthetic rows sit as far from the training rows as new real rows "
            f"do ({len(train):,} training rows, {len(x_synth):,} synthetic and {len(x_heldout):,} held-out rows)."
            f"</p>{_png(fig)}")


def _model_section(model) -> str:
    """The schedule and reveal orders picture (fastmdm.plots), of the columns of largest w
    when the table is wide."""
    from .plots import plot_schedule
    buffer = io.BytesIO()
    weights = model.weights
    orders = model.generation_orders() if model.kind.contextual else None
    note = ""
    if len(weights) > MAX_HEATMAP_COLUMNS and orders is None:
        weights = weights.sort_values(ascending=False).head(MAX_HEATMAP_COLUMNS)
        note = (f"<p>The {MAX_HEATMAP_COLUMNS} columns of largest w, with their reveal positions under "
                "Plackett-Luce among themselves.</p>")
    plot_schedule(weights, buffer, orders=orders)
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    return ("<h2>The model: schedule and generation order</h2><p>Higher w = generated earlier; the heatmap gives "
            f"each column's chance of being revealed at each position.</p>{note}"
            f'<img alt="" src="data:image/png;base64,{image}">')


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table.data {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }}
table.data td, table.data th {{ padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; text-align: right; }}
.figures {{ display: flex; flex-wrap: wrap; }}
.figure {{ margin: 0.3em; }}
.figure p {{ margin: 0; font-size: 0.85em; }}
img {{ max-width: 100%; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
