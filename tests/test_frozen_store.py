"""The frozen layers' states are kept in the data directory between runs: computed once, read
back identical, and never read for another backbone, split, precision or catalog text."""

from __future__ import annotations

from pathlib import Path

import torch

from model.layer_cache import StateCache
from train.config.io import load_config
from train.evaluation import frozen_store


def test_computed_once_then_read_back(tmp_path: Path) -> None:
    config = load_config(None, [f"data.dir={tmp_path}", "model.name_or_path=some/llm"])
    tokens = [[5, 6, 7], [8, 9]]
    calls = []

    def compute() -> StateCache:
        calls.append(1)
        return StateCache(torch.randn(5, 4), torch.tensor([3, 2]))

    first = frozen_store.with_store(config, 3, False, tokens, torch.device("cpu"), True, compute)
    second = frozen_store.with_store(config, 3, False, tokens, torch.device("cpu"), True, compute)
    assert len(calls) == 1
    assert torch.equal(first.states, second.states) and torch.equal(first.lengths, second.lengths)
    assert not list((tmp_path / "frozen-states").glob(".*.tmp"))

    path = frozen_store.store_path(config, 3, False, tokens)
    others = {frozen_store.store_path(config, 2, False, tokens), frozen_store.store_path(config, 3, True, tokens),
              frozen_store.store_path(config, 3, False, [[5, 6, 7], [8, 10]]),
              frozen_store.store_path(load_config(None, [f"data.dir={tmp_path}", "model.name_or_path=other/llm"]), 3,
                                      False, tokens),
              frozen_store.store_path(load_config(None, [f"data.dir={tmp_path}", "model.name_or_path=some/llm",
                                                         "model.dtype=bfloat16"]), 3, False, tokens)}
    assert path not in others and len(others) == 5

    path.write_bytes(b"damaged")
    third = frozen_store.with_store(config, 3, False, tokens, torch.device("cpu"), True, compute)
    assert len(calls) == 2 and third.states.shape == (5, 4)  # recomputed and stored again
    assert frozen_store.load(path) is not None
