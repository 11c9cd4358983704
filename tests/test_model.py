import pytest
import torch

from fastmdm import datasets
from fastmdm.api import DEFAULT_ARCHITECTURE
from fastmdm.data import TableCodec
from fastmdm.models import ColumnTransformer, build_denoiser



def random_tokens(cardinalities, rows, *, masked=True, seed=0):
    """Token ids with masks (value K_l) included when `masked`."""
    generator = torch.Generator().manual_seed(seed)
    extra = 1 if masked else 0
    return torch.stack([torch.randint(0, k + extra, (rows,), generator=generator)
                        for k in cardinalities], 1)


def test_output_shape_and_buffers():
    sizes = [3, 1, 5, 2]
    model = ColumnTransformer(sizes, d_model=16, num_layers=2, num_heads=2, dim_feedforward=32)
    logits = model(random_tokens(sizes, 7))
    assert logits.shape == (7, sum(sizes)) and logits.dtype == torch.float32
    assert model.offsets.tolist() == [0, 3, 4, 9, 11]
    assert model.mask_ids.tolist() == sizes
    assert model.cardinalities == sizes


def test_default_size_on_adult():
    """The model TabularMDM builds by default for Adult, on the codec fit() learns from its train
    split, has the size the README states (79K parameters, near the paper's ~86K)."""
    train, _ = datasets.load("adult")
    codec = TableCodec.fit(train)
    model = build_denoiser(DEFAULT_ARCHITECTURE, codec.cardinalities)
    assert 75_000 <= model.num_parameters() <= 83_000, (model.num_parameters(), codec.cardinalities)


def test_config_round_trip():
    model = ColumnTransformer([4, 2, 3], d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    clone = ColumnTransformer(**model.config)
    clone.load_state_dict(model.state_dict())
    x = random_tokens([4, 2, 3], 5)
    torch.testing.assert_close(clone(x), model(x))


def test_gradient_reaches_every_parameter():
    sizes = [3, 2, 4]
    model = ColumnTransformer(sizes, d_model=8, num_layers=2, num_heads=2, dim_feedforward=8)
    x = torch.cat([random_tokens(sizes, 64), torch.tensor([sizes])])  # every id incl. masks
    (model(x) * torch.randn(x.shape[0], sum(sizes))).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_mask_token_has_its_own_embedding_and_attention_is_bidirectional():
    sizes = [3, 2, 4]
    model = ColumnTransformer(sizes, d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    visible = torch.tensor([[0, 1, 2]])
    masked_last = torch.tensor([[0, 1, 4]])
    # Column 0's prediction depends on whether the last column is masked.
    assert not torch.allclose(model(visible)[0, :3], model(masked_last)[0, :3])
    # Each column's mask id selects a distinct embedding row.
    rows = (model.mask_ids + model._embed_offsets).tolist()
    assert len(set(rows)) == 3 and max(rows) == model.token_embedding.num_embeddings - 1


def test_padded_heads_match_per_column_linear():
    sizes = [3, 1, 5]
    model = ColumnTransformer(sizes, d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    x = random_tokens(sizes, 4)
    hidden = {}
    model.norm_out.register_forward_hook(lambda _m, _i, out: hidden.setdefault("h", out))
    logits = model(x)
    for l, (lo, hi) in enumerate(zip(model.offsets[:-1].tolist(), model.offsets[1:].tolist())):
        expected = hidden["h"][:, l] @ model.heads.weight[lo:hi].T + model.heads.bias[lo:hi]
        torch.testing.assert_close(logits[:, lo:hi], expected)


def test_input_errors():
    model = ColumnTransformer([3, 2], d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    with pytest.raises(ValueError, match="columns"):
        model(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dimension"):
        model(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[0, 3]]))  # mask id of column 1 is 2
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="divisible"):
        ColumnTransformer([3], d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="cardinalities"):
        ColumnTransformer([3, 0])
