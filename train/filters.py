"""Filters prepare applies to the interaction log: a minimum rating, then the iterative k-core.

Both are vectorised over the whole log (numpy bincounts, Arrow filters): one pass per k-core
round, never a Python step per interaction, so they stay cheap on logs of tens of millions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from train.errors import UserError


def k_core(user_codes: np.ndarray, item_codes: np.ndarray, n_users: int, n_items: int,
           k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The k-core: (interactions kept, items kept, rounds that removed something).

    Each round removes at once every interaction of a user or an item with fewer than `k`
    interactions left; removing some can push others below `k`, so rounds repeat until none is
    removed. The result, the largest sub-log where every user and item has >= k interactions,
    does not depend on the order of removal. Items without any interaction are not in the core.
    """
    keep = np.ones(len(user_codes), dtype=bool)
    rounds = 0
    while True:
        user_counts = np.bincount(user_codes[keep], minlength=n_users)
        item_counts = np.bincount(item_codes[keep], minlength=n_items)
        short = keep & ((user_counts[user_codes] < k) | (item_counts[item_codes] < k))
        if not short.any():
            return keep, item_counts >= k, rounds
        keep &= ~short
        rounds += 1


def filter_log(interactions: pa.Table, n_items: int, min_rating: float,
               k: int) -> tuple[pa.Table, np.ndarray | None, dict[str, Any]]:
    """Apply data.min_rating and data.k_core to `interactions` (user_id, item_index[, rating]).

    Returns the kept interactions, the catalog items the k-core keeps (None without a k-core:
    the catalog stays whole) and the report written into the manifest.
    """
    report: dict[str, Any] = {"min_rating": None, "removed_by_min_rating": 0, "k_core": k, "k_core_iterations": 0,
                              "removed_by_k_core_interactions": 0, "k_core_users_removed": 0,
                              "k_core_items_removed": 0}
    if min_rating > float("-inf"):
        # NaN ratings compare False: they are removed too.
        rated = pc.fill_null(pc.greater_equal(interactions.column("rating"), min_rating), False)
        kept = interactions.filter(rated)
        if kept.num_rows == 0:
            raise UserError(f"data.min_rating: no interaction is rated {min_rating:g} or more "
                            f"(of {interactions.num_rows}); lower data.min_rating")
        report.update(min_rating=min_rating, removed_by_min_rating=interactions.num_rows - kept.num_rows)
        interactions = kept
    if k <= 0:
        return interactions, None, report
    users = interactions.column("user_id").combine_chunks().dictionary_encode()
    user_codes = users.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    item_codes = interactions.column("item_index").to_numpy(zero_copy_only=False).astype(np.int64)
    n_users = len(users.dictionary)
    keep, items_kept, rounds = k_core(user_codes, item_codes, n_users, n_items, k)
    if not keep.any():
        raise UserError(f"data.k_core: the {k}-core removes every user (of {n_users} users, {len(keep)} "
                        "interactions); lower data.k_core")
    report.update(k_core_iterations=rounds, removed_by_k_core_interactions=int((~keep).sum()),
                  k_core_users_removed=n_users - int(np.count_nonzero(np.bincount(user_codes[keep]))),
                  k_core_items_removed=int(n_items - items_kept.sum()))
    return interactions.filter(pa.array(keep)), items_kept, report
