"""Streaming training batches from WebDataset shards.

shard list -> split over ranks and workers -> read tar -> shuffle buffer -> batch -> collate.

Training runs by steps, not epochs: the stream repeats epochs forever (each with its own
seeded shard order), so every rank yields exactly as many batches as it is asked for and no
rank waits on another that ran dry (the classic webdataset DDP hang). Within one epoch every
sample reaches exactly one (rank, worker) consumer: by whole shards when there are at least as
many shards as consumers, else by sample index, so small data is never silently duplicated
or dropped.

Shuffling is by blocks: a consumer's samples of an epoch (its shards in the epoch's order) are
cut into blocks of `data.shuffle_buffer` consecutive samples and each block is shuffled alone,
seeded by (seed, epoch, consumer, block). So a resumed run at step 100,000 computes where its
next batch lies from the manifest's shard counts and opens the shard holding that block's first
sample: it reads at most one block again, never the data it already trained on. Runs whose
checkpoints predate blocks resume with the reservoir shuffle they were trained with.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from itertools import chain, count, islice
from typing import Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data import tar_reader
from train.errors import UserError, first_line

log = logging.getLogger(__name__)


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs from a list, a brace pattern (`train-{000000..000009}.tar`) or `::`-joined
    patterns; `pipe:` commands (e.g. `pipe:aws s3 cp s3://b/train-000000.tar -`) pass through."""
    specs = spec.split("::") if isinstance(spec, str) else list(spec)
    return [url for s in specs for url in braceexpand.braceexpand(s)]


class BadShard(UserError):
    """A training shard that cannot be read to its end (data.on_bad_shard=fail)."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception comes back as type(err)(its whole traceback): keep the
        # one line that says what happened.
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


_reported: set[str] = set()  # shards this process already said it skipped (each epoch meets them again)


def read_shard(url: str, on_bad: str = "fail", expected: int | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard, as dicts with `user`, `history`, `item`, `logq` and `__key__`.

    A shard cut short or damaged (a full disk, a copy killed midway) raises BadShard after its
    readable samples, or with `on_bad="skip"` ends there, logging the shard and how many of its
    `expected` samples were lost."""
    read = 0
    local = tar_reader.local_path(url)
    try:
        for raw in tar_reader.samples(local) if local else wds.tarfile_samples([{"url": url}]):
            sample = json.loads(raw["json"])
            sample["__key__"] = raw["__key__"]
            read += 1
            yield sample
        if expected is not None and read != expected:
            # A tar cut at a block boundary reads as a shorter tar: only the count tells.
            raise EOFError(f"the tar ends early, {expected} samples expected")
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as err:  # JSON errors are ValueErrors
        reason = first_line(err)
        if on_bad == "fail":
            raise BadShard(f"{url}: corrupt shard after {read} samples ({reason}); "
                           "data.on_bad_shard=skip trains on without it") from None
        if url not in _reported:
            _reported.add(url)
            lost = f"{expected - read} of its {expected} samples" if expected is not None else "the rest of it"
            log.warning("%s: corrupt shard after %d samples (%s): skipped, %s lost", url, read, reason, lost)


def block_shuffle(samples: Iterator[dict[str, Any]], size: int, rng_of: Callable[[int], random.Random],
                  first_block: int = 0) -> Iterator[dict[str, Any]]:
    """Consecutive blocks of `size` samples, each shuffled by its own `rng_of(block)`."""
    block = first_block
    while chunk := list(islice(samples, size)):
        rng_of(block).shuffle(chunk)
        yield from chunk
        block += 1


def shuffle_buffer(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Reservoir-style shuffle: hold `size` samples, emit a random one as each new one arrives."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


class TrainStream(IterableDataset):
    """Batches for one rank; each DataLoader worker produces whole batches of its own samples."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int, batch_size: int, collate: Callable[[list[dict[str, Any]]], Any],
                 seed: int = 0, shuffle_buffer_size: int = 1000, epochs: int | None = None, drop_last: bool = True,
                 skip_batches: int = 0, on_bad_shard: str = "fail", shard_samples: dict[str, int] | None = None,
                 shuffle: str = "block") -> None:
        super().__init__()
        if not urls:
            raise ValueError("no training shards")
        self.urls = urls
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.epochs = epochs
        self.drop_last = drop_last
        self.skip_batches = skip_batches
        self.on_bad_shard = on_bad_shard
        self.shard_samples = shard_samples or {}  # url -> samples it holds (the manifest's), for what a bad one loses
        if shuffle not in ("block", "reservoir"):
            raise ValueError(f"shuffle must be block or reservoir, not {shuffle!r}")
        self.shuffle = shuffle

    def read(self, url: str) -> Iterator[dict[str, Any]]:
        return read_shard(url, self.on_bad_shard, self.shard_samples.get(url))

    def epoch_urls(self, epoch: int) -> list[str]:
        urls = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)  # same order on every rank
        return urls

    def assignment(self, epoch: int, worker: int, num_workers: int) -> tuple[int, list[str], slice]:
        """(consumer index, the shards it reads in `epoch`, which of their samples are its): whole
        shards when there are at least as many as consumers, else every `consumers`-th sample."""
        consumers = self.world_size * num_workers
        consumer = self.rank * num_workers + worker
        urls = self.epoch_urls(epoch)
        if len(urls) >= consumers:
            return consumer, urls[consumer::consumers], slice(None)
        return consumer, urls, slice(consumer, None, consumers)

    def samples(self, epoch: int, worker: int, num_workers: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """This consumer's samples of one epoch from its `start`-th on, shuffled deterministically
        by (seed, epoch, consumer): reading begins at the block holding `start`."""
        consumer, urls, mine = self.assignment(epoch, worker, num_workers)
        if self.shuffle == "reservoir":
            stream = islice((s for url in urls for s in self.read(url)), mine.start, None, mine.step)
            rng = random.Random(hash((self.seed, epoch, consumer)))
            shuffled = shuffle_buffer(stream, self.shuffle_buffer_size, rng) if self.shuffle_buffer_size > 1 else stream
            return islice(shuffled, start, None)
        size = self.shuffle_buffer_size
        if size <= 1:
            return self.read_from(urls, mine, start)
        block = start // size
        blocks = block_shuffle(self.read_from(urls, mine, block * size), size,
                               lambda b: random.Random(hash((self.seed, epoch, consumer, b))), block)
        return islice(blocks, start - block * size, None)

    def read_from(self, urls: list[str], mine: slice, position: int) -> Iterator[dict[str, Any]]:
        """A consumer's unshuffled samples from its `position`-th on. With trusted shard counts the
        shards before it are not opened and the one holding it is read from its start, else the
        epoch is read from its first sample."""
        first, step = mine.start or 0, mine.step or 1
        index = first + position * step  # in the stream of all `urls`' samples
        if not self.counts_trusted(urls):
            return islice((s for url in urls for s in self.read(url)), index, None, step)
        for n, url in enumerate(urls):
            if index < self.shard_samples[url]:
                break
            index -= self.shard_samples[url]
        else:
            return iter(())
        rest = (s for later in urls[n + 1:] for s in self.read(later))
        return islice(chain(islice(self.read(url), index, None), rest), 0, None, step)

    def counts_trusted(self, urls: list[str]) -> bool:
        # A skipped bad shard holds fewer samples than its count: only runs that stop on one
        # (data.on_bad_shard=fail, which also checks every count it reads) can trust the counts.
        return self.on_bad_shard == "fail" and all(url in self.shard_samples for url in urls)

    def epoch_batches(self, epoch: int, worker: int, num_workers: int) -> int | None:
        """How many batches consumer (rank, worker) makes of `epoch`, from the shards' sample counts
        alone (None where a count is unknown or untrusted: shards from data.shards, or a run that
        skips bad shards)."""
        _, urls, mine = self.assignment(epoch, worker, num_workers)
        if not self.counts_trusted(urls):
            return None
        samples = len(range(sum(self.shard_samples[url] for url in urls))[mine])
        full, rest = divmod(samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def seek(self, skip: int, worker: int, num_workers: int) -> tuple[int, int, bool]:
        """(epoch, batches left to skip in it, whether that epoch's counts are known) after `skip`
        batches of this consumer: whole epochs are passed over by their counts, without reading
        them; with known counts the rest is a position inside the epoch (see `samples`)."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            batches = self.epoch_batches(epoch, worker, num_workers)
            if batches is None:
                return epoch, skip, False
            if skip < batches or batches == 0:
                break
            skip -= batches
            epoch += 1
        return epoch, skip, True

    def _batches(self, worker: int, num_workers: int, first_epoch: int = 0,
                 first_batch: int = 0) -> Iterator[list[dict[str, Any]]]:
        epochs = range(first_epoch, self.epochs) if self.epochs is not None else count(first_epoch)
        for epoch in epochs:
            batch: list[dict[str, Any]] = []
            produced = 0
            start = first_batch * self.batch_size if epoch == first_epoch else 0
            for sample in self.samples(epoch, worker, num_workers, start):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield batch
                    produced += 1
                    batch = []
            if batch and not self.drop_last:
                yield batch
            elif produced == 0 and start == 0 and self.epochs is None:
                raise RuntimeError(f"rank {self.rank} worker {worker}: an epoch holds fewer than "
                                   f"train.batch_size={self.batch_size} samples; lower the batch size or data.num_workers")

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn, so the first `skip_batches`
        # batches of the rank include ceil((skip - worker) / num_workers) of this worker's.
        # A resumed loader starts again at worker 0, while the uninterrupted one would go on
        # with worker skip % num_workers: so worker w takes over the samples of consumer
        # (w + skip) % num_workers, and batches come out in the uninterrupted order.
        role = (worker + self.skip_batches) % num_workers
        epoch, skip, known = self.seek(max(0, -(-(self.skip_batches - role) // num_workers)), role, num_workers)
        # A known epoch is entered at the skipped batches' end; otherwise (or for a reservoir
        # shuffle, whose state needs every earlier sample) they are read, not collated.
        start = skip if known and self.shuffle == "block" else 0
        for n, batch in enumerate(self._batches(role, num_workers, epoch, start), start=start):
            if n >= skip:
                yield self.collate(batch)


def make_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    # A generator of its own: starting an iterator draws the workers' base seed from it, which
    # from the global one would shift every later dropout draw of a resumed run (the stream
    # seeds its shuffling itself).
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None, generator=torch.Generator().manual_seed(0))
