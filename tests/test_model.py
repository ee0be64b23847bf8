"""The encoder: pooling, padding invariance, LoRA freezing (model/pooling.py, model/encoder.py,
train/modeling/backbone.py), on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from model.encoder import RecEncoder
from model.pooling import last_token, mean_tokens, position_ids
from train.modeling.backbone import build_encoder
from train.data.collate import pad
from train.config.io import load_config
from train.errors import UserError

TINY = [
    "model.architecture.hidden_size=32",
    "model.architecture.intermediate_size=64",
    "model.architecture.num_hidden_layers=2",
    "model.architecture.num_attention_heads=4",
    "model.architecture.num_key_value_heads=4",
    "model.architecture.max_position_embeddings=64",
]
PAD_ID = 0
# Different lengths, so both paddings actually pad; no token equals PAD_ID.
SEQUENCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [42]]


def tiny_encoder(*overrides: str) -> RecEncoder:
    config = load_config(None, [*TINY, *overrides])
    return build_encoder(config.model, vocab_size=100, pad_token_id=PAD_ID, seed=0)


def randomise_lora(encoder: RecEncoder) -> None:
    """LoRA B starts at zero (adapters are a no-op); give the adapters a real effect."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# ------------------------------------------------------------------------- pooling

def hidden_states() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [3, 4, 2] with distinct values, and left / right masks for lengths 4, 2, 1."""
    hidden = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    return hidden, left, right


def test_last_token_right_padding() -> None:
    hidden, _, right = hidden_states()
    pooled = last_token(hidden, right)
    assert torch.equal(pooled, torch.stack([hidden[0, 3], hidden[1, 1], hidden[2, 0]]))


def test_last_token_left_padding() -> None:
    hidden, left, _ = hidden_states()
    pooled = last_token(hidden, left)
    # left padding: the last real token is always the last position
    assert torch.equal(pooled, hidden[:, 3])


def test_last_token_mixed_rows() -> None:
    hidden, left, right = hidden_states()
    mask = torch.stack([right[1], left[1], left[2]])
    assert torch.equal(last_token(hidden, mask), torch.stack([hidden[0, 1], hidden[1, 3], hidden[2, 3]]))


def test_mean_tokens_right_and_left_padding() -> None:
    hidden, left, right = hidden_states()
    expected_right = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0), hidden[2, 0]])
    expected_left = torch.stack([hidden[0].mean(0), hidden[1, 2:].mean(0), hidden[2, 3]])
    assert torch.allclose(mean_tokens(hidden, right), expected_right)
    assert torch.allclose(mean_tokens(hidden, left), expected_left)
    # by hand: row 1 right-padded = mean of [8, 9] and [10, 11]
    assert mean_tokens(hidden, right)[1].tolist() == [9.0, 10.0]


def test_mean_tokens_ignores_padded_values() -> None:
    hidden, left, _ = hidden_states()
    noisy = hidden.clone()
    noisy[left == 0] = 1e6
    assert torch.equal(mean_tokens(noisy, left), mean_tokens(hidden, left))


def test_position_ids_count_real_tokens_only() -> None:
    _, left, right = hidden_states()
    assert position_ids(left).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert position_ids(right)[:, :2].tolist() == [[0, 1], [0, 1], [0, 0]]


# ------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_side_does_not_change_embeddings(pooling: str) -> None:
    encoder = tiny_encoder(f"model.pooling={pooling}").eval()
    randomise_lora(encoder)
    with torch.no_grad():
        left = encoder(*pad(SEQUENCES, PAD_ID, "left"))
        right = encoder(*pad(SEQUENCES, PAD_ID, "right"))
        alone = torch.cat([encoder(*pad([seq], PAD_ID, "left")) for seq in SEQUENCES])
    assert left.shape == (len(SEQUENCES), 32)
    assert torch.isfinite(left).all()
    assert torch.allclose(left, right, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)  # padding does not leak into a row
    assert torch.allclose(left.norm(dim=-1), torch.ones(len(SEQUENCES)), atol=1e-5)
    assert torch.allclose(right.norm(dim=-1), torch.ones(len(SEQUENCES)), atol=1e-5)
    # different sequences give different embeddings (the test is not vacuous)
    assert (torch.cdist(left, left) + torch.eye(len(SEQUENCES))).min() > 1e-3


def test_projection_gives_unit_norm_embeddings_of_its_size() -> None:
    encoder = tiny_encoder("model.projection_dim=16", "model.pooling=mean").eval()
    with torch.no_grad():
        left = encoder(*pad(SEQUENCES, PAD_ID, "left"))
        right = encoder(*pad(SEQUENCES, PAD_ID, "right"))
    assert left.shape == (len(SEQUENCES), 16)
    assert encoder.projection.out_features == 16
    assert torch.allclose(left, right, atol=1e-5)
    assert torch.allclose(left.norm(dim=-1), torch.ones(len(SEQUENCES)), atol=1e-5)


def test_same_seed_same_weights() -> None:
    first, second = tiny_encoder(), tiny_encoder()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_lora_trains_only_adapters_and_projection() -> None:
    encoder = tiny_encoder("model.projection_dim=16")
    encoder.train()
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert "lora_" in name or name.startswith("projection."), name
    assert "projection.weight" in trainable
    # every targeted module got both adapter matrices: 7 modules x 2 layers x (A, B)
    assert sum("lora_A" in n for n in trainable) == 14
    assert sum("lora_B" in n for n in trainable) == 14

    frozen_before = {n: p.detach().clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    lora_b_before = {n: p.detach().clone() for n, p in encoder.named_parameters() if "lora_B" in n}
    assert frozen_before and all(torch.count_nonzero(b) == 0 for b in lora_b_before.values())

    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    users = encoder(*pad(SEQUENCES, PAD_ID, "left"))
    items = encoder(*pad([[20, 21], [22], [23, 24, 25], [26, 27]], PAD_ID, "left"))
    loss = torch.nn.functional.cross_entropy(users @ items.T / 0.05, torch.arange(len(SEQUENCES)))
    loss.backward()
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    optimizer.step()

    for name, param in encoder.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"base weight changed: {name}"
    changed = [n for n, before in lora_b_before.items() if not torch.equal(dict(encoder.named_parameters())[n], before)]
    assert changed == list(lora_b_before)


def test_unknown_lora_target_module_names_the_key() -> None:
    with pytest.raises(UserError, match=r"model\.lora\.target_modules.*nope"):
        tiny_encoder("model.lora.target_modules=[nope]")


def test_partly_unknown_lora_targets_name_only_the_missing_one() -> None:
    with pytest.raises(UserError, match=r"model\.lora\.target_modules: nope not in the backbone"):
        tiny_encoder("model.lora.target_modules=[q_proj, nope]")


def test_user_projection_is_a_head_of_its_own(tmp_path) -> None:
    from train.modeling import checkpoint

    encoder = tiny_encoder("model.projection_dim=16", "model.user_projection=true").eval()
    randomise_lora(encoder)
    ids, mask = pad(SEQUENCES, PAD_ID, "left")
    with torch.no_grad():
        as_item = encoder(ids, mask)
        as_user, states = encoder(ids, mask, every_position=True, user=True)
        hidden = encoder.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    assert torch.allclose(as_item, torch.nn.functional.normalize(encoder.projection(hidden[:, -1]), dim=-1), atol=1e-5)
    assert torch.allclose(as_user, torch.nn.functional.normalize(encoder.user_projection(hidden[:, -1]), dim=-1),
                          atol=1e-5)
    assert torch.allclose(states[:, -1], as_user, atol=1e-5)  # every position through the user head too
    assert not torch.allclose(as_user, as_item, atol=1e-3)
    # Saved and loaded with the adapter: another encoder gives the same user embeddings.
    checkpoint.write(tmp_path, encoder, {})
    other = tiny_encoder("model.projection_dim=16", "model.user_projection=true").eval()
    checkpoint.load_weights(tmp_path, other)
    with torch.no_grad():
        assert torch.allclose(other(ids, mask, user=True), as_user, atol=1e-6)
    with pytest.raises(UserError, match="model.user_projection: needs model.projection_dim > 0"):
        tiny_encoder("model.user_projection=true")
