"""The log's item-to-item transitions: a sparse prior added to the encoder's scores at ranking.

An embedding model scores what follows a user's last items by similarity in a few dozen
dimensions; it cannot memorise which particular items follow which (on MovieLens, half of the
consecutive ratings share a timestamp: a user's session is a set of films entered together, and
the next one is a film that tends to be entered beside the last few). Counts over the training
sequences do memorise it, and the two are complementary (the encoder generalises over text and
taste, the counts are exact where the log is dense). The fused score of item i for user u is

    encoder score(u, i) + weight * log(1 + m_u(i)),
    m_u(i) = sum_k decay**k * C[h_k, i] / (count_i + 1)**popularity_power,

over the user's `recent` last items h_0 (most recent), h_1, ...; C[a, b] sums 1/g over the
training sequences in which b comes g <= window steps after a. Dividing by the item's training
count keeps an item that follows everything (the popular ones) from looking like a signal.

Only the training part of each sequence is counted (the validation split's histories, which end
before the validation target), so neither held-out target is ever seen. Each item keeps its
`max_successors` highest counts, which bounds the table at catalog scale. The prior is sparse per
user (at most recent x max_successors items), so ranking stays exact and blockwise
(`train.evaluation.ranking.rank_sums(bonus=...)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Transitions:
    """Successor lists in compressed rows: item a's successors are
    `successors[indptr[a]:indptr[a + 1]]`, with their summed 1/g weights, highest first."""

    indptr: np.ndarray
    successors: np.ndarray
    weights: np.ndarray

    @property
    def num_items(self) -> int:
        return len(self.indptr) - 1


def count_transitions(sequences: Sequence[Sequence[int]], num_items: int, window: int,
                      max_successors: int) -> Transitions:
    """C[a, b] = sum of 1/g over every pair where b comes g <= window steps after a in one sequence."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.fromiter((item for s in sequences for item in s), dtype=np.int64, count=int(lengths.sum()))
    owner = np.repeat(np.arange(len(sequences)), lengths)
    codes, weights = [], []
    for gap in range(1, window + 1):
        same = owner[:-gap] == owner[gap:]  # both ends in one user's sequence
        codes.append(flat[:-gap][same] * num_items + flat[gap:][same])
        weights.append(np.full(int(same.sum()), 1.0 / gap))
    pairs, where = np.unique(np.concatenate(codes) if codes else np.zeros(0, np.int64), return_inverse=True)
    summed = np.bincount(where, weights=np.concatenate(weights) if weights else None, minlength=len(pairs))
    source, successor = pairs // num_items, pairs % num_items
    # Highest weight first within each source (ties: lower item id first), then cut each list.
    order = np.lexsort((successor, -summed, source))
    source, successor, summed = source[order], successor[order], summed[order]
    first_of_source = np.searchsorted(source, source, side="left")
    keep = np.arange(len(source)) - first_of_source < max_successors
    source, successor, summed = source[keep], successor[keep], summed[keep]
    indptr = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(source, minlength=num_items), out=indptr[1:])
    return Transitions(indptr, successor, summed.astype(np.float32))


def user_prior(transitions: Transitions, histories: Sequence[Sequence[int]], train_counts: torch.Tensor, weight: float,
               recent: int, decay: float, popularity_power: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each user's non-zero `weight * log(1 + m_u(i))` as (row, item, value), one entry per (row, item)."""
    rows_, sources, scales = [], [], []
    for row, history in enumerate(histories):
        last = list(history[-recent:])[::-1]  # most recent first: decay**0 for it
        rows_ += [row] * len(last)
        sources += last
        scales += [decay ** k for k in range(len(last))]
    sources_ = np.asarray(sources, dtype=np.int64)
    starts, ends = transitions.indptr[sources_], transitions.indptr[sources_ + 1]
    sizes = ends - starts
    # Every (user, recent item) pair expands to that item's successor slice.
    offsets = np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))
    rows = np.repeat(np.asarray(rows_, dtype=np.int64), sizes)
    items = transitions.successors[offsets]
    values = transitions.weights[offsets].astype(np.float64) * np.repeat(np.asarray(scales, dtype=np.float64), sizes)
    pairs, where = np.unique(rows * transitions.num_items + items, return_inverse=True)
    summed = np.bincount(where, weights=values, minlength=len(pairs))
    rows, items = pairs // transitions.num_items, pairs % transitions.num_items
    popularity = (train_counts.double().numpy()[items] + 1.0) ** popularity_power
    prior = weight * np.log1p(summed / popularity)
    return torch.from_numpy(rows), torch.from_numpy(items), torch.from_numpy(prior).float()
