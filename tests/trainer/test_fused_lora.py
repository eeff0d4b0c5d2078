"""The fused LoRA linear (model/fused_lora.py) computes what PEFT's forward computes: the loss and
every gradient, on dense and NF4 bases, with and without LoRA dropout, with bf16 bases holding
fp32 adapters; and it hands the states it does not cover back to PEFT."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from lora_trainer.model import fused_lora
from lora_trainer.model.loading import load_base
from lora_trainer.model.lora import add_lora


def _model(tiny_base, quantization: str, dtype: str, dropout: float):
    base = load_base(tiny_base, quantization, True, dtype, torch.device("cpu"))
    model = add_lora(base, rank=4, alpha=8, dropout=dropout, target_modules=["all-linear"])
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


@contextmanager
def _peft_forward(model):
    """Every fused layer back on PEFT's own forward, for the reference."""
    layers = [m for m in model.modules() if "_peft_forward" in vars(m)]
    for m in layers:
        m.forward, m._fused = m._peft_forward, m.forward
    try:
        yield
    finally:
        for m in layers:
            m.forward = m._fused


def _loss_and_grads(model, ids):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks on both paths
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), grads


@pytest.mark.parametrize("quantization,dtype,dropout,tol", [
    ("nf4", "float32", 0.0, 1e-5),
    ("nf4", "float32", 0.1, 1e-5),
    ("none", "float32", 0.0, 1e-5),
    ("none", "bfloat16", 0.1, 2e-2),  # bf16 activations, fp32 adapters: casts on both paths
])
def test_fused_lora_equals_peft_in_loss_and_gradients(tiny_base, quantization, dtype, dropout, tol):
    model = _model(tiny_base, quantization, dtype, dropout)
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    got_loss, got = _loss_and_grads(model, ids)
    with _peft_forward(model):
        want_loss, want = _loss_and_grads(model, ids)
    torch.testing.assert_close(got_loss, want_loss, atol=tol, rtol=tol)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B of 7 projections, 2 layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=tol, rtol=tol, msg=name)


def test_every_target_runs_fused_in_training(tiny_base):
    model = _model(tiny_base, "nf4", "float32", 0.0)
    fused = [m for m in model.modules() if "_peft_forward" in vars(m)]
    assert len(fused) == 7 * 2
    x = torch.randn(1, 5, fused[0].in_features, requires_grad=True)
    assert type(fused[0](x).grad_fn).__name__ == "LoRALinearBackward"
    assert fused_lora.fuse(model) == 0  # fusing twice wraps nothing twice


def test_states_it_does_not_cover_go_to_peft(tiny_base):
    model = _model(tiny_base, "none", "float32", 0.0)
    layer = next(m for m in model.modules() if "_peft_forward" in vars(m))
    x = torch.randn(1, 5, layer.in_features, requires_grad=True)
    with model.disable_adapter():  # adapters off: the base alone, through PEFT
        torch.testing.assert_close(layer(x), layer.base_layer(x))
        assert type(layer(x).grad_fn).__name__ != "LoRALinearBackward"
    layer.merge()
    try:
        assert type(layer(x).grad_fn).__name__ != "LoRALinearBackward"
    finally:
        layer.unmerge()
    assert type(layer(x).grad_fn).__name__ == "LoRALinearBackward"
