"""Full-catalog ranking metrics: Recall, NDCG, MRR and HR at K, from scores and held-out targets."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

METRICS = ("recall", "ndcg", "mrr", "hr")

# (begin, end) -> (rows from 0, items, values): extra scores of a chunk of users.
Bonus = Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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
        out[f"hr@{k}"] = out[f"recall@{k}"]  # one held-out item per user: a hit is full recall
        out[f"ndcg@{k}"] = float((hit / torch.log2(ranks + 2)).sum())
        out[f"mrr@{k}"] = float((hit / (ranks + 1)).sum())
    return out


def rank_in_chunks(user_embeddings: torch.Tensor, item_embeddings: torch.Tensor, targets: torch.Tensor,
                   exclude: Sequence[Sequence[int]] | None, ks: Sequence[int], user_chunk: int = 1024,
                   item_chunk: int = 32768,
                   bonus: Bonus | None = None) -> dict[str, float]:
    """Mean metrics of inner-product ranking over the whole catalog.

    Only each target's rank is needed, and it is a count (items scoring above the target), so
    the catalog is scored in blocks of `user_chunk` x `item_chunk` and the counts added up:
    memory stays at one block whatever the catalog and user counts. `bonus(begin, end)`: sparse
    (row, item, value) added to the scores of users begin..end-1 (the transition prior), rows
    counted from 0 at `begin`, one entry per (row, item); built a chunk at a time, so its memory
    is bounded too.
    """
    totals: dict[str, float] = {}
    n_items = item_embeddings.shape[0]
    for begin in range(0, len(targets), user_chunk):
        queries = user_embeddings[begin:begin + user_chunk]
        chunk_targets = targets[begin:begin + user_chunk]
        rows = torch.arange(len(chunk_targets))
        target_scores = (queries * item_embeddings[chunk_targets]).sum(dim=-1)
        extra = bonus(begin, begin + len(chunk_targets)) if bonus is not None else None
        if extra is not None:
            on_target = extra[1] == chunk_targets[extra[0]]
            target_scores = target_scores.index_add(0, extra[0][on_target], extra[2][on_target].to(target_scores.dtype))
        pairs = _exclusion_pairs(exclude[begin:begin + user_chunk], chunk_targets) if exclude is not None else None
        ahead = torch.zeros(len(chunk_targets), dtype=torch.long)
        for low in range(0, n_items, item_chunk):
            high = min(low + item_chunk, n_items)
            scores = queries @ item_embeddings[low:high].T
            if extra is not None:
                inside = (extra[1] >= low) & (extra[1] < high)
                scores.index_put_((extra[0][inside], extra[1][inside] - low), extra[2][inside].to(scores.dtype),
                                  accumulate=True)
            if pairs is not None:
                inside = (pairs[1] >= low) & (pairs[1] < high)
                scores[pairs[0][inside], pairs[1][inside] - low] = float("-inf")
            index = torch.arange(low, high)
            beats = (scores > target_scores[:, None]) | \
                ((scores == target_scores[:, None]) & (index[None, :] < chunk_targets[:, None]))
            in_block = (chunk_targets >= low) & (chunk_targets < high)
            beats[rows[in_block], chunk_targets[in_block] - low] = False  # the target never beats itself
            ahead += beats.sum(dim=1)
        for key, value in metric_sums(ahead, ks).items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / max(len(targets), 1) for key, value in totals.items()}


def _exclusion_pairs(histories: Sequence[Sequence[int]], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) of every history item to remove from a row's ranking; the target is kept."""
    rows = torch.tensor([u for u, items in enumerate(histories) for _ in items], dtype=torch.long)
    items = torch.tensor([i for items in histories for i in items], dtype=torch.long)
    keep = items != targets[rows] if len(rows) else torch.zeros(0, dtype=torch.bool)
    return rows[keep], items[keep]
