"""`rectrain prepare` on small hand-written datasets: splits, shards, catalog and manifest, exactly.

The dataset (tests/conftest.py) has 4 users and 8 catalog items; catalog indices follow the
catalog's file order: b2=0 a1=1 d4=2 c3=3 e5=4 h8=5 f6=6 g7=7. Ordered by time:

    u1: a1 b2 c3 g7 d4 e5   -> 1 0 3 7 2 4   train 1 0 3 7, valid 2, test 4
    u2: d4 (zz) a1 h8 e5    -> 2 1 5 4       "zz" is not in the catalog and is dropped;
                                             h8 and e5 tie at t=300 and keep file order
    u3: e5 c3               -> 4 3           two interactions: train only
    u4: f6 g7 b2            -> 6 7 0         one training item: no training sample
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.config.io import load_config
from train.errors import UserError
from train.data.layout import is_prepared, stale_reason
from train.data.prepare.run import ensure_prepared, exclusive, prepare


EXPECTED_VALID = [
    {"user_index": 0, "user_id": "u1", "history": [1, 0, 3, 7], "target": 2},
    {"user_index": 1, "user_id": "u2", "history": [2, 1], "target": 5},
    {"user_index": 3, "user_id": "u4", "history": [6], "target": 7},
]
EXPECTED_TEST = [
    {"user_index": 0, "user_id": "u1", "history": [1, 0, 3, 7, 2], "target": 4},
    {"user_index": 1, "user_id": "u2", "history": [2, 1, 5], "target": 4},
    {"user_index": 3, "user_id": "u4", "history": [6, 7], "target": 0},
]
# Item 3 is the target of two of the five training samples, every other item of at most one
# (items never a target count as one): logq = log(count / 5).
LOG_ONE_FIFTH, LOG_TWO_FIFTHS = round(math.log(1 / 5), 6), round(math.log(2 / 5), 6)
# Training samples with max_history=2, by key u<user index>t<position>.
EXPECTED_SAMPLES = {
    "u000000000t000001": {"user": 0, "history": [1], "item": 0, "logq": LOG_ONE_FIFTH},
    "u000000000t000002": {"user": 0, "history": [1, 0], "item": 3, "logq": LOG_TWO_FIFTHS},
    "u000000000t000003": {"user": 0, "history": [0, 3], "item": 7, "logq": LOG_ONE_FIFTH},  # [1, 0, 3] cut to 2
    "u000000001t000001": {"user": 1, "history": [2], "item": 1, "logq": LOG_ONE_FIFTH},
    "u000000002t000001": {"user": 2, "history": [4], "item": 3, "logq": LOG_TWO_FIFTHS},
}
EXPECTED_CATALOG = [
    {"item_index": 0, "item_id": "b2", "title": "Babe", "genre": "Children", "train_count": 1},
    {"item_index": 1, "item_id": "a1", "title": "Toy Story", "genre": "Animation", "train_count": 2},
    {"item_index": 2, "item_id": "d4", "title": "Heat, The", "genre": "Crime", "train_count": 1},
    {"item_index": 3, "item_id": "c3", "title": 'Say "Anything"', "genre": "Romance", "train_count": 2},
    {"item_index": 4, "item_id": "e5", "title": "Copycat", "genre": "Thriller", "train_count": 1},
    {"item_index": 5, "item_id": "h8", "title": "Twelve Monkeys", "genre": "Sci-Fi", "train_count": 0},
    {"item_index": 6, "item_id": "f6", "title": "Fargo", "genre": "Crime", "train_count": 1},
    {"item_index": 7, "item_id": "g7", "title": "Casino", "genre": "Drama", "train_count": 1},
]
EXPECTED_COUNTS = {"users": 4, "items": 8, "interactions": 15, "dropped_unknown_items": 1, "train_samples": 5,
                   "valid_users": 3, "test_users": 3}


def _prepare(dataset: dict[str, Any], *extra: str) -> dict[str, Any]:
    return prepare(load_config(None, [*dataset["overrides"], *extra]), show_progress=False)


def _read_shards(data_dir: Path, manifest: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
    """Each shard's samples, in the shard's order, keyed by sample key."""
    shards = []
    for shard in manifest["shards"]:
        with tarfile.open(data_dir / shard["name"]) as tar:
            members = tar.getmembers()
            assert all(m.isfile() and m.name.endswith(".json") for m in members)
            shards.append({m.name.removesuffix(".json"): json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
                           for m in members})
            assert len(shards[-1]) == len(members)  # keys are unique
    return shards


def _all_samples(data_dir: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    samples: dict[str, dict[str, Any]] = {}
    for shard in _read_shards(data_dir, manifest):
        assert not samples.keys() & shard.keys()
        samples.update(shard)
    return samples


def _assert_small_dataset(data_dir: Path, manifest: dict[str, Any]) -> None:
    assert pq.read_table(data_dir / "splits" / "valid.parquet").to_pylist() == EXPECTED_VALID
    assert pq.read_table(data_dir / "splits" / "test.parquet").to_pylist() == EXPECTED_TEST
    assert pq.read_table(data_dir / "catalog.parquet").to_pylist() == EXPECTED_CATALOG
    assert _all_samples(data_dir, manifest) == EXPECTED_SAMPLES
    assert manifest["counts"] == EXPECTED_COUNTS


# ------------------------------------------------------------------- the CSV dataset

def test_splits_hold_full_histories_and_leave_one_out_targets(write_dataset) -> None:
    dataset = write_dataset("csv")
    _prepare(dataset)
    valid = pq.read_table(dataset["dir"] / "splits" / "valid.parquet")
    test = pq.read_table(dataset["dir"] / "splits" / "test.parquet")
    assert valid.schema.names == ["user_index", "user_id", "history", "target"]
    assert valid.schema.field("user_id").type == pa.string()
    assert valid.schema.field("history").type == pa.list_(pa.int64())
    assert valid.to_pylist() == EXPECTED_VALID
    assert test.to_pylist() == EXPECTED_TEST


def test_timestamp_tie_keeps_file_order(write_dataset) -> None:
    # u2's h8 (index 5) and e5 (index 4) share t=300; h8 comes first in the file, so it is the
    # validation target and e5 the test target, although e5 sorts first by id and by index.
    dataset = write_dataset("csv")
    _prepare(dataset)
    valid = pq.read_table(dataset["dir"] / "splits" / "valid.parquet").to_pylist()
    test = pq.read_table(dataset["dir"] / "splits" / "test.parquet").to_pylist()
    assert (valid[1]["user_id"], valid[1]["target"]) == ("u2", 5)
    assert (test[1]["user_id"], test[1]["target"], test[1]["history"]) == ("u2", 4, [2, 1, 5])


def test_training_samples_in_shards(write_dataset) -> None:
    dataset = write_dataset("csv")
    manifest = _prepare(dataset)
    shards = _read_shards(dataset["dir"], manifest)
    assert [len(shard) for shard in shards] == [3, 2]
    samples = {key: sample for shard in shards for key, sample in shard.items()}
    assert samples == EXPECTED_SAMPLES
    # u3 (two interactions) only trains, u4 (one training item) gives no sample at all.
    assert {s["user"] for s in samples.values()} == {0, 1, 2}
    for sample in samples.values():
        assert set(sample) == {"user", "history", "item", "logq"}


def test_shard_files_and_sizes(write_dataset) -> None:
    dataset = write_dataset("csv")
    manifest = _prepare(dataset)
    assert manifest["shards"] == [{"name": "shards/train-000000.tar", "samples": 3},
                                  {"name": "shards/train-000001.tar", "samples": 2}]
    assert sorted(p.name for p in (dataset["dir"] / "shards").iterdir()) == ["train-000000.tar", "train-000001.tar"]


@pytest.mark.parametrize(("shard_size", "sizes"), [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (5, [5]), (100, [5])])
def test_shard_size_splits_the_samples(write_dataset, shard_size: int, sizes: list[int]) -> None:
    dataset = write_dataset("csv", shard_size=shard_size)
    manifest = _prepare(dataset)
    shards = _read_shards(dataset["dir"], manifest)
    assert [len(shard) for shard in shards] == sizes
    assert [s["samples"] for s in manifest["shards"]] == sizes
    assert {k: v for shard in shards for k, v in shard.items()} == EXPECTED_SAMPLES


def test_max_history_keeps_the_most_recent_items(write_dataset) -> None:
    dataset = write_dataset("csv", max_history=1)
    samples = _all_samples(dataset["dir"], _prepare(dataset))
    assert {key: s["history"] for key, s in samples.items()} == {
        "u000000000t000001": [1], "u000000000t000002": [0], "u000000000t000003": [3],
        "u000000001t000001": [2], "u000000002t000001": [4]}
    long = write_dataset("csv", max_history=20, name="long")
    samples = _all_samples(long["dir"], _prepare(long))
    assert samples["u000000000t000003"]["history"] == [1, 0, 3]
    # Splits always keep the whole history, whatever max_history is.
    assert pq.read_table(dataset["dir"] / "splits" / "test.parquet").to_pylist() == EXPECTED_TEST


def test_same_data_gives_byte_identical_shards(write_dataset) -> None:
    first = write_dataset("csv", name="first")
    second = write_dataset("csv", name="second")
    first_manifest, second_manifest = _prepare(first), _prepare(second)
    for shard in first_manifest["shards"]:
        assert (first["dir"] / shard["name"]).read_bytes() == (second["dir"] / shard["name"]).read_bytes()
    assert first_manifest["files"] == second_manifest["files"]


def test_catalog_parquet(write_dataset) -> None:
    dataset = write_dataset("csv")
    _prepare(dataset)
    catalog = pq.read_table(dataset["dir"] / "catalog.parquet")
    assert catalog.schema.names == ["item_index", "item_id", "title", "genre", "train_count"]
    assert catalog.to_pylist() == EXPECTED_CATALOG


def test_manifest(write_dataset) -> None:
    dataset = write_dataset("csv")
    manifest = _prepare(dataset)
    assert manifest == json.loads((dataset["dir"] / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["counts"] == EXPECTED_COUNTS
    assert manifest["text_fields"] == ["title", "genre"]
    assert sorted(manifest["files"]) == ["catalog.parquet", "shards/train-000000.tar", "shards/train-000001.tar",
                                         "splits/test.parquet", "splits/valid.parquet"]
    fingerprint = manifest["fingerprint"]
    assert (fingerprint["format"], fingerprint["max_history"], fingerprint["shard_size"]) == ("csv", 2, 3)
    assert fingerprint["files"]["interactions"]["path"] == str(dataset["interactions"].resolve())
    assert fingerprint["files"]["catalog"]["bytes"] == dataset["catalog"].stat().st_size
    config = load_config(None, dataset["overrides"])
    assert is_prepared(config)
    assert not is_prepared(load_config(None, [*dataset["overrides"], "data.max_history=3"]))


def test_stale_reason_says_why_to_prepare_again(write_dataset) -> None:
    dataset = write_dataset("csv")
    config = load_config(None, dataset["overrides"])
    assert stale_reason(config) == "not prepared yet"
    _prepare(dataset)
    assert stale_reason(config) is None
    changed = load_config(None, [*dataset["overrides"], "data.max_history=3", "seed=9"])
    assert stale_reason(changed) == "prepared from other settings (data.max_history, seed changed)"
    dataset["interactions"].write_text(dataset["interactions"].read_text() + "u9,a1,1\n")
    assert stale_reason(config) == "prepared from other settings (the data.interactions file changed)"
    path = dataset["dir"] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["fingerprint"]["schema_version"] = 1
    path.write_text(json.dumps(manifest))
    assert stale_reason(config) == "prepared with schema 1, now 2"


def test_a_copy_of_the_same_data_is_not_prepared_again(write_dataset) -> None:
    """The same bytes under a new mtime (data copied to a new node) keep the prepared directory,
    other bytes of the same size do not, and a re-prepare keeps the frozen states: they are
    named by a digest of what they depend on, so an old file is right or never read."""
    dataset = write_dataset("csv")
    config = load_config(None, dataset["overrides"])
    _prepare(dataset)
    kept = dataset["dir"] / "frozen-states" / "0123.safetensors"
    kept.parent.mkdir()
    kept.write_bytes(b"states")
    inter = dataset["interactions"]
    later = inter.stat().st_mtime + 3600
    os.utime(inter, (later, later))
    assert stale_reason(config) is None
    ensure_prepared(config)  # records the new stamp: later runs need not hash the file
    manifest = json.loads((dataset["dir"] / "manifest.json").read_text())
    assert manifest["fingerprint"]["files"]["interactions"]["mtime"] == later
    assert stale_reason(config) is None and kept.read_bytes() == b"states"
    inter.write_text(inter.read_text().replace("u2,a1,200", "u2,a1,201"))  # same size, another log
    assert stale_reason(config) == "prepared from other settings (the data.interactions file changed)"
    ensure_prepared(config)
    assert stale_reason(config) is None
    assert kept.read_bytes() == b"states"


def test_prepare_leaves_only_the_data_dir(write_dataset) -> None:
    dataset = write_dataset("csv")
    _prepare(dataset)
    assert sorted(p.name for p in dataset["dir"].parent.iterdir()) == ["data"]
    assert sorted(p.relative_to(dataset["dir"]).as_posix() for p in dataset["dir"].rglob("*")) == [
        "catalog.parquet", "manifest.json", "shards", "shards/train-000000.tar", "shards/train-000001.tar",
        "splits", "splits/test.parquet", "splits/valid.parquet"]


def test_prepare_replaces_an_older_preparation(write_dataset) -> None:
    dataset = write_dataset("csv")
    _prepare(dataset, "data.shard_size=1")
    assert len(list((dataset["dir"] / "shards").iterdir())) == 5
    manifest = _prepare(dataset)
    assert sorted(p.name for p in (dataset["dir"] / "shards").iterdir()) == ["train-000000.tar", "train-000001.tar"]
    _assert_small_dataset(dataset["dir"], manifest)
    assert sorted(p.name for p in dataset["dir"].parent.iterdir()) == ["data"]


def test_unknown_item_fails_when_asked_naming_file_and_line(write_dataset) -> None:
    dataset = write_dataset("csv")
    with pytest.raises(UserError) as caught:
        _prepare(dataset, "data.unknown_items=fail")
    assert str(caught.value) == (f"{dataset['interactions']} line 9: item not in the catalog "
                                 "(data.unknown_items=drop skips such rows): 'zz'")
    assert not dataset["dir"].exists()
    assert not dataset["dir"].parent.exists()


def test_no_known_item_at_all_fails(write_dataset) -> None:
    dataset = write_dataset("csv", interactions=[("u1", "x", 1), ("u1", "y", 2)])
    with pytest.raises(UserError) as caught:
        _prepare(dataset)
    assert str(caught.value) == f"{dataset['interactions']} line 2: no interaction's item is in the catalog: 'x'"


def test_no_training_pair_fails(write_dataset) -> None:
    dataset = write_dataset("csv", interactions=[("u1", "a1", 1), ("u2", "b2", 1), ("u2", "c3", 2),
                                                 ("u2", "d4", 3)])
    with pytest.raises(UserError) as caught:
        _prepare(dataset)
    assert str(caught.value) == (f"{dataset['interactions']}: no user has two training interactions; "
                                 "nothing to train on")
    assert not dataset["dir"].exists()


# --------------------------------------------------------------- every input format

@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl", "atomic", "hf"])
def test_every_format_reads_the_same_data(write_dataset, fmt: str) -> None:
    dataset = write_dataset(fmt)
    manifest = _prepare(dataset)
    _assert_small_dataset(dataset["dir"], manifest)


def test_atomic_files_keep_quotes_and_commas_literal(write_dataset) -> None:
    dataset = write_dataset("atomic")
    header = dataset["interactions"].read_text().splitlines()[0]
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    assert 'c3\tSay "Anything"\tRomance' in dataset["catalog"].read_text()
    _prepare(dataset)
    titles = pq.read_table(dataset["dir"] / "catalog.parquet").column("title").to_pylist()
    assert titles[2:4] == ["Heat, The", 'Say "Anything"']


def test_atomic_header_with_extra_fields(write_dataset, small_dataset_rows) -> None:
    # ml-100k's layout: a rating column between item and time.
    interactions = [(u, i, 3.0, t) for u, i, t in small_dataset_rows[0]]
    dataset = write_dataset("atomic", interactions=interactions,
                            interaction_columns=("user_id", "item_id", "rating", "timestamp"))
    _assert_small_dataset(dataset["dir"], _prepare(dataset))


def test_renamed_columns(write_dataset) -> None:
    dataset = write_dataset("csv", interaction_columns=("uid", "iid", "when"),
                            catalog_columns=("movie", "title", "genre"))
    manifest = _prepare(dataset, "data.columns.user=uid", "data.columns.item=iid", "data.columns.timestamp=when",
                        "data.catalog_columns.item=movie")
    _assert_small_dataset(dataset["dir"], manifest)


ZERO_IDS_INTERACTIONS = [("0042", "007", 1), ("0042", "7", 2), ("0042", "1.0", 3), ("0042", "007", 4),
                         ("42", "7", 1), ("42", "007", 2), ("42", "1.0", 3), ("42", "7", 4)]
ZERO_IDS_CATALOG = [("007", "Bond", "Spy"), ("7", "Seven", "Crime"), ("1.0", "One", "Drama")]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl", "atomic", "hf"])
def test_ids_stay_strings(write_dataset, fmt: str) -> None:
    # "007" and "7" are different items and "0042" and "42" different users: nothing may read
    # them as numbers.
    dataset = write_dataset(fmt, interactions=ZERO_IDS_INTERACTIONS, catalog=ZERO_IDS_CATALOG)
    manifest = _prepare(dataset)
    assert pq.read_table(dataset["dir"] / "catalog.parquet").column("item_id").to_pylist() == ["007", "7", "1.0"]
    assert pq.read_table(dataset["dir"] / "splits" / "valid.parquet").to_pylist() == [
        {"user_index": 0, "user_id": "0042", "history": [0, 1], "target": 2},
        {"user_index": 1, "user_id": "42", "history": [1, 0], "target": 2}]
    assert pq.read_table(dataset["dir"] / "splits" / "test.parquet").to_pylist() == [
        {"user_index": 0, "user_id": "0042", "history": [0, 1, 2], "target": 0},
        {"user_index": 1, "user_id": "42", "history": [1, 0, 2], "target": 1}]
    samples = _all_samples(dataset["dir"], manifest)
    assert {k: (s["history"], s["item"]) for k, s in samples.items()} == {
        "u000000000t000001": ([0], 1), "u000000001t000001": ([1], 0)}
    assert manifest["counts"]["users"] == 2


def test_numeric_parquet_ids_become_their_text(write_dataset) -> None:
    # Exporters that write ids as integers (or as 1.0 floats) still match a text catalog.
    dataset = write_dataset("parquet", interactions=[(1, 10.0, 1), (1, 20.0, 2), (1, 10.0, 3), (1, 30.0, 4)],
                            catalog=[(10, "ten", "x"), (20, "twenty", "y"), (30, "thirty", "z")])
    manifest = _prepare(dataset)
    assert pq.read_table(dataset["dir"] / "catalog.parquet").column("item_id").to_pylist() == ["10", "20", "30"]
    assert pq.read_table(dataset["dir"] / "splits" / "test.parquet").to_pylist() == [
        {"user_index": 0, "user_id": "1", "history": [0, 1, 0], "target": 2}]
    assert manifest["counts"]["train_samples"] == 1


# ------------------------------------------------------------------------ timestamps

ISO_ROWS = [("u1", "a1", "2021-03-01T10:00:00"), ("u1", "b2", "2021-03-01T09:00:00"), ("u1", "c3", "2021-03-02"),
            ("u1", "d4", "2021-03-03 08:30:00")]


def _test_history(dataset: dict[str, Any]) -> tuple[list[int], int]:
    row = pq.read_table(dataset["dir"] / "splits" / "test.parquet").to_pylist()[0]
    return row["history"], row["target"]


def test_iso_timestamps_are_ordered_by_time(write_dataset) -> None:
    dataset = write_dataset("csv", interactions=ISO_ROWS)
    _prepare(dataset)
    assert _test_history(dataset) == ([0, 1, 3], 2)  # b2 09:00, a1 10:00, c3 day 2, d4 day 3


def test_iso_timestamps_with_zone_offsets(write_dataset) -> None:
    # 10:00+02:00 is 08:00 UTC, before 09:00Z.
    rows = [("u1", "a1", "2021-03-01T10:00:00+02:00"), ("u1", "b2", "2021-03-01T09:00:00Z"),
            ("u1", "c3", "2021-03-02T00:00:00Z"), ("u1", "d4", "2021-03-01T23:00:00-02:00")]
    dataset = write_dataset("csv", interactions=rows)
    _prepare(dataset)
    assert _test_history(dataset) == ([1, 0, 3], 2)  # a1 08:00Z, b2 09:00Z, c3 00:00Z day 2, d4 01:00Z day 2


def test_native_parquet_timestamps(write_dataset) -> None:
    base = dt.datetime(2021, 3, 1)
    rows = [("u1", "a1", base + dt.timedelta(hours=2)), ("u1", "b2", base + dt.timedelta(hours=1)),
            ("u1", "c3", base + dt.timedelta(hours=4)), ("u1", "d4", base + dt.timedelta(hours=3))]
    dataset = write_dataset("parquet", interactions=rows)
    path = dataset["interactions"]
    for stamp_type in (pa.timestamp("s"), pa.timestamp("us"), pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"),
                       pa.date32()):
        table = pq.read_table(path)
        rows_with_dates = rows if stamp_type != pa.date32() else [
            (u, i, (base + dt.timedelta(days=d)).date()) for (u, i, _), d in zip(rows, (2, 1, 4, 3))]
        pq.write_table(table.set_column(2, "timestamp", pa.array([r[2] for r in rows_with_dates], stamp_type)), path)
        _prepare(dataset)
        assert _test_history(dataset) == ([0, 1, 2], 3), stamp_type  # b2 a1 d4 c3


def test_non_numeric_timestamp_names_file_and_line(write_dataset) -> None:
    rows = [("u1", "a1", "5"), ("u1", "b2", "6"), ("u1", "c3", "soon"), ("u1", "d4", "8")]
    dataset = write_dataset("csv", interactions=rows)
    with pytest.raises(UserError) as caught:
        _prepare(dataset)
    assert str(caught.value) == (f"{dataset['interactions']} line 4: column 'timestamp': "
                                 "'soon' is not a number or an ISO-8601 time")


def test_missing_timestamp_in_jsonl_is_reported(write_dataset) -> None:
    dataset = write_dataset("jsonl")
    lines = dataset["interactions"].read_text().splitlines()
    lines[4] = json.dumps({"user_id": "u3", "item_id": "c3", "timestamp": None})
    dataset["interactions"].write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as caught:
        _prepare(dataset)
    assert str(caught.value) == f"{dataset['interactions']} line 5: empty 'timestamp'"


# -------------------------------------------------------------------------- ml-100k

@pytest.mark.slow
def test_prepare_ml_100k(tmp_path: Path, ml_100k: list[str]) -> None:
    config = load_config(None, [*ml_100k, "data.catalog_columns.text=[movie_title, class]"])
    manifest = prepare(config, show_progress=False)
    users, items, ratings = 943, 1682, 100_000
    # Every user has >= 20 ratings: two held out each, and each user's first training item
    # is history only.
    assert manifest["counts"] == {"users": users, "items": items, "interactions": ratings, "dropped_unknown_items": 0,
                                  "train_samples": ratings - 3 * users, "valid_users": users, "test_users": users}
    assert manifest["text_fields"] == ["movie_title", "class"]
    assert sum(s["samples"] for s in manifest["shards"]) == ratings - 3 * users
    assert [s["samples"] for s in manifest["shards"]] == [10_000] * 9 + [97_171 - 90_000]
    catalog = pq.read_table(tmp_path / "ml-100k" / "catalog.parquet")
    assert catalog.num_rows == items
    assert catalog.column("item_index").to_pylist() == list(range(items))
    assert catalog.slice(0, 2).to_pylist() == [
        {"item_index": 0, "item_id": "1", "movie_title": "Toy Story", "class": "Animation Children's Comedy",
         "train_count": catalog.column("train_count")[0].as_py()},
        {"item_index": 1, "item_id": "2", "movie_title": "GoldenEye", "class": "Action Adventure Thriller",
         "train_count": catalog.column("train_count")[1].as_py()}]
    assert sum(catalog.column("train_count").to_pylist()) == ratings - 2 * users
    test = pq.read_table(tmp_path / "ml-100k" / "splits" / "test.parquet")
    valid = pq.read_table(tmp_path / "ml-100k" / "splits" / "valid.parquet")
    assert test.num_rows == valid.num_rows == users
    assert sum(len(h) for h in test.column("history").to_pylist()) == ratings - users
    assert sum(len(h) for h in valid.column("history").to_pylist()) == ratings - 2 * users
    # The validation target is the last item of the test history.
    assert [h[-1] for h in test.column("history").to_pylist()] == valid.column("target").to_pylist()
    assert min(len(h) for h in valid.column("history").to_pylist()) >= 18


def test_a_second_prepare_of_the_same_dir_waits_for_the_first(write_dataset) -> None:
    """Two trainings started together on one data.dir: the second waits, writes nothing
    meanwhile, then prepares cleanly; no lock file is left."""
    dataset = write_dataset("csv")
    root = Path(__file__).resolve().parents[1]
    recipe = dataset["interactions"].with_name("recipe.yaml")
    recipe.write_text("seed: 0\n")
    with exclusive(dataset["dir"]):
        second = subprocess.Popen([sys.executable, "-m", "train.cli", "prepare", str(recipe), *dataset["overrides"]],
                                  cwd=root, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert second.stderr is not None
        first_line = second.stderr.readline()
        assert "waiting for another prepare of" in first_line, first_line
        assert sorted(p.name for p in dataset["dir"].parent.iterdir()) == [".data.lock"]
    assert second.wait(timeout=120) == 0, second.stderr.read()
    _assert_small_dataset(dataset["dir"], json.loads((dataset["dir"] / "manifest.json").read_text()))
    assert sorted(p.name for p in dataset["dir"].parent.iterdir()) == ["data"]


def test_cold_items_never_reach_training_and_stay_in_evaluation(write_dataset) -> None:
    """data.cold_items: the seeded share of items is in no training sample (target or history)
    and counts zero in training; the valid and test splits are those of a run without it."""
    from train.data.layout import cold_items

    dataset = write_dataset()
    manifest = _prepare(dataset, "data.cold_items=0.25")
    cold = cold_items(8, 0.25, load_config(None, dataset["overrides"]).seed)
    assert cold is not None and int(cold.sum()) == 2 and manifest["filters"]["cold_items"] == 2
    data_dir = dataset["dir"]
    assert pq.read_table(data_dir / "splits" / "valid.parquet").to_pylist() == EXPECTED_VALID
    assert pq.read_table(data_dir / "splits" / "test.parquet").to_pylist() == EXPECTED_TEST
    # The training parts of the users' sequences (all but the last two), cold items taken out.
    training = {0: [1, 0, 3, 7], 1: [2, 1], 2: [4, 3], 3: [6]}
    expected = {}
    for user, sequence in training.items():
        warm = [item for item in sequence if not cold[item]]
        for t in range(1, len(warm)):
            expected[(user, t)] = (warm[max(0, t - 2):t], warm[t])
    samples = _all_samples(data_dir, manifest)
    got = {(s["user"], int(key.split("t")[1])): (s["history"], s["item"]) for key, s in samples.items()}
    assert got == expected and manifest["counts"]["train_samples"] == len(expected)
    counts = {row["item_index"]: row["train_count"] for row in pq.read_table(data_dir / "catalog.parquet").to_pylist()}
    assert all(counts[i] == 0 for i in range(8) if cold[i])
    assert any(cold[row["target"]] for row in EXPECTED_TEST + EXPECTED_VALID)  # the held-out users measure them


@pytest.mark.parametrize("cold", ["0", "0.25"])
def test_last_samples_are_each_users_last_training_target(write_dataset, cold: str) -> None:
    """data.samples=last: one sample per user with two training items or more, the one `every`
    makes for the user's last training target; splits and counts as with `every`."""
    dataset = write_dataset()
    every = _all_samples(dataset["dir"], _prepare(dataset, f"data.cold_items={cold}"))
    valid, test = (pq.read_table(dataset["dir"] / "splits" / f"{s}.parquet").to_pylist() for s in ("valid", "test"))
    counts = pq.read_table(dataset["dir"] / "catalog.parquet").column("train_count").to_pylist()
    assert not stale_reason(load_config(None, [*dataset["overrides"], f"data.cold_items={cold}"]))
    config = load_config(None, [*dataset["overrides"], f"data.cold_items={cold}", "data.samples=last"])
    assert "data.samples" in str(stale_reason(config))  # another preparation, and the log says why
    manifest = _prepare(dataset, f"data.cold_items={cold}", "data.samples=last")
    last = _all_samples(dataset["dir"], manifest)
    newest = {}
    for key, sample in every.items():
        user, t = sample["user"], int(key.split("t")[1])
        if user not in newest or t > newest[user][0]:
            newest[user] = (t, sample["history"], sample["item"])
    got = {s["user"]: (int(key.split("t")[1]), s["history"], s["item"]) for key, s in last.items()}
    assert got == newest and len(got) < len(every) and manifest["counts"]["train_samples"] == len(got)
    assert pq.read_table(dataset["dir"] / "splits" / "valid.parquet").to_pylist() == valid
    assert pq.read_table(dataset["dir"] / "splits" / "test.parquet").to_pylist() == test
    assert pq.read_table(dataset["dir"] / "catalog.parquet").column("train_count").to_pylist() == counts
