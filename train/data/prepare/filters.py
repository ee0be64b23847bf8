"""The iterative k-core filter prepare applies to the interaction log (after data.min_rating).

The log may be cut into parts, each holding every interaction of its users (prepare keeps
them on disk, one in memory at a time): a user's count is then local to one part, and only
the item counts, catalog-sized, are summed over parts. Each round is vectorised (numpy
bincounts), never a Python step per interaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class CorePart(Protocol):
    """A part of the log that holds all the interactions of its users."""

    def codes(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(user code of each interaction, from 0 within the part; its catalog index; users in the part)."""
        ...

    def keep(self) -> np.ndarray:
        """Which of the part's interactions are still in the core (all, before the first round)."""
        ...

    def set_keep(self, keep: np.ndarray) -> None:
        ...


@dataclass
class InMemoryPart:
    """A part held in arrays."""

    user_codes: np.ndarray
    item_codes: np.ndarray
    n_users: int
    kept: np.ndarray | None = None

    def codes(self) -> tuple[np.ndarray, np.ndarray, int]:
        return self.user_codes, self.item_codes, self.n_users

    def keep(self) -> np.ndarray:
        return np.ones(len(self.user_codes), dtype=bool) if self.kept is None else self.kept

    def set_keep(self, keep: np.ndarray) -> None:
        self.kept = keep


def k_core(user_codes: np.ndarray, item_codes: np.ndarray, n_users: int, n_items: int,
           k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The k-core of one in-memory log: (interactions kept, items kept, rounds that removed something).

    Prepare uses `k_core_of_parts` on the log cut into partitions; this whole-log form is the
    reference the tests hold it to (and check against a naive filter).
    """
    part = InMemoryPart(np.asarray(user_codes), np.asarray(item_codes), n_users)
    items_kept, rounds = k_core_of_parts([part], n_items, k)
    return part.keep(), items_kept, rounds


def k_core_of_parts(parts: Sequence[CorePart], n_items: int, k: int) -> tuple[np.ndarray, int]:
    """The k-core of a log cut into parts: (items kept, rounds that removed something); each
    part's `keep` is left holding its interactions in the core.

    Each round removes at once every interaction of a user or an item with fewer than `k`
    interactions left; removing some can push others below `k`, so rounds repeat until none is
    removed. The result, the largest sub-log where every user and item has >= k interactions,
    does not depend on the order of removal, nor on how the log is cut. Items without any
    interaction are not in the core.
    """
    item_counts = np.zeros(n_items, np.int64)
    for part in parts:
        item_counts += np.bincount(part.codes()[1], minlength=n_items)
    rounds = 0
    while True:
        # Every part is judged on the counts at the start of the round, as if the log were whole.
        removed = False
        counts_left = np.zeros(n_items, np.int64)
        for part in parts:
            user_codes, item_codes, n_users = part.codes()
            keep = part.keep()
            user_counts = np.bincount(user_codes[keep], minlength=n_users)
            short = keep & ((user_counts[user_codes] < k) | (item_counts[item_codes] < k))
            if short.any():
                keep = keep & ~short
                part.set_keep(keep)
                removed = True
            counts_left += np.bincount(item_codes[keep], minlength=n_items)
        if not removed:
            return item_counts >= k, rounds
        item_counts = counts_left
        rounds += 1
