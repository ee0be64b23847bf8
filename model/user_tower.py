"""The user tower of the hierarchical encoder (`model.user_encoder=items`).

The LLM embeds every item once, from its own text; the tower, a small causal transformer,
reads a user's sequence of item embeddings (most recent last) and gives a user state at every
position: what the user is likely to take next after that item. This is HLLM's user model, and
SASRec's structure with items born from text: the same item vectors are the tower's input and
the candidates it is scored against, so the tower can learn to look away from what a user
already has.
"""

from __future__ import annotations

import torch
from torch import nn

from model.pooling import position_ids


class UserTower(nn.Module):
    """Item embeddings [B, L, D] (left-padded sequences) -> user states [B, L, D]."""

    def __init__(self, backbone: nn.Module, item_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(getattr(backbone.config, "hidden_size"))
        self.backbone = backbone
        # The tower reads embeddings, never token ids: its vocabulary rows would get no
        # gradient, which DDP's reducer does not allow for a trainable parameter.
        getattr(backbone, "get_input_embeddings")().requires_grad_(False)
        self.into: nn.Module = nn.Linear(item_dim, hidden, bias=False) if hidden != item_dim else nn.Identity()
        self.out: nn.Module = nn.Linear(hidden, item_dim, bias=False) if hidden != item_dim else nn.Identity()
        # The catalogs this is meant for are small next to the number of weights that could
        # memorise them: dropout on the input items is SASRec's main regulariser.
        self.dropout = nn.Dropout(dropout)

    def forward(self, item_sequence: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs = self.dropout(self.into(item_sequence))
        output = self.backbone(inputs_embeds=inputs, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False)
        return self.out(output.last_hidden_state)


def sequence_inputs(history_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded histories [B, H] (-1 = none) -> (item ids [B, L], mask [B, L], next ids [B, L]).

    Rows are left-padded (the newest item last, where the user embedding is read) with id 0 and
    mask 0; the state after history item k predicts item k + 1, the last one the target; padding
    positions predict -1."""
    rows, width = history_ids.shape
    lengths = (history_ids >= 0).sum(dim=1)
    shift = width - lengths  # how far each row moves right
    columns = torch.arange(width, device=history_ids.device).unsqueeze(0)
    source = (columns - shift.unsqueeze(1)).clamp(min=0)
    mask = columns >= shift.unsqueeze(1)
    ids = torch.where(mask, history_ids.gather(1, source), torch.zeros_like(history_ids))
    following = torch.cat([history_ids, torch.full_like(history_ids[:, :1], -1)], dim=1)
    following[torch.arange(rows, device=history_ids.device), lengths] = targets
    next_ids = torch.where(mask, following.gather(1, (source + 1).clamp(max=width)), torch.full_like(ids, -1))
    return ids, mask.long(), next_ids
