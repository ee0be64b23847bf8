"""The checked interaction log on disk, cut into partitions by ranges of user id, so that
prepare holds one partition in memory at a time, whatever the log's length.

A partition holds every interaction of its users, and partition p's users all sort before
partition p+1's: grouping, k-core user counts and leave-one-out need one partition only, and
numbering users partition after partition, each in id order, numbers them in id order overall,
as if the log were sorted whole. The ranges come from a bounded uniform sample of the rows'
user ids, so partitions hold about the same number of rows (a single user is never split).

Files, all in one spill directory that prepare removes:
    log.arrow                 the checked rows in file order (Arrow IPC): user_id, item, timestamp, row
    part-NNNNN.arrow          the same rows, one range of user ids each (log.arrow itself if one is enough)
    part-NNNNN.{users,items,keep}.npy   the k-core's codes and its kept-rows mask
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# `item` is the catalog index; `row` the row's place in the file (0-based), which breaks time ties.
SPILL_SCHEMA = pa.schema([("user_id", pa.string()), ("item", pa.int32()), ("timestamp", pa.float64()),
                          ("row", pa.int64())])


class UserSample:
    """A uniform sample of the user ids of the rows added, at most `capacity` of them.

    Each row is kept with probability `rate`; when the sample outgrows its capacity, the rate
    halves and each kept id stays with probability 1/2, so every row added so far has been kept
    with the same probability. Seeded: the same rows give the same sample.
    """

    def __init__(self, capacity: int = 1 << 16, seed: int = 0) -> None:
        self.capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._rate = 1.0
        self._ids: list[pa.Array] = []
        self._size = 0

    def add(self, user_ids: pa.Array) -> None:
        if self._rate < 1.0:
            user_ids = user_ids.filter(pa.array(self._rng.random(len(user_ids)) < self._rate))
        self._ids.append(user_ids)
        self._size += len(user_ids)
        while self._size > self.capacity:
            kept = pa.concat_arrays(self._ids)
            kept = kept.filter(pa.array(self._rng.random(len(kept)) < 0.5))
            self._ids, self._size, self._rate = [kept], len(kept), self._rate / 2

    def boundaries(self, parts: int) -> pa.Array:
        """The `parts - 1` ids that cut the sample into `parts` runs of equal length, in order."""
        ids = pa.concat_arrays(self._ids) if self._ids else pa.array([], pa.string())
        ordered = ids.take(pc.sort_indices(ids))
        return ordered.take(pa.array([len(ordered) * j // parts for j in range(1, parts)], pa.int64()))


def partition_of(user_ids: pa.Array, boundaries: pa.Array) -> np.ndarray:
    """The partition of each id: how many boundaries are <= it (bisect_right), by binary search
    over the boundaries for all ids at once, comparing as Arrow sorts strings (bytewise)."""
    low = np.zeros(len(user_ids), np.int64)
    high = np.full(len(user_ids), len(boundaries), np.int64)
    while len(boundaries) and (low < high).any():
        searching = low < high
        middle = (low + high) // 2
        at_or_above = pc.greater_equal(user_ids, boundaries.take(pa.array(np.minimum(middle, len(boundaries) - 1))))
        above = at_or_above.to_numpy(zero_copy_only=False)
        low = np.where(searching & above, middle + 1, low)
        high = np.where(searching & ~above, middle, high)
    return low


@dataclass
class Partition:
    """One partition's rows on disk (SPILL_SCHEMA) and, after a k-core, which of them it keeps."""

    path: Path
    rows: int
    keep_path: Path | None = None

    def read(self) -> pa.Table:
        """The rows, less those the k-core removed."""
        table = _read_ipc(self.path)
        if self.keep_path is not None:
            table = table.filter(pa.array(np.load(self.keep_path)))
        return table

    def user_lengths(self) -> np.ndarray:
        """Interactions of each of the partition's users left, in no particular order."""
        users = self.read().column("user_id").combine_chunks().dictionary_encode()
        return np.bincount(users.indices.to_numpy(zero_copy_only=False), minlength=len(users.dictionary))


@dataclass
class DiskCorePart:
    """A partition as a train.data.prepare.filters.CorePart: its codes, computed once, kept beside it as .npy
    and loaded a round at a time (loaded, not memory-mapped: mapped pages would stay resident)."""

    partition: Partition
    n_users: int

    @classmethod
    def of(cls, partition: Partition) -> DiskCorePart:
        table = _read_ipc(partition.path)
        users = table.column("user_id").combine_chunks().dictionary_encode()
        part = cls(partition, len(users.dictionary))
        np.save(part._file("users"), users.indices.to_numpy(zero_copy_only=False).astype(np.int32))
        np.save(part._file("items"), table.column("item").to_numpy().astype(np.int32))
        return part

    def _file(self, what: str) -> Path:
        return self.partition.path.with_suffix(f".{what}.npy")

    def codes(self) -> tuple[np.ndarray, np.ndarray, int]:
        return np.load(self._file("users")), np.load(self._file("items")), self.n_users

    def keep(self) -> np.ndarray:
        path = self.partition.keep_path
        return np.ones(self.partition.rows, dtype=bool) if path is None else np.load(path)

    def set_keep(self, keep: np.ndarray) -> None:
        self.partition.keep_path = self._file("keep")
        np.save(self.partition.keep_path, keep)


class LogSpill:
    """Appends checked chunks of the log (SPILL_SCHEMA) to `directory/log.arrow`, sampling their
    user ids; `partitions` then cuts the file into partitions of about `rows` rows.

    A user is never split, so a partition holding a user with more than `rows` interactions is
    that long: memory then follows the largest user's history, not the figure.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "log.arrow"
        self.rows = 0
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SPILL_SCHEMA)
        self._sample = UserSample()

    def append(self, chunk: pa.Table) -> None:
        self._writer.write_table(chunk.cast(SPILL_SCHEMA))
        self._sample.add(chunk.column("user_id").combine_chunks())
        self.rows += chunk.num_rows

    def close(self) -> None:
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()

    def partitions(self, rows: int) -> list[Partition]:
        self.close()
        count = max(1, math.ceil(self.rows / rows))
        if count == 1:
            return [Partition(self.path, self.rows)]
        partitions = _route(self.path, self._sample.boundaries(count), self.directory)
        self.path.unlink()
        return partitions


def _open_partitions() -> int:
    """Partition files to write at once: a quarter of the process's soft limit on open files
    (1024 on Linux, 256 on macOS), so that the rest of the process keeps plenty."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 64
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 256 if soft == resource.RLIM_INFINITY else max(16, min(256, soft // 4))


# A log cut into more partitions than this is routed in several passes, one group at a time.
OPEN_PARTITIONS = _open_partitions()


def _route(path: Path, boundaries: pa.Array, directory: Path) -> list[Partition]:
    """Copy the rows of `path` into one file per range of user ids, each in file order."""
    count = len(boundaries) + 1
    rows = np.zeros(count, np.int64)
    for first in range(0, count, OPEN_PARTITIONS):
        group = range(first, min(first + OPEN_PARTITIONS, count))
        rows[first:first + len(group)] = _route_group(path, boundaries, directory, group)
    return [Partition(_part_path(directory, p), int(n)) for p, n in enumerate(rows)]


def _route_group(path: Path, boundaries: pa.Array, directory: Path, group: range) -> np.ndarray:
    """Copy the rows of `path` that belong to the partitions of `group` into their files; return
    their row counts. Every file opened is closed, whichever open, write or close fails."""
    counts = np.zeros(len(group), np.int64)
    with contextlib.ExitStack() as stack:
        writers = []
        for p in group:  # each closed in reverse order on exit: the writer, then its file
            sink = stack.enter_context(pa.OSFile(str(_part_path(directory, p)), "wb"))
            writers.append(stack.enter_context(pa.ipc.new_file(sink, SPILL_SCHEMA)))
        source = stack.enter_context(pa.OSFile(str(path)))
        reader = pa.ipc.open_file(source)
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            part = partition_of(batch.column("user_id"), boundaries) - group.start
            here = np.bincount(part[(part >= 0) & (part < len(group))], minlength=len(group))
            grouped = batch.take(pa.array(np.argsort(part, kind="stable")))
            begin = int(np.count_nonzero(part < 0))  # rows of earlier groups sort first
            for writer, rows_here in zip(writers, here.tolist()):
                if rows_here:
                    writer.write_batch(grouped.slice(begin, rows_here))
                begin += rows_here
            counts += here
    return counts


def _part_path(directory: Path, partition: int) -> Path:
    return directory / f"part-{partition:05d}.arrow"


def _read_ipc(path: Path) -> pa.Table:
    # Read into memory rather than memory-map: mapped pages would stay in the resident set.
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_file(source).read_all()
