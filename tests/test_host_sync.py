"""A training step never waits on the host: no value of a tensor is read on the host inside it.

On a GPU each such read (`.item()`, `bool(tensor)`, a data-dependent shape such as
`nonzero`'s, a copy to host memory) stalls the host until the device has finished its
queue, which at this model's size costs more than the step's arithmetic. The same ops run
on CPU, so a `TorchDispatchMode` that counts them during the public fit finds every one
without a GPU. The count is the difference between a fit of 2N steps and one of N steps,
so the setup (codec, model, token check) and the validation checks cancel out.
"""
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmdm import TabularMDM
from fastmdm.kinds import model_loss
from fastmdm.train import LOG_EVERY

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
         torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host, and copies to host memory
    from another device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            self.count += 1
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = kwargs.get("device", args[0].device if func is torch.ops.aten.copy_.default else None)
            if source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
                self.count += 1
        return func(*args, **kwargs)


def table(rows: int = 640, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, rows)
    return pd.DataFrame({"a": a.astype(str), "b": (a + rng.integers(0, 2, rows)).astype(str),
                         "x": a * 10.0 + rng.normal(size=rows)})


def reads_in_fit(kind: dict, steps: int) -> int:
    model = TabularMDM(**kind, model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32),
                       steps=steps, batch_size=32, seed=0, progress=False, device="cpu")
    with HostReads() as reads:
        model.fit(table(), validation=None)
    return reads.count


@pytest.mark.parametrize("kind", [dict(), dict(architecture="causal", order="contextual")],
                         ids=["default", "causal-contextual"])
def test_a_training_step_reads_nothing_on_the_host(kind):
    # Both runs stay below LOG_EVERY steps and within the first epoch (20 steps of 32 rows),
    # so each has one check, at its end: the same reads outside the steps.
    steps = LOG_EVERY // 3
    per_step = (reads_in_fit(kind, 2 * steps) - reads_in_fit(kind, steps)) / steps
    assert per_step == 0


def test_the_counter_sees_a_read():
    with HostReads() as reads:
        bool(torch.ones(3).sum() > 0)
        torch.arange(4).nonzero()
    assert reads.count == 2


def test_the_training_loss_compiles_into_one_graph():
    """Orders, forward, fused heads, the RLOO surrogate for w and backward trace as one graph
    (fullgraph=True fails on any graph break). The aot_eager backend traces forward and
    backward as inductor would, without its minutes of C++ code generation. The orders come
    from the global generator here: a torch.Generator argument, as the trainer passes for
    exact resume, is not traced by torch.compile."""
    model = TabularMDM(model=dict(d_model=16, num_layers=1, num_heads=2, dim_feedforward=32),
                       steps=1, batch_size=32, seed=0, progress=False, device="cpu")
    model.fit(table(), validation=None)
    trainer = model._trainer
    batch = model.codec.encode(table().head(32))

    def loss(x):
        return model_loss(trainer.model, x, trainer.schedule, trainer.mask_id, trainer.offsets,
                          estimator="order", num_samples=2).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(batch)
    grad_w, grad_head = torch.autograd.grad(value, [trainer.schedule.log_w, trainer.denoiser.heads.weight])
    assert torch.isfinite(value) and grad_w.abs().sum() > 0 and grad_head.abs().sum() > 0
