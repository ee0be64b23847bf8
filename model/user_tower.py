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


class RepeatScore(nn.Module):
    """model.repeat_score: one learned number added to the score of every item the user already
    has among the items the tower reads (their last data.max_history).

    Whether people take an item again is a property of the domain, not of any item: nobody
    re-rates a film, everybody re-buys paper. A single dot product can only push all of a user's
    items down by pointing away from them, which costs the user vector the room it needs for
    the next item; this number learns the domain's answer directly (negative for films, positive
    for consumables), and the embeddings are left to rank what is new. It starts at 0 (no
    opinion)."""

    # The score is SPEED x the weight. Adam moves a weight by about lr a step whatever its
    # gradient, and the score must reach the scale of the scores it competes with (inner
    # products of several units): as the weight itself, at lr 1e-3 it was still moving after a
    # whole ml-100k run (-0.42 at step 1000).
    SPEED = 10.0

    def __init__(self) -> None:
        super().__init__()
        # Shape [1], not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors.
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor:
        return self.SPEED * self.weight.squeeze(0)


def seen_so_far(columns: torch.Tensor, mask: torch.Tensor, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [n], candidate columns [n]): every pair of a known position and a distinct item
    its user has read up to it, the tower's state there (b, t) having read row b's items 0..t.

    `columns` [B, L]: each position's item as a candidate column; `mask` [B, L]: 0 at padding;
    `known` [B, L]: the positions scored (those whose next item is known), numbered in row-major
    order as `states[known]` has them. Pairs, not a [P, C] mask: a user holds at most L of a
    catalog that may be millions."""
    width = columns.shape[1]
    real = mask.bool()
    order = torch.arange(width, device=columns.device)
    # An item's first occurrence in its row: each is paired once with every position from it on.
    before = order.view(1, 1, width) < order.view(1, width, 1)  # [1, t, s]: s comes before t
    repeated = (columns.unsqueeze(2) == columns.unsqueeze(1)) & real.unsqueeze(1) & before
    first = real & ~repeated.any(dim=2)
    # [B, t, s]: position t (known) has read the first occurrence at s <= t.
    up_to = order.view(1, 1, width) <= order.view(1, width, 1)
    pairs = known.unsqueeze(2) & first.unsqueeze(1) & up_to
    row, position, source = pairs.nonzero(as_tuple=True)
    numbering = known.flatten().cumsum(0) - 1
    return numbering[row * width + position], columns[row, source]


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
