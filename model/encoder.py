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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                every_position: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, D] embeddings; with every_position, also [B, T, D]: each token state made an
        embedding the same way (what a causal backbone knows up to that token)."""
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False)
        pooled = self.embed(self.pool(output.last_hidden_state, attention_mask))
        if every_position:
            return pooled, self.embed(output.last_hidden_state)
        return pooled

    def embed(self, states: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            states = self.projection(states.to(self.projection.weight.dtype))
        # Normalise in float32: cosine scores divided by a small temperature amplify bf16 error.
        return F.normalize(states.float(), dim=-1)
