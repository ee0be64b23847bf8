"""A run directory that holds another run is never overwritten without overwrite=true; the same
run with other run settings (more steps, other logging) resumes in it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_cli import TINY
from train.cli import main


def train(tmp_path: Path, *overrides: str) -> int:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(run=tmp_path / "run", data=tmp_path / "data", workers=0))
    return main(["train", str(config), "device=cpu", "train.max_steps=2", "train.save_every=2", *overrides])


def test_another_run_is_refused_then_replaced_with_overwrite(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert train(tmp_path) == 0
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()

    assert train(tmp_path, "model.projection_dim=8", "loss.temperature=0.1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rectrain: error: output_dir: {run} holds another run (loss.temperature: 0.05 -> 0.1; "
                   "model.projection_dim: 16 -> 8); set overwrite=true to replace it, or choose another output_dir"]
    assert (run / "config.yaml").read_text() == saved
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2"]

    # More steps, other logging: the same run, resumed.
    assert train(tmp_path, "train.max_steps=4", "train.log_every=2") == 0
    assert "resumed from" in capsys.readouterr().err

    assert train(tmp_path, "model.projection_dim=8", "overwrite=true") == 0
    out = capsys.readouterr()
    assert "clearing" in out.err and "resumed from" not in out.err
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["projection_dim"] == 8
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2"]
