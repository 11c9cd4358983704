"""Test-wide setup. Without a GPU, Triton kernels run through its CPU interpreter, which
must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def ragged_problem(rows: int, sizes: list[int], *, seed: int = 0, dtype=torch.float32):
    """Random targets [rows, L], logits [rows, V] and offsets [L+1] for columns of `sizes` values."""
    generator = torch.Generator().manual_seed(seed)
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes_t, 0)
    targets = torch.stack([torch.randint(0, k, (rows,), generator=generator) for k in sizes], 1)
    logits = (3 * torch.randn(rows, int(offsets[-1]), generator=generator)).to(dtype)
    return targets, logits, offsets


def order_uniforms(rows, w, generator):
    """Uniforms whose keys -log(u)/w differ by > 1e-4 relatively within each row: the later
    column of every close pair is redrawn until none is left (wide rows have many pairs)."""
    u = torch.rand(rows, w.shape[0], generator=generator)
    for _ in range(100):
        keys, order = (-torch.log(u.double()) / w.double()[None, :]).sort(1)
        close = torch.zeros_like(u, dtype=torch.bool)
        close.scatter_(1, order[:, 1:], (keys[:, 1:] - keys[:, :-1]) <= 1e-4 * keys[:, 1:])
        if not close.any():
            return u
        u[close] = torch.rand(int(close.sum()), generator=generator)
    raise AssertionError("could not draw separated keys")


def outputs_per_thread_count(compute, counts=(1, 2)):
    """compute() run with the C++ kernels on each OpenMP thread count, in order. Skips the test
    when fastmdm._C was built without OpenMP (one thread always: a comparison across thread
    counts would pass without testing anything) and checks that each count took effect."""
    from fastmdm import _C
    if not _C.has_openmp:
        pytest.skip("fastmdm._C was built without OpenMP: it always runs one thread")
    before = _C.num_threads()
    outputs = []
    try:
        for count in counts:
            _C.set_num_threads(count)
            assert _C.num_threads() == count
            outputs.append(compute())
    finally:
        _C.set_num_threads(before)
    return outputs


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny models on tiny tables gain nothing from a
    second thread but contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
