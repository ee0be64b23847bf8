"""model.lora.fused: the fused LoRA node gives peft's outputs and gradients, falls back to peft
where it does not apply, and trains the same run.

The engines' tests run with it on (the default) against the one-process step; here it is
compared with the peft modules it replaces."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import layer as lora_layer

from model import fused_lora
from test_engines import train_on_fixed_batches
from train.config.schema import LoraSettings, ModelConfig
from train.modeling.backbone import build_encoder

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2}
QWEN2 = {**LLAMA, "model_type": "qwen2"}  # q, k and v projections with a bias


def encode(fused: bool, architecture: dict, precision: torch.dtype | None = None,
           dropout: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Embeddings and every trained parameter's gradient for one batch, LoRA's B made non-zero
    so that every adapter product takes part."""
    config = ModelConfig(architecture=architecture, projection_dim=8, lora=LoraSettings(fused=fused, dropout=dropout))
    encoder = build_encoder(config, 200, 0, seed=5)
    layers = [m for m in encoder.modules() if isinstance(m, lora_layer.Linear)]
    assert layers and all(("forward" in vars(m)) == fused for m in layers)
    generator = torch.Generator().manual_seed(2)
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3, generator=generator)
    ids = torch.randint(1, 200, (5, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :9] = 0
    with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
        pooled, states = encoder(ids * mask, mask, every_position=True)
    weights = torch.randn(states.shape, generator=generator)
    loss = (pooled.float() * weights[:, 0, :pooled.shape[1]]).sum() + (states.float() * mask[..., None] * weights).sum()
    params = [p for p in encoder.parameters() if p.requires_grad]
    return (pooled.detach(), (states * mask[..., None]).detach(), *torch.autograd.grad(loss, params))


@pytest.mark.parametrize("architecture", [LLAMA, QWEN2])
def test_fused_forward_and_backward_equal_peft(architecture: dict) -> None:
    peft = encode(False, architecture)
    fused = encode(True, architecture)
    assert len(peft) == len(fused) > 4
    assert all(bool(a.abs().max() > 0) for a in peft)
    for a, b in zip(peft, fused):  # float rounding, relative to each tensor's scale
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


class Projection(torch.nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 64, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_under_bf16_autocast_is_as_close_to_fp32_as_peft(bias: bool) -> None:
    torch.manual_seed(0)
    peft = get_peft_model(Projection(bias), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    torch.nn.init.normal_(peft.base_model.model.proj.lora_B["default"].weight, std=0.3)
    fused = copy.deepcopy(peft)
    assert fused_lora.fuse(fused) == 1
    x, grad = torch.randn(200, 32), torch.randn(200, 64)

    def run(module: torch.nn.Module, bf16: bool) -> list[torch.Tensor]:
        inputs = x.clone().requires_grad_()
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(inputs)
        out.backward(grad)
        return [out.detach(), inputs.grad, *(p.grad for p in module.parameters() if p.requires_grad)]

    exact = run(peft, False)
    for reference, a, b in zip(exact, run(peft, True), run(fused, True)):
        assert b.dtype == a.dtype  # bf16 out, as peft's; fp32 gradients for fp32 inputs and weights
        peft_error = float((a.float() - reference).norm() / reference.norm())
        fused_error = float((b.float() - reference).norm() / reference.norm())
        assert 0 < fused_error < 1.2 * peft_error + 1e-3  # bf16 rounding, no more than peft's


def test_layers_outside_the_plain_case_run_pefts_forward() -> None:
    # With adapter dropout each product depends on the dropout mask: peft's path, seeded alike,
    # gives the same numbers only if both runs take it.
    torch.manual_seed(0)
    peft = encode(False, LLAMA, dropout=0.1)
    torch.manual_seed(0)
    fused = encode(True, LLAMA, dropout=0.1)
    for a, b in zip(peft, fused):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    config = ModelConfig(architecture=LLAMA, lora=LoraSettings(dropout=0.1))
    layer = next(m for m in build_encoder(config, 200, 0, seed=5).modules() if isinstance(m, lora_layer.Linear))
    x = torch.randn(2, 32)
    assert fused_lora._plain_adapter(layer, x) is None
    layer.lora_dropout["default"] = torch.nn.Identity()
    assert fused_lora._plain_adapter(layer, x) == "default"
    assert fused_lora._plain_adapter(layer, x.double()) is None
    layer.merge()
    assert fused_lora._plain_adapter(layer, x) is None


def test_a_run_trains_the_same_fused(tmp_path: Path) -> None:
    runs = {flag: train_on_fixed_batches(0, 1, str(tmp_path), [("plain", -1)], (f"model.lora.fused={flag}",))["plain-1"]
            for flag in ("false", "true")}
    (peft_losses, peft_weights), (losses, weights) = runs["false"], runs["true"]
    assert peft_losses[0] != peft_losses[-1]
    assert losses == pytest.approx(peft_losses, abs=1e-5)
    for name, ref in peft_weights.items():
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=2e-5)
