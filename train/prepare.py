"""`rectrain prepare`: raw interactions + catalog -> WebDataset shards, catalog, splits, manifest.

Interactions whose item is not in the catalog are dropped; then, when asked, those rated below
`data.min_rating`, then all outside the `data.k_core`-core (train.filters). Per user,
interactions are ordered by time (ties keep file order). Leave-one-out: the last item is the
test target, the one before it the validation target, the rest are training; users with fewer
than 3 interactions only train. Every training position t >= 1 of a user becomes a
sample (history = the previous `max_history` items, target = item t). Shards carry catalog
indices only; text is rendered at load time. Everything is written into a temporary directory
renamed over `data.dir` at the end, so a failed prepare leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from train import filters, formats, readers, synthetic
from train.config import Config
from train.errors import UserError
from train.shards import write_training_shards

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


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
    # Only when on, so that directories prepared before these keys existed stay valid.
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
    manifest = read_manifest(config.data.dir)
    return manifest is not None and manifest.get("fingerprint") == json.loads(json.dumps(fingerprint(config)))


# ---------------------------------------------------------------------------- reading

def _read(config: Config) -> tuple[formats.Source, formats.Source]:
    """(interactions, catalog) under the standard column names: user_id, item_id, timestamp[, rating];
    item_id and text fields. Named formats map their own fields; the others use data.columns.*."""
    data, cols = config.data, config.data.columns
    if data.format in formats.FORMATS:
        return formats.read(data.format, data.interactions, data.catalog)
    id_col = data.catalog_columns.item
    catalog = readers.read_columns(data.catalog, data.format, [id_col, *dict.fromkeys(data.catalog_columns.text)],
                                   "data.catalog")
    names = {"user_id": cols.user, "item_id": cols.item, "timestamp": cols.timestamp}
    if data.min_rating > float("-inf"):
        names["rating"] = cols.rating
    table = readers.read_columns(data.interactions, data.format, list(dict.fromkeys(names.values())),
                                 "data.interactions")

    def lines(path: str) -> Callable[[int], str]:
        return lambda row: readers.row_location(Path(path), data.format, row)

    return (formats.Source(pa.table({name: table.column(column) for name, column in names.items()}),
                           lines(data.interactions), names),
            formats.Source(catalog.rename_columns(["item_id", *catalog.column_names[1:]]), lines(data.catalog),
                           {"item_id": id_col}))


def _checked_catalog(config: Config, source: formats.Source) -> pa.Table:
    """item_id and the data.catalog_columns.text fields; ids present and unique."""
    data, table = config.data, source.table
    text_cols = list(dict.fromkeys(data.catalog_columns.text))
    for name in text_cols:
        if name not in table.column_names:  # only the named formats get here: read_columns checks the rest
            fields = ", ".join(c for c in table.column_names if c != "item_id")
            raise UserError(f"data.catalog_columns.text: data.format={data.format} catalogs have no field "
                            f"{name!r} (fields: {fields})")
    table = table.select(["item_id", *text_cols])
    if table.num_rows == 0:
        raise UserError(f"{data.catalog}: the catalog is empty")
    id_name = source.name("item_id")
    empty = readers.first_empty(table.column("item_id"))
    if empty is not None:
        raise UserError(f"{source.where(empty)}: empty {id_name!r}")
    ids = table.column("item_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        unique = pc.unique(ids)
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        row = int(np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))[1])
        raise UserError(f"{source.where(row)}: item {dup!r} appears twice "
                        f"in the catalog ({len(unique)} distinct of {table.num_rows})")
    return table


def _checked_interactions(config: Config, source: formats.Source) -> pa.Table:
    """user_id, item_id, timestamp (float64 seconds) and, with data.min_rating, rating (float64)."""
    table, filter_ratings = source.table, config.data.min_rating > float("-inf")
    if filter_ratings and "rating" not in table.column_names:
        raise UserError(f"data.min_rating: {config.data.interactions} has no ratings to filter on")
    names = ["user_id", "item_id", "timestamp", *(["rating"] if filter_ratings else [])]
    for name in names:  # a null time would sort silently as NaN
        empty = readers.first_empty(table.column(name))
        if empty is not None:
            raise UserError(f"{source.where(empty)}: empty {source.name(name)!r}")
    columns = {"user_id": table.column("user_id"), "item_id": table.column("item_id"),
               "timestamp": pa.array(readers.parse_timestamps(table.column("timestamp"), source.name("timestamp"),
                                                              source.where), pa.float64())}
    if filter_ratings:
        columns["rating"] = pa.array(readers.parse_numbers(table.column("rating"), source.name("rating"),
                                                           source.where), pa.float64())
    return pa.table(columns)


def _sources(config: Config) -> tuple[pa.Table, pa.Table, Callable[[int], str]]:
    """(interactions, catalog, where an interaction row is in its file)."""
    if config.data.format == "synthetic":
        interactions, catalog = synthetic.generate(config.data.synthetic, config.seed)
        return (interactions.set_column(2, "timestamp", pc.cast(interactions["timestamp"], pa.float64())), catalog,
                lambda row: "interactions")
    interactions, catalog = _read(config)
    return _checked_interactions(config, interactions), _checked_catalog(config, catalog), interactions.where


# -------------------------------------------------------------------------- splitting

def _sequences(interactions: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Sort by (user, time, file order); return user ids, their run starts and the item column."""
    interactions = interactions.append_column("row", pa.array(np.arange(interactions.num_rows)))
    ordered = interactions.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("row", "ascending")])
    users = ordered.column("user_id").combine_chunks()
    codes = users.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
    items = ordered.column("item_index").to_numpy(zero_copy_only=False).astype(np.int64)
    return users.take(pa.array(starts)), np.r_[starts, len(codes)], items


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

def _leave_one_out(user_ids: pa.Array, bounds: np.ndarray, items: np.ndarray, n_items: int
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, pa.Table]]:
    """Leave-one-out over all users at once, with no Python work per user or per sample.

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
    samples = {"users": user_of[sample_at], "starts": user_starts[user_of[sample_at]], "ts": position[sample_at]}
    split_users = np.flatnonzero(held_out)
    splits = {}
    for split, from_end in (("valid", 2), ("test", 1)):
        # The history is everything before the target, whatever data.max_history is.
        history_lengths = lengths[split_users] - from_end
        in_history = held_out[user_of] & (position < (lengths - from_end)[user_of])
        splits[split] = pa.table({
            "user_index": pa.array(split_users, pa.int64()),
            "user_id": pc.cast(user_ids.take(pa.array(split_users)), pa.string()),
            "history": pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(history_lengths)], pa.int32()),
                                                pa.array(items[in_history], pa.int64())),
            "target": pa.array(items[user_starts[split_users] + history_lengths], pa.int64())})
    return samples, train_counts, target_counts, splits


def prepare(config: Config, show_progress: bool = True) -> dict[str, Any]:
    """Prepare `config.data` into `config.data.dir`; return the manifest."""
    started = time.perf_counter()
    data = config.data
    interactions, catalog, where = _sources(config)
    catalog_ids = catalog.column("item_id").combine_chunks()
    item_index = pc.index_in(interactions.column("item_id"), value_set=catalog_ids)
    unknown = pc.is_null(item_index)
    n_unknown = int(pc.sum(unknown).as_py() or 0)
    if n_unknown:
        if data.unknown_items == "fail" or n_unknown == interactions.num_rows:
            row = int(np.flatnonzero(unknown.to_numpy(zero_copy_only=False))[0])
            what = "no interaction's item is in the catalog" if n_unknown == interactions.num_rows else \
                "item not in the catalog (data.unknown_items=drop skips such rows)"
            raise UserError(f"{where(row)}: {what}: {interactions.column('item_id')[row].as_py()!r}")
        log.warning("dropped %d interactions whose item is not in the catalog", n_unknown)
    interactions = interactions.append_column("item_index", item_index).filter(pc.invert(unknown))
    interactions, items_kept, filtered = filters.filter_log(interactions, catalog.num_rows, data.min_rating,
                                                            data.k_core)
    if items_kept is not None:  # the k-core's catalog: renumber the items it keeps
        new_index = np.cumsum(items_kept) - 1
        catalog = catalog.filter(pa.array(items_kept))
        interactions = interactions.set_column(
            interactions.column_names.index("item_index"), "item_index",
            pa.array(new_index[interactions.column("item_index").to_numpy(zero_copy_only=False)]))
    if filtered["min_rating"] is not None:
        log.info("data.min_rating=%g removed %d interactions", data.min_rating, filtered["removed_by_min_rating"])
    if data.k_core:
        log.info("data.k_core=%d removed %d interactions, %d users and %d catalog items (rounds: %d)", data.k_core,
                 filtered["removed_by_k_core_interactions"], filtered["k_core_users_removed"],
                 filtered["k_core_items_removed"], filtered["k_core_iterations"])

    user_ids, bounds, items = _sequences(interactions)
    n_items = catalog.num_rows
    samples, train_counts, target_counts, splits = _leave_one_out(user_ids, bounds, items, n_items)
    n_samples = len(samples["ts"])
    if not n_samples:
        raise UserError(f"{data.interactions or 'data'}: no user has two training interactions; nothing to train on")

    # Sampling log-probability of each item as a positive: its share of training targets.
    # Items never seen as a target get the share of one count (no -inf in the loss).
    logq = np.log(np.maximum(target_counts, 1) / n_samples)
    order = np.random.default_rng(config.seed).permutation(n_samples)

    out_dir = Path(data.dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / "shards").mkdir(parents=True)
    (tmp_dir / "splits").mkdir()
    try:
        shards = write_training_shards(tmp_dir / "shards", items, samples["starts"], samples["ts"], samples["users"],
                                       order, logq, data.shard_size, data.max_history, show_progress)
        catalog = catalog.append_column("train_count", pa.array(train_counts))
        catalog = pa.table({"item_index": pa.array(np.arange(n_items, dtype=np.int64)), **{
            name: catalog.column(name) for name in catalog.column_names}})
        pq.write_table(catalog, tmp_dir / "catalog.parquet")
        for split, table in splits.items():
            pq.write_table(table, tmp_dir / "splits" / f"{split}.parquet")
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": fingerprint(config),
            "counts": {"users": len(user_ids), "items": n_items, "interactions": int(len(items)),
                       "dropped_unknown_items": n_unknown, "train_samples": n_samples,
                       "valid_users": splits["valid"].num_rows, "test_users": splits["test"].num_rows},
            "filters": filtered,
            "text_fields": [c for c in catalog.column_names if c not in ("item_index", "item_id", "train_count")],
            "shards": shards,
            "files": {p.relative_to(tmp_dir).as_posix(): _sha256(p) for p in sorted(tmp_dir.rglob("*")) if p.is_file()},
            "seconds": round(time.perf_counter() - started, 2),
        }
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
    log.info("prepared %s: %d users, %d items, %d training samples in %d shards (%.1fs)", out_dir,
             manifest["counts"]["users"], n_items, n_samples, len(shards), manifest["seconds"])
    return manifest
