"""The training objective chosen in the config: one loss of the family over in-batch negatives
and/or a softmax over the whole catalog, an optional user-user term, and the (possibly learned)
temperature."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.loss import (Temperature, catalog_loss, contrastive_loss, next_item_loss, pairwise_softmax_loss,
                        position_loss, symmetric_loss, triplet_loss, uniformity_loss, user_contrastive_loss)


class Objective(nn.Module):
    """loss(query, item, ids...) + user_cl_weight * user-user term; owns the temperature parameter."""

    def __init__(self, kind: str = "infonce", temperature: float = 0.05, learn_temperature: bool = False,
                 temperature_range: tuple[float, float] = (0.01, 1.0), mask_false_negatives: bool = True,
                 logq: bool = False, triplet_margin: float = 0.2, triplet_negative: str = "hardest",
                 user_cl_weight: float = 0.0, negatives: str = "batch", history_positions: float = 0.0,
                 mask_history: bool = True, uniformity: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        self.temperature = Temperature(temperature, learn_temperature, *temperature_range)
        self.mask_false_negatives = mask_false_negatives
        self.use_logq = logq
        self.triplet_margin = triplet_margin
        self.triplet_negative = triplet_negative
        self.user_cl_weight = user_cl_weight
        self.negatives = negatives
        self.history_positions = history_positions
        self.mask_history = mask_history
        self.uniformity = uniformity
        self.calls = 0  # seeds the random triplet draws; the same on every rank

    @property
    def needs_catalog(self) -> bool:
        """Whether forward needs every item's embedding (`catalog`)."""
        return self.negatives != "batch" or self.history_positions > 0

    def forward(self, query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *,
                history_ids: torch.Tensor | None = None, logq: torch.Tensor | None = None,
                views: tuple[torch.Tensor, torch.Tensor] | None = None, catalog: torch.Tensor | None = None,
                positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                group: dist.ProcessGroup | None = None, held_out: torch.Tensor | None = None) -> torch.Tensor:
        """`catalog`: every item's embedding [N, D], needed when the negatives include the catalog
        or with history positions; `positions`: (user token states [B, T, D], rows, columns,
        next items) for the history-positions term (model.loss.next_item_positions);
        `negatives`: (ids, log q) of extra in-batch negatives whose embeddings follow the B
        positives in `item` (loss.history_negatives); `held_out` [N]: items the catalog softmax
        leaves out (data.cold_items, never a candidate in training)."""
        tau = self.temperature()
        terms = []
        if self.negatives != "catalog":
            candidate_ids, candidate_logq = item_ids, logq
            if negatives is not None:
                candidate_ids = torch.cat([item_ids, negatives[0]])
                candidate_logq = None if logq is None else torch.cat([logq, negatives[1].to(logq.dtype)])
            terms.append(self._in_batch(query, item, candidate_ids, tau, history_ids, candidate_logq, group))
        if self.negatives != "batch":
            terms.append(catalog_loss(query, item_ids, self._required(catalog), temperature=tau,
                                      held_out=held_out))
        self.calls += 1
        loss = terms[0] if len(terms) == 1 else (terms[0] + terms[1]) / 2
        if self.uniformity > 0:
            rows = item_ids.shape[0]  # the positives only: history draws are no sample of the catalog
            loss = loss + self.uniformity * uniformity_loss(item[:rows], item_ids, group=group)
        if views is not None and self.user_cl_weight > 0:
            loss = loss + self.user_cl_weight * user_contrastive_loss(*views, temperature=tau, group=group)
        if positions is not None and self.history_positions > 0:
            loss = loss + self.history_positions * position_loss(*positions, self._required(catalog), temperature=tau,
                                                                  group=group, held_out=held_out)
        return loss

    def next_item(self, states: torch.Tensor, next_columns: torch.Tensor, candidates: torch.Tensor, first: torch.Tensor,
                  group: dist.ProcessGroup | None = None, seen: tuple[torch.Tensor, torch.Tensor] | None = None,
                  repeat: torch.Tensor | None = None) -> torch.Tensor:
        """The hierarchical objective (model.user_encoder=items): model.loss.next_item_loss."""
        self.calls += 1
        return next_item_loss(states, next_columns, candidates, first, temperature=self.temperature(), group=group,
                              seen=seen, repeat=repeat)

    def _required(self, catalog: torch.Tensor | None) -> torch.Tensor:
        if catalog is None:
            raise ValueError(f"negatives={self.negatives}, history_positions={self.history_positions:g} "
                             "need the catalog's embeddings")
        return catalog

    def _in_batch(self, query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, tau: torch.Tensor,
                  history_ids: torch.Tensor | None, logq: torch.Tensor | None,
                  group: dist.ProcessGroup | None) -> torch.Tensor:
        common: dict[str, Any] = {"history_ids": history_ids if self.mask_history else None,
                                  "mask_false_negatives": self.mask_false_negatives, "group": group}
        logq = logq if self.use_logq else None
        if self.kind == "infonce":
            return contrastive_loss(query, item, item_ids, temperature=tau, logq=logq, **common)
        if self.kind == "symmetric":
            return symmetric_loss(query, item, item_ids, temperature=tau, logq=logq, **common)
        if self.kind == "triplet":
            return triplet_loss(query, item, item_ids, margin=self.triplet_margin, negative=self.triplet_negative,
                                seed=self.calls, **common)
        return pairwise_softmax_loss(query, item, item_ids, temperature=tau, **common)
