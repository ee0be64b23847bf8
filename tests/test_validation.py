"""Validation across ranks and over time: the users' ranking split over ranks gives the
one-process metrics on every rank, and a trainer ranks the popularity baseline once a split (it
does not change while the model trains) without changing what it reports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import train.evaluation.evaluate
from multiproc import run_ranks
from test_transitions import sparse
from train.config.io import load_config
from train.evaluation.ranking import Bonus, rank_catalog


def ranking_case(users: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]], Bonus]:
    """`users` users against 9 items, with histories (a repeat, a target among them) and a prior."""
    generator = torch.Generator().manual_seed(users)
    user_vectors, items = torch.randn(users, 3, generator=generator), torch.randn(9, 3, generator=generator)
    targets = torch.randint(0, 9, (users,), generator=generator)
    histories = [torch.randint(0, 9, (u % 4,), generator=generator).tolist() + [int(targets[u])] * (u % 2)
                 for u in range(users)]
    pairs = torch.unique(torch.stack([torch.arange(users).repeat_interleave(2),
                                      torch.randint(0, 9, (2 * users,), generator=generator)]), dim=1)
    rows, cols = pairs  # one entry per (row, item)
    values = torch.rand(len(rows), generator=generator)
    return user_vectors, items, targets, histories, sparse(rows, cols, values)


def shared_ranking(rank: int, world_size: int, users: int) -> dict[str, Any]:
    user_vectors, items, targets, histories, bonus = ranking_case(users)
    return train.evaluation.evaluate.rank_in_shares(user_vectors, items, targets, histories, [1, 5], torch.device("cpu"), bonus,
                                      parts=True)


@pytest.mark.parametrize("world_size, users", [(2, 7), (3, 7), (3, 2)])  # (3, 2): a rank with no users
def test_ranking_split_over_ranks_equals_one_process(world_size: int, users: int) -> None:
    user_vectors, items, targets, histories, bonus = ranking_case(users)
    expected = rank_catalog(user_vectors, items, targets, histories, [1, 5], user_chunk=2, bonus=bonus, parts=True)
    assert train.evaluation.evaluate.numbers(expected) != [0.0] * len(train.evaluation.evaluate.numbers(expected))
    for got in run_ranks(shared_ranking, world_size, users):
        assert got.keys() == expected.keys()
        assert train.evaluation.evaluate.numbers(got) == pytest.approx(train.evaluation.evaluate.numbers(expected), abs=1e-12)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    tmp = tmp_path_factory.mktemp("validation")
    config = load_config(None, [
        f"output_dir={tmp}/run", f"data.dir={tmp}/data", "device=cpu", "resume=never", "data.num_workers=0",
        "data.synthetic={num_users: 40, num_items: 30, num_categories: 3, num_brands: 3, min_length: 4, max_length: 7}",
        "model.tokenizer_vocab_size=200", "model.projection_dim=8",
        "model.architecture={hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
        "num_key_value_heads: 2}", "prompt.max_item_tokens=8", "train.batch_size=6", "train.max_steps=2",
        "train.warmup_steps=0", "eval.transitions.weight=0.5"])
    trainer = Trainer(config, from_environment("cpu"))
    trainer.setup()
    yield trainer
    trainer.close()


def test_popularity_is_ranked_once_a_split(trainer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ranked: list[int] = []
    real = train.evaluation.evaluate.popularity

    def counted(*args: Any) -> dict[str, Any]:
        ranked.append(1)
        return real(*args)

    monkeypatch.setattr(train.evaluation.evaluate, "popularity", counted)
    first = trainer.evaluate("valid", show_progress=False)
    again = trainer.evaluate("valid", show_progress=False)
    assert len(ranked) == 1  # the second validation reused the first's baseline
    test = trainer.evaluate("test", show_progress=False)
    assert len(ranked) == 2  # another split, another baseline
    assert again == first  # same model, same figures: the reused baseline is reported as it was
    fresh = train.evaluation.evaluate.evaluate(trainer.encoder, trainer.collator, trainer.config, trainer.dist.device, "test",
                                    False)
    assert fresh == test  # nothing cached changes what an evaluation from scratch reports
    assert {"encoder", "transitions"} <= set(test)
