"""Prepare in bounded memory: the log read in chunks, cut into partitions by user id, shuffled
through buckets. Whatever the budget, the preparation is the same; tiny budgets here force
many chunks, partitions and buckets on small logs."""

from __future__ import annotations

import bisect
import gzip
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_prepare import EXPECTED_CATALOG, EXPECTED_COUNTS, EXPECTED_SAMPLES, EXPECTED_TEST, EXPECTED_VALID
from train.data.prepare import readers
from train.config.io import load_config
from train.errors import UserError
from train.data.prepare.filters import InMemoryPart, k_core, k_core_of_parts
from train.data.prepare.partition import LogSpill, Partition, UserSample, partition_of
from train.data.prepare.pipeline import Budget
from train.data.prepare.run import prepare
from train.data.prepare.shuffle import Permutation



def small(**sizes: int) -> Budget:
    """A budget of these sizes, with chunks not stretched to the (small) catalog's length."""
    return Budget(**{"chunk_bytes_per_item": 0, **sizes})


# A few rows a chunk, two a partition, one sample at once and a shard a bucket: every boundary is crossed.
TINY = small(chunk_bytes=64, partition_rows=2, samples_at_once=1, bucket_samples=1)


def _prepare(overrides: list[str], budget: Budget = Budget()) -> dict[str, Any]:
    return prepare(load_config(None, overrides), show_progress=False, budget=budget)


def _samples(data_dir: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    samples: dict[str, dict[str, Any]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(data_dir / shard["name"]) as tar:
            for member in tar.getmembers():
                payload = tar.extractfile(member).read()  # type: ignore[union-attr]
                samples[member.name.removesuffix(".json")] = json.loads(payload)
    return samples


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl", "atomic"])
def test_tiny_budget_gives_the_same_preparation(write_dataset, fmt: str) -> None:
    dataset = write_dataset(fmt)
    manifest = _prepare(dataset["overrides"], TINY)
    data_dir = dataset["dir"]
    assert pq.read_table(data_dir / "splits" / "valid.parquet").to_pylist() == EXPECTED_VALID
    assert pq.read_table(data_dir / "splits" / "test.parquet").to_pylist() == EXPECTED_TEST
    assert pq.read_table(data_dir / "catalog.parquet").to_pylist() == EXPECTED_CATALOG
    assert _samples(data_dir, manifest) == EXPECTED_SAMPLES
    assert manifest["counts"] == EXPECTED_COUNTS
    assert [s["samples"] for s in manifest["shards"]] == [3, 2]
    assert sorted(p.name for p in data_dir.parent.iterdir()) == ["data"]  # no spill left behind


def _random_log(tmp_path: Path, users: int = 120, items: int = 40, seed: int = 0) -> list[str]:
    """A CSV log with skewed users and items, ratings, time ties and a few unknown items."""
    rng = np.random.default_rng(seed)
    per_user = rng.integers(1, 30, users)
    user_of = np.repeat(np.arange(users), per_user)
    popularity = 1.0 / np.arange(1, items + 1)
    item_of = rng.choice(items, len(user_of), p=popularity / popularity.sum())
    lines = ["user,item,time,stars"]
    for row in rng.permutation(len(user_of)):
        item = f"i{item_of[row]}" if rng.random() > 0.02 else "unknown"
        lines.append(f"u{user_of[row]:x},{item},{rng.integers(0, 50)},{rng.integers(1, 6)}")
    log_path, catalog_path = tmp_path / "log.csv", tmp_path / "items.csv"
    log_path.write_text("\n".join(lines) + "\n")
    catalog_path.write_text("id,title\n" + "".join(f"i{i},Item {i}\n" for i in rng.permutation(items + 5)))
    return ["data.format=csv", f"data.interactions={log_path}", f"data.catalog={catalog_path}",
            "data.columns.user=user", "data.columns.item=item", "data.columns.timestamp=time",
            "data.columns.rating=stars", "data.catalog_columns.item=id", "data.catalog_columns.text=[title]",
            "data.max_history=4", "data.shard_size=7", "seed=3", "device=cpu"]


@pytest.mark.parametrize("filters", [[], ["data.min_rating=2", "data.k_core=3"], ["data.k_core=6"]])
def test_partitions_chunks_and_buckets_change_nothing(tmp_path: Path, filters: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [*_random_log(tmp_path), *filters]
    cut_into: list[int] = []
    partitions = LogSpill.partitions

    def counted(spill: LogSpill, rows: int) -> list[Partition]:
        made = partitions(spill, rows)
        cut_into.append(len(made))
        return made

    monkeypatch.setattr(LogSpill, "partitions", counted)
    monkeypatch.setattr("train.data.prepare.partition.OPEN_PARTITIONS", 3)  # route in several passes
    whole = _prepare([*overrides, f"data.dir={tmp_path / 'whole'}"])
    budgets = [small(chunk_bytes=100, partition_rows=150, samples_at_once=13, bucket_samples=20),
               small(chunk_bytes=64, partition_rows=40, samples_at_once=3, bucket_samples=5)]
    for number, budget in enumerate(budgets):
        data_dir = tmp_path / f"cut-{number}"
        cut = _prepare([*overrides, f"data.dir={data_dir}"], budget)
        for key in ("counts", "filters", "text_fields", "shards"):
            assert cut[key] == whole[key], key
        # Shards are byte-identical: a sample's place depends on its number, not on the budget.
        assert {name: digest for name, digest in cut["files"].items() if not name.startswith("splits/")} == {
            name: digest for name, digest in whole["files"].items() if not name.startswith("splits/")}
        for split in ("valid", "test"):
            assert pq.read_table(data_dir / "splits" / f"{split}.parquet").to_pylist() == pq.read_table(
                tmp_path / "whole" / "splits" / f"{split}.parquet").to_pylist()
    assert cut_into[0] == 1 and min(cut_into[1:]) >= 10  # the log fits one partition, or is cut in many
    sizes = [s["samples"] for s in whole["shards"]]
    assert sizes[:-1] == [7] * (len(sizes) - 1) and 1 <= sizes[-1] <= 7
    assert whole["counts"]["train_samples"] == sum(sizes)
    valid = pq.read_table(tmp_path / "whole" / "splits" / "valid.parquet").to_pylist()
    assert [row["user_id"] for row in valid] == sorted(row["user_id"] for row in valid)  # users in id order


def test_k_core_over_parts_equals_the_whole_log() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        n_users, n_items, k = int(rng.integers(5, 40)), int(rng.integers(3, 30)), int(rng.integers(1, 5))
        users = rng.integers(0, n_users, int(rng.integers(0, 300)))
        items = rng.integers(0, n_items, len(users))
        keep, items_kept, rounds = k_core(users, items, n_users, n_items, k)
        part_of_user = rng.integers(0, int(rng.integers(1, 6)), n_users)
        parts, rows = [], []
        for p in range(int(part_of_user.max()) + 1):
            members = np.flatnonzero(part_of_user == p)
            local = np.full(n_users, -1)
            local[members] = np.arange(len(members))
            at = np.flatnonzero(part_of_user[users] == p)
            parts.append(InMemoryPart(local[users[at]], items[at], len(members)))
            rows.append(at)
        parts_kept, parts_rounds = k_core_of_parts(parts, n_items, k)
        assert parts_rounds == rounds
        assert np.array_equal(parts_kept, items_kept)
        for part, at in zip(parts, rows):
            assert np.array_equal(part.keep(), keep[at])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_permutation_is_a_permutation(n: int) -> None:
    places = Permutation(n, seed=0)(np.arange(n))
    assert sorted(places.tolist()) == list(range(n))
    assert np.array_equal(Permutation(n, seed=0)(np.arange(n)), places)  # seeded
    if n >= 16:
        assert not np.array_equal(Permutation(n, seed=1)(np.arange(n)), places)
        assert not np.array_equal(places, np.arange(n))
    # Any slice of the numbering gives the same places as the whole.
    assert np.array_equal(Permutation(n, seed=0)(np.arange(n // 2, n)), places[n // 2:])


def test_partition_of_is_bisect_right_on_the_boundaries() -> None:
    ids = ["", "a", "a0", "b", "ab", "zz", "é", "u10", "u9", "u1", "B", "007", "7"]
    for boundaries in (["a"], ["a", "u1"], ["0", "a", "a", "u10", "z"], ["é"]):
        got = partition_of(pa.array(ids), pa.array(boundaries))
        # Python compares str by code point, which is the byte order of UTF-8, as Arrow compares.
        assert got.tolist() == [bisect.bisect_right(boundaries, i) for i in ids]


def test_user_sample_is_bounded_and_cuts_evenly() -> None:
    sample = UserSample(capacity=1000)
    ids = np.char.add("u", np.arange(100_000).astype(str)).astype(object)
    for begin in range(0, len(ids), 7_000):
        sample.add(pa.array(ids[begin:begin + 7_000], pa.string()))
    boundaries = pa.array(sample.boundaries(4))
    parts = np.bincount(partition_of(pa.array(ids, pa.string()), boundaries), minlength=4)
    assert len(boundaries) == 3
    assert parts.min() > 0.15 * len(ids)  # an even cut would give 25% each


def _log_lines(count: int) -> list[tuple[str, str, str]]:
    return [(f"u{row % 7}", ["a1", "b2", "c3", "d4"][row % 4], str(row)) for row in range(count)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "atomic", "jsonl"])
def test_errors_in_a_later_chunk_name_the_right_line(write_dataset, fmt: str) -> None:
    rows = _log_lines(200)
    rows[150] = ("u1", "a1", "next week")
    dataset = write_dataset(fmt, interactions=rows)
    with pytest.raises(UserError) as caught:
        _prepare(dataset["overrides"], small(chunk_bytes=128))
    line = 151 if fmt == "jsonl" else 152  # JSON lines have no header line
    assert str(caught.value) == (f"{dataset['interactions']} line {line}: column 'timestamp': "
                                 "'next week' is not a number or an ISO-8601 time")
    assert not dataset["dir"].parent.exists()


def test_unknown_item_and_empty_user_in_a_later_chunk(write_dataset) -> None:
    rows = _log_lines(300)
    rows[210] = ("u1", "zz", "5")
    dataset = write_dataset("csv", interactions=rows)
    with pytest.raises(UserError) as caught:
        _prepare([*dataset["overrides"], "data.unknown_items=fail"], small(chunk_bytes=100))
    assert str(caught.value) == (f"{dataset['interactions']} line 212: item not in the catalog "
                                 "(data.unknown_items=drop skips such rows): 'zz'")
    rows[250] = ("", "a1", "5")
    dataset = write_dataset("csv", interactions=rows, name="empty")
    with pytest.raises(UserError) as caught:
        _prepare(dataset["overrides"], small(chunk_bytes=100))
    assert str(caught.value) == f"{dataset['interactions']} line 252: empty 'user_id'"


def test_parquet_rows_in_a_later_chunk(write_dataset) -> None:
    rows = _log_lines(100)
    rows[77] = ("u1", "zz", "5")
    dataset = write_dataset("parquet", interactions=rows)
    with pytest.raises(UserError) as caught:
        _prepare([*dataset["overrides"], "data.unknown_items=fail"], small(chunk_bytes=64))  # 2 rows a chunk
    assert str(caught.value) == (f"{dataset['interactions']} row 78: item not in the catalog "
                                 "(data.unknown_items=drop skips such rows): 'zz'")


@pytest.mark.parametrize("chunk_bytes", [200, 1 << 20])
def test_numbers_then_dates_in_another_chunk(write_dataset, chunk_bytes: int) -> None:
    rows = _log_lines(100)
    rows[60:] = [(u, i, f"2021-03-01T10:{minute % 60:02d}:00") for minute, (u, i, _) in enumerate(rows[60:])]
    dataset = write_dataset("csv", interactions=rows)
    with pytest.raises(UserError) as caught:
        _prepare(dataset["overrides"], small(chunk_bytes=chunk_bytes))
    # As when read whole: the first date is named (row 60, below the header).
    assert str(caught.value) == f"{dataset['interactions']} line 62: column 'timestamp': mixes numbers and dates"


def test_logs_read_whole_go_through_the_same_chunks(tmp_path: Path) -> None:
    # The synthetic log, like the named formats, is built whole, then cut into chunks.
    overrides = ["data.format=synthetic", "data.synthetic.num_users=60", "data.synthetic.num_items=50",
                 "data.shard_size=64", "device=cpu"]
    whole = _prepare([*overrides, f"data.dir={tmp_path / 'whole'}"])
    cut = _prepare([*overrides, f"data.dir={tmp_path / 'cut'}"],
                   small(chunk_bytes=320, partition_rows=100, samples_at_once=10, bucket_samples=64))
    assert cut["counts"] == whole["counts"] and cut["shards"] == whole["shards"]
    assert {k: v for k, v in cut["files"].items() if k.startswith("shards/")} == {
        k: v for k, v in whole["files"].items() if k.startswith("shards/")}
    for split in ("valid", "test"):
        assert pq.read_table(tmp_path / "cut" / "splits" / f"{split}.parquet").to_pylist() == pq.read_table(
            tmp_path / "whole" / "splits" / f"{split}.parquet").to_pylist()


def test_a_log_of_no_rows(write_dataset) -> None:
    dataset = write_dataset("csv", interactions=[])
    with pytest.raises(UserError) as caught:
        _prepare(dataset["overrides"], TINY)
    assert str(caught.value) == f"{dataset['interactions']}: no interactions (a header, no rows)"
    assert not dataset["dir"].parent.exists()


def _jsonl_log(path: Path, rows: int = 200) -> None:
    """A JSON lines log whose later lines bring a field the first ones lack ("vote") and whose
    ratings and times turn from integers to decimals: several blocks at a small chunk_bytes."""
    lines = []
    for row in range(rows):
        record: dict[str, Any] = {"user": f"u{row % 7}", "item": ["a1", "b2", "c3", "d4"][row % 4], "time": row,
                                  "stars": 1 + row % 5}
        if row >= rows // 2:
            record.update(time=row + 0.5, stars=0.5 + row % 5, vote=str(row))
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))


@pytest.mark.parametrize("name", ["log.jsonl", "log.jsonl.gz"])
def test_jsonl_blocks_read_as_the_whole_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _jsonl_log(tmp_path / "log.jsonl")
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress((tmp_path / "log.jsonl").read_bytes()))
    columns = ["user", "item", "time", "stars"]
    whole = readers.read_columns(path, "jsonl", columns, "data.interactions")
    blocks = list(readers.iter_columns(path, "jsonl", columns, "data.interactions", 256))
    assert len(blocks) > 10
    assert pa.concat_tables(blocks).equals(whole)
    assert whole.column("stars")[-1].as_py() == "4.5" and whole.column("stars")[0].as_py() == "1"


def test_jsonl_field_absent_from_the_first_block(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"user": "u1", "time": row} if row < 50 else
                                       {"user": "u1", "time": row, "stars": 3}) + "\n" for row in range(100)))
    whole = readers.read_columns(path, "jsonl", ["user", "stars"], "data.interactions")
    blocks = list(readers.iter_columns(path, "jsonl", ["user", "stars"], "data.interactions", 128))
    assert pa.concat_tables(blocks).equals(whole)  # null where a line has no stars, as read whole
    with pytest.raises(UserError, match=r"missing column 'item' \(columns: user, time, stars\)"):
        list(readers.iter_columns(path, "jsonl", ["user", "item"], "data.interactions", 128))


def test_jsonl_log_over_many_blocks_prepares_as_read_whole(tmp_path: Path, write_dataset) -> None:
    dataset = write_dataset("jsonl")
    _jsonl_log(dataset["interactions"])
    overrides = [*dataset["overrides"], "data.columns.user=user", "data.columns.item=item",
                 "data.columns.timestamp=time", "data.columns.rating=stars", "data.min_rating=2"]
    whole = _prepare([*overrides, f"data.dir={tmp_path / 'whole'}"])
    cut = _prepare([*overrides, f"data.dir={tmp_path / 'cut'}"], small(chunk_bytes=128))
    for key in ("counts", "filters", "shards", "files"):
        assert cut[key] == whole[key], key
    assert whole["filters"]["removed_by_min_rating"] == 60  # stars 1, then 0.5 and 1.5: decimals were read


def test_routing_closes_every_file_when_one_fails_to_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spill = LogSpill(tmp_path)
    spill.append(pa.table({"user_id": [f"u{i}" for i in range(40)], "item": pa.array(range(40), pa.int32()),
                           "timestamp": [0.0] * 40, "row": list(range(40))}))
    opened: list[Any] = []
    real = pa.OSFile

    def failing(path: str, mode: str = "r") -> Any:
        if len(opened) == 5:
            raise OSError("too many open files")
        opened.append(real(path, mode))
        return opened[-1]

    monkeypatch.setattr(pa, "OSFile", failing)
    with pytest.raises(OSError, match="too many open files"):
        spill.partitions(4)
    assert len(opened) == 5 and all(handle.closed for handle in opened)
