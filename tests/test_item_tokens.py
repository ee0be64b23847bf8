"""Item tokens: one whole token per catalog item, rendered where templates say, and the only
embedding rows that training changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_engines import GLOBAL_BATCH, tiny_config
from train.data.catalog import item_token
from train.config.io import load_config
from train.distributed import from_environment
from train.errors import UserError
from train.data.stream import read_shard
from train.loop.recipe import Trainer


def test_item_tokens_render_tokenize_and_train(tmp_path: Path) -> None:
    config = load_config(None, [*tiny_config(tmp_path, "plain", -1, 1), "loss.learn_temperature=false",
                                "model.item_tokens=true", "prompt.item_template={item_token} {title}",
                                "prompt.history_item_template={item_token}", "prompt.history_separator= "])
    trainer = Trainer(config, from_environment("cpu"))
    trainer.setup()
    catalog_size = len(trainer.inputs.catalog)
    assert trainer.inputs.catalog.texts([3], "history") == [item_token(3)]
    assert trainer.inputs.catalog.texts([3])[0].startswith(item_token(3) + " ")
    ids = trainer.inputs.item_token_ids
    assert len(ids) == catalog_size and len(set(ids)) == catalog_size
    assert trainer.collator.item_tokens([3])[0][0] == ids[3]  # one whole token, first
    user = trainer.collator.user_tokens([[1, 2]])[0]
    assert [t for t in user if t in set(ids)] == [ids[1], ids[2]]

    embeddings = trainer.encoder.backbone.get_input_embeddings()
    before = embeddings(torch.arange(len(trainer.inputs.tokenizer))).detach().clone()
    samples = list(read_shard(str(Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"])))[:GLOBAL_BATCH]
    trainer.train_step(trainer.collator(samples))
    after = embeddings(torch.arange(len(trainer.inputs.tokenizer))).detach()
    changed = set((before != after).any(dim=1).nonzero().flatten().tolist())
    used = {s["item"] for s in samples} | {i for s in samples for i in s["history"]}
    assert changed and changed <= set(ids)  # text tokens stay frozen
    assert {ids[i] for i in used} <= changed


def test_item_token_field_needs_the_switch(tmp_path: Path) -> None:
    config = load_config(None, [*tiny_config(tmp_path, "plain", -1, 1), "prompt.item_template={item_token}"])
    with pytest.raises(UserError, match=r"prompt.item_template: \{item_token\} needs model.item_tokens=true"):
        Trainer(config, from_environment("cpu")).setup()
