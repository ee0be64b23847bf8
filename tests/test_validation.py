"""What a trainer keeps between validations: the popularity baseline is ranked once a split
(it does not change while the model trains), and the reports after the first are unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import train.evaluate
from train.config_io import load_config


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from train.distributed import from_environment
    from train.trainer import Trainer

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
    real = train.evaluate.popularity

    def counted(*args: Any) -> dict[str, Any]:
        ranked.append(1)
        return real(*args)

    monkeypatch.setattr(train.evaluate, "popularity", counted)
    first = trainer.evaluate("valid", show_progress=False)
    again = trainer.evaluate("valid", show_progress=False)
    assert len(ranked) == 1  # the second validation reused the first's baseline
    test = trainer.evaluate("test", show_progress=False)
    assert len(ranked) == 2  # another split, another baseline
    assert again == first  # same model, same figures: the reused baseline is reported as it was
    fresh = train.evaluate.evaluate(trainer.encoder, trainer.prompts, trainer.config, trainer.dist.device, "test",
                                    False)
    assert fresh == test  # nothing cached changes what an evaluation from scratch reports
    assert {"encoder", "transitions"} <= set(test)
