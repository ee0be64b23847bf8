"""The global shuffle of the training samples into equal shards, in memory bounded by a bucket.

Samples are numbered 0..n-1 in the order prepare makes them (user, then position). Sample i
goes to place `Permutation(n, seed)(i)` of the shuffled stream, so shard s holds the places
[s * shard_size, (s + 1) * shard_size): every shard is full but the last, as with one in-memory
permutation, but nothing of size n is ever held. Samples are written, as they are made, into
the bucket file of their place (a bucket is a run of whole shards); then each bucket is read
back alone, put in place order and cut into shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from train.data.prepare.shards import gather

_ROUNDS = 6  # Feistel rounds; four already make a pseudo-random permutation (Luby-Rackoff)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 values (arithmetic wraps around)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class Permutation:
    """A seeded pseudo-random permutation of 0..n-1, computed for any indices without a table.

    A balanced Feistel network permutes the 2^(2h) values of 2h bits, the smallest even width
    that holds n; an index it sends to n or beyond is sent through again (cycle walking) until
    it lands below n, which keeps the map a permutation of 0..n-1 (at most 4n values: a few
    passes).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self._half = max(1, math.ceil(max(1, n - 1).bit_length() / 2))
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = np.random.default_rng(seed).integers(0, 2 ** 63, _ROUNDS, dtype=np.int64).astype(np.uint64)

    def _feistel(self, values: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = values >> half, values & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << half) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        places = self._feistel(np.asarray(indices, np.uint64))
        outside = np.flatnonzero(places >= self.n)
        while len(outside):
            places[outside] = self._feistel(places[outside])
            outside = outside[places[outside] >= self.n]
        return places.astype(np.int64)


# A training sample in a bucket file; its history's items follow in the bucket's history file.
SAMPLE_RECORD = np.dtype([("place", np.int64), ("user", np.int64), ("t", np.int32), ("target", np.int32),
                          ("history_length", np.int32)])


class SampleBuckets:
    """Bucket files of training samples, by place in the shuffled stream: bucket b holds places
    [b * span, (b + 1) * span), `span` being whole shards, at least `bucket_samples`.

    Each bucket is two raw files appended to (and closed) as samples come: fixed-size records
    (SAMPLE_RECORD) and their histories' items (int32) in the same order; so any number of
    buckets can be filled without holding a file open for each.
    """

    def __init__(self, directory: Path, n_samples: int, seed: int, shard_size: int, bucket_samples: int) -> None:
        self.directory = directory
        self.shard_size = shard_size
        self.span = max(1, bucket_samples // shard_size) * shard_size
        self.permutation = Permutation(n_samples, seed)
        self.count = math.ceil(n_samples / self.span)

    def _files(self, bucket: int) -> tuple[Path, Path]:
        return self.directory / f"bucket-{bucket:05d}.samples", self.directory / f"bucket-{bucket:05d}.history"

    def add(self, first: int, users: np.ndarray, ts: np.ndarray, targets: np.ndarray, history: np.ndarray,
            history_lengths: np.ndarray) -> None:
        """Samples `first`, `first + 1`, ... of the stream's numbering, each history the next
        `history_lengths[i]` items of `history`."""
        records = np.empty(len(users), SAMPLE_RECORD)
        records["place"] = self.permutation(np.arange(first, first + len(users)))
        records["user"], records["t"], records["target"] = users, ts, targets
        records["history_length"] = history_lengths
        bucket = records["place"] // self.span
        order = np.argsort(bucket, kind="stable")
        records = records[order]
        history = gather(np.asarray(history, np.int32), np.asarray(history_lengths)[order],
                          (np.cumsum(history_lengths) - history_lengths)[order])
        ends = np.cumsum(np.bincount(bucket, minlength=self.count))
        history_ends = np.cumsum(records["history_length"], dtype=np.int64)
        begin = history_begin = 0
        for b in np.flatnonzero(np.diff(np.r_[0, ends])):
            end = int(ends[b])
            history_end = int(history_ends[end - 1])
            sample_file, history_file = self._files(int(b))
            with sample_file.open("ab") as handle:
                handle.write(records[begin:end].tobytes())
            with history_file.open("ab") as handle:
                handle.write(history[history_begin:history_end].tobytes())
            begin, history_begin = end, history_end

    def shards(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(shard number, its samples in place order: users, ts, targets, history, history_lengths),
        shard after shard; one bucket in memory at a time."""
        per_bucket = self.span // self.shard_size
        for b in range(self.count):
            sample_file, history_file = self._files(b)
            records = np.fromfile(sample_file, SAMPLE_RECORD)
            history = np.fromfile(history_file, np.int32)
            lengths = records["history_length"].astype(np.int64)
            history_starts = np.cumsum(lengths) - lengths
            order = np.argsort(records["place"])
            for begin in range(0, len(records), self.shard_size):
                chosen = order[begin:begin + self.shard_size]
                yield b * per_bucket + begin // self.shard_size, {
                    "users": records["user"][chosen], "ts": records["t"][chosen],
                    "targets": records["target"][chosen],
                    "history": gather(history, lengths[chosen], history_starts[chosen]),
                    "history_lengths": lengths[chosen]}
            sample_file.unlink()
            history_file.unlink()


def write_shards(buckets: SampleBuckets, write: Callable[..., dict[str, Any]],
                 progress: Callable[[int], object]) -> list[dict[str, Any]]:
    """Write every shard with `write(shard, users, ts, history, history_lengths, targets)`."""
    shards = []
    for shard, samples in buckets.shards():
        shards.append(write(shard, samples["users"], samples["ts"], samples["history"], samples["history_lengths"],
                            samples["targets"]))
        progress(len(samples["users"]))
    return shards
