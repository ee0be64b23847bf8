"""`rectrain prepare`: raw interactions + catalog -> WebDataset shards, catalog, splits, manifest.

Interactions whose item is not in the catalog are dropped; then, when asked, those rated below
`data.min_rating`, then all outside the `data.k_core`-core (train.filters). Per user,
interactions are ordered by time (ties keep file order). Leave-one-out: the last item is the
test target, the one before it the validation target, the rest are training; users with fewer
than 3 interactions only train. Every training position t >= 1 of a user becomes a
sample (history = the previous `max_history` items, target = item t). Shards carry catalog
indices only; text is rendered at load time. Users are numbered in user id order.

Memory does not grow with the log, only with the catalog and a `Budget`: the log is read in
chunks (train.sources) and spilled to disk in partitions by ranges of user id
(train.partition), each grouped and split alone; the training samples are shuffled over the
whole log through bucket files (train.shuffle). Everything, the spill included, is written
into a temporary directory renamed over `data.dir` at the end, so a failed prepare leaves
nothing half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from train import filters, sources
from train.config import Config
from train.errors import UserError
from train.partition import DiskCorePart, LogSpill, Partition
from train.shards import ShardWriter, histories
from train.shuffle import SampleBuckets, write_shards

log = logging.getLogger(__name__)

# 2: the shuffle is a seeded Feistel permutation (train.shuffle), not numpy's permutation.
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Budget:
    """How much of the log prepare holds in memory at once; the catalog is always held whole."""

    chunk_bytes: int = 4 << 20  # raw text read and checked at once (Parquet: rows of about 32 bytes)
    chunk_bytes_per_item: int = 32  # ... or this much a catalog item, if more (see sources.read)
    partition_rows: int = 500_000  # interactions grouped and split at once (a partition)
    samples_at_once: int = 50_000  # training samples (and their histories) made at once
    bucket_samples: int = 100_000  # samples put in shuffled order at once (rounded to whole shards)


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
    return fields


def _file_stamp(path: str) -> dict[str, Any]:
    resolved = Path(path).resolve()
    stat = resolved.stat() if resolved.is_file() else None
    return {"path": str(resolved), "bytes": stat.st_size if stat else None, "mtime": stat.st_mtime if stat else None}


def read_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_prepared(config: Config) -> bool:
    return stale_reason(config) is None


def stale_reason(config: Config) -> str | None:
    """Why `config.data.dir` must be prepared (again), for the log; None if it is up to date."""
    manifest = read_manifest(config.data.dir)
    if manifest is None:
        return "not prepared yet"
    old = manifest.get("fingerprint") or {}
    new = json.loads(json.dumps(fingerprint(config)))  # as the manifest holds it (tuples as lists)
    if old == new:
        return None
    if old.get("schema_version") != SCHEMA_VERSION:
        return f"prepared with schema {old.get('schema_version', manifest.get('schema_version'))}, now {SCHEMA_VERSION}"
    return f"prepared from other settings ({', '.join(_changed_settings(old, new))} changed)"


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


# -------------------------------------------------------------------------- splitting

def _sequences(interactions: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Sort by (user, time, file row); return user ids, their run starts and the item column."""
    ordered = interactions.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("row", "ascending")])
    users = ordered.column("user_id").combine_chunks()
    codes = users.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
    items = ordered.column("item").to_numpy().astype(np.int64)
    return users.take(pa.array(starts)), np.r_[starts, len(codes)], items


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _leave_one_out(user_ids: pa.Array, bounds: np.ndarray, items: np.ndarray, n_items: int, first_user: int = 0
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, pa.Table]]:
    """Leave-one-out over all users at once, with no Python work per user or per sample.

    Users are numbered from `first_user` in the order of `user_ids`.
    Returns the training samples as arrays (`users`, `starts`: where the user's sequence begins
    in `items`, `ts`: the target's position in it), in the order of user then t; each item's
    count in training sequences and as a training target; and the valid and test split tables.
    """
    lengths = np.diff(bounds)
    user_starts = bounds[:-1]
    held_out = lengths >= 3  # these users hold out their last two items; the others only train
    n_train = np.where(held_out, lengths - 2, lengths)
    user_of = np.repeat(np.arange(len(lengths)), lengths)  # per interaction, as are the masks below
    position = np.arange(len(items)) - np.repeat(user_starts, lengths)
    in_train = position < n_train[user_of]
    is_target = in_train & (position >= 1)  # every training position t >= 1 is a sample
    train_counts = np.bincount(items[in_train], minlength=n_items)
    target_counts = np.bincount(items[is_target], minlength=n_items)
    sample_at = np.flatnonzero(is_target)
    samples = {"users": first_user + user_of[sample_at], "starts": user_starts[user_of[sample_at]],
               "ts": position[sample_at]}
    split_users = np.flatnonzero(held_out)
    splits = {}
    for split, from_end in (("valid", 2), ("test", 1)):
        # The history is everything before the target, whatever data.max_history is.
        history_lengths = lengths[split_users] - from_end
        in_history = held_out[user_of] & (position < (lengths - from_end)[user_of])
        splits[split] = pa.table({
            "user_index": pa.array(first_user + split_users, pa.int64()),
            "user_id": pc.cast(user_ids.take(pa.array(split_users)), pa.string()),
            "history": pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(history_lengths)], pa.int32()),
                                                pa.array(items[in_history], pa.int64())),
            "target": pa.array(items[user_starts[split_users] + history_lengths], pa.int64())})
    return samples, train_counts, target_counts, splits


SPLIT_SCHEMA = pa.schema([("user_index", pa.int64()), ("user_id", pa.string()), ("history", pa.list_(pa.int64())),
                          ("target", pa.int64())])


@dataclass
class _Totals:
    """What the partitions add up to, catalog-sized counts included."""

    train_counts: np.ndarray
    target_counts: np.ndarray
    users: int = 0
    interactions: int = 0
    samples: int = 0
    split_users: int = 0


def _k_core(partitions: list[Partition], n_items: int, k: int) -> tuple[np.ndarray, dict[str, int]]:
    """The k-core over the partitions (each left keeping its rows in the core): the catalog
    items it keeps, and its part of the manifest's report."""
    parts = [DiskCorePart.of(partition) for partition in partitions]
    items_kept, rounds = filters.k_core_of_parts(parts, n_items, k)
    users = users_kept = removed = 0
    for part in parts:
        user_codes, _, n_users = part.codes()
        keep = part.keep()
        users += n_users
        users_kept += int(np.count_nonzero(np.bincount(user_codes[keep], minlength=n_users)))
        removed += int(np.count_nonzero(~keep))
    if not users_kept:
        raise UserError(f"data.k_core: the {k}-core removes every user (of {users} users, "
                        f"{sum(p.rows for p in partitions)} interactions); lower data.k_core")
    return items_kept, {"k_core_iterations": rounds, "removed_by_k_core_interactions": removed,
                        "k_core_users_removed": users - users_kept,
                        "k_core_items_removed": int(n_items - items_kept.sum())}


def _training_samples(partition: Partition) -> int:
    """How many training samples the partition's users make (to number the shuffle before they are made)."""
    lengths = partition.user_lengths()
    n_train = np.where(lengths >= 3, lengths - 2, lengths)
    return int(np.maximum(n_train - 1, 0).sum())


def _split_partition(partition: Partition, new_index: np.ndarray | None, totals: _Totals, buckets: SampleBuckets,
                     split_writers: dict[str, pq.ParquetWriter], max_history: int, samples_at_once: int) -> None:
    """Group and split one partition: its split rows to `split_writers`, its samples to `buckets`."""
    table = partition.read()
    if new_index is not None:  # the k-core's catalog: renumber the items it keeps
        table = table.set_column(table.schema.get_field_index("item"), "item",
                                 pa.array(new_index[table.column("item").to_numpy()], pa.int32()))
    user_ids, bounds, items = _sequences(table)
    del table
    samples, train_counts, target_counts, splits = _leave_one_out(user_ids, bounds, items, len(totals.train_counts),
                                                                  first_user=totals.users)
    totals.train_counts += train_counts
    totals.target_counts += target_counts
    for split, rows in splits.items():
        if rows.num_rows:
            split_writers[split].write_table(rows)
    totals.split_users += splits["test"].num_rows
    # Histories are up to max_history items a sample: made a slice of samples at a time.
    for begin in range(0, len(samples["ts"]), samples_at_once):
        taken = slice(begin, begin + samples_at_once)
        starts, ts = samples["starts"][taken], samples["ts"][taken]
        history, history_lengths = histories(items, starts, ts, max_history)
        buckets.add(totals.samples + begin, samples["users"][taken], ts, items[starts + ts], history, history_lengths)
    totals.samples += len(samples["ts"])
    totals.users += len(user_ids)
    totals.interactions += len(items)


def _filter_log(config: Config, partitions: list[Partition], catalog: pa.Table,
                dropped: dict[str, int]) -> tuple[pa.Table, np.ndarray | None, dict[str, Any]]:
    """The k-core, when asked: (the catalog it keeps, the new index of each old item or None, the
    manifest's filter report)."""
    data = config.data
    filtered: dict[str, Any] = {
        "min_rating": data.min_rating if data.min_rating > float("-inf") else None,
        "removed_by_min_rating": dropped["removed_by_min_rating"], "k_core": data.k_core, "k_core_iterations": 0,
        "removed_by_k_core_interactions": 0, "k_core_users_removed": 0, "k_core_items_removed": 0}
    if filtered["min_rating"] is not None:
        log.info("data.min_rating=%g removed %d interactions", data.min_rating, filtered["removed_by_min_rating"])
    if not data.k_core:
        return catalog, None, filtered
    items_kept, report = _k_core(partitions, catalog.num_rows, data.k_core)
    filtered.update(report)
    log.info("data.k_core=%d removed %d interactions, %d users and %d catalog items (rounds: %d)", data.k_core,
             filtered["removed_by_k_core_interactions"], filtered["k_core_users_removed"],
             filtered["k_core_items_removed"], filtered["k_core_iterations"])
    return catalog.filter(pa.array(items_kept)), np.cumsum(items_kept) - 1, filtered


def _prepare_into(config: Config, tmp_dir: Path, show_progress: bool, budget: Budget) -> dict[str, Any]:
    """Write the whole preparation into `tmp_dir`; return the manifest (less `files` and `seconds`)."""
    from tqdm import tqdm

    data = config.data
    spill_dir = tmp_dir / "spill"
    spill_dir.mkdir(parents=True)
    source, catalog = sources.read(config, budget.chunk_bytes, budget.chunk_bytes_per_item)
    spill = LogSpill(spill_dir)
    try:
        dropped = sources.spill_log(config, source, catalog.column("item_id").combine_chunks(), spill)
    finally:
        source.close()  # the log file, when an error stopped the reading early
        spill.close()
    partitions = spill.partitions(budget.partition_rows)
    log.debug("%d interactions kept, in %d partition(s)", spill.rows, len(partitions))
    catalog, new_index, filtered = _filter_log(config, partitions, catalog, dropped)
    n_items = catalog.num_rows
    n_samples = sum(_training_samples(partition) for partition in partitions)
    if not n_samples:
        raise UserError(f"{data.interactions or 'data'}: no user has two training interactions; nothing to train on")

    buckets = SampleBuckets(spill_dir, n_samples, config.seed, data.shard_size, budget.bucket_samples)
    totals = _Totals(np.zeros(n_items, np.int64), np.zeros(n_items, np.int64))
    (tmp_dir / "splits").mkdir()
    split_writers = {split: pq.ParquetWriter(tmp_dir / "splits" / f"{split}.parquet", SPLIT_SCHEMA)
                     for split in ("valid", "test")}
    try:
        for partition in partitions:
            _split_partition(partition, new_index, totals, buckets, split_writers, data.max_history,
                             budget.samples_at_once)
    finally:
        for writer in split_writers.values():
            writer.close()
    if totals.samples != n_samples:  # a bug, not bad input: the shuffle's numbering would have holes
        raise RuntimeError(f"prepare counted {n_samples} training samples but made {totals.samples}")

    # Sampling log-probability of each item as a positive: its share of training targets.
    # Items never seen as a target get the share of one count (no -inf in the loss).
    logq = np.log(np.maximum(totals.target_counts, 1) / n_samples)
    (tmp_dir / "shards").mkdir()
    with tqdm(total=n_samples, desc="prepare", unit="sample", disable=not show_progress, leave=False) as bar:
        shards = write_shards(buckets, ShardWriter(tmp_dir / "shards", logq).write, bar.update)
    shutil.rmtree(spill_dir)

    catalog = catalog.append_column("train_count", pa.array(totals.train_counts))
    catalog = pa.table({"item_index": pa.array(np.arange(n_items, dtype=np.int64)), **{
        name: catalog.column(name) for name in catalog.column_names}})
    pq.write_table(catalog, tmp_dir / "catalog.parquet")
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint(config),
        "counts": {"users": totals.users, "items": n_items, "interactions": totals.interactions,
                   "dropped_unknown_items": dropped["dropped_unknown_items"], "train_samples": n_samples,
                   "valid_users": totals.split_users, "test_users": totals.split_users},
        "filters": filtered,
        "text_fields": [c for c in catalog.column_names if c not in ("item_index", "item_id", "train_count")],
        "shards": shards,
    }


def _missing_parents(path: Path) -> list[Path]:
    """The directories above `path` that do not exist yet, deepest first."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """One prepare of `out_dir` at a time, across processes: two trainings started together on
    the same data.dir would otherwise write one temporary directory at once. The second waits
    for the first (then finds the data prepared). The lock is the file `.<name>.lock` beside
    data.dir, removed on the way out; its parents are removed too when nothing else is in them.
    """
    created = _missing_parents(out_dir)
    lock = out_dir.with_name(f".{out_dir.name}.lock")
    while True:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = lock.open("a")
        except FileNotFoundError:  # the holder before us removed the empty parent just now
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another prepare of %s (%s is held)", out_dir, lock)
            fcntl.flock(handle, fcntl.LOCK_EX)
        # The holder before us may have removed the file we waited on; then lock the new one.
        if lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    try:
        yield
    finally:
        lock.unlink()
        handle.close()
        for directory in created:  # a failed prepare leaves no trace, not even data.dir's parents
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()


def ensure_prepared(config: Config) -> None:
    """Prepare `config.data.dir` unless it is up to date (what train and eval do first)."""
    with exclusive(Path(config.data.dir)):
        reason = stale_reason(config)
        if reason is not None:
            log.info("preparing %s: %s", config.data.dir, reason)
            _prepare(config, True, Budget())


def prepare(config: Config, show_progress: bool = True, budget: Budget = Budget()) -> dict[str, Any]:
    """Prepare `config.data` into `config.data.dir`; return the manifest.

    `budget` bounds the memory the log takes (tests shrink it to cut small logs into many pieces).
    """
    with exclusive(Path(config.data.dir)):
        return _prepare(config, show_progress, budget)


def _prepare(config: Config, show_progress: bool, budget: Budget) -> dict[str, Any]:
    started = time.perf_counter()
    out_dir = Path(config.data.dir)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        manifest = _prepare_into(config, tmp_dir, show_progress, budget)
        manifest["files"] = {p.relative_to(tmp_dir).as_posix(): _sha256(p)
                             for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp_dir.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    counts = manifest["counts"]
    log.info("prepared %s: %d users, %d items, %d training samples in %d shards (%.1fs)", out_dir,
             counts["users"], counts["items"], counts["train_samples"], len(manifest["shards"]), manifest["seconds"])
    return manifest
