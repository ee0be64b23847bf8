"""Shared fixtures: small hand-written raw datasets in every input format; the cores shared between
pytest-xdist workers."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`-n 2`), each worker and every process it starts gets its share of the
    cores: a worker's default of one thread per core, twice over, makes the OpenMP threads spin
    against each other, slower than one worker alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        # A choice already made (OMP_NUM_THREADS) holds here as in the processes a test starts.
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", str(share))))


_share_the_cores_between_workers()

# MovieLens 100K as RecBole atomic files, read by path beside the project (never copied in).
ML_100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@pytest.fixture
def ml_100k(tmp_path: Path) -> list[str]:
    """Config overrides that prepare ../shared/data/ml-100k into tmp_path; skips when it is absent."""
    if not ML_100K.is_dir():
        pytest.skip("needs ../shared/data/ml-100k beside the project")
    return ["data.format=atomic", f"data.interactions={ML_100K / 'ml-100k.inter'}",
            f"data.catalog={ML_100K / 'ml-100k.item'}", f"data.dir={tmp_path / 'ml-100k'}"]

# The item catalog, deliberately not in id order (item_index follows file order, not ids), with
# titles holding a comma and double quotes.
CATALOG_COLUMNS = ("item_id", "title", "genre")
CATALOG_ROWS: list[tuple[str, str, str]] = [
    ("b2", "Babe", "Children"),            # 0
    ("a1", "Toy Story", "Animation"),      # 1
    ("d4", "Heat, The", "Crime"),          # 2
    ("c3", 'Say "Anything"', "Romance"),   # 3
    ("e5", "Copycat", "Thriller"),         # 4
    ("h8", "Twelve Monkeys", "Sci-Fi"),    # 5
    ("f6", "Fargo", "Crime"),              # 6
    ("g7", "Casino", "Drama"),             # 7
]

# The interaction log, in file order: times are not in file order, user u2 has a tie at t=300
# (h8 before e5 in the file), u3 has only two interactions (train only), and line 9 of the
# CSV (row 8) names item "zz", which is not in the catalog.
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
INTERACTION_ROWS: list[tuple[str, str, int]] = [
    ("u2", "a1", 200),   # line 2
    ("u1", "c3", 30),    # line 3
    ("u1", "a1", 10),    # line 4
    ("u3", "e5", 5),     # line 5
    ("u2", "d4", 100),   # line 6
    ("u1", "b2", 20),    # line 7
    ("u4", "f6", 7),     # line 8
    ("u2", "zz", 150),   # line 9: unknown item
    ("u2", "h8", 300),   # line 10: tie with the next row
    ("u2", "e5", 300),   # line 11
    ("u1", "g7", 40),    # line 12
    ("u1", "d4", 50),    # line 13
    ("u4", "g7", 8),     # line 14
    ("u3", "c3", 6),     # line 15
    ("u4", "b2", 9),     # line 16
    ("u1", "e5", 60),    # line 17
]

_ATOMIC_TYPES = {"user_id": "token", "item_id": "token", "timestamp": "float", "title": "token_seq",
                 "genre": "token_seq"}
EXTENSIONS = {"csv": "csv", "tsv": "tsv", "parquet": "parquet", "jsonl": "jsonl", "atomic": None, "hf": "hf"}


def write_table(path: Path, fmt: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write `rows` under the header `columns` to `path` in format `fmt` (csv, tsv, parquet, jsonl, atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("csv", "tsv"):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)
    elif fmt == "atomic":
        # RecBole atomic files: `name:type` headers, tab-separated, quotes and commas literal.
        lines = ["\t".join(f"{c}:{_ATOMIC_TYPES.get(c, 'token')}" for c in columns)]
        lines += ["\t".join(str(v) for v in row) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, row))) + "\n" for row in rows), encoding="utf-8")
    elif fmt == "parquet":
        table = pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)})
        pq.write_table(table, path)
    elif fmt == "hf":  # a Hugging Face datasets folder, as Dataset.save_to_disk writes it
        import datasets

        datasets.Dataset.from_dict({c: [row[i] for row in rows] for i, c in enumerate(columns)}).save_to_disk(str(path))
    else:
        raise ValueError(fmt)
    return path


@pytest.fixture
def write_dataset(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Write the small dataset above (or given rows) in one format; return paths and overrides.

    Returns {"interactions": Path, "catalog": Path, "dir": Path, "overrides": [...]}, where the
    overrides point data.* at the files and at a fresh data.dir under tmp_path.
    """

    def write(fmt: str = "csv", *, interactions: Sequence[Sequence[Any]] | None = None,
              catalog: Sequence[Sequence[Any]] | None = None,
              interaction_columns: Sequence[str] = INTERACTION_COLUMNS,
              catalog_columns: Sequence[str] = CATALOG_COLUMNS, name: str = "raw",
              max_history: int = 2, shard_size: int = 3) -> dict[str, Any]:
        raw = tmp_path / name
        ext = EXTENSIONS[fmt]
        inter_name, catalog_name = ("ml.inter", "ml.item") if ext is None else (f"interactions.{ext}",
                                                                              f"catalog.{ext}")
        inter_path = write_table(raw / inter_name, fmt, interaction_columns,
                                 INTERACTION_ROWS if interactions is None else interactions)
        catalog_path = write_table(raw / catalog_name, fmt, catalog_columns,
                                   CATALOG_ROWS if catalog is None else catalog)
        data_dir = tmp_path / f"{name}-prepared" / "data"
        overrides = [f"data.format={fmt}", f"data.interactions={inter_path}", f"data.catalog={catalog_path}",
                     f"data.dir={data_dir}", f"data.max_history={max_history}", f"data.shard_size={shard_size}",
                     "data.catalog_columns.text=[title, genre]", "device=cpu"]
        return {"interactions": inter_path, "catalog": catalog_path, "dir": data_dir, "overrides": overrides}

    return write


@pytest.fixture
def small_dataset_rows() -> tuple[list[tuple[str, str, int]], list[tuple[str, str, str]]]:
    """(interaction rows, catalog rows) of the small dataset that `write_dataset` writes by default."""
    return list(INTERACTION_ROWS), list(CATALOG_ROWS)
