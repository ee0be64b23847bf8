"""Token states -> one vector per sequence, independent of the padding side."""

from __future__ import annotations

import torch


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of each row's last real token, for left padding, right padding or none.

    The index is found from the mask itself (the last position holding a 1) rather than from
    `mask.sum() - 1`, which is only right for right padding.
    """
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(dims=[1]).int().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


POOLERS = {"last": last_token, "mean": mean_tokens}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the same positions
    (and gives the same embedding) as the right-padded one."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
