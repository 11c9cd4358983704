"""The table codec: a DataFrame's columns as token ids and back, and tables on disk.

- `types`: the dtypes taken, their plain form, and the categorical-or-numeric rule;
- `categorical` and `numeric`: how one column of each kind is coded;
- `codec`: `TableCodec`, a whole table's columns side by side;
- `files`: Parquet and CSV tables read and written a chunk at a time, and a codec fitted
  from them.
"""
from .categorical import DEFAULT_CATEGORY_CAP, OTHER_LABEL
from .codec import TableCodec
from .numeric import DEFAULT_NUM_BINS
from .types import DEFAULT_MAX_CATEGORIES, KEY_MIN_VALUES, infer_categorical, is_time_dtype, to_plain

__all__ = ["TableCodec", "infer_categorical", "is_time_dtype", "to_plain", "DEFAULT_NUM_BINS",
           "DEFAULT_MAX_CATEGORIES", "DEFAULT_CATEGORY_CAP", "OTHER_LABEL", "KEY_MIN_VALUES"]
