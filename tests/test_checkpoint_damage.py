"""A checkpoint cut short (a copy or a disk that ran out mid-write, a save killed before its
rename) is never resumed from: `resume: auto` takes the newest whole one and says why, and the
resumed run replays the uninterrupted run's losses from there."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from train.cli import main
from train.modeling import checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def train(run: Path, data: Path, steps: int) -> int:
    return main(["train", str(CONFIG), f"output_dir={run}", f"data.dir={data}", "device=cpu", "data.num_workers=0",
                 "data.synthetic={num_users: 80, num_items: 30}", "train.batch_size=8", f"train.max_steps={steps}",
                 "train.save_every=2", "train.keep_last=3", "train.log_every=1", "resume=auto"])


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    assert train(run, data, 6) == 0
    uninterrupted = losses(run)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-2", "step-4", "step-6"]
    assert json.loads((root / "step-6" / checkpoint.COMPLETE).read_text())["step"] == 6
    assert checkpoint.latest(run) == root / "step-6"

    adapter = root / "step-6" / "adapter" / "adapter_model.safetensors"
    size = adapter.stat().st_size
    adapter.write_bytes(adapter.read_bytes()[:size // 2])  # the disk filled up during a copy
    (root / ".step-8.tmp").mkdir()  # a save killed before its rename
    (root / "step-8").mkdir()  # ... or a folder without its trainer state
    collect = Collect()
    logging.getLogger(checkpoint.__name__).addHandler(collect)
    try:
        assert checkpoint.latest(run) == root / "step-4"
    finally:
        logging.getLogger(checkpoint.__name__).removeHandler(collect)
    assert collect.lines == [f"skipped damaged checkpoint(s) step-6 (adapter/adapter_model.safetensors holds "
                             f"{size // 2} of its {size} bytes); step-8 (no trainer_state.pt); using step-4"]

    (run / "metrics.jsonl").unlink()
    assert train(run, data, 6) == 0
    replayed = losses(run)
    assert sorted(replayed) == [5, 6]
    assert replayed == pytest.approx({step: uninterrupted[step] for step in (5, 6)}, abs=1e-6)
    assert checkpoint.damage(root / "step-6") is None  # saved again, whole


def test_a_checkpoint_without_its_record_is_still_whole(tmp_path: Path) -> None:
    # Checkpoints from before COMPLETE existed (tests/fixtures/checkpoint-v1) have none.
    path = tmp_path / "step-3"
    path.mkdir()
    (path / checkpoint.STATE_FILE).write_bytes(b"x")
    assert checkpoint.damage(path) is None
    (path / checkpoint.COMPLETE).write_text("{not json")
    assert checkpoint.damage(path) == f"{checkpoint.COMPLETE} is unreadable"
