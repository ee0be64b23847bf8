"""model.fused_norm: the fused RMSNorm node gives transformers' outputs and gradients, applies to
the Llama-family norms only, and leaves other dtypes to the module's own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from model import fused_norm
from train.config.schema import ModelConfig
from train.modeling.backbone import build_encoder

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def norm_and_grads(fused: bool, x: torch.Tensor, trained_weight: bool) -> tuple[torch.Tensor, ...]:
    norm = LlamaRMSNorm(x.shape[-1], eps=1e-5).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, x.shape[-1]))
    norm.weight.requires_grad_(trained_weight)
    if fused:
        assert fused_norm.fuse(norm) == 1
    x = x.clone().requires_grad_(True)
    out = norm(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    inputs = [x, norm.weight] if trained_weight else [x]
    return (out.detach(), *torch.autograd.grad((out * weights).sum(), inputs))


def test_node_is_the_formula_and_its_gradient() -> None:
    """In float64, against autograd through w * x / sqrt(mean(x^2) + eps): the same up to
    rounding far below float32's, so the hand-written backward is the formula's gradient."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 7, 16, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    weight = torch.linspace(0.5, 2.0, 16, dtype=torch.float64).requires_grad_(True)
    probe = torch.randn(4, 7, 16, generator=generator, dtype=torch.float64)
    formula = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    node = fused_norm._RMSNorm.apply(x, weight, 1e-5)
    expected = (formula, *torch.autograd.grad((formula * probe).sum(), [x, weight]))
    got = (node, *torch.autograd.grad((node * probe).sum(), [x, weight]))
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trained_weight", [False, True])
def test_equals_llama_rms_norm_in_float32(trained_weight: bool) -> None:
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(0)) * 3
    plain, fused = norm_and_grads(False, x, trained_weight), norm_and_grads(True, x, trained_weight)
    assert len(fused) == (3 if trained_weight else 2)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_run_the_module_forward(dtype: torch.dtype) -> None:
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    for a, b in zip(norm_and_grads(False, x, True), norm_and_grads(True, x, True)):
        assert torch.equal(a, b)


def test_non_contiguous_input() -> None:
    norm = LlamaRMSNorm(8)
    fused_norm.fuse(norm)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)).t()  # [5, 8], strided
    torch.testing.assert_close(norm(x), LlamaRMSNorm.forward(norm, x))


@pytest.mark.parametrize("model_type,expected", [("llama", 7), ("qwen2", 7), ("mistral", 7), ("gemma", 0)])
def test_fuses_llama_family_norms_only(model_type: str, expected: int) -> None:
    config = AutoConfig.for_model(model_type, vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = AutoModel.from_config(config)
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    before = model(input_ids=ids).last_hidden_state
    assert fused_norm.fuse(model) == expected  # two a layer and the final norm; Gemma's `1 + weight` is left alone
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before, rtol=1e-5, atol=1e-5)


def encoder_grads(fused: bool) -> tuple[torch.Tensor, ...]:
    encoder = build_encoder(ModelConfig(architecture=LLAMA, projection_dim=8, fused_norm=fused), 200, 0, seed=5)
    norms = [m for m in encoder.modules() if fused_norm.is_llama_rms_norm(m)]
    assert len(norms) == 7 and all(("forward" in vars(m)) == fused for m in norms)
    generator = torch.Generator().manual_seed(2)
    for name, param in encoder.named_parameters():
        if "lora_B" in name:  # non-zero, so every adapter's gradient takes part
            torch.nn.init.normal_(param, std=0.3, generator=generator)
    ids = torch.randint(1, 200, (5, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pooled = encoder(ids * mask, mask)
    params = [p for p in encoder.parameters() if p.requires_grad]
    loss = (pooled * torch.randn(pooled.shape, generator=generator)).sum()
    return (pooled.detach(), *torch.autograd.grad(loss, params))


def test_encoder_with_fused_norms_equals_transformers() -> None:
    plain, fused = encoder_grads(False), encoder_grads(True)
    assert len(plain) == len(fused) > 4
    for a, b in zip(plain, fused):
        assert bool(a.abs().max() > 0)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
