"""Unpadded encoding: the backbone computes real tokens only.

A batch of prompts of different lengths is usually padded to its longest, and every layer's
projections and MLP then run on the padding too: with user prompts of 40 to 256 tokens, half
of the work. Here the batch's real tokens are packed into one row ([1, N]), so the linear layers
(nearly all of a decoder's FLOPs) see N tokens; only attention needs the sequences apart, and
`unpadded_attention` lays queries, keys and values back out as [B, T] (right-aligned, padded to
the batch's longest), runs the usual sdpa kernel with a causal-and-length mask, and packs the
result again. The outputs equal the padded forward's at every real token (up to the float
rounding of differently shaped matrix products): positions count real tokens only, as in
`model.pooling.position_ids`.

The backbone is loaded with `attn_implementation=ATTENTION` (registered here). Called without a
`rectrain_layout` (a padded batch, generation, an export loaded elsewhere), the function is
plain sdpa, so the same model serves both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from model.pooling import position_ids

ATTENTION = "rectrain_unpadded"


class PackedLayout:
    """Where a packed batch's tokens sit once laid out as [B, T] (each row right-padded to the
    longest row), and the causal mask of that layout; built once per forward, read by every layer."""

    def __init__(self, attention_mask: torch.Tensor) -> None:
        lengths = attention_mask.sum(dim=1)
        width = int(lengths.max())
        self.shape = (len(lengths), width)
        steps = torch.arange(width, device=attention_mask.device)
        real = steps[None, :] < lengths[:, None]  # [B, T]
        # Packed token n sits at flat position where[n]: rows in order, tokens in order.
        self.where = real.flatten().nonzero().squeeze(1)
        # A query sees the keys at or before it in its own row: right-aligned rows leave every
        # query at least itself, so no row of the softmax is empty.
        self.mask = real[:, None, None, :] & (steps[None, :] <= steps[:, None])[None, None]

    def spread(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, heads, N, d] -> [B, heads, T, d], zeros at padding."""
        batch, width = self.shape
        heads, dim = packed.shape[1], packed.shape[3]
        laid = packed.new_zeros(batch * width, heads, dim).index_copy(0, self.where, packed[0].transpose(0, 1))
        return laid.view(batch, width, heads, dim).transpose(1, 2)

    def pack(self, laid: torch.Tensor) -> torch.Tensor:
        """[B, T, heads, d] (attention's output layout) -> [1, N, heads, d]."""
        return laid.reshape(-1, *laid.shape[2:]).index_select(0, self.where).unsqueeze(0)


def unpadded_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: a packed batch (`rectrain_layout` given) per sequence,
    anything else as sdpa."""
    layout: PackedLayout | None = kwargs.pop("rectrain_layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    laid, _ = sdpa_attention_forward(module, layout.spread(query), layout.spread(key), layout.spread(value),
                                     layout.mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
    return layout.pack(laid), None


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No [N, N] mask for a packed batch (its layout masks per sequence); sdpa's otherwise."""
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION, unpadded_attention)
AttentionMaskInterface.register(ATTENTION, _mask)


def is_unpadded(backbone: nn.Module) -> bool:
    """Whether the backbone was loaded with the unpadded attention."""
    return getattr(getattr(backbone, "config", None), "_attn_implementation", None) == ATTENTION


def unpadded_forward(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden states [B, T, H] in the input's own padded layout (zeros at
    padding, for the poolers), computed on the real tokens only."""
    real = attention_mask.bool()
    packed = backbone(input_ids=input_ids[real].unsqueeze(0), position_ids=position_ids(attention_mask)[real].unsqueeze(0),
                      attention_mask=None, use_cache=False, rectrain_layout=PackedLayout(attention_mask)).last_hidden_state[0]
    batch, width = attention_mask.shape
    flat = real.flatten().nonzero().squeeze(1)
    return packed.new_zeros(batch * width, packed.shape[-1]).index_copy(0, flat, packed).view(batch, width, -1)
