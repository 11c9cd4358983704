"""TableCodec: pandas DataFrame <-> token ids, one discrete token per column.

Masked diffusion works on discrete tokens, so every column becomes a small vocabulary:
categorical columns map each category to an id, numeric columns map each value to a
bin. Decoding a bin gives back one of the column's atoms in it (a value at least
`MIN_ROWS_PER_VALUE` rows hold: capital-gain = 0, round amounts), exactly, or draws a new
number inside the bin from the column's quantile sketch, at the column's observed precision.
The codec stores atoms and quantile levels, never a value fewer rows hold (see `NumericColumn`).
A column that had missing values when fitted gets one extra token for "missing".

Every categorical column has a rare ("other") token, after its categories: values it has no
token for, that is, values fewer than `MIN_ROWS_PER_VALUE` training rows hold
(`fastmdm.data.privacy`), frequent values beyond `category_cap`, and categories first seen
after fitting (a held-out split's). So any split of a table encodes, and the model scores an
unseen category by the probability it gives the rare token (learnt from the rare values'
share in a column that had some; in other columns the model never sees the token in
training, so an unseen value costs what a never-seen token costs, typically several nats).
See `CategoricalColumn` for what the rare token decodes to: the codec keeps no list of rare
values to copy, and `rare_tokens` names the tokens samplers must not draw.

How a column is typed and how time columns become numbers: `fastmdm.data.types`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .._checks import INT_DTYPES, check_tensor
from .categorical import DEFAULT_CATEGORY_CAP, CategoricalColumn
from .numeric import DEFAULT_NUM_BINS, NumericColumn
from .privacy import MIN_ROWS_PER_VALUE
from .types import (DEFAULT_MAX_CATEGORIES, check_finite, check_supported, examples, from_plain,
                    infer_categorical, is_numeric_plain, is_time_dtype, to_plain)

__all__ = ["TableCodec"]

_STATE_VERSION = 4


class TableCodec:
    """Maps a table's rows to int64 tokens [N, L] and back.

    Column l has cardinalities[l] = K_l values (categories or bins, plus a final "missing"
    token if the column had missing values when fitted); its mask token is K_l, one past
    the last real value. offsets[l] is where column l starts in a flat [sum K_l] vocabulary.
    Build with TableCodec.fit(df).
    """

    def __init__(self, columns: Sequence[CategoricalColumn | NumericColumn]):
        self._columns = list(columns)
        self.columns = [c.name for c in self._columns]
        self.num_columns = len(self._columns)
        self.is_numeric = [c.is_numeric for c in self._columns]
        self.cardinalities = [c.num_values + int(c.has_missing) for c in self._columns]
        self.mask_ids = torch.tensor(self.cardinalities, dtype=torch.int64)
        self.offsets = torch.zeros(self.num_columns + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.mask_ids, 0)

    def token_positions(self) -> list[list[float] | None]:
        """Per column, where each token sits in the column's order (numbers: the bin's middle
        quantile; NaN for a missing token), or None for a column of categories: the
        denoiser shares what it learns between neighbouring bins through these."""
        return [column.token_positions() if column.is_numeric else None for column in self._columns]

    @classmethod
    def fit(cls, df: pd.DataFrame, *, num_bins: int = DEFAULT_NUM_BINS,
            categorical: Sequence[str] | None = None,
            max_categories: int = DEFAULT_MAX_CATEGORIES,
            category_cap: int | None = DEFAULT_CATEGORY_CAP) -> "TableCodec":
        """Learn each column's vocabulary from `df`.

        categorical=None detects types (`infer_categorical`): object/string/category/bool
        columns and integer-valued numeric columns with <= max_categories distinct values are
        categorical, other numeric columns (datetimes and timedeltas included) get up to
        num_bins quantile bins. A list names exactly the categorical columns.
        A categorical column keeps a token for each value at least MIN_ROWS_PER_VALUE rows
        hold, and of those, beyond `category_cap`, for the category_cap - 1 most frequent
        (None: no cap); the rest share the rare token every categorical column has for values
        it has no token for.
        A categorical column that looks like a unique key (most rows hold a value seen once) is
        refused with a message naming it; all-distinct integers (row ids) get a warning.

        What else a user's table may hold, decided here before any training (every refusal
        is a ValueError or TypeError naming the column and what to do):
        - a column with only missing values is refused (drop it);
        - infinities are refused (`check_finite`: replace them with NaN or a finite cap);
        - an object column mixing text with numbers or bools is text (`to_plain`);
        - a constant column is kept: one category, or one bin that decodes to its value;
        - a table needs MIN_ROWS_PER_VALUE rows (with fewer, no value could be stored or
          generated: `fastmdm.data.privacy`); one column is enough.
        """
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
        if df.shape[1] == 0:
            raise ValueError("cannot fit a codec on a table with no columns")
        if len(df) == 0:
            raise ValueError("cannot fit a codec on a table with no rows")
        if len(df) < MIN_ROWS_PER_VALUE:
            raise ValueError(f"the table has {len(df)} row(s), fewer than MIN_ROWS_PER_VALUE = {MIN_ROWS_PER_VALUE}: "
                             f"every value would be held by fewer than {MIN_ROWS_PER_VALUE} rows, and fastmdm stores "
                             "or generates only values that many rows hold (fastmdm.data.privacy); give it at least "
                             f"{MIN_ROWS_PER_VALUE} rows")
        if df.columns.duplicated().any():
            raise ValueError(f"duplicate column names: {examples(df.columns[df.columns.duplicated()])}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        if isinstance(max_categories, bool) or not isinstance(max_categories, int) or max_categories < 0:
            raise ValueError(f"max_categories must be an integer >= 0, got {max_categories!r}")
        if category_cap is not None and (isinstance(category_cap, bool) or not isinstance(category_cap, int)
                                         or category_cap < 2):
            raise ValueError(f"category_cap must be None or an integer >= 2, got {category_cap!r}")
        if isinstance(categorical, str):
            raise TypeError("categorical must be a list of column names, not a single string")
        if categorical is not None:
            categorical = list(categorical)
            unknown = [c for c in categorical if c not in df.columns]
            if unknown:
                raise ValueError(f"categorical names columns not in the table: {unknown}")

        columns = []
        for name in df.columns:
            if not isinstance(name, (str, int)) or isinstance(name, bool):
                raise TypeError(f"column names must be str or int, got {name!r}")
            series = df[name]
            missing = series.isna()
            if missing.all():
                raise ValueError(f"column {name!r} has only missing values; drop it before fitting")
            check_finite(name, series)
            is_categorical = cls._is_categorical(name, series, categorical, max_categories)
            if is_categorical:
                columns.append(CategoricalColumn.fit(name, series, bool(missing.any()), category_cap))
            else:
                columns.append(NumericColumn.fit(name, series, bool(missing.any()), num_bins))
        return cls(columns)

    @staticmethod
    def _is_categorical(name, series: pd.Series, categorical, max_categories: int) -> bool:
        check_supported(name, series.dtype)
        if categorical is None:
            return infer_categorical(series, max_categories)
        if not (is_numeric_plain(series.dtype) or is_time_dtype(series.dtype)) and name not in categorical:
            raise TypeError(f"column {name!r} has dtype {series.dtype} but is not listed in categorical")
        return name in categorical

    # ----------------------------------------------------------------------------- encode
    @staticmethod
    def _plain(column: CategoricalColumn | NumericColumn, series: pd.Series) -> pd.Series:
        """`to_plain` of a frame's column for `column`, read as text when the column was
        fitted as text (an object column whose every category is a string)."""
        if isinstance(series.dtype, pd.CategoricalDtype):
            series = series.astype(object)
        text = (not column.is_numeric and column.dtype == "object"
                and all(isinstance(c, str) for c in column.categories))
        return to_plain(column.name, series, column.pandas_dtype, text=text)

    def _check_frame(self, df: pd.DataFrame) -> None:
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
        missing = [c for c in self.columns if c not in df.columns]
        extra = [c for c in df.columns if c not in self.columns]
        if missing or extra:
            raise ValueError(f"table does not match the codec's schema: missing columns {missing}, "
                             f"unexpected columns {extra}")
        if len(df) == 0:
            raise ValueError("cannot encode a table with no rows")

    def _encode(self, df: pd.DataFrame, nan_is_unknown: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_frame(df)
        tokens = np.zeros((len(df), self.num_columns), dtype=np.int64)
        known = np.ones((len(df), self.num_columns), dtype=bool)
        for l, column in enumerate(self._columns):
            series = self._plain(column, df[column.name].reset_index(drop=True))
            check_finite(column.name, series)
            missing = series.isna().to_numpy()
            tokens[:, l] = column.encode(series, missing)
            if nan_is_unknown:
                tokens[missing, l] = 0
                known[:, l] = ~missing
            elif missing.any():
                if not column.has_missing:
                    raise ValueError(f"column {column.name!r} has {int(missing.sum())} missing value(s) but "
                                     "had none when the codec was fitted (use encode_partial to impute them)")
                tokens[missing, l] = column.num_values
        return torch.from_numpy(tokens), torch.from_numpy(known)

    def encode(self, df: pd.DataFrame) -> torch.Tensor:
        """Tokens int64 [N, L] in codec column order; NaN becomes the column's missing token."""
        return self._encode(df, nan_is_unknown=False)[0]

    def encode_partial(self, df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N, L], known bool [N, L]) for imputation: NaN marks a value to fill in.

        Unknown positions hold token 0 and known=False (callers replace them with mask_ids).
        """
        return self._encode(df, nan_is_unknown=True)

    # ----------------------------------------------------------------------------- decode
    def keep_given(self, given: pd.DataFrame, decoded: pd.DataFrame) -> pd.DataFrame:
        """`decoded` with every known (non-NaN) cell of `given` put back as given, in the
        fitted dtype (text parsed as encoding does). A token is a numeric bin or the shared
        rare token, and decoding draws a number inside the bin or does not write the rare
        value, so the tokens alone would not return a conditioned or imputed row's known
        values. A category dtype that lacks a given value (one fewer than MIN_ROWS_PER_VALUE
        training rows held, which the fitted dtype does not name) gets it appended to its
        categories in this frame: the caller's own value comes back, nothing of the model's."""
        self._check_frame(given)
        if len(given) != len(decoded):
            raise ValueError(f"given has {len(given)} rows but decoded has {len(decoded)}")
        out = decoded.copy()
        for column in self._columns:
            plain = self._plain(column, given[column.name].reset_index(drop=True))
            if column.is_numeric and plain.dtype == object:
                plain = pd.to_numeric(plain, errors="coerce")
            known = plain.notna().to_numpy()
            if not known.any():
                continue
            values = plain.to_numpy(dtype=object)
            values[~known] = values[known][0]   # placeholders: those cells keep the decoded value
            dtype, drawn = column.pandas_dtype, decoded[column.name].reset_index(drop=True)
            if isinstance(dtype, pd.CategoricalDtype):
                extra = [v for v in dict.fromkeys(values[known]) if v not in set(dtype.categories)]
                if extra:
                    dtype = pd.CategoricalDtype([*dtype.categories, *extra], ordered=dtype.ordered)
                    drawn = drawn.astype(dtype)
            restored = from_plain(values, np.zeros(len(values), dtype=bool), dtype)
            if known.all():
                out[column.name] = restored.set_axis(decoded.index)
                continue
            if drawn[~known].isna().any():   # a column none of whose values may be generated stays missing
                restored = restored.astype(drawn.dtype)
            out[column.name] = restored.where(known, drawn).set_axis(decoded.index)
        return out

    def decode(self, tokens: torch.Tensor, generator: torch.Generator | None = None, *,
               ranges: dict | None = None, choices: dict | None = None, rare_marker: bool = False) -> pd.DataFrame:
        """DataFrame with the fitted column names, order and dtypes.

        Numeric bins decode to a number drawn inside the bin (random via `generator`, a CPU
        torch.Generator; see `NumericColumn`); missing tokens decode to NaN; rare tokens as
        `CategoricalColumn` says (OTHER_LABEL in text columns with `rare_marker`). Rows
        sampled under set or range conditions (`fastmdm.conditions`) pass them: `ranges`
        {numeric column: (low, high)} draws the numbers inside the range, `choices` {column:
        values} decodes the rare token to one of a set's values that have no token.
        """
        check_tensor("tokens", tokens, ndim=2, dtypes=INT_DTYPES)
        if tokens.shape[1] != self.num_columns:
            raise ValueError(f"tokens has {tokens.shape[1]} columns but the codec has {self.num_columns}")
        tokens = tokens.detach().to("cpu", torch.int64)
        out = {}
        for l, column in enumerate(self._columns):
            codes = tokens[:, l].numpy()
            bad = (codes < 0) | (codes >= self.cardinalities[l])
            if bad.any():
                hint = " (mask tokens must be sampled before decoding)" if (codes == self.cardinalities[l]).any() else ""
                raise ValueError(f"column {column.name!r} has token ids outside [0, {self.cardinalities[l]}): "
                                 f"{examples(codes[bad])}{hint}")
            missing = (codes == column.num_values) if column.has_missing else np.zeros(len(codes), dtype=bool)
            if column.is_numeric and ranges and column.name in ranges:
                out[column.name] = column.decode(codes, missing, generator, ranges[column.name])
            elif not column.is_numeric and choices and column.name in choices:
                out[column.name] = column.decode(codes, missing, generator, choices[column.name])
            elif column.is_numeric:
                out[column.name] = column.decode(codes, missing, generator)
            else:
                out[column.name] = column.decode(codes, missing, generator, marker=rare_marker)
        return pd.DataFrame(out, columns=self.columns)

    def rare_tokens(self) -> list[int]:
        """The rare token of every categorical column that has a frequent category, as ids of the
        flat [sum K_l] vocabulary: the tokens a sampler draws no value from unless the model
        keeps the marker (a column with no frequent category has nothing else to draw)."""
        return [int(self.offsets[l]) + len(column.categories) for l, column in enumerate(self._columns)
                if not column.is_numeric and column.categories]

    def rare_shares(self) -> dict:
        """{categorical column: the share of its training rows with a value that hold a rare one}."""
        return {column.name: column.rare_share for column in self._columns if not column.is_numeric}

    def column(self, name) -> CategoricalColumn | NumericColumn:
        """How the column `name` is coded: its categories, or its bins, atoms and quantile sketch."""
        return self._columns[self.columns.index(name)]

    def redraw(self, column, tokens: torch.Tensor, low, high, generator: torch.Generator | None = None) -> pd.Series:
        """A numeric column's values decoded again from its tokens [N] inside [low, high]
        (numbers, None or per-row arrays), in the fitted dtype."""
        codes = tokens.detach().to("cpu", torch.int64).numpy()
        numeric = self.column(column)
        missing = (codes == numeric.num_values) if numeric.has_missing else np.zeros(len(codes), dtype=bool)
        return numeric.decode(codes, missing, generator, (low, high))

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain Python types and tensors only: loads with torch.load(weights_only=True)."""
        return {"version": _STATE_VERSION,
                "columns": [{"name": c.name, "dtype": c.dtype, "has_missing": c.has_missing, **c.state_dict()}
                            for c in self._columns]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TableCodec":
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported TableCodec state version {version!r} (this fastmdm reads version "
                             f"{_STATE_VERSION}); refit the model with this version")
        columns = []
        for c in state["columns"]:
            common = (c["name"], c["dtype"], c["has_missing"])
            if c["kind"] == "categorical":
                columns.append(CategoricalColumn(*common, list(c["categories"]), list(c["counts"]), c["rare_rows"],
                                            c["domain"], c["ordered"]))
            else:
                columns.append(NumericColumn(*common, c["lefts"], c["sketch"], c["atoms"], c["atom_counts"],
                                             c["residual_rows"], c["step"], c["decimals"]))
        return cls(columns)

    def __repr__(self) -> str:
        kinds = sum(self.is_numeric)
        return (f"TableCodec({self.num_columns} columns: {kinds} numeric, {self.num_columns - kinds} categorical; "
                f"vocabulary {int(self.offsets[-1])})")
