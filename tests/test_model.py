import pytest
import torch

from fastmdm import datasets
from fastmdm.api import DEFAULT_ARCHITECTURE
from fastmdm.data import TableCodec
from fastmdm.models import ColumnTransformer, build_denoiser
from fastmdm.models.base import ORDINAL_FEATURES



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
    split, has about the size of the paper's ~86K-parameter models (113K, 479 tokens: age,
    capital gain and loss and hours have a token per value)."""
    train, _ = datasets.load("adult")
    codec = TableCodec.fit(train)
    model = build_denoiser(DEFAULT_ARCHITECTURE, codec.cardinalities, token_positions=codec.token_positions())
    assert 108_000 <= model.num_parameters() <= 118_000, (model.num_parameters(), codec.cardinalities)


def test_config_round_trip():
    model = ColumnTransformer([4, 2, 3], d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    clone = ColumnTransformer(**model.config)
    clone.load_state_dict(model.state_dict())
    x = random_tokens([4, 2, 3], 5)
    torch.testing.assert_close(clone(x), model(x))


POSITIONS = [None, None, [0.1, 0.3, 0.6, float("nan")]]   # the last column ordered, its missing token not


def test_gradient_reaches_every_parameter():
    sizes = [3, 2, 4]
    model = ColumnTransformer(sizes, d_model=8, num_layers=2, num_heads=2, dim_feedforward=8,
                              token_positions=POSITIONS)
    x = torch.cat([random_tokens(sizes, 64), torch.tensor([sizes])])  # every id incl. masks
    (model(x) * torch.randn(x.shape[0], sum(sizes))).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def randomize_ordinal_parts(model):
    with torch.no_grad():
        for module in (model.ordinal_embedding, model.heads.ordinal_weight, model.heads.ordinal_bias):
            module.table.normal_()


def test_ordered_tokens_add_a_smooth_function_of_their_position():
    """An ordered token's embedding and head rows are its own row plus phi(u) A_l, phi the
    cosine features of its position; other tokens (categories, the missing token, masks) keep
    their own rows. A fresh model's smooth parts are zero: it equals the model without them."""
    sizes = [3, 2, 4]
    options = dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)
    torch.manual_seed(0)
    plain = ColumnTransformer(sizes, **options)
    torch.manual_seed(0)
    model = ColumnTransformer(sizes, **options, token_positions=POSITIONS)
    x = random_tokens(sizes, 16)
    torch.testing.assert_close(model(x), plain(x))
    randomize_ordinal_parts(model)
    phi = torch.cos(torch.pi * torch.tensor([0.1, 0.3, 0.6])[:, None] * torch.arange(1, ORDINAL_FEATURES + 1))
    embedded = model.embed_values(torch.arange(5), torch.full((5,), 2))          # 3 ordered, missing, mask
    own = model.token_embedding.weight[model._embed_offsets[2] + torch.arange(5)] + model.column_embedding[2]
    smooth = phi @ model.ordinal_embedding.table.view(ORDINAL_FEATURES, -1)
    torch.testing.assert_close(embedded, own + torch.cat([smooth, torch.zeros(2, 8)]))
    torch.testing.assert_close(model.embed_values(torch.arange(3), torch.zeros(3, dtype=torch.int64)),
                               model.token_embedding.weight[:3] + model.column_embedding[0])
    weight, bias = model.heads.weight_and_bias()
    rows = slice(5, 8)
    torch.testing.assert_close(weight[rows], model.heads.weight[rows] + phi @ model.heads.ordinal_weight.table.view(
        ORDINAL_FEATURES, -1))
    torch.testing.assert_close(bias[rows], model.heads.bias[rows] + phi @ model.heads.ordinal_bias.table.view(-1))
    torch.testing.assert_close(weight[:5], model.heads.weight[:5])
    torch.testing.assert_close(weight[8], model.heads.weight[8])


def test_every_head_path_scores_the_smooth_parts():
    """The fused loss, the fused sampler and the logits all use the same ordered-token rows."""
    sizes = [3, 2, 4]
    model = ColumnTransformer(sizes, d_model=8, num_layers=1, num_heads=2, dim_feedforward=8,
                              token_positions=POSITIONS)
    randomize_ordinal_parts(model)
    h = torch.randn(32, 3, 8)
    targets = random_tokens(sizes, 32, masked=False)
    logits = model.heads.logits(h)
    expected = torch.zeros(32)
    for l, (lo, hi) in enumerate(zip(model.offsets[:-1].tolist(), model.offsets[1:].tolist())):
        expected -= torch.log_softmax(logits[:, lo:hi], 1).gather(1, targets[:, l:l + 1]).squeeze(1)
    loss = model.heads.loss(h, targets, torch.ones(32, 3), torch.ones(32, 3, dtype=torch.bool))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    columns = torch.full((32,), 2)
    drawn = model.heads.sample(h[:, 2], columns, temperature=0.0)
    assert torch.equal(drawn, logits[:, 5:9].argmax(1))


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
