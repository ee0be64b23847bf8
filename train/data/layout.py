"""The prepared data directory: where each part lives, its schema version and manifest, the
fingerprint of the settings it was prepared from (and why it is stale), and its splits.

    <data.dir>/shards/train-{000000..}.tar   WebDataset, catalog indices only
              catalog.parquet                item_index, item_id, text fields, train_count
              splits/{valid,test}.parquet    user_index, user_id, history, target (SPLIT_SCHEMA)
              manifest.json                  counts, filters, shards, fingerprint, file hashes
              frozen-states/                 a pretrained backbone's states per catalog item (written
                                             by train.evaluation.frozen_store, kept across re-prepares)

prepare writes it (train/data/prepare/), everything else reads it through this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from train.config.schema import Config


@dataclass(frozen=True)
class Layout:
    """The paths of one prepared directory (or of the temporary one prepare fills)."""

    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def frozen_states(self) -> Path:
        return self.root / "frozen-states"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.parquet"

    def shard_urls(self, manifest: dict[str, Any]) -> list[str]:
        """The training shards the manifest lists (their names are relative to the root)."""
        return [str(self.root / shard["name"]) for shard in manifest["shards"]]


# 2: the shuffle is a seeded Feistel permutation (train.data.prepare.shuffle), not numpy's permutation.
SCHEMA_VERSION = 2


def fingerprint(config: Config) -> dict[str, Any]:
    """The settings a prepared directory depends on; a different fingerprint means re-prepare."""
    data = config.data
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "format": data.format, "max_history": data.max_history,
        "shard_size": data.shard_size, "seed": config.seed,
    }
    if data.format == "synthetic":
        fields["synthetic"] = asdict(data.synthetic)
    else:
        fields.update(columns=asdict(data.columns), catalog_columns=asdict(data.catalog_columns),
                      unknown_items=data.unknown_items,
                      files={"interactions": _file_stamp(data.interactions), "catalog": _file_stamp(data.catalog)})
    # Only when on: a filter left off adds no key (a new SCHEMA_VERSION re-prepares every directory anyway).
    if data.min_rating > float("-inf"):
        fields["min_rating"] = data.min_rating
    if data.k_core:
        fields["k_core"] = data.k_core
    if data.cold_items:
        fields["cold_items"] = data.cold_items
    if data.samples != "every":
        fields["samples"] = data.samples
    return fields


def _file_stamp(path: str) -> dict[str, Any]:
    # data.format=hf: NAME#SPLIT names a split of a datasets folder, whose files count together.
    name, _, split = ("", "", "") if Path(path).exists() else path.partition("#")
    resolved = Path(name or path).resolve()
    if resolved.is_dir():
        stats = [p.stat() for p in sorted(resolved.rglob("*")) if p.is_file()]
        return {"path": str(resolved) + (f"#{split}" if split else ""), "bytes": sum(s.st_size for s in stats),
                "mtime": max((s.st_mtime for s in stats), default=None)}
    stat = resolved.stat() if resolved.is_file() else None
    return {"path": str(resolved), "bytes": stat.st_size if stat else None, "mtime": stat.st_mtime if stat else None}


def read_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a prepared directory; None when there is none (or it is torn)."""
    path = Layout(Path(data_dir)).manifest
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def cold_items(n_items: int, share: float, seed: int) -> np.ndarray | None:
    """data.cold_items: a seeded `share` of the catalog held out of training (a mask), or None.
    Prepare keeps them out of every sample; the step keeps them out of catalog negatives."""
    if share <= 0:
        return None
    cold = np.zeros(n_items, dtype=bool)
    cold[np.random.default_rng(seed).permutation(n_items)[:round(share * n_items)]] = True
    return cold


def is_prepared(config: Config) -> bool:
    return stale_reason(config) is None


def stale_reason(config: Config) -> str | None:
    """Why `config.data.dir` must be prepared (again), for the log; None if it is up to date."""
    manifest = read_manifest(config.data.dir)
    if manifest is None:
        return "not prepared yet"
    old = manifest.get("fingerprint") or {}
    new = json.loads(json.dumps(fingerprint(config)))  # as the manifest holds it (tuples as lists)
    if old == new or _copied_unchanged(manifest, old, new, config):
        return None
    if old.get("schema_version") != SCHEMA_VERSION:
        return f"prepared with schema {old.get('schema_version', manifest.get('schema_version'))}, now {SCHEMA_VERSION}"
    return f"prepared from other settings ({', '.join(_changed_settings(old, new))} changed)"


def input_digests(config: Config) -> dict[str, str] | None:
    """sha256 of the interactions and catalog files; None when either is not one regular file
    (a datasets folder, a synthetic log): those are judged by their stamp alone."""
    paths = {"interactions": Path(config.data.interactions), "catalog": Path(config.data.catalog)}
    if config.data.format == "synthetic" or not all(path.is_file() for path in paths.values()):
        return None
    return {role: file_sha256(path) for role, path in paths.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copied_unchanged(manifest: dict[str, Any], old: dict[str, Any], new: dict[str, Any], config: Config) -> bool:
    """Whether only the input files' mtimes differ and their contents are what was prepared: a
    copy of the same data (a new node, a re-synced share) must not cost a re-prepare, nor the
    frozen states a re-prepare would leave to recompute."""
    def unstamped(fields: dict[str, Any]) -> dict[str, Any]:
        files = {role: {k: v for k, v in (stamp or {}).items() if k != "mtime"}
                 for role, stamp in (fields.get("files") or {}).items()}
        return {**fields, "files": files}

    recorded = manifest.get("input_sha256")
    return bool(recorded) and unstamped(old) == unstamped(new) and recorded == input_digests(config)


def refresh_stamps(config: Config) -> None:
    """Record the input files' current mtimes in the manifest when their contents are unchanged
    (stale_reason said so), so that later runs skip hashing them; written atomically."""
    manifest = read_manifest(config.data.dir)
    new = json.loads(json.dumps(fingerprint(config)))
    if manifest is None or manifest.get("fingerprint") == new:
        return
    manifest["fingerprint"] = new
    path = Layout(Path(config.data.dir)).manifest
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(manifest, indent=2))
    staging.replace(path)


def _changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The config keys (or input files) whose fingerprint entries differ."""
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "files":
            before, after = old.get(key) or {}, new.get(key) or {}
            changed += [f"the data.{role} file" for role in sorted(set(before) | set(after))
                        if before.get(role) != after.get(role)]
        else:
            changed.append(key if key == "seed" else f"data.{key}")
    return changed


SPLIT_SCHEMA = pa.schema([("user_index", pa.int64()), ("user_id", pa.string()), ("history", pa.list_(pa.int64())),
                          ("target", pa.int64())])


def load_split(data_dir: str | Path, split: str) -> dict[str, Any]:
    """A split as columns of Python lists: user_index, user_id, history, target."""
    table = pq.read_table(Layout(Path(data_dir)).split(split))
    return {name: table.column(name).to_pylist() for name in table.column_names}
