"""Unpadded encoding: the backbone computes real tokens only.

A batch of prompts of different lengths is usually padded to its longest, and every layer's
projections and MLP then run on the padding too: with user prompts of 40 to 256 tokens, half
of the work. Here the batch's real tokens are packed into one row ([1, N]), so the linear layers
(nearly all of a decoder's FLOPs) see N tokens; only attention needs the sequences apart, and
`unpadded_attention` lays queries, keys and values back out as [B, T] (each row from column 0,
padded to the batch's longest), runs the usual sdpa kernel, causal, and packs the result
again. The outputs equal the padded forward's at every real token (up to the float rounding of
differently shaped matrix products): positions count real tokens only, as in
`model.pooling.position_ids`. Leading tokens that every prompt of the batch shares (the user
prompts' instruction) are computed once (`shared_prefix`).

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
    longest row); built once per forward, read by every layer.

    `prefix` leading tokens common to every row are packed once, ahead of the rows' own tokens:
    a causal decoder's states there depend on those tokens alone, so every row's copy would be
    the same. Attention still sees them in every row (copied in by `spread`, their gradients
    summed back by autograd); the linear layers compute them once."""

    def __init__(self, attention_mask: torch.Tensor, prefix: int = 0) -> None:
        lengths = attention_mask.sum(dim=1)
        width = int(lengths.max())
        self.shape = (len(lengths), width)
        steps = torch.arange(width, device=attention_mask.device)
        real = steps[None, :] < lengths[:, None]  # [B, T]
        # Real slot (row, t) in row order reads packed token source[...]: t for the shared
        # prefix, else the row's own tokens, which follow the prefix and the earlier rows'.
        own = lengths - prefix
        starts = prefix + own.cumsum(0) - own  # packed index of each row's first own token
        source = torch.where(steps[None, :] < prefix, steps[None, :], starts[:, None] + steps[None, :] - prefix)
        self.where = real.flatten().nonzero().squeeze(1)
        self.source = source[real]
        # Packing back takes the prefix from row 0 (its copies elsewhere are discarded).
        rows = torch.arange(len(lengths), device=steps.device)[:, None]
        self.first = self.where[((steps[None, :] >= prefix) | (rows == 0))[real]]

    def spread(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, heads, N, d] -> [B, heads, T, d], zeros at padding."""
        batch, width = self.shape
        heads, dim = packed.shape[1], packed.shape[3]
        tokens = packed[0].transpose(0, 1).index_select(0, self.source)
        laid = packed.new_zeros(batch * width, heads, dim).index_copy(0, self.where, tokens)
        return laid.view(batch, width, heads, dim).transpose(1, 2)

    def pack(self, laid: torch.Tensor) -> torch.Tensor:
        """[B, T, heads, d] (attention's output layout) -> [1, N, heads, d]."""
        return laid.reshape(-1, *laid.shape[2:]).index_select(0, self.first).unsqueeze(0)


def unpadded_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: a packed batch (`rectrain_layout` given) per sequence,
    anything else as sdpa."""
    layout: PackedLayout | None = kwargs.pop("rectrain_layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Rows start at column 0, so the causal mask alone is right for every real query: the keys
    # at or before it are its row's real tokens. Queries at padding read garbage that `pack`
    # drops (no gradient reaches it). Without an explicit mask, CUDA's sdpa can take its flash
    # kernel (a mask rules it out) and no [B, 1, T, T] mask is built; on a CPU the time is the same.
    laid, _ = sdpa_attention_forward(module, layout.spread(query), layout.spread(key), layout.spread(value),
                                     None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
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


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading real tokens every row of a batch has in common (rows padded on either
    side): user prompts open with the same instruction."""
    lengths = attention_mask.sum(dim=1)
    shortest = int(lengths.min())
    if len(lengths) < 2 or shortest == 0:
        return 0
    first = attention_mask.int().argmax(dim=1)  # the first real token: left padding or none
    heads = input_ids.gather(1, first[:, None] + torch.arange(shortest, device=input_ids.device)[None, :])
    return int((heads == heads[:1]).all(dim=0).int().cumprod(dim=0).sum())


def unpadded_forward(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     share_prefix: bool = True) -> torch.Tensor:
    """The backbone's last hidden states [B, T, H] in the input's own padded layout (zeros at
    padding, for the poolers), computed on the real tokens only; with `share_prefix`, the
    rows' common leading tokens once."""
    real = attention_mask.bool()
    prefix = shared_prefix(input_ids, attention_mask) if share_prefix else 0
    layout = PackedLayout(attention_mask, prefix)
    # The real tokens in row order, each put at its packed index; the prefix's copies are equal
    # (same ids, same positions), so whichever lands there is right.
    count = int(layout.source.max()) + 1
    ids = input_ids.new_empty(count).index_copy_(0, layout.source, input_ids[real])
    positions = input_ids.new_empty(count).index_copy_(0, layout.source, position_ids(attention_mask)[real])
    packed = backbone(input_ids=ids.unsqueeze(0), position_ids=positions.unsqueeze(0), attention_mask=None,
                      use_cache=False, rectrain_layout=layout).last_hidden_state[0]
    batch, width = attention_mask.shape
    flat = real.flatten().nonzero().squeeze(1)
    per_row = packed.index_select(0, layout.source)  # the prefix's states copied to every row
    return packed.new_zeros(batch * width, packed.shape[-1]).index_copy(0, flat, per_row).view(batch, width, -1)
