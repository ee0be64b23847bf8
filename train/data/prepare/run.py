"""`rectrain prepare`: raw interactions + catalog -> WebDataset shards, catalog, splits, manifest.

Interactions whose item is not in the catalog are dropped; then, when asked, those rated below
`data.min_rating`, then all outside the `data.k_core`-core (train.data.prepare.filters). Per user,
interactions are ordered by time (ties keep file order). Leave-one-out: the last item is the
test target, the one before it the validation target, the rest are training; users with fewer
than 3 interactions only train. Every training position t >= 1 of a user becomes a
sample (history = the previous `max_history` items, target = item t). Shards carry catalog
indices only; text is rendered at load time. Users are numbered in user id order.

Memory does not grow with the log, only with the catalog and a `Budget`: the log is read in
chunks (train.data.prepare.sources) and spilled to disk in partitions by ranges of user id
(train.data.prepare.partition), each grouped and split alone; the training samples are shuffled over the
whole log through bucket files (train.data.prepare.shuffle). Everything, the spill included, is written
into a temporary directory renamed over `data.dir` at the end, so a failed prepare leaves
nothing half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from train.config.schema import Config
from train.data.layout import Layout, file_sha256, input_digests, refresh_stamps, stale_reason
from train.data.prepare.pipeline import Budget, prepare_into

log = logging.getLogger(__name__)


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
        else:
            refresh_stamps(config)


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
        manifest = prepare_into(config, tmp_dir, show_progress, budget)
        manifest["files"] = {p.relative_to(tmp_dir).as_posix(): file_sha256(p)
                             for p in sorted(tmp_dir.rglob("*")) if p.is_file()}
        manifest["input_sha256"] = input_digests(config)
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        Layout(tmp_dir).manifest.write_text(json.dumps(manifest, indent=2))
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            # The frozen states are named by a digest of the backbone and every item's tokens, so
            # a file kept from before is either exactly right or never read: keep them.
            if Layout(old).frozen_states.is_dir():
                Layout(old).frozen_states.rename(Layout(tmp_dir).frozen_states)
        tmp_dir.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    counts = manifest["counts"]
    log.info("prepared %s: %d users, %d items, %d training samples in %d shards (%.1fs)", out_dir,
             counts["users"], counts["items"], counts["train_samples"], len(manifest["shards"]), manifest["seconds"])
    return manifest
