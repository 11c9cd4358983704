"""The reference ops and the public op API: values, gradients (float64 gradcheck), errors.

All tests here force the reference backend; the C++ and Triton backends have their own
parity tests against it.
"""
import pytest
import torch

from conftest import ragged_problem
from fastmdm import ops
from fastmdm.ops import reference
from fastmdm.schedules import plackett_luce_log_prob

SIZES = [2, 3, 1, 7, 4]


@pytest.fixture(autouse=True)
def reference_backend():
    with ops.use_backend("reference"):
        yield


def naive_weighted_ce(logits, targets, weight, mask, offsets):
    """Column-by-column loop: the plainest statement of the loss."""
    loss = torch.zeros(logits.shape[0], dtype=torch.float64)
    for col in range(targets.shape[1]):
        segment = logits[:, offsets[col]:offsets[col + 1]].double()
        ce = torch.logsumexp(segment, 1) - segment.gather(1, targets[:, col:col + 1]).squeeze(1)
        loss += torch.where(mask[:, col], weight[:, col].double() * ce, torch.zeros_like(ce))
    return loss


def random_mask_and_weight(rows, cols, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) < 0.6
    weight = torch.rand(rows, cols, generator=generator, dtype=dtype) * 3
    return mask, torch.where(mask, weight, torch.zeros_like(weight))


def test_weighted_ce_matches_column_loop():
    targets, logits, offsets = ragged_problem(9, SIZES, seed=1)
    mask, weight = random_mask_and_weight(9, len(SIZES), 2)
    got = ops.weighted_ce(logits, targets, weight, mask, offsets)
    torch.testing.assert_close(got.double(), naive_weighted_ce(logits, targets, weight, mask, offsets),
                               rtol=1e-5, atol=1e-5)


def test_weighted_ce_gradcheck_float64():
    targets, logits, offsets = ragged_problem(4, SIZES, seed=3, dtype=torch.float64)
    mask, weight = random_mask_and_weight(4, len(SIZES), 4, torch.float64)
    logits.requires_grad_(True)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lg, wt: ops.weighted_ce(lg, targets, wt, mask, offsets), (logits, weight))


def test_weighted_ce_analytic_dlogits_matches_autograd_of_loop():
    targets, logits, offsets = ragged_problem(6, SIZES, seed=5, dtype=torch.float64)
    mask, weight = random_mask_and_weight(6, len(SIZES), 6, torch.float64)
    row_grad = torch.rand(6, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    (ops.weighted_ce(a, targets, weight, mask, offsets) * row_grad).sum().backward()
    b = logits.clone().requires_grad_(True)
    (naive_weighted_ce(b, targets, weight, mask, offsets) * row_grad).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_weighted_ce_backward_twice_does_not_corrupt_saved_grad():
    """Known bug class of fused CE: scaling the saved dlogits in place."""
    targets, logits, offsets = ragged_problem(3, SIZES, seed=7)
    mask, weight = random_mask_and_weight(3, len(SIZES), 8)
    logits.requires_grad_(True)
    loss = ops.weighted_ce(logits, targets, weight, mask, offsets).sum() * 3
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(first, second)


def test_weighted_ce_without_grad_and_non_contiguous_logits():
    targets, logits, offsets = ragged_problem(5, SIZES, seed=9)
    mask, weight = random_mask_and_weight(5, len(SIZES), 10)
    wide = torch.randn(5, 2 * logits.shape[1])
    wide[:, ::2] = logits
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    with torch.no_grad():
        got = ops.weighted_ce(strided, targets, weight, mask, offsets)
    torch.testing.assert_close(got, ops.weighted_ce(logits, targets, weight, mask, offsets))


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(targets=a["targets"] + 100), ValueError, "out of range"),
    (lambda a: a.update(targets=a["targets"] - 100), ValueError, "out of range"),
    (lambda a: a.update(offsets=a["offsets"][:-1]), ValueError, "L\\+1"),
    (lambda a: a.update(offsets=a["offsets"].flip(0)), ValueError, "start at 0"),
    (lambda a: a.update(logits=a["logits"][:, :-1]), ValueError, "logits width"),
    (lambda a: a.update(logits=a["logits"].long()), TypeError, "dtype"),
    (lambda a: a.update(mask=a["mask"].float()), TypeError, "dtype"),
    (lambda a: a.update(weight=a["weight"][:2]), ValueError, "shape"),
    (lambda a: a.update(logits=a["logits"][None]), ValueError, "dimension"),
    (lambda a: a.update(targets=a["targets"][:0], logits=a["logits"][:0],
                        weight=a["weight"][:0], mask=a["mask"][:0]), ValueError, "no rows"),
])
def test_weighted_ce_errors(mutate, error, match):
    targets, logits, offsets = ragged_problem(3, SIZES)
    mask, weight = random_mask_and_weight(3, len(SIZES), 0)
    args = dict(logits=logits, targets=targets, weight=weight, mask=mask, offsets=offsets)
    mutate(args)
    with pytest.raises(error, match=match):
        ops.weighted_ce(**args)


def tokens(rows, sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, k, (rows,), generator=generator) for k in sizes], 1)


def test_mask_tspace_semantics():
    sizes = torch.tensor(SIZES)
    x = tokens(64, SIZES)
    w = torch.tensor([0.1, 0.5, 1.0, 3.0, 30.0])
    t = torch.rand(64)
    time_weight = torch.rand(64) * 10
    u = torch.rand(64, 5)
    out = ops.mask_tspace(x, torch.log(t), w, sizes, time_weight, u=u)
    expected_mask = u < t[:, None] ** w[None, :]
    assert torch.equal(out.mask, expected_mask)
    assert torch.equal(out.x_t, torch.where(expected_mask, sizes[None, :], x))
    torch.testing.assert_close(out.weight, torch.where(expected_mask, w * time_weight[:, None], torch.zeros(())))


def test_mask_tspace_takes_times_below_float32_range():
    """log t = -1e4 (t = e^-10000 underflows): a column with w = 1e-3 is masked with probability
    e^-10, its score is log t where masked; larger w are never masked there."""
    rows = 20
    w = torch.tensor([1e-3, 1.0, 1e3])
    u = torch.full((rows, 3), 0.5)
    u[::2, 0] = 1e-5                       # below e^-10 ~ 4.5e-5: masked
    out = ops.mask_tspace(tokens(rows, [2, 2, 2]), torch.full((rows,), -1e4), w, torch.tensor([2, 2, 2]),
                          torch.full((rows,), 3.0), u=u)
    assert torch.equal(out.mask[:, 0], torch.arange(rows) % 2 == 0) and not out.mask[:, 1:].any()
    assert (out.score[::2, 0] == -1e4).all() and (out.weight[::2, 0] == 3e-3).all()
    assert torch.isfinite(out.score).all()


def test_mask_order_semantics():
    """The visible columns are exactly the first n of the PL order drawn from the same u."""
    sizes = torch.tensor(SIZES)
    x = tokens(40, SIZES, seed=1)
    w = torch.tensor([0.1, 0.5, 1.0, 3.0, 30.0])
    u = torch.rand(40, 5)
    n = torch.randint(0, 5, (40,))
    out = ops.mask_order(x, w, sizes, n, u=u)
    order = torch.argsort(-torch.log(u) / w, dim=1)
    for b in range(40):
        visible = set(order[b, :n[b]].tolist())
        assert set(torch.nonzero(~out.mask[b]).flatten().tolist()) == visible
        hidden_w = w[out.mask[b]].sum()
        torch.testing.assert_close(out.weight[b][out.mask[b]], 5 * w[out.mask[b]] / hidden_w)
    assert out.mask.sum(1).ge(1).all()


def test_mask_order_score_is_gradient_of_prefix_log_prob():
    sizes = torch.tensor(SIZES)
    w = torch.tensor([0.1, 0.5, 1.0, 3.0, 30.0], dtype=torch.float64)
    u = torch.rand(20, 5, dtype=torch.float64)
    n = torch.randint(0, 5, (20,))
    out = ops.mask_order(tokens(20, SIZES), w, sizes, n, u=u)
    order = torch.argsort(-torch.log(u) / w, dim=1)
    w_leaf = w.clone().requires_grad_(True)
    plackett_luce_log_prob(w_leaf, order, n).sum().backward()
    torch.testing.assert_close(out.score.sum(0), w_leaf.grad)


@pytest.mark.parametrize("space", ["tspace", "order"])
def test_mask_weight_gradcheck_in_w(space):
    sizes = torch.tensor(SIZES)
    x = tokens(12, SIZES, seed=2)
    u = torch.rand(12, 5, dtype=torch.float64)
    t = torch.rand(12, dtype=torch.float64)
    time_weight = 1 / t
    n = torch.randint(0, 5, (12,))
    probe = torch.randn(12, 5, dtype=torch.float64)

    def weighted(w):
        out = (ops.mask_tspace(x, torch.log(t), w, sizes, time_weight, u=u) if space == "tspace"
               else ops.mask_order(x, w, sizes, n, u=u))
        return (out.weight * probe).sum()

    w = torch.tensor([0.3, 0.5, 1.0, 3.0, 7.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weighted, (w,))


def test_mask_tspace_weight_gradcheck_in_time_weight():
    x = tokens(12, SIZES, seed=3)
    u = torch.rand(12, 5, dtype=torch.float64)
    log_t = torch.log(torch.rand(12, dtype=torch.float64))
    w = torch.tensor([0.3, 0.5, 1.0, 3.0, 7.0], dtype=torch.float64)
    probe = torch.randn(12, 5, dtype=torch.float64)
    time_weight = torch.rand(12, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda tw: (ops.mask_tspace(x, log_t, w, torch.tensor(SIZES), tw, u=u).weight * probe).sum(),
        (time_weight,))


def test_seeded_masking_is_deterministic():
    sizes = torch.tensor(SIZES)
    x = tokens(50, SIZES)
    w = torch.ones(5)
    log_t, time_weight = torch.log(torch.rand(50)), torch.ones(50)
    a = ops.mask_tspace(x, log_t, w, sizes, time_weight, seed=7)
    b = ops.mask_tspace(x, log_t, w, sizes, time_weight, seed=7)
    c = ops.mask_tspace(x, log_t, w, sizes, time_weight, seed=8)
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(w=torch.tensor([1.0, -1.0, 1, 1, 1])), ValueError, "positive"),
    (dict(w=torch.tensor([1.0, float("nan"), 1, 1, 1])), ValueError, "NaN"),
    (dict(w=torch.ones(4)), ValueError, "columns"),
    (dict(log_t=torch.full((8,), 0.5)), ValueError, "<= 0"),
    (dict(log_t=torch.full((8,), -float("inf"))), ValueError, "infinite"),
    (dict(log_t=torch.zeros(7)), ValueError, "entries"),
    (dict(time_weight=torch.zeros(8)), ValueError, "positive"),
    (dict(time_weight=torch.full((8,), float("nan"))), ValueError, "NaN"),
    (dict(time_weight=torch.ones(8, 1)), ValueError, "dimension"),
    (dict(x=tokens(8, SIZES).float()), TypeError, "dtype"),
    (dict(u=torch.ones(8, 5)), ValueError, r"\[0, 1\)"),
    (dict(mask_id=torch.tensor(SIZES[:4])), ValueError, "mask_id"),
])
def test_mask_tspace_errors(kwargs, error, match):
    args = dict(x=tokens(8, SIZES), log_t=-torch.rand(8), w=torch.ones(5), mask_id=torch.tensor(SIZES),
                time_weight=torch.ones(8))
    args.update(kwargs)
    u = args.pop("u", None)
    with pytest.raises(error, match=match):
        ops.mask_tspace(**args, u=u)


def test_mask_order_rejects_nothing_hidden():
    with pytest.raises(ValueError, match="at least one column hidden"):
        ops.mask_order(tokens(3, SIZES), torch.ones(5), torch.tensor(SIZES), torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("per_row", [False, True])
def test_rloo_matches_loop_and_checks_inputs(per_row):
    f = torch.rand(6, 3, dtype=torch.float64)
    score = torch.randn(6, 3, 4, dtype=torch.float64)
    expected = torch.zeros(6, 4, dtype=torch.float64)
    for b in range(6):
        for k in range(3):
            others = [f[b, j] for j in range(3) if j != k]
            expected[b] += (f[b, k] - sum(others) / 2) * score[b, k] / 3
    torch.testing.assert_close(ops.rloo_grad(f, score, per_row=per_row), expected if per_row else expected.mean(0))
    with pytest.raises(ValueError, match="K >= 2"):
        ops.rloo_grad(f[:, :1], score[:, :1], per_row=per_row)
    with pytest.raises(ValueError, match=r"\[B, K, L\]"):
        ops.rloo_grad(f, score[:, :2], per_row=per_row)
    with pytest.raises(ValueError, match="NaN"):
        ops.rloo_grad(torch.full((2, 2), float("nan")), torch.zeros(2, 2, 1), per_row=per_row)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fake tensors and autograd registration are consistent."""
    targets, logits, offsets = ragged_problem(3, SIZES)
    mask, weight = random_mask_and_weight(3, len(SIZES), 0)
    x = tokens(3, SIZES)
    w = torch.tensor([0.3, 0.5, 1.0, 3.0, 7.0], requires_grad=True)
    u = torch.rand(3, 5)
    sizes = torch.tensor(SIZES)
    torch.library.opcheck(torch.ops.fastmdm.weighted_ce.default,
                          (logits.requires_grad_(True), targets, weight, mask, offsets, True))
    torch.library.opcheck(torch.ops.fastmdm.mask_tspace.default,
                          (x, -torch.rand(3), w, sizes, torch.rand(3).requires_grad_(True), u, 0))
    torch.library.opcheck(torch.ops.fastmdm.mask_order.default, (x, w, sizes, u, torch.tensor([0, 2, 4]), 0))
    torch.library.opcheck(torch.ops.fastmdm.rloo_grad.default, (torch.rand(3, 2), torch.rand(3, 2, 5)))
    torch.library.opcheck(torch.ops.fastmdm.rloo_grad.default, (torch.rand(3, 2), torch.rand(3, 2, 5), True))


def test_segment_layout_covers_every_logit_once():
    offsets = torch.tensor([0, 2, 5, 6, 13])
    index, valid = reference.segment_layout(offsets, 13)
    assert sorted(index[valid].tolist()) == list(range(13))
