"""Full-catalog ranking metrics: Recall, NDCG, MRR and HR at K, from scores and held-out targets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
    return _beats(scores, target_scores[:, None], index[None, :], targets[:, None]).sum(dim=1)


def ndcg_at(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Each user's NDCG@k from the 0-based rank of their one held-out item."""
    ranks = ranks.double()
    return (ranks < k) / torch.log2(ranks + 2)


def metric_sums(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Per-metric sums over users (divide by the user count for the means)."""
    out: dict[str, float] = {}
    ranks = ranks.double()
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.sum())
        out[f"hr@{k}"] = out[f"recall@{k}"]  # one held-out item per user: a hit is full recall
        out[f"ndcg@{k}"] = float(ndcg_at(ranks, k).sum())
        out[f"mrr@{k}"] = float((hit / (ranks + 1)).sum())
    return out


def rank_catalog(user_embeddings: torch.Tensor, item_embeddings: torch.Tensor, targets: torch.Tensor,
                 histories: Sequence[Sequence[int]] | None, ks: Sequence[int], user_chunk: int = 1024,
                 item_chunk: int = 32768, bonus: Bonus | None = None, parts: bool = False,
                 device: torch.device | None = None) -> dict[str, Any]:
    """Mean metrics of inner-product ranking over the whole catalog, every variant in one pass
    (the sums of `rank_sums` over the users)."""
    sums = rank_sums(user_embeddings, item_embeddings, targets, histories, ks, user_chunk, item_chunk, bonus, parts,
                     device)
    return mean_metrics(sums, len(targets))


def rank_sums(user_embeddings: torch.Tensor, item_embeddings: torch.Tensor, targets: torch.Tensor,
              histories: Sequence[Sequence[int]] | None, ks: Sequence[int], user_chunk: int = 1024,
              item_chunk: int = 32768, bonus: Bonus | None = None, parts: bool = False,
              device: torch.device | None = None, groups: tuple[torch.Tensor, list[str]] | None = None,
              repeat: Bonus | None = None) -> dict[str, Any]:
    """Per-metric sums over the users of inner-product ranking over the whole catalog.

    Only each target's rank is needed, and it is a count (items scoring above the target), so
    the catalog is scored in blocks of `user_chunk` x `item_chunk` and the counts added up:
    memory stays at one block whatever the catalog and user counts. The blocks are scored on
    `device` (default: where the item embeddings are), each moved there when it is scored, so
    the catalog can stay in host memory while an accelerator does the arithmetic.

    Returns the sums with each user's `histories` excluded from its ranking at the top level
    and with them kept under "with_history" (the same with and without when `histories` is
    None). Both come from one count: an excluded item only changes the rank when it scores
    above the target, so the excluded rank is the kept one less the excluded items ahead.

    `bonus(begin, end)`: sparse (row, item, value) added to the scores of users begin..end-1
    (the transition prior), rows counted from 0 at `begin`; built a chunk at a time, so its
    memory is bounded too. With `parts`, the embeddings alone ("encoder") and the bonus alone
    ("transitions") are ranked in the same pass and reported beside the sum, each with its
    "with_history": the block's inner products are computed once for all three.

    `groups`: (each user's group [U], the groups' names); the same sums are also kept per group,
    under "groups" -> name, each with its "users" count (from the same ranks: no second pass).

    `repeat(begin, end)`: sparse scores in `bonus`'s form that belong to the model itself (its
    repeat score on the items a user has): part of "encoder" and of the ranking, and the inner
    products without them reported beside, as "embeddings".
    """
    if parts and bonus is None:
        raise ValueError("parts needs a bonus: there is nothing to rank apart")
    device = device or item_embeddings.device
    stages = _stages(repeat is not None, bonus is not None, parts)
    names = [name for name, _, _ in stages]
    none_yet = metric_sums(torch.zeros(0, dtype=torch.long), ks)  # every key, even for no users
    sums = {f"{name}/{view}": dict(none_yet) for name in names for view in ("excluded", "kept")}
    group_of, group_names = groups if groups is not None else (None, [])
    group_sums = [{key: dict(none_yet) for key in sums} for _ in group_names]
    group_users = [0.0 for _ in group_names]
    n_items = item_embeddings.shape[0]
    for begin in range(0, len(targets), user_chunk):
        queries = user_embeddings[begin:begin + user_chunk].to(device)
        host_targets = targets[begin:begin + user_chunk].cpu()
        chunk_targets = host_targets.to(device)
        rows = torch.arange(len(chunk_targets), device=device)
        end = begin + len(chunk_targets)
        sparse = {kind: tuple(t.to(device) for t in made(begin, end))
                  for kind, made in (("repeat", repeat), ("bonus", bonus)) if made is not None}
        # Each stage's score of every row's target, built up as the blocks' scores are.
        target = (queries * item_embeddings[host_targets].to(device)).sum(dim=-1)
        target_scores = {}
        for name, reset, adds in stages:
            if reset:
                target = torch.zeros_like(target)
            for kind in adds:
                rows_of, items_of, values = sparse[kind]
                on_target = items_of == chunk_targets[rows_of]
                target = target.index_add(0, rows_of[on_target], values[on_target].to(target.dtype))
            target_scores[name] = target
        pairs = None
        if histories is not None:
            excluded_rows, excluded_items = _exclusion_pairs(histories[begin:begin + user_chunk], host_targets, n_items)
            pairs = (excluded_rows.to(device), excluded_items.to(device))
        kept = {name: torch.zeros(len(chunk_targets), dtype=torch.long, device=device) for name in names}
        excluded_ahead = {name: torch.zeros(len(chunk_targets), dtype=torch.long, device=device) for name in names}
        for low in range(0, n_items, item_chunk):
            high = min(low + item_chunk, n_items)
            in_block = (chunk_targets >= low) & (chunk_targets < high)
            excluded_here = None
            if pairs is not None:
                inside = (pairs[1] >= low) & (pairs[1] < high)
                excluded_here = (pairs[0][inside], pairs[1][inside] - low)
            scores = queries @ item_embeddings[low:high].to(device).T
            here = {}
            for kind, (rows_of, items_of, values) in sparse.items():
                inside = (items_of >= low) & (items_of < high)
                here[kind] = ((rows_of[inside], items_of[inside] - low), values[inside].to(scores.dtype))
            # The stages change the block's scores in place (the inner products, then the repeat
            # score added, then the bonus, then the bonus alone): one block in memory for all.
            for name, reset, adds in stages:
                if reset:
                    scores.zero_()
                for kind in adds:
                    scores.index_put_(*here[kind], accumulate=True)
                target = target_scores[name]
                kept[name] += _items_ahead(scores, target, chunk_targets, low, rows[in_block])
                if excluded_here is not None:
                    beaten = _beats(scores[excluded_here], target[excluded_here[0]], excluded_here[1] + low,
                                    chunk_targets[excluded_here[0]])
                    excluded_ahead[name].index_add_(0, excluded_here[0], beaten.long())
        members = [] if group_of is None else [group_of[begin:begin + user_chunk].to(device) == index
                                               for index in range(len(group_names))]
        for name in names:
            for view, ahead in (("excluded", kept[name] - excluded_ahead[name]), ("kept", kept[name])):
                _add(sums[f"{name}/{view}"], metric_sums(ahead, ks))
                for group, member in zip(group_sums, members):
                    _add(group[f"{name}/{view}"], metric_sums(ahead[member], ks))
        for index, member in enumerate(members):
            group_users[index] += float(member.sum())
    out = _nest(sums, names)
    if groups is not None:
        out["groups"] = {label: {**_nest(group, names), "users": users}
                         for label, group, users in zip(group_names, group_sums, group_users)}
    return out


def _stages(repeat: bool, bonus: bool, parts: bool) -> list[tuple[str, bool, tuple[str, ...]]]:
    """The rankings one pass counts, in order, each (name, whether the block's scores restart at
    zero, the sparse scores then added in place): "ranked" is the reported ranking; with a repeat
    score, "embeddings" the inner products before it; with `parts`, "encoder" the model's own
    scores and "transitions" the bonus alone."""
    model: tuple[str, ...] = ("repeat",) if repeat else ()
    stages = [("embeddings", False, ())] if repeat else []
    if bonus and parts:
        return [*stages, ("encoder", False, model), ("ranked", False, ("bonus",)), ("transitions", True, ("bonus",))]
    return [*stages, ("ranked", False, (*model, *(("bonus",) if bonus else ())))]


def _add(total: dict[str, float], more: dict[str, float]) -> None:
    for key, value in more.items():
        total[key] += value


def _nest(sums: dict[str, dict[str, float]], names: list[str]) -> dict[str, Any]:
    """"name/view" sums -> the reported shape: the fused ranking's at the top, each part under its
    name, the history-kept figures under "with_history"."""
    out: dict[str, Any] = {**sums["ranked/excluded"], "with_history": sums["ranked/kept"]}
    for name in names:
        if name != "ranked":
            out[name] = {**sums[f"{name}/excluded"], "with_history": sums[f"{name}/kept"]}
    return out


def _beats(scores: torch.Tensor, target: torch.Tensor, items: torch.Tensor, target_items: torch.Tensor) -> torch.Tensor:
    """Whether each item ranks above its row's target: a higher score, or the same score and a
    lower item index (ties broken as a stable sort would)."""
    return (scores > target) | ((scores == target) & (items < target_items))


def _items_ahead(scores: torch.Tensor, target: torch.Tensor, chunk_targets: torch.Tensor, low: int,
                 target_rows: torch.Tensor) -> torch.Tensor:
    """Per row, the items of the block `scores` (columns low, low + 1, ...) that rank above the
    row's target, by `_beats`, in one comparison over the block.

    An item below the target's index beats it with an equal score, one above only with a higher
    one. In a block wholly below a row's target, "s >= t" is "s > the float just under t"; wholly
    above, "s > t": one threshold a row. Only the rows whose target lies in the block (few: one
    block's share of the catalog) need the exact rule, applied to those rows alone, which also
    keeps the target from beating itself (its block score and its separately computed score may
    differ by rounding)."""
    below_target = chunk_targets >= low + scores.shape[1]  # the whole block comes before the target
    threshold = torch.where(below_target, torch.nextafter(target, torch.full_like(target, float("-inf"))), target)
    ahead = (scores > threshold[:, None]).sum(dim=1)
    if len(target_rows):
        own = scores[target_rows]
        items = torch.arange(low, low + scores.shape[1], device=scores.device)
        exact = _beats(own, target[target_rows, None], items[None, :], chunk_targets[target_rows, None])
        exact[torch.arange(len(target_rows), device=scores.device), chunk_targets[target_rows] - low] = False
        ahead[target_rows] = exact.sum(dim=1)
    return ahead


def mean_metrics(sums: dict[str, Any], users: int) -> dict[str, Any]:
    """Every number of a (nested) dict of metric sums divided by the user count; each of
    "groups" by its own "users" count (kept as a count)."""
    out = {key: mean_metrics(value, users) if isinstance(value, dict) else value / max(users, 1)
           for key, value in sums.items() if key != "groups"}
    if "groups" in sums:
        out["groups"] = {label: {**mean_metrics({k: v for k, v in group.items() if k != "users"},
                                                int(group["users"])), "users": int(group["users"])}
                         for label, group in sums["groups"].items()}
    return out


def rank_in_chunks(user_embeddings: torch.Tensor, item_embeddings: torch.Tensor, targets: torch.Tensor,
                   exclude: Sequence[Sequence[int]] | None, ks: Sequence[int], user_chunk: int = 1024,
                   item_chunk: int = 32768, bonus: Bonus | None = None) -> dict[str, float]:
    """One ranking's mean metrics (see `rank_catalog`): `exclude[u]` removed from user u's
    ranking, or nothing removed when `exclude` is None."""
    ranked = rank_catalog(user_embeddings, item_embeddings, targets, exclude, ks, user_chunk, item_chunk, bonus)
    kept = ranked.pop("with_history")
    return ranked if exclude is not None else kept


def _exclusion_pairs(histories: Sequence[Sequence[int]], targets: torch.Tensor,
                     n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) of every history item to remove from a row's ranking, each once (an item
    seen twice must not be subtracted twice); the target is kept."""
    rows = torch.tensor([u for u, items in enumerate(histories) for _ in items], dtype=torch.long)
    items = torch.tensor([i for items in histories for i in items], dtype=torch.long)
    keep = items != targets[rows] if len(rows) else torch.zeros(0, dtype=torch.bool)
    unique = torch.unique(rows[keep] * n_items + items[keep])
    return unique // n_items, unique % n_items
