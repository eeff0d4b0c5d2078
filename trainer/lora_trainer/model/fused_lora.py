"""One autograd node per LoRA linear: frozen base + x·Aᵀ·Bᵀ·s, with the backward written out.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: six autograd
nodes per projection (the 4-bit matmul, a clone, two Linears, a multiply, an add) and, in the
backward, the scaling multiply and the add on full (tokens x out_features) tensors. `LoRALinear`
computes the same function in one node: the base output gets the low-rank term added in place by
one `addmm`, the scaling is applied to the small (tokens x rank) tensors, and the backward does
exactly the products it needs:

    h      = xd Aᵀ                    (tokens x r)       xd = dropout(x), or x
    y      = base(x) + s · h Bᵀ
    ∂B     = s · gᵀ h                  ∂A = (s · g B)ᵀ xd
    ∂x     = g W  (+ s · g B A when xd is x; else ∂xd = s · g B A flows back through dropout)

W is the frozen base weight, dequantized again in the backward for NF4 exactly as bitsandbytes'
own MatMul4Bit does, so nothing of the size of the base is kept between forward and backward.

Invariant: outputs and gradients equal PEFT's forward (tests/trainer/test_fused_lora.py); where a
layer is in a state this does not cover (merged, adapters disabled, several or mixed adapters,
DoRA and other variants, a LoRA bias, autocast, a trainable base bias, int8 bases, extra forward
arguments), it calls PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's (out x in) weight in `dtype`; NF4 weights are dequantized."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.view(-1, 1), quant_state).to(dtype)


class LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, a, b, base, scaling: float):
        y = base(x)  # autograd is off inside forward: bitsandbytes takes its no-grad kernel
        shape = y.shape
        y = y.reshape(-1, shape[-1])
        x_low = (x if xd is None else xd).reshape(-1, x.shape[-1])
        if x_low.dtype != a.dtype:
            x_low = x_low.to(a.dtype)
        h = x_low @ a.t()
        if y.dtype == h.dtype:
            y.addmm_(h, b.t(), alpha=scaling)
        else:
            y += (h @ b.t()).mul_(scaling).to(y.dtype)
        ctx.base, ctx.scaling, ctx.shared = base, scaling, xd is None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x_low, h, a, b)
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x_low, h, a, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        g = grad.reshape(-1, grad.shape[-1])
        g_low = g if g.dtype == a.dtype else g.to(a.dtype)
        gh = (g_low @ b).mul_(s)  # ∂h, scaled: (tokens x r)
        grad_a = gh.t() @ x_low if need_a else None
        grad_b = (g_low.t() @ h).mul_(s) if need_b else None
        grad_x = grad_xd = None
        in_shape = grad.shape[:-1] + (a.shape[1],)
        if need_x:
            grad_x = g @ _base_weight(ctx.base, g.dtype)
            if ctx.shared:  # xd is x: both paths in one buffer
                if grad_x.dtype == gh.dtype:
                    grad_x.addmm_(gh, a)
                else:
                    grad_x += (gh @ a).to(grad_x.dtype)
            grad_x = grad_x.view(in_shape)
        if need_xd and not ctx.shared:
            grad_xd = (gh @ a).to(ctx.x_dtype).view(in_shape)
        return grad_x, grad_xd, grad_a, grad_b, None, None


def _supported_base(base: nn.Module) -> bool:
    if base.bias is not None and base.bias.requires_grad:
        return False
    if type(base) is nn.Linear:
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: only dense bases
        return False
    return isinstance(base, bnb.nn.Linear4bit)


def _fused_forward(self, x, *args, **kwargs):
    """PEFT LoRA layer forward through LoRALinear where it computes the same; else PEFT's own."""
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or torch.is_autocast_enabled(x.device.type)):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    xd = None if isinstance(dropout, nn.Identity) else dropout(x)
    return LoRALinear.apply(x, xd, self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                            self.scaling[name])


def fuse(model) -> int:
    """Route every PEFT LoRA linear with a dense or NF4 base through LoRALinear; returns how many."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        base = module.get_base_layer()
        if module.base_layer is not base or not _supported_base(base) or "_peft_forward" in vars(module):
            continue
        module._peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count
