"""The recommender encoder: one backbone (with LoRA) shared by users and items."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layer_cache import check_splittable, decoder_of, run_layers
from model.pooling import POOLERS, last_token, position_ids
from model.unpadded import is_unpadded, unpadded_forward
from model.user_tower import RepeatScore, UserTower


class RecEncoder(nn.Module):
    """Backbone -> pooled hidden state -> optional projection -> L2-normalised embedding.

    Users and items go through the same weights: a user is the text of their history, an item
    the text of itself, and the loss pulls the two towards each other. With `user_projection`,
    users get a projection head of their own: a user's state, which holds the items they have,
    then need not lie next to those items (the ones they will not take again).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, pooling: str = "last", projection_dim: int = 0,
                 user_projection: bool = False, user_tower: UserTower | None = None, normalize: bool = True,
                 split: int | None = None, num_items: int = 0, share_prefix: bool = True,
                 repeat_score: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = POOLERS[pooling]
        self.projection = nn.Linear(hidden_size, projection_dim, bias=False) if projection_dim else None
        self.user_projection = nn.Linear(hidden_size, projection_dim, bias=False) if user_projection else None
        self.user_tower = user_tower
        # model.id_embeddings: one trained vector per catalog item, added to its text embedding.
        # Zero at first, and only rows of items that occur in training get a gradient, so an item
        # unseen there keeps its text embedding exactly.
        self.id_embeddings: nn.Embedding | None = None
        if num_items:
            self.id_embeddings = nn.Embedding(num_items, projection_dim or hidden_size)
            nn.init.zeros_(self.id_embeddings.weight)
        # model.repeat_score (with the user tower): a learned score for the items a user already has.
        self.repeat_score = RepeatScore() if repeat_score else None
        self.normalize = normalize
        # model.unpadded: the backbone runs on the batch's real tokens only (model/unpadded.py).
        self.unpadded = is_unpadded(backbone)
        # model.shared_prefix: unpadded batches compute their rows' common leading tokens once.
        self.share_prefix = share_prefix
        # model.trained_layers: layers below `split` are frozen and their token states cached per
        # item (model/layer_cache.py); None runs the whole backbone from tokens.
        self.split = split
        # model.trained_layers=0: nothing above the cache trains, so the cache keeps each item's
        # pooled state (one vector, not its token states) and a step reads it directly.
        self.frozen = False
        if split is not None:
            check_splittable(decoder_of(backbone))
            self.frozen = split == len(decoder_of(backbone).layers)

    def heads(self) -> list[nn.Module]:
        """The trained modules beside the backbone that this encoder has: projections, user
        tower, id table, repeat score."""
        return [head for head in (self.projection, self.user_projection, self.user_tower, self.id_embeddings,
                                  self.repeat_score) if head is not None]

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, every_position: bool = False,
                user: bool = False, item_sequence: torch.Tensor | None = None,
                lower_states: torch.Tensor | None = None,
                item_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, D] embeddings; with every_position, also [B, T, D]: each token state made an
        embedding the same way (what a causal backbone knows up to that token). `user`: the
        prompts are users' (their head, when they have one of their own). `item_sequence`
        [B, T, D]: users as sequences of item embeddings, through the user tower (input_ids unused).
        `lower_states` [B, T, H]: the frozen lower layers' token states (`lower`), so only the
        layers from `split` up run (input_ids unused). `item_ids` [B]: the items' catalog
        indices, required for items when there are id embeddings."""
        if item_sequence is not None:
            assert self.user_tower is not None, "item sequences need model.user_encoder=items"
            states = self.user_tower(item_sequence, attention_mask)
            pooled = self.unit(last_token(states, attention_mask))
            return (pooled, self.unit(states)) if every_position else pooled
        if lower_states is not None and self.frozen:  # [B, 1, H]: the pooled states `lower` kept
            return self.embed(lower_states[:, -1], user, item_ids)
        if lower_states is not None:
            assert self.split is not None, "lower states need model.trained_layers"
            decoder = decoder_of(self.backbone)
            last_hidden = run_layers(decoder, lower_states, attention_mask, self.split, len(decoder.layers), True)
        elif self.unpadded:
            assert input_ids is not None
            last_hidden = unpadded_forward(self.backbone, input_ids, attention_mask, self.share_prefix)
        else:
            assert input_ids is not None
            last_hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        pooled = self.embed(self.pool(last_hidden, attention_mask), user, item_ids)
        if every_position:
            return pooled, self.embed(last_hidden, user)
        return pooled

    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T, H] token states after the frozen layers below `split`, their mask): what
        `forward` takes as `lower_states`; they never change during training, so each item's are
        computed once. With every layer frozen, the pooled state instead ([B, 1, H], mask [B, 1])."""
        assert self.split is not None, "lower states need model.trained_layers"
        decoder = decoder_of(self.backbone)
        hidden = decoder.embed_tokens(input_ids)
        if self.frozen:
            last_hidden = run_layers(decoder, hidden, attention_mask, 0, self.split, True)
            pooled = self.pool(last_hidden, attention_mask).unsqueeze(1)
            return pooled, torch.ones(pooled.shape[:2], dtype=attention_mask.dtype, device=pooled.device)
        return run_layers(decoder, hidden, attention_mask, 0, self.split, False), attention_mask

    def embed(self, states: torch.Tensor, user: bool = False, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (the user's head for users that have one), plus the items' id vectors
        (model.id_embeddings; items only; none for an index below 0), made unit."""
        head = self.user_projection if user and self.user_projection is not None else self.projection
        if head is not None:
            states = head(states.to(head.weight.dtype))
        if self.id_embeddings is not None and not user:
            assert item_ids is not None, "model.id_embeddings: items need their catalog indices"
            # A negative index is an item whose id vector this step leaves out (model.id_dropout):
            # its text alone, as an item that was never in training.
            kept = (item_ids >= 0).unsqueeze(-1)
            states = states.float() + self.id_embeddings(item_ids.clamp(min=0)).float() * kept
        return self.unit(states)

    def unit(self, vectors: torch.Tensor) -> torch.Tensor:
        """L2-normalised (or, with normalize=False, raw: SASRec's inner products) float32 vectors.
        Float32: cosine scores divided by a small temperature amplify bf16 error."""
        return F.normalize(vectors.float(), dim=-1) if self.normalize else vectors.float()
