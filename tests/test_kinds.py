"""The table of model kinds: each kind's loss and decoder are the ones fit and sample use."""
import dataclasses

import pandas as pd
import pytest
import torch

import fastmdm.kinds
from fastmdm import TabularMDM
from fastmdm.kinds import KINDS, kind_of, model_kind

TINY = dict(d_model=8, num_layers=1, num_heads=2, dim_feedforward=8)


class Wrapped(torch.nn.Module):
    """A module holding the denoiser as `.module`, as DistributedDataParallel does."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_a_kind_is_found_by_its_names_and_by_its_denoiser(kind):
    assert model_kind(kind.architecture, kind.order) is kind
    denoiser = kind.denoiser([3, 2, 4], **TINY)
    assert kind_of(denoiser) is kind and kind_of(Wrapped(denoiser)) is kind


def test_an_invalid_combination_names_the_valid_ones():
    with pytest.raises(ValueError) as error:
        model_kind("bidirectional", "contextual")
    assert all(kind.name in str(error.value) for kind in KINDS)
    with pytest.raises(ValueError, match="architecture must be one of"):
        model_kind("recurrent", "static")
    assert model_kind(None, "static").architecture == "causal"
    assert model_kind(None, "static", "tspace").architecture == "bidirectional"   # the paper's estimator
    assert model_kind(None, "contextual").architecture == "causal"
    with pytest.raises(ValueError, match="order-space"):
        TabularMDM(architecture="causal", estimator="tspace")   # refused before any training


def test_order_parameters_are_the_order_models():
    """What the trainer gives order_lr: a contextual model's policy and posterior, nothing else."""
    for kind in KINDS:
        denoiser = kind.denoiser([3, 2, 4], **TINY)
        named = [p for name, p in denoiser.named_parameters() if name.startswith(("order_policy.", "order_posterior."))]
        got = denoiser.order_parameters()
        assert len(got) == len(named) and all(a is b for a, b in zip(got, named))
        assert bool(got) == kind.contextual


def recording(calls, label, function):
    def record(*args, **kwargs):
        calls.append(label)
        return function(*args, **kwargs)
    return record


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_fit_and_sample_use_the_kinds_loss_and_decoder(kind, monkeypatch):
    calls = []
    table = [dataclasses.replace(
        k, bound=recording(calls, (k.name, "bound"), k.bound), decode=recording(calls, (k.name, "decode"), k.decode),
        order_search=k.order_search and recording(calls, (k.name, "order_search"), k.order_search),
        speculative_decode=k.speculative_decode and recording(calls, (k.name, "speculative"), k.speculative_decode))
        for k in KINDS]
    monkeypatch.setattr(fastmdm.kinds, "KINDS", tuple(table))
    frame = pd.DataFrame({"a": torch.randint(0, 3, (32,)).tolist(), "b": torch.randint(0, 2, (32,)).tolist()})
    model = TabularMDM(architecture=kind.architecture, order=kind.order, model=TINY, epochs=2, batch_size=32,
                       progress=False, order_search_epochs=1 if kind.contextual else None, device="cpu")
    model.fit(frame, validation=None)
    expected = [(kind.name, "order_search"), (kind.name, "bound")] if kind.contextual else [(kind.name, "bound")] * 2
    assert calls == expected
    calls.clear()
    model.sample(5, seed=0)
    assert calls == [(kind.name, "decode")]
    if kind.speculative_decode is not None:
        calls.clear()
        model.sample(5, seed=0, speculative=2)
        assert calls == [(kind.name, "speculative")]


def test_sample_tokens_refuses_a_causal_model_without_its_decoder():
    from fastmdm.decoding import sample_tokens
    model = model_kind("causal", "static").denoiser([3, 2, 4], **TINY)
    with pytest.raises(ValueError, match="kind_of"):
        sample_tokens(model, torch.ones(3), model.mask_ids, model.offsets, 4)
    tokens = sample_tokens(model, torch.ones(3), model.mask_ids, model.offsets, 4, decode=kind_of(model).decoder())
    assert tokens.shape == (4, 3)
