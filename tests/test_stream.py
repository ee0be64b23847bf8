"""Streaming training batches from real WebDataset shards (train/data/stream.py), with real
DataLoader worker processes."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader

from train.config.io import load_config
from train.data.prepare.run import prepare
from train.data.stream import TrainStream, expand_urls, read_shard

NUM_USERS = 60
NUM_ITEMS = 50


def sample_keys(batch: list[dict[str, Any]]) -> list[str]:
    """Collate that keeps only the sample keys (module level, so worker processes can use it)."""
    return [sample["__key__"] for sample in batch]


def prepared_shards(data_dir: Path, shard_size: int) -> list[str]:
    """Prepare a small synthetic dataset and return its shard paths, checked against the manifest."""
    config = load_config(None, [
        f"data.dir={data_dir}", "data.format=synthetic", f"data.synthetic.num_users={NUM_USERS}",
        f"data.synthetic.num_items={NUM_ITEMS}", f"data.shard_size={shard_size}",
    ])
    manifest = prepare(config, show_progress=False)
    shards = manifest["shards"]
    total = manifest["counts"]["train_samples"]
    assert [s["name"] for s in shards] == [f"shards/train-{n:06d}.tar" for n in range(len(shards))]
    assert sum(s["samples"] for s in shards) == total
    assert len(shards) == -(-total // shard_size)
    assert all(s["samples"] == shard_size for s in shards[:-1])
    paths = [str(data_dir / s["name"]) for s in shards]
    assert all(Path(p).is_file() for p in paths)
    return paths


def keys_in_shards(paths: list[str]) -> list[str]:
    """Sample keys read with tarfile directly (independent of the code under test)."""
    keys = []
    for path in paths:
        with tarfile.open(path) as tar:
            keys.extend(name.removesuffix(".json") for name in tar.getnames())
    return keys


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """About 19 shards of 40 samples: more shards than 2 ranks x 2 workers."""
    paths = prepared_shards(tmp_path_factory.mktemp("many") / "data", shard_size=40)
    assert len(paths) > 4
    return paths


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    paths = prepared_shards(tmp_path_factory.mktemp("one") / "data", shard_size=100_000)
    assert len(paths) == 1
    return paths


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Fewer shards than 4 consumers, but more than one."""
    paths = prepared_shards(tmp_path_factory.mktemp("three") / "data", shard_size=300)
    assert len(paths) == 3
    return paths


def stream(urls: list[str], **kwargs: Any) -> TrainStream:
    settings: dict[str, Any] = dict(rank=0, world_size=1, batch_size=8, collate=sample_keys, seed=0,
                                    shuffle_buffer_size=100, epochs=1, drop_last=False)
    settings.update(kwargs)
    return TrainStream(urls, **settings)


def flat(batches: Any) -> list[str]:
    return [key for batch in batches for key in batch]


def loader(dataset: TrainStream, num_workers: int = 2) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)


# ----------------------------------------------------------------- basics and determinism

def test_one_epoch_in_one_process_yields_every_sample_once(many_shards: list[str]) -> None:
    all_keys = keys_in_shards(many_shards)
    batches = list(stream(many_shards))
    assert all(len(b) == 8 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 8
    keys = flat(batches)
    assert sorted(keys) == sorted(all_keys)
    assert keys != all_keys  # shuffled


def test_read_shard_gives_the_sample_fields(many_shards: list[str]) -> None:
    samples = list(read_shard(many_shards[0]))
    assert [s["__key__"] for s in samples] == keys_in_shards(many_shards[:1])
    for sample in samples:
        assert set(sample) == {"__key__", "user", "history", "item", "logq"}
        assert 0 <= sample["item"] < NUM_ITEMS
        assert 1 <= len(sample["history"]) and all(0 <= i < NUM_ITEMS for i in sample["history"])
        assert sample["__key__"].startswith(f"u{sample['user']:09d}t")


def test_same_seed_same_order(many_shards: list[str]) -> None:
    first = flat(stream(many_shards, seed=3))
    second = flat(stream(many_shards, seed=3))
    assert first == second


def test_different_seed_different_order(many_shards: list[str]) -> None:
    first = flat(stream(many_shards, seed=3))
    other = flat(stream(many_shards, seed=4))
    assert sorted(first) == sorted(other)
    assert first != other


def test_different_epoch_different_order(many_shards: list[str]) -> None:
    dataset = stream(many_shards, seed=3)
    epoch0 = [s["__key__"] for s in dataset.samples(0, 0, 1)]
    epoch1 = [s["__key__"] for s in dataset.samples(1, 0, 1)]
    assert sorted(epoch0) == sorted(epoch1)
    assert epoch0 != epoch1
    assert epoch0 == [s["__key__"] for s in dataset.samples(0, 0, 1)]
    # Two epochs in a row are exactly epoch 0 then epoch 1.
    two = flat(stream(many_shards, seed=3, epochs=2, batch_size=len(epoch0)))
    assert two == epoch0 + epoch1


def test_small_shuffle_buffer_and_no_buffer(many_shards: list[str]) -> None:
    all_keys = keys_in_shards(many_shards)
    unshuffled = flat(stream(many_shards, shuffle_buffer_size=0))
    assert sorted(unshuffled) == sorted(all_keys)
    # without a buffer, shards are read whole and in their file order, one after another
    owner = {key: n for n, url in enumerate(many_shards) for key in keys_in_shards([url])}
    runs = [shard for shard, _ in itertools.groupby(owner[key] for key in unshuffled)]
    assert sorted(runs) == list(range(len(many_shards)))
    assert runs != sorted(runs)  # in the epoch's shuffled shard order
    assert unshuffled == [key for shard in runs for key in keys_in_shards([many_shards[shard]])]
    assert sorted(flat(stream(many_shards, shuffle_buffer_size=5))) == sorted(all_keys)


def test_no_urls_is_an_error() -> None:
    with pytest.raises(ValueError, match="no training shards"):
        stream([])


# ------------------------------------------------------------- ranks x workers split

def rank_keys(urls: list[str], rank: int, **kwargs: Any) -> list[str]:
    dataset = stream(urls, rank=rank, world_size=2, **kwargs)
    return flat(loader(dataset, num_workers=2))


@pytest.mark.parametrize("fixture", ["many_shards", "three_shards", "one_shard"])
def test_two_ranks_two_workers_cover_every_sample_once(fixture: str, request: pytest.FixtureRequest) -> None:
    urls: list[str] = request.getfixturevalue(fixture)
    all_keys = keys_in_shards(urls)
    per_rank = [rank_keys(urls, rank) for rank in (0, 1)]
    union = per_rank[0] + per_rank[1]
    assert len(union) == len(set(union)), "a sample reached two consumers"
    assert set(union) == set(all_keys)
    assert len(union) == len(all_keys)
    for keys in per_rank:
        assert keys  # every rank got data
    if fixture != "many_shards":
        # sample-level split: each rank gets half the samples (to within one per worker)
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2


def test_shard_level_split_keeps_shards_whole(many_shards: list[str]) -> None:
    owner = {key: n for n, url in enumerate(many_shards) for key in keys_in_shards([url])}
    shards_of_rank = [{owner[k] for k in rank_keys(many_shards, rank)} for rank in (0, 1)]
    assert not shards_of_rank[0] & shards_of_rank[1]
    assert shards_of_rank[0] | shards_of_rank[1] == set(range(len(many_shards)))


def test_workers_match_in_process_consumers(three_shards: list[str]) -> None:
    """Worker w of rank r in a DataLoader reads what `samples(epoch, w, 2)` says it should."""
    for rank in (0, 1):
        dataset = stream(three_shards, rank=rank, world_size=2)
        expected = {k for w in (0, 1) for k in (s["__key__"] for s in dataset.samples(0, w, 2))}
        assert set(rank_keys(three_shards, rank)) == expected


# ------------------------------------------------------------------------ infinite mode

@pytest.mark.parametrize("fixture", ["many_shards", "one_shard"])
def test_infinite_mode_yields_full_batches_past_one_epoch(fixture: str, request: pytest.FixtureRequest) -> None:
    urls: list[str] = request.getfixturevalue(fixture)
    all_keys = set(keys_in_shards(urls))
    batch_size = 16
    epoch_batches = -(-len(all_keys) // (2 * batch_size))  # one epoch's batches per rank, at most
    for rank in (0, 1):
        dataset = stream(urls, rank=rank, world_size=2, batch_size=batch_size, epochs=None, drop_last=True)
        batches = list(itertools.islice(loader(dataset, num_workers=2), 3 * epoch_batches))
        assert len(batches) == 3 * epoch_batches
        assert all(len(batch) == batch_size for batch in batches)
        keys = flat(batches)
        assert set(keys) <= all_keys
        assert len(keys) > len(set(keys))  # samples came back: it went past one epoch


def test_infinite_mode_with_too_little_data_raises(one_shard: list[str]) -> None:
    total = len(keys_in_shards(one_shard))
    dataset = stream(one_shard, batch_size=total + 1, epochs=None, drop_last=True)
    with pytest.raises(RuntimeError, match="fewer than train.batch_size"):
        next(iter(dataset))


# -------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("skip", [1, 2, 3, 4, 7])
def test_skip_batches_continues_the_infinite_stream(skip: int, many_shards: list[str]) -> None:
    settings: dict[str, Any] = dict(rank=1, world_size=2, batch_size=8, epochs=None, drop_last=True)
    count = 12
    full = list(itertools.islice(loader(stream(many_shards, **settings)), skip + count))
    resumed = list(itertools.islice(loader(stream(many_shards, skip_batches=skip, **settings)), count))
    assert resumed == full[skip:]


@pytest.mark.parametrize("skip", [0, 1, 2, 3, 4])
def test_skip_batches_in_one_epoch(skip: int, many_shards: list[str]) -> None:
    full = list(loader(stream(many_shards, rank=0, world_size=2)))
    resumed = list(loader(stream(many_shards, rank=0, world_size=2, skip_batches=skip)))
    assert resumed == full[skip:]


def test_skip_batches_near_the_end_of_the_epoch(many_shards: list[str]) -> None:
    full = list(loader(stream(many_shards, rank=0, world_size=2)))
    for skip in (len(full) - 3, len(full) - 2, len(full) - 1, len(full), len(full) + 5):
        resumed = list(loader(stream(many_shards, rank=0, world_size=2, skip_batches=skip)))
        assert resumed == full[skip:], skip


class CountingStream(TrainStream):
    """Counts the shards it opens (in-process)."""

    def read(self, url: str) -> Any:
        self.opened = getattr(self, "opened", 0) + 1
        return super().read(url)


def counts_of(urls: list[str]) -> dict[str, int]:
    return {url: len(keys_in_shards([url])) for url in urls}


@pytest.mark.parametrize("shuffle", ["block", "reservoir"])
@pytest.mark.parametrize("world_size, num_workers, fixture", [(1, 0, "many_shards"), (2, 2, "many_shards"),
                                                              (2, 2, "three_shards")])
@pytest.mark.parametrize("skip", [0, 3, 11, 40, 57])
def test_resume_seeks_to_the_same_batches(skip: int, world_size: int, num_workers: int, fixture: str, shuffle: str,
                                          request: pytest.FixtureRequest) -> None:
    urls: list[str] = request.getfixturevalue(fixture)
    settings: dict[str, Any] = dict(rank=world_size - 1, world_size=world_size, batch_size=8, epochs=None,
                                    drop_last=True, shuffle=shuffle, shuffle_buffer_size=30)
    count = 10
    full = list(itertools.islice(loader(stream(urls, **settings), num_workers), skip + count))
    seeking = stream(urls, skip_batches=skip, shard_samples=counts_of(urls), **settings)
    assert list(itertools.islice(loader(seeking, num_workers), count)) == full[skip:]


def test_resume_reads_at_most_one_epoch_again(many_shards: list[str]) -> None:
    settings: dict[str, Any] = dict(batch_size=8, epochs=None, drop_last=True)
    per_epoch = sum(counts_of(many_shards).values()) // 8
    skip = 5 * per_epoch + 2  # five epochs and two batches in
    replaying = CountingStream(many_shards, rank=0, world_size=1, collate=sample_keys, skip_batches=skip, **settings)
    seeking = CountingStream(many_shards, rank=0, world_size=1, collate=sample_keys, skip_batches=skip,
                             shard_samples=counts_of(many_shards), **settings)
    assert next(iter(seeking)) == next(iter(replaying))
    assert seeking.opened <= len(many_shards) < 5 * len(many_shards) < replaying.opened


@pytest.mark.parametrize("into_epoch", [0, 7, 13, 60, 94])
def test_resume_inside_an_epoch_opens_only_the_shards_from_its_block(into_epoch: int, many_shards: list[str]) -> None:
    # Blocks of 40 samples (one shard each), batches of 8: batch b of an epoch lies in block b // 5.
    settings: dict[str, Any] = dict(batch_size=8, epochs=None, drop_last=True, shuffle_buffer_size=40)
    per_epoch = sum(counts_of(many_shards).values()) // 8
    skip = 3 * per_epoch + into_epoch
    replaying = CountingStream(many_shards, rank=0, world_size=1, collate=sample_keys, skip_batches=skip, **settings)
    seeking = CountingStream(many_shards, rank=0, world_size=1, collate=sample_keys, skip_batches=skip,
                             shard_samples=counts_of(many_shards), **settings)
    assert list(itertools.islice(seeking, 3)) == list(itertools.islice(replaying, 3))
    assert seeking.opened <= 2 < 3 * len(many_shards) < replaying.opened  # the block's shard (and the next)


def test_skip_batches_in_process(many_shards: list[str]) -> None:
    full = list(stream(many_shards))
    assert list(stream(many_shards, skip_batches=5)) == full[5:]


# ---------------------------------------------------------------------------------- URLs

def test_expand_urls_brace_patterns() -> None:
    assert expand_urls("/d/train-{000000..000002}.tar") == ["/d/train-000000.tar", "/d/train-000001.tar",
                                                           "/d/train-000002.tar"]
    assert expand_urls("/a/x-{0..1}.tar::/b/y.tar") == ["/a/x-0.tar", "/a/x-1.tar", "/b/y.tar"]
    assert expand_urls(["/a/{p,q}.tar", "/b/z.tar"]) == ["/a/p.tar", "/a/q.tar", "/b/z.tar"]


def test_expand_urls_leaves_pipe_commands_alone() -> None:
    assert expand_urls("pipe:cat /path/x.tar") == ["pipe:cat /path/x.tar"]
    assert expand_urls(["pipe:cat /path/x.tar", "/path/y.tar"]) == ["pipe:cat /path/x.tar", "/path/y.tar"]


def test_pipe_urls_stream_the_same_samples(many_shards: list[str]) -> None:
    pipes = [f"pipe:cat {path}" for path in many_shards]
    assert expand_urls(pipes) == pipes
    assert list(read_shard(pipes[0])) == list(read_shard(many_shards[0]))
    # same shard order and shuffling: the URLs differ, but both lists are shuffled alike
    assert flat(stream(pipes, seed=2)) == flat(stream(many_shards, seed=2))


def test_brace_pattern_of_prepared_shards(many_shards: list[str]) -> None:
    shard_dir = Path(many_shards[0]).parent
    pattern = f"{shard_dir}/train-{{000000..{len(many_shards) - 1:06d}}}.tar"
    assert expand_urls(pattern) == many_shards
