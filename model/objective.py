"""The training objective chosen in the config: one loss of the family, an optional user-user
term, and the (possibly learned) temperature."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.loss import (Temperature, contrastive_loss, pairwise_softmax_loss, symmetric_loss, triplet_loss,
                        user_contrastive_loss)


class Objective(nn.Module):
    """loss(query, item, ids...) + user_cl_weight * user-user term; owns the temperature parameter."""

    def __init__(self, kind: str = "infonce", temperature: float = 0.05, learn_temperature: bool = False,
                 temperature_range: tuple[float, float] = (0.01, 1.0), mask_false_negatives: bool = True,
                 logq: bool = False, triplet_margin: float = 0.2, triplet_negative: str = "hardest",
                 user_cl_weight: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        self.temperature = Temperature(temperature, learn_temperature, *temperature_range)
        self.mask_false_negatives = mask_false_negatives
        self.use_logq = logq
        self.triplet_margin = triplet_margin
        self.triplet_negative = triplet_negative
        self.user_cl_weight = user_cl_weight
        self.calls = 0  # seeds the random triplet draws; the same on every rank

    def forward(self, query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *,
                history_ids: torch.Tensor | None = None, logq: torch.Tensor | None = None,
                views: tuple[torch.Tensor, torch.Tensor] | None = None,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
        tau = self.temperature()
        common: dict[str, Any] = {"history_ids": history_ids, "mask_false_negatives": self.mask_false_negatives, "group": group}
        logq = logq if self.use_logq else None
        if self.kind == "infonce":
            loss = contrastive_loss(query, item, item_ids, temperature=tau, logq=logq, **common)
        elif self.kind == "symmetric":
            loss = symmetric_loss(query, item, item_ids, temperature=tau, logq=logq, **common)
        elif self.kind == "triplet":
            loss = triplet_loss(query, item, item_ids, margin=self.triplet_margin, negative=self.triplet_negative,
                                seed=self.calls, **common)
        else:
            loss = pairwise_softmax_loss(query, item, item_ids, temperature=tau, **common)
        self.calls += 1
        if views is not None and self.user_cl_weight > 0:
            loss = loss + self.user_cl_weight * user_contrastive_loss(*views, temperature=tau, group=group)
        return loss
