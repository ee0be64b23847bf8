"""train/data/prepare/shards.py: the fast shard writer gives byte for byte what tarfile gave, and reads back.

The reference below is prepare's writer as it was before train/data/prepare/shards.py (tarfile, one
json.dumps per sample); the fast writer must produce identical files from the same samples.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from train.data.prepare.shards import BLOCK, RECORD, ShardWriter, histories, tar_bytes, ustar_headers, write_tar
from train.data.prepare.shuffle import Permutation, SampleBuckets, write_shards
from train.data.stream import read_shard

# --------------------------------------------------------------- the tarfile reference


def _reference_sample_bytes(user: int, history: np.ndarray, item: int, logq: float) -> bytes:
    return json.dumps({"user": user, "history": history.tolist(), "item": item, "logq": round(logq, 6)},
                      separators=(",", ":")).encode()


def _reference_write_shard(path: Path, samples: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, payload in samples:
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))


def _reference_write_shards(shard_dir: Path, order: np.ndarray, positions: list[tuple[int, int, int]],
                            items: np.ndarray, logq: np.ndarray, shard_size: int,
                            max_history: int) -> list[dict[str, Any]]:
    shards = []
    for shard, begin in enumerate(range(0, len(order), shard_size)):
        samples = []
        for index in order[begin:begin + shard_size]:
            user, start, t = positions[index]
            history = items[max(start, start + t - max_history):start + t]
            item = int(items[start + t])
            samples.append((f"u{user:09d}t{t:06d}", _reference_sample_bytes(user, history, item, float(logq[item]))))
        name = f"train-{shard:06d}.tar"
        _reference_write_shard(shard_dir / name, samples)
        shards.append({"name": f"shards/{name}", "samples": len(samples)})
    return shards


def _tarfile_bytes(names: list[str], payloads: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in zip(names, payloads):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _tarfile_writes_device_fields() -> bool:
    """Python 3.10 before its late bug-fix releases wrote "0000000" device numbers for regular
    files; later versions (and train/data/prepare/shards.py) leave them empty, as GNU tar does."""
    return _tarfile_bytes(["x"], [b""])[329:337] != bytes(8)


needs_current_tarfile = pytest.mark.skipif(_tarfile_writes_device_fields(),
                                           reason="this Python's tarfile writes device numbers for regular files")

# ----------------------------------------------------------------------- the dataset


def _dataset(seed: int = 0, num_users: int = 40, num_items: int = 1500) -> dict[str, Any]:
    """Random user sequences (1 to 30 items, catalog indices with 1 to 4 digits), laid out as
    prepare lays them out, with every training position a sample as prepare makes them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 31, num_users)
    bounds = np.r_[0, np.cumsum(lengths)]
    items = rng.integers(0, num_items, int(bounds[-1]))
    positions = [(user, int(bounds[user]), t) for user in range(num_users)
                 for t in range(1, (lengths[user] - 2 if lengths[user] >= 3 else lengths[user]))]
    # Every shape of number json.dumps writes for round(x, 6) (integers as floats, exponents,
    # -0.0, long digit strings), on items that are targets, so that they reach the shards.
    logq = -rng.exponential(3.0, num_items)
    targets = list(dict.fromkeys(int(items[start + t]) for _, start, t in positions))
    logq[targets[:6]] = [0.0, -1e-7, -1.5e-5, -12.5, -1234567.1234567, -0.1 - 0.2]
    return {"items": items, "positions": positions, "logq": logq, "order": _order(len(positions)),
            "starts": np.array([p[1] for p in positions]), "ts": np.array([p[2] for p in positions]),
            "users": np.array([p[0] for p in positions])}


SEED = 5


def _order(n: int) -> np.ndarray:
    """The samples in shuffled order: the sample at place k is order[k]."""
    return np.argsort(Permutation(n, SEED)(np.arange(n)))


def _fast(shard_dir: Path, data: dict[str, Any], shard_size: int, max_history: int,
          bucket_samples: int = 64, at_once: int = 50) -> list[dict[str, Any]]:
    """prepare's path: samples made `at_once` at a time into bucket files, then written shard by shard."""
    bucket_dir = shard_dir.with_name(f"{shard_dir.name}-buckets")
    bucket_dir.mkdir()
    items, starts, ts = data["items"], np.asarray(data["starts"]), np.asarray(data["ts"])
    buckets = SampleBuckets(bucket_dir, len(ts), SEED, shard_size, bucket_samples)
    for begin in range(0, len(ts), at_once):
        taken = slice(begin, begin + at_once)
        history, history_lengths = histories(items, starts[taken], ts[taken], max_history)
        buckets.add(begin, np.asarray(data["users"])[taken], ts[taken], items[starts[taken] + ts[taken]], history,
                    history_lengths)
    return write_shards(buckets, ShardWriter(shard_dir, data["logq"]).write, lambda samples: None)


# ------------------------------------------------------------------------------ tests


@needs_current_tarfile
@pytest.mark.parametrize(("shard_size", "max_history"), [(37, 5), (100, 20), (1, 3), (10_000, 1)])
def test_training_shards_are_byte_identical_to_tarfile(tmp_path: Path, shard_size: int, max_history: int) -> None:
    data = _dataset()
    (tmp_path / "ref").mkdir()
    (tmp_path / "fast").mkdir()
    expected = _reference_write_shards(tmp_path / "ref", data["order"], data["positions"], data["items"], data["logq"],
                                       shard_size, max_history)
    written = _fast(tmp_path / "fast", data, shard_size, max_history)
    assert written == expected
    assert len(data["positions"]) > 300  # several shards, the last one partial, at shard_size=37
    if shard_size == 37:
        assert len(written) > 3 and written[-1]["samples"] < shard_size
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    for shard in expected:
        name = Path(shard["name"]).name
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


@needs_current_tarfile
def test_wide_keys_match_the_reference(tmp_path: Path) -> None:
    # A user index past 9 digits and a position past 6 widen the key, as the f-string does.
    items = np.arange(1_000_005) % 997
    positions = [(1_234_567_890, 0, 1_000_001), (7, 0, 1), (10 ** 12, 0, 999_999), (0, 0, 1_000_000)]
    logq = np.linspace(-9.0, -0.5, 997)
    (tmp_path / "ref").mkdir()
    (tmp_path / "fast").mkdir()
    expected = _reference_write_shards(tmp_path / "ref", _order(len(positions)), positions, items, logq, 3, 20)
    data = {"items": items, "starts": [p[1] for p in positions], "ts": [p[2] for p in positions],
            "users": [p[0] for p in positions], "logq": logq}
    written = _fast(tmp_path / "fast", data, shard_size=3, max_history=20, bucket_samples=1, at_once=3)
    assert written == expected
    for shard in expected:
        name = Path(shard["name"]).name
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_samples_without_history_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a history of at least one item"):
        ShardWriter(tmp_path, np.zeros(3)).write(0, np.array([0]), np.array([0]), np.zeros(0, np.int64), np.array([0]),
                                                 np.array([1]))


def test_training_shards_read_back_with_the_stream_reader(tmp_path: Path) -> None:
    data = _dataset(seed=1)
    max_history = 4
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    shards = _fast(shard_dir, data, shard_size=50, max_history=max_history)
    read = [sample for shard in shards for sample in read_shard(str(shard_dir / Path(shard["name"]).name))]
    assert len(read) == len(data["positions"]) == sum(s["samples"] for s in shards)
    items, logq = data["items"], data["logq"]
    for sample, index in zip(read, data["order"]):
        user, start, t = data["positions"][index]
        assert sample == {"__key__": f"u{user:09d}t{t:06d}", "user": user,
                          "history": items[max(start, start + t - max_history):start + t].tolist(),
                          "item": int(items[start + t]), "logq": round(float(logq[items[start + t]]), 6)}
    assert not list(shard_dir.glob("*.tmp"))
    assert not list((tmp_path / "shards-buckets").iterdir())  # each bucket is removed once written


def test_no_samples_writes_no_shards(tmp_path: Path) -> None:
    empty = np.zeros(0, np.int64)
    (tmp_path / "shards").mkdir()
    data = {"items": np.arange(3), "starts": empty, "ts": empty, "users": empty, "logq": np.zeros(3)}
    assert _fast(tmp_path / "shards", data, shard_size=10, max_history=5) == []
    assert not list((tmp_path / "shards").iterdir())


# Payload sizes around block edges, and a count that crosses a 20-block record boundary.
EDGE_SIZES = [0, 1, 511, 512, 513, 1024, 1025, 5000] + [7] * 9


@needs_current_tarfile
@pytest.mark.parametrize("count", [0, 1, 4, 8, 9, len(EDGE_SIZES)])
def test_archive_bytes_equal_tarfile(count: int) -> None:
    sizes = EDGE_SIZES[:count]
    names = [f"u{n:09d}t{n:06d}.json" if n % 3 else f"sample-{n}-of-a-longer-name.json" for n in range(count)]
    names[:1] = ["x" * 100][:count]  # the longest name ustar holds without its prefix field
    payloads = [bytes([65 + n % 26]) * size for n, size in enumerate(sizes)]
    archive = tar_bytes(names, payloads).tobytes()
    assert archive == _tarfile_bytes(names, payloads)
    assert len(archive) % RECORD == 0


def test_headers_are_valid_ustar(tmp_path: Path) -> None:
    names = [f"u{n:09d}t{n:06d}.json" for n in range(30)] + ["u1234567890t000001.json"]
    payloads = [json.dumps({"n": n, "pad": "z" * (n * 37)}).encode() for n in range(len(names))]
    path = tmp_path / "a.tar"
    write_tar(path, names, payloads)
    raw = path.read_bytes()
    offset = 0
    for name, payload in zip(names, payloads):
        header = raw[offset:offset + BLOCK]
        # frombuf raises on a bad checksum; compare the stored one with tarfile's own sum too.
        info = tarfile.TarInfo.frombuf(header, "ascii", "strict")
        assert int(header[148:154], 8) == sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
        assert header[154:156] == b"\0 "
        assert header[257:265] == b"ustar\x0000"
        assert (info.name, info.size, info.mtime, info.mode, info.uid, info.gid, info.type) == \
            (name, len(payload), 0, 0o644, 0, 0, tarfile.REGTYPE)
        offset += BLOCK + -(-len(payload) // BLOCK) * BLOCK
    assert raw[offset:] == bytes(len(raw) - offset) and len(raw) - offset >= 2 * BLOCK
    with tarfile.open(path) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == list(zip(names, payloads))  # type: ignore[union-attr]
    assert not (tmp_path / "a.tar.tmp").exists()


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
def test_gnu_tar_lists_and_extracts(tmp_path: Path) -> None:
    names = ["u000000001t000001.json", "u000000001t000002.json"]
    payloads = [b'{"a":1}', b"x" * 700]
    write_tar(tmp_path / "a.tar", names, payloads)
    listed = subprocess.run(["tar", "-tf", str(tmp_path / "a.tar")], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == names
    (tmp_path / "out").mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(tmp_path / "out")], check=True)
    assert [(tmp_path / "out" / n).read_bytes() for n in names] == payloads


def test_ustar_headers_reject_what_ustar_cannot_hold() -> None:
    with pytest.raises(ValueError, match="100"):
        ustar_headers(["x" * 101], np.array([1]))
    with pytest.raises(ValueError, match="8 GiB"):
        ustar_headers(["x"], np.array([8 ** 11]))
    with pytest.raises(ValueError, match="names"):
        ustar_headers(["x", "y"], np.array([1]))
