import itertools

import pytest
import torch
import torch.nn.functional as F

from fastmdm.models import ColumnTransformer
from fastmdm.decoding import impute_tokens, reveal_steps, sample_tokens
from fastmdm.schedules import PowerSchedule, plackett_luce_log_prob

SIZES = (2, 3, 2)
MASK_ID = torch.tensor(SIZES)
OFFSETS = torch.tensor([0, 2, 5, 7])
ROWS = 40_000


def random_joint(seed=0):
    """A strongly dependent joint P(x0, x1, x2) over SIZES, shape [2, 3, 2]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(12, generator=generator, dtype=torch.float64), 0).view(SIZES)


class Oracle:
    """Exact conditionals: logits of column l = log P(x_l | visible columns), for every l.

    Records which columns were masked at each call, so tests can read the reveal order back.
    """

    def __init__(self, joint):
        self.configs = torch.cartesian_prod(*[torch.arange(k) for k in SIZES])  # [12, L]
        self.prob = joint.flatten()
        self.onehots = [F.one_hot(self.configs[:, l], k).double() for l, k in enumerate(SIZES)]
        self.masked = []

    def __call__(self, x):
        visible = x != MASK_ID
        self.masked.append(~visible)
        agrees = ((self.configs[None] == x[:, None]) | ~visible[:, None]).all(2)  # [N, 12]
        weight = agrees * self.prob
        return torch.cat([torch.log(weight @ onehot) for onehot in self.onehots], 1).float()

    def reveal_steps(self):
        """Call index at which each column was revealed ([N, L]; -1 for columns never masked)."""
        return torch.stack(self.masked).sum(0) - 1


def empirical(tokens, sizes=SIZES):
    flat = torch.zeros((), dtype=torch.int64)
    for l, k in enumerate(sizes):
        flat = flat * k + tokens[:, l]
    count = torch.bincount(flat, minlength=int(torch.tensor(sizes).prod()))
    return (count.double() / tokens.shape[0]).view(sizes)


def assert_distribution(observed, expected, rows):
    """Every cell within 5 binomial standard deviations (plus a hair for rounding)."""
    sigma = (expected * (1 - expected) / rows).sqrt()
    error = (observed - expected).abs()
    assert bool((error <= 5 * sigma + 1e-4).all()), (observed, expected)


@pytest.mark.parametrize("w", [[1.0, 1.0, 1.0], [0.3, 1.0, 4.0]])
def test_steps_equal_to_L_sample_the_joint_exactly(w):
    joint = random_joint()
    tokens = sample_tokens(Oracle(joint), torch.tensor(w), MASK_ID, OFFSETS, ROWS,
                           generator=torch.Generator().manual_seed(1))
    assert_distribution(empirical(tokens), joint, ROWS)


def test_one_step_samples_the_product_of_marginals():
    joint = random_joint()
    tokens = sample_tokens(Oracle(joint), torch.ones(3), MASK_ID, OFFSETS, ROWS, steps=1,
                           generator=torch.Generator().manual_seed(2))
    product = (joint.sum((1, 2))[:, None, None] * joint.sum((0, 2))[None, :, None]
               * joint.sum((0, 1))[None, None, :])
    assert (product - joint).abs().max() > 0.02  # the test can tell them apart
    assert_distribution(empirical(tokens), product, ROWS)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_conditioning_on_a_column(steps):
    joint = random_joint()
    a = 1
    known = torch.zeros(ROWS, 3, dtype=torch.int64)
    known[:, 0] = a
    oracle = Oracle(joint)
    tokens = sample_tokens(oracle, torch.tensor([2.0, 0.5, 1.0]), MASK_ID, OFFSETS, ROWS,
                           steps=steps, known=known, known_mask=torch.tensor([True, False, False]),
                           generator=torch.Generator().manual_seed(3), batch_size=ROWS)
    assert bool((tokens[:, 0] == a).all())
    assert all(not bool(masked[:, 0].any()) for masked in oracle.masked)  # visible throughout
    conditional = joint[a] / joint[a].sum()
    if steps == 1:  # both unknown columns at once: product of the conditional marginals
        conditional = conditional.sum(1, keepdim=True) * conditional.sum(0, keepdim=True)
    assert len(oracle.masked) == min(steps, 2)
    assert_distribution(empirical(tokens[:, 1:], SIZES[1:]), conditional, ROWS)


def test_imputation_keeps_known_values_and_samples_the_conditional():
    joint = random_joint()
    generator = torch.Generator().manual_seed(4)
    truth = sample_tokens(Oracle(joint), torch.ones(3), MASK_ID, OFFSETS, ROWS, generator=generator)
    known_mask = torch.rand(ROWS, 3, generator=generator) < 0.5
    tokens = torch.where(known_mask, truth, MASK_ID)
    imputed = impute_tokens(Oracle(joint), torch.tensor([0.5, 1.0, 2.0]), MASK_ID, OFFSETS, tokens,
                            generator=generator)
    assert bool((imputed[known_mask] == truth[known_mask]).all())
    assert bool((imputed < MASK_ID).all())
    # Rows that knew only x2 = 0: (x0, x1) follows P(x0, x1 | x2 = 0).
    group = (known_mask == torch.tensor([False, False, True])).all(1) & (truth[:, 2] == 0)
    conditional = joint[:, :, 0] / joint[:, :, 0].sum()
    assert_distribution(empirical(imputed[group, :2], SIZES[:2]), conditional, int(group.sum()))
    # A fully known row is returned as is, without calling the denoiser.
    assert torch.equal(impute_tokens(Oracle(joint), torch.ones(3), MASK_ID, OFFSETS, truth[:5]),
                       truth[:5])


def test_reveal_order_is_plackett_luce():
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    oracle = Oracle(random_joint())
    sample_tokens(oracle, w, MASK_ID, OFFSETS, ROWS, batch_size=ROWS,
                  generator=torch.Generator().manual_seed(5))
    step = oracle.reveal_steps()
    assert sorted(step[0].tolist()) == [0, 1, 2]  # one column per call
    orders = torch.argsort(step, 1)
    for perm in itertools.permutations(range(3)):
        frequency = (orders == torch.tensor(perm)).all(1).double().mean()
        expected = plackett_luce_log_prob(w, torch.tensor([perm])).exp()[0]
        sigma = (expected * (1 - expected) / ROWS).sqrt()
        assert abs(frequency - expected) <= 5 * sigma, perm


def test_chunks_are_as_equal_as_possible():
    generator = torch.Generator().manual_seed(6)
    w = torch.rand(15, generator=generator) + 0.1
    step = reveal_steps(w, 100, 4, generator=generator)
    sizes = torch.stack([(step == s).sum(1) for s in range(4)], 1)
    assert bool(((sizes == 3) | (sizes == 4)).all()) and bool((sizes.sum(1) == 15).all())
    known_mask = torch.rand(100, 15, generator=generator) < 0.7
    step = reveal_steps(w, 100, 4, known_mask, generator=generator)
    assert bool((step[known_mask] == -1).all())
    unknown = (~known_mask).sum(1)
    for row in range(100):
        counts = torch.bincount(step[row][~known_mask[row]], minlength=1)
        m, used = int(unknown[row]), min(4, int(unknown[row]))
        assert counts.numel() == used or m == 0
        assert bool(((counts == m // max(used, 1)) | (counts == -(-m // max(used, 1)))).all())


def test_temperature_zero_is_deterministic_given_the_order():
    joint = random_joint()
    oracle = Oracle(joint)
    tokens = sample_tokens(oracle, torch.ones(3), MASK_ID, OFFSETS, 3000, temperature=0.0,
                           generator=torch.Generator().manual_seed(7))
    orders = torch.argsort(oracle.reveal_steps(), 1)
    seen = 0
    for perm in itertools.permutations(range(3)):
        rows = tokens[(orders == torch.tensor(perm)).all(1)]
        seen += rows.shape[0]
        assert rows.shape[0] > 0 and bool((rows == rows[0]).all()), perm
        first = perm[0]
        marginal = joint.sum(tuple(d for d in range(3) if d != first))
        assert int(rows[0, first]) == int(marginal.argmax())  # greedy on the first column
    assert seen == 3000


def test_padding_and_mask_token_are_never_sampled():
    # Huge logits on column 1 leak into column 0's padded slot if padding is not masked out.
    def denoiser(x):
        logits = torch.zeros(x.shape[0], 7)
        logits[:, 2:5] = 1e4
        return logits
    tokens = sample_tokens(denoiser, torch.ones(3), MASK_ID, OFFSETS, 2000, steps=2, temperature=5.0)
    assert bool((tokens < MASK_ID).all()) and bool((tokens >= 0).all())
    assert set(tokens[:, 0].tolist()) == {0, 1}


def test_with_column_transformer_batches_and_reproducibility():
    sizes = [4, 2, 7, 3, 5]
    model = ColumnTransformer(sizes, d_model=16, num_layers=1, num_heads=2, dim_feedforward=16)
    schedule = PowerSchedule(len(sizes))
    model.train()

    def draw(seed, **kwargs):
        return sample_tokens(model, schedule, model.mask_ids, model.offsets, 37, steps=2,
                             batch_size=10, generator=torch.Generator().manual_seed(seed), **kwargs)

    first = draw(0)
    assert first.shape == (37, 5) and first.dtype == torch.int64 and not first.requires_grad
    assert bool((first < model.mask_ids).all()) and bool((first >= 0).all())
    assert model.training  # restored
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))
    first[0, 0] = 0  # an ordinary tensor, writable in place


def test_argument_errors():
    oracle, w = Oracle(random_joint()), torch.ones(3)
    with pytest.raises(ValueError, match="steps"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 5, steps=0)
    with pytest.raises(ValueError, match="steps"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 5, steps=4)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 5, temperature=-1.0)
    with pytest.raises(ValueError, match="num_rows"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 0)
    with pytest.raises(ValueError, match="columns"):
        sample_tokens(oracle, torch.ones(2), MASK_ID, OFFSETS, 5)
    with pytest.raises(ValueError, match="positive"):
        sample_tokens(oracle, torch.tensor([1.0, 0.0, 1.0]), MASK_ID, OFFSETS, 5)
    with pytest.raises(ValueError, match="rows"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 5, known=torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="known_mask"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 5, known=torch.zeros(5, 3, dtype=torch.int64),
                      known_mask=torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 1, known=torch.tensor([[2, 0, 0]]),
                      known_mask=torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="without known"):
        sample_tokens(oracle, w, MASK_ID, OFFSETS, 5, known_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="denoiser returned"):
        sample_tokens(lambda x: torch.zeros(x.shape[0], 6), w, MASK_ID, OFFSETS, 5)
