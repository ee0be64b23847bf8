"""The frozen layers' outputs per catalog item (model.trained_layers), kept on disk between runs.

A pretrained backbone's lower layers never train, so what they make of an item depends only on
the weights and the item's tokens. Computing it is the slow part of starting a run (about 2.5
minutes for Amazon Office's 2,420 products through SmolLM2's 30 layers on 2 cores); a sweep of
recipes over the same backbone and catalog pays it once. The file sits in the prepared data
directory, named by a hash of everything the states depend on: the backbone (its name and GGUF
file, or, for a random one, its architecture and seed), the layer split and pooling, the
precision, and every item's token ids. Anything else changes the name, so a stale file is never
read (which is why a re-prepare of the directory keeps the folder); it is written under a
temporary name and renamed."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.layer_cache import StateCache
from train.config.schema import Config
from train.data.layout import Layout
from train.distributed import any_process

log = logging.getLogger(__name__)


def store_path(config: Config, split: int, frozen: bool, token_lists: list[list[int]]) -> Path:
    model = config.model
    backbone = ({"name_or_path": model.name_or_path, "gguf_file": model.gguf_file} if model.name_or_path
                else {"architecture": model.architecture, "seed": config.seed})
    identity = {"backbone": backbone, "split": split, "frozen": frozen, "pooling": model.pooling if frozen else None,
                "dtype": model.dtype, "attention": model.attn_implementation}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    digest.update(json.dumps(token_lists).encode())
    return Layout(Path(config.data.dir)).frozen_states / f"{digest.hexdigest()[:24]}.safetensors"


def load(path: Path) -> StateCache | None:
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as err:  # a file damaged on disk is recomputed, not trusted
        log.warning("%s: unreadable (%s); computing the frozen layers' states again", path, err)
        return None
    log.info("frozen layers' states of the catalog read from %s", path)
    return StateCache(tensors["states"], tensors["lengths"])


def save(path: Path, cache: StateCache) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    save_file({"states": cache.states.contiguous(), "lengths": cache.lengths.contiguous()}, str(staging))
    staging.replace(path)
    log.info("frozen layers' states of the catalog kept in %s for later runs", path)


def with_store(config: Config, split: int, frozen: bool, token_lists: list[list[int]], device: torch.device,
               is_main: bool, compute: Callable[[], StateCache]) -> StateCache:
    """The stored states when every process finds them, else `compute()` on every process (its
    collectives need them all), stored by the main one."""
    path = store_path(config, split, frozen, token_lists)
    found = load(path)
    if not any_process(found is None, device):
        assert found is not None
        return found
    cache = compute()
    if is_main:
        save(path, cache)
    return cache
