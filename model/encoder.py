"""The recommender encoder: one backbone (with LoRA) shared by users and items."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.pooling import POOLERS, position_ids


class RecEncoder(nn.Module):
    """Backbone -> pooled hidden state -> optional projection -> L2-normalised embedding.

    Users and items go through the same weights: a user is the text of their history, an item
    the text of itself, and the loss pulls the two towards each other.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, pooling: str = "last", projection_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = POOLERS[pooling]
        self.projection = nn.Linear(hidden_size, projection_dim, bias=False) if projection_dim else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False)
        pooled = self.pool(output.last_hidden_state, attention_mask)
        if self.projection is not None:
            pooled = self.projection(pooled.to(self.projection.weight.dtype))
        # Normalise in float32: cosine scores divided by a small temperature amplify bf16 error.
        return F.normalize(pooled.float(), dim=-1)
