"""LoRA linear layers as one autograd node, with the adapter's products in the shapes BLAS is fast at.

peft computes `base(x) + lora_B(lora_A(x)) * scaling` as separate modules. On a CPU (profiled on
a SmolLM2-shaped stack, 2,560 tokens) the adapter's products took 16% of the matrix-multiply time
for 2% of the FLOPs. Their outputs have the rank r (8) as their few columns, a shape CPU GEMM
kernels run slowly: B's gradient, `grad.T @ (x A)` ([out, N] x [N, r]), took 15.6 ms where the same
product with r as the output's rows ([r, N] x [N, out], then transposed) took 2.1. The scaling and
the sum were two more passes over the [N, out] output. Here the forward is two GEMMs into one
buffer (the adapter's added in place, scaling folded in), and every adapter product keeps r as
its output's rows. The result equals peft's up to float rounding (tests/test_fused_lora.py), and a
SmolLM2-shaped LoRA step runs 1.16x as fast; the module, its parameters and its state dict are
peft's own, so checkpoints, merging and every other peft path are untouched.

Only the plain case is fused: one active adapter, no dropout, no DoRA or other variant, a frozen
nn.Linear base with the adapter's dtype. Anything else runs peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import layer as lora_layer


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, dtype: torch.dtype | None) -> torch.Tensor:
        ctx.dtypes = (x.dtype, a.dtype, b.dtype, None if bias is None else bias.dtype)
        if dtype is not None:  # under autocast: compute in its dtype, as the modules would
            x, weight, a, b = x.to(dtype), weight.to(dtype), a.to(dtype), b.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        rows = x.reshape(-1, x.shape[-1])
        down = (a @ rows.T).T  # [N, r] computed as [r, N]: an output with r columns is slow
        out = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
        out.addmm_(down, b.T, alpha=scaling)
        ctx.save_for_backward(rows, weight, a, b, down)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, a, b, down = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype, bias_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)
        up = (b.T @ g.T).T.mul(ctx.scaling)  # [N, r]: the gradient reaching the adapter's middle
        grad_b = (down.T @ g).mul_(ctx.scaling).T.contiguous()  # [r, N] x [N, out], not g.T @ down
        grad_a = up.T @ rows
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(up, a).view(*grad.shape[:-1], rows.shape[-1]).to(x_dtype)
        grad_bias = g.sum(0).to(bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a.to(a_dtype), grad_b.to(b_dtype), None, None


def _fused_forward(module: lora_layer.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter = _plain_adapter(module, x)
    if adapter is None or args or kwargs:
        return lora_layer.Linear.forward(module, x, *args, **kwargs)
    base = module.base_layer
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return _LoraLinear.apply(x, base.weight, base.bias, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                             module.scaling[adapter], dtype)


def _plain_adapter(module: lora_layer.Linear, x: torch.Tensor) -> str | None:
    """The one active adapter when the layer is the plain case, else None (peft's forward)."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    adapter = module.active_adapters[0]
    base = module.base_layer
    if (adapter not in module.lora_A or adapter in module.lora_variant
            or not isinstance(module.lora_dropout[adapter], torch.nn.Identity)
            or type(base) is not torch.nn.Linear or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return None
    if not x.dtype == base.weight.dtype == module.lora_A[adapter].weight.dtype:
        return None
    return adapter


def fuse(model: torch.nn.Module) -> int:
    """Route every peft LoRA linear layer of `model` through the fused node; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, lora_layer.Linear):
            module.forward = _fused_forward.__get__(module)  # type: ignore[method-assign]
            count += 1
    return count
