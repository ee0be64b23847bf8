"""A step whose loss is not finite on any rank is skipped on every rank together: no backward,
no update, the optimizer and schedule where they were, the step counted; after
train.max_bad_steps such steps in a row the run stops with one line, its last checkpoint intact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from multiproc import run_ranks
from test_engines import GLOBAL_BATCH, tiny_config

SPOILED_STEP = 1


def spoil(trainer, rank_to_spoil: int, rank: int, steps: set[int]) -> None:  # type: ignore[no-untyped-def]
    """Make `rank`'s loss NaN at the given steps (counted from 0), the way a bad batch would."""
    stepper = trainer.stepper
    original = stepper.loss

    def loss(embeddings, batch):  # type: ignore[no-untyped-def]
        value = original(embeddings, batch)
        return value * float("nan") if rank == rank_to_spoil and trainer.step in steps else value

    stepper.loss = loss


def train_with_a_nan(rank: int, world_size: int, tmp: str, engine: str, stage: int, extra: tuple[str, ...]) -> dict:
    from train.config.io import load_config
    from train.data.stream import read_shard
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    config = load_config(None, [*tiny_config(Path(tmp), engine, stage, world_size, extra), "train.optimizer=adamw",
                                "train.lr=0.01", "train.warmup_steps=0"])
    trainer = Trainer(config, from_environment("cpu"))
    trainer.setup()
    spoil(trainer, world_size - 1, rank, {SPOILED_STEP})
    shard = Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
    samples = list(read_shard(str(shard)))
    per_rank = GLOBAL_BATCH // world_size
    out: dict = {"skipped": [], "unchanged": [], "lr": []}
    for step in range(3):
        with trainer.engine.full_weights():
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        rows = samples[step * GLOBAL_BATCH + rank * per_rank:][:per_rank]
        result = trainer.train_step(trainer.collator(rows))
        with trainer.engine.full_weights():
            after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        out["skipped"].append(result.skipped)
        out["unchanged"].append(all(torch.equal(before[n], after[n]) for n in before))
        out["lr"].append(trainer.engine.lr())
    out["weights"] = after
    return out


@pytest.mark.parametrize("world_size, engine, stage, extra", [
    (1, "plain", -1, ()),
    (1, "plain", -1, ("train.grad_cache_chunk=2",)),
    (2, "ddp", -1, ()),
    (2, "deepspeed", 2, ()),
], ids=["plain", "plain-cached", "ddp", "zero2"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path, world_size: int, engine: str, stage: int,
                                                         extra: tuple[str, ...]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = run_ranks(train_with_a_nan, world_size, str(tmp_path), engine, stage, extra, timeout=600)
    for out in results:
        assert out["skipped"] == [False, True, False]
        assert out["unchanged"] == [False, True, False]  # the skipped step moved nothing
        assert out["lr"][0] == out["lr"][1]  # ... and the schedule kept its place
    assert all(torch.equal(results[0]["weights"][n], results[-1]["weights"][n]) for n in results[0]["weights"])


def test_too_many_bad_steps_in_a_row_stop_the_run_with_its_checkpoint_intact(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from train.cli import main
    from train.loop import recipe

    setup = recipe.Trainer.setup

    def spoiled_setup(self):  # type: ignore[no-untyped-def]
        setup(self)
        spoil(self, 0, 0, {3, 4, 5, 6})  # steps 4-7, counted from 1

    monkeypatch.setattr(recipe.Trainer, "setup", spoiled_setup)
    run = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    code = main(["train", str(config), f"output_dir={run}", f"data.dir={tmp_path / 'data'}", "device=cpu",
                 "data.num_workers=0", "data.synthetic={num_users: 80, num_items: 30}", "train.batch_size=8",
                 "train.max_steps=10", "train.save_every=3", "train.log_every=1", "train.max_bad_steps=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "rectrain: error: 3 steps in a row had a non-finite loss or gradient (the last, step 6: loss nan); stopped "
        "after train.max_bad_steps=2, the last checkpoint, step-3, is intact. Lower train.lr or turn on "
        "train.grad_clip, then resume")
    assert "step 4: loss nan; the step is skipped on every rank (1 in a row, 1 in all)" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-3"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]  # step 6 raised before its row
    assert [row.get("skipped_steps", 0) for row in rows] == [0, 0, 0, 1, 1]
    assert [row["loss"] is None for row in rows] == [False, False, False, True, True]
