"""model.unpadded: the backbone on a batch's real tokens only gives the padded forward's
embeddings, token states and gradients, and trains the same run.

The engines' and grad-cache tests run with it on (the default), against the one-process step;
here it is compared with the padded forward it replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_engines import train_on_fixed_batches
from train.config.schema import ModelConfig
from model.unpadded import shared_prefix
from train.modeling.backbone import build_encoder

# Grouped-query attention (4 query heads, 2 key/value heads), as in Llama and Qwen.
GQA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2}


def encode(unpadded: bool, side: str, pooling: str, checkpointing: bool, prefix: int = 0,
           tokens: list[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Embeddings, token states (zero at padding) and LoRA/projection gradients of one batch of
    prompts of lengths 1 to 19 (`prefix` + 1 to 19 with a shared prefix); `tokens` collects how
    many tokens the backbone's embedding layer saw."""
    config = ModelConfig(unpadded=unpadded, pooling=pooling, projection_dim=16, architecture=GQA,
                         gradient_checkpointing=checkpointing)
    encoder = build_encoder(config, 300, 0, seed=3)
    assert encoder.unpadded == unpadded
    if tokens is not None:
        embeddings = encoder.backbone.get_input_embeddings()
        embeddings.register_forward_hook(lambda _module, inputs, _out: tokens.append(int(inputs[0].numel())))
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1, 19, 7, 12, 19, 3]) + prefix
    width = int(lengths.max())
    steps = torch.arange(width)[None, :]
    mask = (steps >= width - lengths[:, None]) if side == "left" else (steps < lengths[:, None])
    ids = torch.randint(1, 300, (len(lengths), width), generator=generator)
    if prefix:  # every row opens with the same tokens, as user prompts open with the instruction
        first = (width - lengths)[:, None] if side == "left" else torch.zeros(len(lengths), 1, dtype=torch.long)
        ids.scatter_(1, first + torch.arange(prefix)[None, :], torch.arange(5, 5 + prefix).repeat(len(lengths), 1))
    ids = ids * mask
    pooled, states = encoder(ids, mask.long(), every_position=True)
    states = states * mask[..., None]
    # A loss that weighs every row and token differently, so misplaced rows change the gradient.
    weights = torch.randn(states.shape, generator=generator)
    loss = (pooled * weights[:, 0]).sum() + (states * weights).sum()
    grads = torch.autograd.grad(loss, [p for p in encoder.parameters() if p.requires_grad])
    return (pooled, states, *grads)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling, checkpointing", [("last", False), ("mean", False), ("mean", True)])
def test_unpadded_forward_and_backward_equal_the_padded_ones(side: str, pooling: str, checkpointing: bool) -> None:
    padded = encode(False, side, pooling, checkpointing)
    unpadded = encode(True, side, pooling, checkpointing)
    assert len(padded) == len(unpadded)
    # LoRA's B starts at zero, so A's gradient is zero: the rest must not be.
    assert sum(bool(a.abs().max() > 0) for a in padded) > len(padded) // 2
    for a, b in zip(padded, unpadded):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling, checkpointing", [("last", False), ("mean", False), ("mean", True)])
def test_a_shared_prefix_computed_once_gives_the_padded_forward(side: str, pooling: str, checkpointing: bool) -> None:
    padded = encode(False, side, pooling, checkpointing, prefix=6)
    seen: list[int] = []
    shared = encode(True, side, pooling, checkpointing, prefix=6, tokens=seen)
    for a, b in zip(padded, shared):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    real = 6 * 6 + (1 + 19 + 7 + 12 + 19 + 3)
    assert seen[0] == real - 5 * 6  # the prefix once, not in each of the 6 rows


def test_the_shared_prefix_is_the_rows_common_leading_tokens() -> None:
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    ids = torch.tensor([[0, 4, 5, 6, 7], [4, 5, 6, 9, 9], [0, 0, 4, 5, 8]])
    assert shared_prefix(ids, mask) == 2
    assert shared_prefix(ids[:1], mask[:1]) == 0  # one row: nothing to share
    assert shared_prefix(ids[[0, 1]], mask[[0, 1]]) == 3
    assert shared_prefix(torch.tensor([[4, 5], [5, 4]]), torch.ones(2, 2, dtype=torch.long)) == 0


def test_a_run_trains_the_same_unpadded(tmp_path: Path) -> None:
    runs = {flag: train_on_fixed_batches(0, 1, str(tmp_path), [("plain", -1)], (f"model.unpadded={flag}",))["plain-1"]
            for flag in ("false", "true")}
    (padded_losses, padded_weights), (losses, weights) = runs["false"], runs["true"]
    assert padded_losses[0] != padded_losses[-1]
    assert losses == pytest.approx(padded_losses, abs=1e-5)
    for name, ref in padded_weights.items():
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=2e-5)
