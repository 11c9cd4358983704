"""Categorical columns: one token per category, and an "other" token for the values without one."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .types import KEY_MIN_VALUES, examples, from_plain, python_scalar, to_plain

__all__ = ["CategoricalColumn", "DEFAULT_CATEGORY_CAP", "OTHER_LABEL"]

# Most tokens a categorical column gets (its "other" token included). The denoiser's
# embedding and output head grow with every token and each training step scores all of them,
# so a column with thousands of rare values (flights' 4,043 tail numbers) would dominate the
# model's size and cost while each rare value is seen too seldom to learn.
DEFAULT_CATEGORY_CAP = 1000
# What the "other" token of a text column decodes to.
OTHER_LABEL = "(other)"


class CategoricalColumn:
    """One token per category (sorted when comparable, else in first-seen order; a category
    dtype's declared order), then the "other" token for every value without one (rare
    values beyond the cap, values first seen after fitting).

    Decoding "other": in a capped column it stands for the rare values, and becomes
    OTHER_LABEL (missing where the dtype cannot hold text). In an uncapped column no training
    row holds it, so a model generates it only by error (an undertrained model now and then);
    it becomes a category drawn by the training counts, so synthetic rows hold only the
    column's categories.
    """

    is_numeric = False

    def __init__(self, name, dtype: str, has_missing: bool, categories: list, counts: list[int], capped: bool,
                 domain: list | None = None, ordered: bool = False):
        self.name, self.dtype, self.has_missing = name, dtype, has_missing
        self.categories, self.counts, self.capped = categories, counts, capped
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
        capped = cap is not None and len(values) > cap
        if capped:
            # Most frequent first; ties keep the category order (a stable sort).
            kept = set(counts.sort_values(ascending=False, kind="stable").index[:cap - 1])
            values = [v for v in values if v in kept]
        domain = [python_scalar(v) for v in series.cat.categories] if is_category else None
        return cls(name, str(series.dtype), has_missing, [python_scalar(v) for v in values],
                   [int(counts[v]) for v in values], capped, domain,
                   bool(series.cat.ordered) if is_category else False)

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
        command line's "9" finds the category 9. Values without a token take the "other"
        token of a capped column (they may be its rare values); in an uncapped column the
        table never had them, which is an error."""
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
            if not self.capped:
                raise ValueError(f"condition on {self.name!r}: the table never had {examples(np.array(others, dtype=object))}")
            weights[len(self.categories)] = 1.0
        return weights, tuple(others)

    def decode(self, codes: np.ndarray, missing: np.ndarray, generator, choices: tuple = ()) -> pd.Series:
        """Categories of the tokens; "other" as the class docstring says, or, with `choices`
        (a set condition's values without a token), one of them drawn uniformly."""
        codes = np.where(missing, 0, codes)
        other = codes == len(self.categories)
        u = torch.rand(len(codes), generator=generator, dtype=torch.float64).numpy()
        if choices:
            values = np.empty(len(codes), dtype=object)
            values[~other] = np.array(self.categories, dtype=object)[codes[~other]]
            values[other] = np.array(choices, dtype=object)[np.minimum((u[other] * len(choices)).astype(np.int64),
                                                                       len(choices) - 1)]
            return from_plain(values, missing, self.pandas_dtype)
        if not self.capped:
            cumulative = np.cumsum(self.counts)
            drawn = np.minimum(np.searchsorted(cumulative, u * cumulative[-1], side="right"), len(self.categories) - 1)
            codes, other = np.where(other, drawn, codes), np.zeros(len(codes), dtype=bool)
        values = np.empty(len(codes), dtype=object)
        values[~other] = np.array(self.categories, dtype=object)[codes[~other]]
        if pd.api.types.is_object_dtype(self.pandas_dtype) or pd.api.types.is_string_dtype(self.pandas_dtype):
            values[other] = OTHER_LABEL
        else:
            values[other] = self.categories[0]  # a placeholder of the right type, masked below
            missing = missing | other
        return from_plain(values, missing, self.pandas_dtype)

    def state_dict(self) -> dict:
        return {"kind": "categorical", "categories": list(self.categories), "counts": list(self.counts),
                "capped": self.capped, "domain": self.domain, "ordered": self.ordered}
