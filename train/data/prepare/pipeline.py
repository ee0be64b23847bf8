"""The prepare pipeline: the log spilled into partitions, filtered (min rating, k-core), each
partition grouped and split (train/data/prepare/split.py), the training samples shuffled over
the whole log into shards; everything written into a temporary directory that
train/data/prepare/run.py renames into place."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from train.config.schema import Config
from train.data.layout import SCHEMA_VERSION, SPLIT_SCHEMA, Layout, cold_items, fingerprint
from train.data.prepare import filters, sources
from train.data.prepare.partition import DiskCorePart, LogSpill, Partition
from train.data.prepare.shards import ShardWriter, histories
from train.data.prepare.shuffle import SampleBuckets, write_shards
from train.data.prepare.split import leave_one_out, training_part, user_sequences
from train.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How much of the log prepare holds in memory at once; the catalog is always held whole."""

    chunk_bytes: int = 4 << 20  # raw text read and checked at once (Parquet: rows of about 32 bytes)
    chunk_bytes_per_item: int = 32  # ... or this much a catalog item, if more (see sources.read)
    partition_rows: int = 500_000  # interactions grouped and split at once (a partition)
    samples_at_once: int = 50_000  # training samples (and their histories) made at once
    bucket_samples: int = 100_000  # samples put in shuffled order at once (rounded to whole shards)


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


def _training_samples(partition: Partition, new_index: np.ndarray | None, cold: np.ndarray | None,
                      last_only: bool) -> int:
    """How many training samples the partition's users make (to number the shuffle before they are made)."""
    if cold is None:
        lengths = partition.user_lengths()
        n_train = np.where(lengths >= 3, lengths - 2, lengths)
    else:  # which interactions go depends on their order: the sequences are needed
        _, bounds, items = _sequences(partition, new_index)
        n_train = training_part(bounds, items, cold)[2]
    return int((n_train >= 2).sum()) if last_only else int(np.maximum(n_train - 1, 0).sum())


def _sequences(partition: Partition, new_index: np.ndarray | None) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The partition's users' time-ordered sequences (split.user_sequences), items renumbered
    to the k-core's catalog when there is one."""
    table = partition.read()
    if new_index is not None:  # the k-core's catalog: renumber the items it keeps
        table = table.set_column(table.schema.get_field_index("item"), "item",
                                 pa.array(new_index[table.column("item").to_numpy()], pa.int32()))
    return user_sequences(table)


def _split_partition(partition: Partition, new_index: np.ndarray | None, totals: _Totals, buckets: SampleBuckets,
                     split_writers: dict[str, pq.ParquetWriter], max_history: int, samples_at_once: int,
                     cold: np.ndarray | None, last_only: bool) -> None:
    """Group and split one partition: its split rows to `split_writers`, its samples to `buckets`."""
    user_ids, bounds, items = _sequences(partition, new_index)
    samples, train_counts, target_counts, splits, train_items = leave_one_out(
        user_ids, bounds, items, len(totals.train_counts), first_user=totals.users, cold=cold, last_only=last_only)
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
        history, history_lengths = histories(train_items, starts, ts, max_history)
        buckets.add(totals.samples + begin, samples["users"][taken], ts, train_items[starts + ts], history,
                    history_lengths)
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


def prepare_into(config: Config, tmp_dir: Path, show_progress: bool, budget: Budget) -> dict[str, Any]:
    """Write the whole preparation into `tmp_dir`; return the manifest (less `files` and `seconds`)."""
    from tqdm import tqdm

    data = config.data
    layout = Layout(tmp_dir)
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
    cold = cold_items(n_items, data.cold_items, config.seed)
    if cold is not None:
        filtered["cold_items"] = int(cold.sum())
        log.info("data.cold_items=%g: %d of %d items held out of training", data.cold_items, int(cold.sum()), n_items)
    last_only = data.samples == "last"
    n_samples = sum(_training_samples(partition, new_index, cold, last_only) for partition in partitions)
    if not n_samples:
        raise UserError(f"{data.interactions or 'data'}: no user has two training interactions; nothing to train on")

    buckets = SampleBuckets(spill_dir, n_samples, config.seed, data.shard_size, budget.bucket_samples)
    totals = _Totals(np.zeros(n_items, np.int64), np.zeros(n_items, np.int64))
    layout.splits.mkdir()
    split_writers = {split: pq.ParquetWriter(layout.split(split), SPLIT_SCHEMA)
                     for split in ("valid", "test")}
    try:
        for partition in partitions:
            _split_partition(partition, new_index, totals, buckets, split_writers, data.max_history,
                             budget.samples_at_once, cold, last_only)
    finally:
        for writer in split_writers.values():
            writer.close()
    if totals.samples != n_samples:  # a bug, not bad input: the shuffle's numbering would have holes
        raise RuntimeError(f"prepare counted {n_samples} training samples but made {totals.samples}")

    # Sampling log-probability of each item as a positive: its share of training targets.
    # Items never seen as a target get the share of one count (no -inf in the loss).
    logq = np.log(np.maximum(totals.target_counts, 1) / n_samples)
    layout.shards.mkdir()
    with tqdm(total=n_samples, desc="prepare", unit="sample", disable=not show_progress, leave=False) as bar:
        shards = write_shards(buckets, ShardWriter(layout.shards, logq).write, bar.update)
    shutil.rmtree(spill_dir)

    catalog = catalog.append_column("train_count", pa.array(totals.train_counts))
    catalog = pa.table({"item_index": pa.array(np.arange(n_items, dtype=np.int64)), **{
        name: catalog.column(name) for name in catalog.column_names}})
    pq.write_table(catalog, layout.catalog)
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
