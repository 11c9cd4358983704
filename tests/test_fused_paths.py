"""No default path builds logits as wide as the vocabulary: every cell is scored against its
own column's head (fused ragged heads, or per-column segments of width Kmax at most).

A dispatch mode watches the output of every torch op run by fit (with validation), nelbo and
each sampler: none may have a dimension of the vocabulary's size V = sum_l K_l and more
elements than the head weight [V, d] itself (its gradient, optimizer state and EMA copy
have exactly that many).
"""
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastmdm import TabularMDM
from fastmdm.data.privacy import MIN_ROWS_PER_VALUE

TINY = dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)


class RefuseVocabularyWide(TorchDispatchMode):
    def __init__(self, vocab: int, d_model: int):
        super().__init__()
        self.vocab, self.limit = vocab, vocab * d_model

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and self.vocab in tensor.shape and tensor.numel() > self.limit:
                raise AssertionError(f"{func} built a vocabulary-wide tensor of shape {tuple(tensor.shape)}")
        return out


def wide_table(rows: int = 6000) -> pd.DataFrame:
    """A 1,200-category column (every value held by MIN_ROWS_PER_VALUE = 5 rows: a token each,
    and not a unique key) next to small ones."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({"wide": np.repeat(np.arange(rows // MIN_ROWS_PER_VALUE), MIN_ROWS_PER_VALUE).astype(str),
                         "small": rng.choice(["a", "b"], rows), "x": rng.normal(size=rows)})


def test_the_watch_catches_full_logits():
    """The check itself: the heads' padded [N, V] logits trip it."""
    model = TabularMDM(architecture="causal", epochs=1, batch_size=1024, category_cap=None,
                       progress=False, model=TINY).fit(wide_table(), validation=None)
    vocab = int(model.denoiser.offsets[-1])
    with RefuseVocabularyWide(vocab, TINY["d_model"]), pytest.raises(AssertionError, match="vocabulary-wide"):
        model.denoiser.heads.logits(torch.zeros(50, model.denoiser.num_columns, TINY["d_model"]))


@pytest.mark.parametrize("architecture, sample_options", [
    ("bidirectional", [{}]),
    ("causal", [{}, {"speculative": 2}, {"steps": 2}]),
])
def test_default_paths_never_build_vocabulary_wide_logits(architecture, sample_options):
    df = wide_table()
    model = TabularMDM(architecture=architecture, epochs=1, batch_size=1024, category_cap=None,
                       progress=False, model=TINY)
    vocab = 1201 + 3 + model.num_bins          # with each categorical column's "other" token; checked below
    with RefuseVocabularyWide(vocab, TINY["d_model"]):
        model.fit(df)
        assert np.isfinite(model.nelbo(df.head(50)))
        for options in sample_options:
            assert len(model.sample(40, seed=0, **options)) == 40
    assert int(model.denoiser.offsets[-1]) == vocab
