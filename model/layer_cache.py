"""A decoder split in two at layer `split`: the frozen lower layers' token states, computed once
per item and kept in a `StateCache`, and the upper layers (the ones carrying LoRA) run on them
each step. The two halves run exactly the decoder's own forward (the same mask, rotary
positions, layers and final norm), so encoding an item from its cached states equals encoding
it from its tokens; tests/test_layer_cache.py holds them to that.

Llama-family decoders (Llama, Qwen2, Mistral, SmolLM: `embed_tokens`, `layers`, `norm`,
`rotary_emb`, full causal attention) are supported; sliding-window layers are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from model.pooling import position_ids


def decoder_of(backbone: nn.Module) -> Any:
    """The decoder inside a (peft-wrapped) backbone: the module holding `layers` and `norm`."""
    for module in backbone.modules():
        if all(hasattr(module, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return module
    raise ValueError(f"{type(backbone).__name__} has no Llama-style decoder (embed_tokens, layers, norm, rotary_emb)")


def check_splittable(decoder: Any) -> None:
    layer_types = getattr(decoder.config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(f"{decoder.config.model_type}: sliding-window layers cannot be split")


def run_layers(decoder: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, first: int, last: int,
               final_norm: bool) -> torch.Tensor:
    """Layers [first, last) of `decoder` on `hidden` [B, T, H], then the final norm when asked:
    the decoder's forward restricted to those layers."""
    positions = position_ids(attention_mask)
    mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                              position_ids=positions)
    rotary = decoder.rotary_emb(hidden, position_ids=positions)
    for layer in decoder.layers[first:last]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions, cache=None,
                       use_cache=False)
    return decoder.norm(hidden) if final_norm else hidden


class StateCache:
    """Every item's token states after the frozen lower layers, packed: item i's are rows
    `offsets[i]:offsets[i + 1]` of `states` [total tokens, H] (no padding kept)."""

    def __init__(self, states: torch.Tensor, lengths: torch.Tensor) -> None:
        self.states = states
        self.lengths = lengths.long()
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, item_ids: torch.Tensor, padding_side: str,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, H] states, [B, T] attention mask) of `item_ids`, padded to the longest of them."""
        ids = item_ids.cpu()
        lengths = self.lengths[ids]
        width = int(lengths.max())
        # Token k of row r: source row offsets[id_r] + k, column start_r + k.
        rows = torch.arange(len(ids)).repeat_interleave(lengths)
        within = torch.arange(int(lengths.sum())) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
        starts = width - lengths if padding_side == "left" else torch.zeros_like(lengths)
        columns = starts.repeat_interleave(lengths) + within
        states = torch.zeros(len(ids), width, self.states.shape[1], dtype=self.states.dtype)
        states[rows, columns] = self.states[self.offsets[ids].repeat_interleave(lengths) + within]
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        mask[rows, columns] = 1
        return states.to(device), mask.to(device)

    @staticmethod
    def pack(states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([tokens, H] the real tokens' states row after row, [B] their counts) of a padded batch."""
        real = attention_mask.bool()
        return states[real], real.sum(dim=1)
