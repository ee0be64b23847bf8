"""loss.history_negatives: items drawn from each user's history join the in-batch candidates as
negatives, encoded in the same item pass as the positives (the loss's layout is proven against
one process in tests/test_loss_distributed.py)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from test_engines import GLOBAL_BATCH, tiny_config
from train.config.io import load_config
from train.distributed import from_environment
from train.data.stream import read_shard
from train.loop.recipe import Trainer

DRAWN = 3


def _trainer(tmp_path: Path, *extra: str) -> Trainer:
    config = load_config(None, [*tiny_config(tmp_path, "plain", -1, 1), "loss.mask_history=false", *extra])
    trainer = Trainer(config, from_environment("cpu"))
    trainer.setup()
    return trainer


def test_each_row_gets_its_own_history_items_after_the_positives(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, f"loss.history_negatives={DRAWN}")
    samples = list(read_shard(str(Path(trainer.config.data.dir) / trainer.inputs.manifest["shards"][0]["name"])))
    samples = samples[:GLOBAL_BATCH]
    batch = trainer.collator(samples)
    negatives = batch["negative_ids"].view(GLOBAL_BATCH, DRAWN).tolist()
    for sample, drawn in zip(samples, negatives):
        distinct = set(sample["history"])
        assert set(drawn) <= distinct
        assert len(set(drawn)) == min(DRAWN, len(distinct))  # distinct while the history allows
    assert any(len(set(s["history"])) < DRAWN for s in samples)  # the repeat path is exercised
    # One item pass: the positives' tokens, then the negatives', row after row.
    expected, _ = trainer.collator.pad(trainer.collator.item_tokens([s["item"] for s in samples]
                                                                  + batch["negative_ids"].tolist()))
    assert torch.equal(batch["item_input_ids"], expected)
    counts = trainer.inputs.catalog.train_counts().double().clamp(min=1)
    for item, logq in zip(batch["negative_ids"].tolist(), batch["negative_logq"].tolist()):
        assert math.isclose(logq, math.log(counts[item] / counts.sum()), rel_tol=1e-5)
    # The same samples draw the same negatives (a resumed run replays them), other samples others.
    assert torch.equal(trainer.collator(samples)["negative_ids"], batch["negative_ids"])
    assert not torch.equal(trainer.collator(samples[1:] + samples[:1])["negative_ids"], batch["negative_ids"])


def test_the_negatives_enter_the_loss(tmp_path: Path) -> None:
    with_negatives = _trainer(tmp_path, f"loss.history_negatives={DRAWN}")
    without = _trainer(tmp_path / "plain")
    samples = list(read_shard(str(Path(with_negatives.config.data.dir) / with_negatives.inputs.manifest["shards"][0]["name"])))
    batch = with_negatives.collator(samples[:GLOBAL_BATCH])
    loss = float(with_negatives.stepper.loss(with_negatives.stepper.embed(batch), batch))
    plain = {k: v for k, v in batch.items() if not k.startswith("negative")}
    plain["item_input_ids"] = batch["item_input_ids"][:GLOBAL_BATCH]
    plain["item_attention_mask"] = batch["item_attention_mask"][:GLOBAL_BATCH]
    assert torch.equal(plain["item_input_ids"], without.collator(samples[:GLOBAL_BATCH])["item_input_ids"])
    baseline = float(without.stepper.loss(without.stepper.embed(plain), plain))
    assert math.isfinite(loss) and loss > baseline  # more candidates, same weights: a larger softmax loss
    assert math.isfinite(with_negatives.train_step(batch).loss)
