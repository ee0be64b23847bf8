"""The recommender encoder: one backbone (with LoRA) shared by users and items."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.pooling import POOLERS, last_token, position_ids
from model.user_tower import UserTower


class RecEncoder(nn.Module):
    """Backbone -> pooled hidden state -> optional projection -> L2-normalised embedding.

    Users and items go through the same weights: a user is the text of their history, an item
    the text of itself, and the loss pulls the two towards each other. With `user_projection`,
    users get a projection head of their own: a user's state, which holds the items they have,
    then need not lie next to those items (the ones they will not take again).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, pooling: str = "last", projection_dim: int = 0,
                 user_projection: bool = False, user_tower: UserTower | None = None, normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = POOLERS[pooling]
        self.projection = nn.Linear(hidden_size, projection_dim, bias=False) if projection_dim else None
        self.user_projection = nn.Linear(hidden_size, projection_dim, bias=False) if user_projection else None
        self.user_tower = user_tower
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, every_position: bool = False,
                user: bool = False, item_sequence: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, D] embeddings; with every_position, also [B, T, D]: each token state made an
        embedding the same way (what a causal backbone knows up to that token). `user`: the
        prompts are users' (their head, when they have one of their own). `item_sequence`
        [B, T, D]: users as sequences of item embeddings, through the user tower (input_ids unused)."""
        if item_sequence is not None:
            assert self.user_tower is not None, "item sequences need model.user_encoder=items"
            states = self.user_tower(item_sequence, attention_mask)
            pooled = self.unit(last_token(states, attention_mask))
            return (pooled, self.unit(states)) if every_position else pooled
        assert input_ids is not None
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False)
        pooled = self.embed(self.pool(output.last_hidden_state, attention_mask), user)
        if every_position:
            return pooled, self.embed(output.last_hidden_state, user)
        return pooled

    def embed(self, states: torch.Tensor, user: bool = False) -> torch.Tensor:
        head = self.user_projection if user and self.user_projection is not None else self.projection
        if head is not None:
            states = head(states.to(head.weight.dtype))
        return self.unit(states)

    def unit(self, vectors: torch.Tensor) -> torch.Tensor:
        """L2-normalised (or, with normalize=False, raw: SASRec's inner products) float32 vectors.
        Float32: cosine scores divided by a small temperature amplify bf16 error."""
        return F.normalize(vectors.float(), dim=-1) if self.normalize else vectors.float()
