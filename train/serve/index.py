"""The item index: every item's embedding in a faiss index, searched by inner product (the
cosine, for unit vectors: the score rectrain trains and evaluates with).

Up to `exact_limit` items (200,000 by default) the index is exact (`IndexFlatIP`): a brute-force
scan of 200k 64-float vectors takes a few milliseconds a query on one core, and nothing is
missed. Past it, HNSW (`IndexHNSWFlat`, 32 links a node, efSearch 128): sub-linear search with
recall near 1, no training pass, and items can be added to it later, as the service does.
Rows are catalog positions: the first N are the catalog's items in order, added ones follow."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from train.errors import UserError


def _faiss():  # type: ignore[no-untyped-def]
    try:
        import faiss
    except ImportError:
        raise UserError("the item index needs faiss (pip install faiss-cpu, or rectrain[serve])") from None
    return faiss


class ItemIndex:
    """Inner-product search over item vectors, with rows to leave out per query."""

    def __init__(self, index: object, kind: str) -> None:
        self.index = index
        self.kind = kind

    @classmethod
    def build(cls, vectors: np.ndarray, exact_limit: int = 200_000) -> ItemIndex:
        faiss = _faiss()
        dim = vectors.shape[1]
        if len(vectors) <= exact_limit:
            index, kind = faiss.IndexFlatIP(dim), "exact"
        else:
            index, kind = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT), "hnsw"
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 128
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index, kind)

    @classmethod
    def load(cls, path: Path) -> ItemIndex:
        faiss = _faiss()
        index = faiss.read_index(str(path))
        return cls(index, "hnsw" if "HNSW" in type(index).__name__ else "exact")

    def save(self, path: Path) -> None:
        _faiss().write_index(self.index, str(path))

    def __len__(self) -> int:
        return int(self.index.ntotal)  # type: ignore[attr-defined]

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))  # type: ignore[attr-defined]

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] = ()
               ) -> list[list[tuple[int, float]]]:
        """The `k` best rows of each query as (row, score), best first, none of its `exclude` rows."""
        widest = max((len(set(rows)) for rows in exclude), default=0)
        wanted = min(len(self), k + widest)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), wanted)  # type: ignore[attr-defined]
        out = []
        for q in range(len(queries)):
            left_out = set(exclude[q]) if q < len(exclude) else set()
            hits = [(int(r), float(s)) for r, s in zip(rows[q], scores[q]) if r >= 0 and int(r) not in left_out]
            out.append(hits[:k])
        return out
