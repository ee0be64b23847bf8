"""In-batch contrastive loss over the global batch (the contract in DESIGN.md)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.gather import gather_no_grad, gather_with_grad, world


def false_negative_mask(item_ids: torch.Tensor, candidate_ids: torch.Tensor, positive_column: torch.Tensor,
                        history_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, C] True where candidate j must leave row i's softmax.

    A candidate is a false negative of row i when it is not row i's own positive column but
    its id equals row i's positive (two users with the same next item in the batch) or is in
    row i's history (an item the user already has).
    """
    same = candidate_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    if history_ids is not None and history_ids.numel():
        in_history = (candidate_ids.view(1, -1, 1) == history_ids.unsqueeze(1)).any(dim=-1)
        same = same | in_history
    own = torch.zeros_like(same)
    own[torch.arange(len(item_ids), device=own.device), positive_column] = True
    return same & ~own


def contrastive_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *, temperature: float | torch.Tensor,
                     history_ids: torch.Tensor | None = None, logq: torch.Tensor | None = None,
                     mask_false_negatives: bool = True, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """InfoNCE of each local user against every item of the global batch.

    Returns the mean over local rows. Why no world-size factor: every rank's loss is the mean
    over its B rows, so the mean of the ranks' losses is the one-process mean over the global
    batch; the gather's backward sums the gradients all ranks computed for a row into its
    owner, and the engine's gradient averaging over ranks then divides that sum by the world
    size exactly once, giving the one-process gradient. (Multiplying the loss by the world
    size, as some trainers do, is only right when the gather drops gradients of other ranks.)
    """
    rank, _ = world(group)
    rows = query.shape[0]
    candidates = gather_with_grad(item, group)
    candidate_ids = gather_no_grad(item_ids, group)
    logits = query @ candidates.T / temperature
    if logq is not None:
        # Popular items are over-represented as in-batch negatives; subtracting log q_j turns
        # the sampled softmax into an estimate of the full-catalog softmax.
        logits = logits - gather_no_grad(logq.to(logits.dtype), group).unsqueeze(0)
    positive_column = rank * rows + torch.arange(rows, device=query.device)
    if mask_false_negatives:
        masked = false_negative_mask(item_ids, candidate_ids, positive_column, history_ids)
        logits = logits.masked_fill(masked, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, positive_column)
