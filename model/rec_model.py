"""The model the engines wrap: encoder + objective in one module."""

from __future__ import annotations

import torch
from torch import nn

from model.encoder import RecEncoder
from model.objective import Objective


class RecModel(nn.Module):
    """Encoder + objective: every trainable parameter (the temperature included) in one module,
    whose forward is the encoder's, so DDP and DeepSpeed see each encoding call."""

    def __init__(self, encoder: RecEncoder, objective: Objective) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, every_position: bool = False,
                user: bool = False, item_sequence: torch.Tensor | None = None,
                lower_states: torch.Tensor | None = None,
                item_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(input_ids, attention_mask, every_position, user, item_sequence, lower_states, item_ids)
