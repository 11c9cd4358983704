"""Categorical columns: one token per category that at least `MIN_ROWS_PER_VALUE` training rows
hold, and a shared rare ("other") token for the values without one."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .privacy import MIN_ROWS_PER_VALUE
from .types import KEY_MIN_VALUES, examples, from_plain, python_scalar, to_plain

__all__ = ["CategoricalColumn", "DEFAULT_CATEGORY_CAP", "OTHER_LABEL", "frequent_categories"]

# Most tokens a categorical column gets (its "other" token included): a memory bound. The
# denoiser's embedding and output head grow with every token and each training step scores
# all of them, so a column with thousands of frequent values would dominate the model's size
# and cost.
DEFAULT_CATEGORY_CAP = 1000
# What the rare token of a text column decodes to when the model keeps the marker.
OTHER_LABEL = "(other)"


def frequent_categories(counts: pd.Series, cap: int | None) -> set:
    """The categories that get a token of their own, from the training counts of every
    category (index: the categories in token order): those held by at least
    MIN_ROWS_PER_VALUE rows (`fastmdm.data.privacy`), and of them, beyond `cap` - 1, the most
    frequent (ties keep the category order)."""
    frequent = counts[counts >= MIN_ROWS_PER_VALUE]
    if cap is not None and len(frequent) > cap - 1:
        frequent = frequent.sort_values(ascending=False, kind="stable").iloc[:cap - 1]
    return set(frequent.index)


class CategoricalColumn:
    """One token per frequent category (held by at least MIN_ROWS_PER_VALUE training rows,
    within the cap; sorted when comparable, else in first-seen order; a category dtype's
    declared order), then the rare ("other") token for every value without one: the rare
    values, the values beyond the cap, and values first seen after fitting. Rare values are
    neither stored nor emitted: `rare_rows` counts the training rows that held one.

    Samplers never draw the rare token of a column that has a frequent category (see
    `fastmdm.decoding.ColumnLayout`), so a rare cell is drawn among the frequent categories
    from the model's conditional. With `marker` (TabularMDM's `rare_marker`) they may, and
    the rare token decodes to OTHER_LABEL in a text column and to a missing value in a
    column of numbers, bools or a category dtype. A column with no frequent category comes
    back missing. Without the marker, a rare token that reaches decoding all the same (the
    token of a given cell, which the caller puts back) becomes a category drawn by the
    training counts.
    A category dtype keeps its declared order, without the categories held by 1 to
    MIN_ROWS_PER_VALUE - 1 rows (the dtype would name them); declared categories no row
    holds stay.
    """

    is_numeric = False

    def __init__(self, name, dtype: str, has_missing: bool, categories: list, counts: list[int], rare_rows: int,
                 domain: list | None = None, ordered: bool = False):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.categories, self.counts, self.rare_rows = categories, counts, rare_rows
        self.domain, self.ordered = domain, ordered  # a category dtype's declared categories
        self._index = pd.Index(categories, dtype=object)
        self.pandas_dtype = (pd.CategoricalDtype(domain, ordered=ordered) if dtype == "category"
                             else pd.api.types.pandas_dtype(dtype))

    @classmethod
    def fit(cls, name, series: pd.Series, has_missing: bool, cap: int | None) -> "CategoricalColumn":
        is_category = isinstance(series.dtype, pd.CategoricalDtype)
        plain = to_plain(name, series, series.dtype).dropna()
        if is_category:
            values = list(series.cat.categories)  # the declared domain, used or not
        else:
            values = list(pd.unique(plain))
            try:
                values = sorted(values)
            except TypeError:
                pass
        counts = plain.value_counts().reindex(values, fill_value=0)
        if len(plain) and (counts == 1).sum() > len(plain) / 2 and len(values) >= KEY_MIN_VALUES:
            raise ValueError(f"column {name!r} looks like a unique key ({len(values):,} distinct values; "
                             f"{(counts == 1).sum() / len(plain):.0%} of the rows hold a value seen only once): "
                             "a generator can only copy such values, not learn them. Drop it before fitting, "
                             "and number the synthetic rows yourself if you need a key.")
        kept = frequent_categories(counts, cap)
        domain = [python_scalar(v) for v, n in counts.items() if n == 0 or n >= MIN_ROWS_PER_VALUE] \
            if is_category else None
        values = [v for v in values if v in kept]
        kept_counts = [int(counts.loc[v]) for v in values]
        return cls(name, str(series.dtype), has_missing, [python_scalar(v) for v in values], kept_counts,
                   len(plain) - sum(kept_counts), domain, bool(series.cat.ordered) if is_category else False)

    @property
    def rare_share(self) -> float:
        """The share of the training rows with a value (not missing) that hold a rare one."""
        present = self.rare_rows + sum(self.counts)
        return self.rare_rows / present if present else 0.0

    @property
    def num_values(self) -> int:
        return len(self.categories) + 1  # the categories, then "other"

    def encode(self, series: pd.Series, missing: np.ndarray) -> np.ndarray:
        codes = self._index.get_indexer(series.to_numpy(dtype=object))
        codes[(codes < 0) & ~missing] = len(self.categories)
        return codes

    def value_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(value, value) of each category token, for comparisons between columns; "other" and missing are (+inf, -inf), which satisfy no comparison. Only a
        column of numbers compares."""
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.categories):
            raise ValueError(f"column {self.name!r} holds categories that are not numbers; a rule compares numbers "
                             "or times")
        values = np.array(self.categories, dtype=np.float64)
        never = np.full(self.num_values + int(self.has_missing) - len(values), np.inf)
        return np.concatenate([values, never]), np.concatenate([values, -never])

    def set_weights(self, values) -> tuple[np.ndarray, tuple]:
        """(1 for the tokens of `values`, else 0, over the column's tokens; the values that
        have no token of their own). A value matches a category by its printed form, so a
        command line's "9" finds the category 9. Values without a token take the rare token
        of a column whose training rows held rare values (they may be among them); in another
        column the table never had them, which is an error."""
        weights = np.zeros(self.num_values + int(self.has_missing))
        printed = {str(c): i for i, c in enumerate(self.categories)}
        others = []
        for value in values:
            if value is None or (isinstance(value, float) and np.isnan(value)):
                if not self.has_missing:
                    raise ValueError(f"condition on {self.name!r}: the column had no missing values")
                weights[self.num_values] = 1.0
                continue
            i = int(self._index.get_indexer([value])[0])
            i = printed.get(str(value), -1) if i < 0 else i
            if i >= 0:
                weights[i] = 1.0
            else:
                others.append(value)
        if others:
            if not self.rare_rows:
                raise ValueError(f"condition on {self.name!r}: the table never had {examples(np.array(others, dtype=object))}")
            weights[len(self.categories)] = 1.0
        return weights, tuple(others)

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator, choices: tuple = (),
               marker: bool = False) -> pd.Series:
        """Categories of the tokens; the rare token as the class docstring says (`marker`: the
        model keeps the marker), or, with `choices` (a set condition's values without a
        token), one of them drawn uniformly."""
        codes = np.where(missing, 0, codes)
        other = codes == len(self.categories)
        u = torch.rand(len(codes), generator=generator, dtype=torch.float64).numpy()
        values = np.empty(len(codes), dtype=object)
        if choices:
            values[~other] = np.array(self.categories, dtype=object)[codes[~other]]
            values[other] = np.array(choices, dtype=object)[np.minimum((u[other] * len(choices)).astype(np.int64),
                                                                       len(choices) - 1)]
            return from_plain(values, missing, self.pandas_dtype)
        text = pd.api.types.is_object_dtype(self.pandas_dtype) or pd.api.types.is_string_dtype(self.pandas_dtype)
        if not marker and self.categories:
            # A rare token the sampler did not draw (a given cell's, which the caller puts
            # back): a category drawn by the training counts keeps the column's dtype.
            cumulative = np.cumsum(self.counts)
            drawn = np.minimum(np.searchsorted(cumulative, u * cumulative[-1], side="right"), len(self.categories) - 1)
            codes, other = np.where(other, drawn, codes), np.zeros(len(codes), dtype=bool)
        values[~other] = np.array(self.categories, dtype=object)[codes[~other]]
        if marker and text:
            values[other] = OTHER_LABEL
        else:
            # A placeholder of the right type, masked below.
            values[other] = self.categories[0] if self.categories else (OTHER_LABEL if text else 0)
            missing = missing | other
        return from_plain(values, missing, self.pandas_dtype)

    def state_dict(self) -> dict:
        return {"kind": "categorical", "categories": list(self.categories), "counts": list(self.counts),
                "rare_rows": self.rare_rows, "domain": self.domain, "ordered": self.ordered}
