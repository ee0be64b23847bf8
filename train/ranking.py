"""Full-catalog ranking metrics: Recall, NDCG and MRR at K, from scores and held-out targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch

METRICS = ("recall", "ndcg", "mrr")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """0-based rank of each row's target among all items.

    `exclude[u]` lists items removed from row u's ranking (its history); the target itself is
    never removed. Ties are broken by item index (lower first), as a stable sort would, so a
    constant-score baseline cannot look better than it is by luck.
    """
    scores = scores.float().clone()
    rows = torch.arange(len(targets), device=scores.device)
    target_scores = scores[rows, targets]  # read before exclusion, which may hit the target too
    if exclude is not None:
        user_rows = [u for u, items in enumerate(exclude) for _ in items]
        if user_rows:
            items = torch.tensor([i for items in exclude for i in items], device=scores.device)
            scores[torch.tensor(user_rows, device=scores.device), items] = float("-inf")
    scores[rows, targets] = target_scores  # restore a target that was also in the history
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > target_scores[:, None]) | ((scores == target_scores[:, None]) & (index[None, :] < targets[:, None]))
    return ahead.sum(dim=1)


def metric_sums(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Per-metric sums over users (divide by the user count for the means)."""
    out: dict[str, float] = {}
    ranks = ranks.double()
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float((hit / torch.log2(ranks + 2)).sum())
        out[f"mrr@{k}"] = float((hit / (ranks + 1)).sum())
    return out


def rank_in_chunks(user_embeddings: torch.Tensor, item_embeddings: torch.Tensor, targets: torch.Tensor,
                   exclude: Sequence[Sequence[int]] | None, ks: Sequence[int], chunk: int = 1024) -> dict[str, float]:
    """Mean metrics of inner-product ranking, scoring `chunk` users at a time."""
    totals: dict[str, float] = {}
    for begin in range(0, len(targets), chunk):
        end = begin + chunk
        scores = user_embeddings[begin:end] @ item_embeddings.T
        ranks = target_ranks(scores, targets[begin:end], exclude[begin:end] if exclude is not None else None)
        for key, value in metric_sums(ranks, ks).items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / max(len(targets), 1) for key, value in totals.items()}
