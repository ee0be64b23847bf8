"""A training shard cut short: data.on_bad_shard=fail stops the run with the shard's name (one
line, exit 2); skip trains to the end, logging the shard and the samples it lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
SETTINGS = ["device=cpu", "data.synthetic={num_users: 120, num_items: 30}", "data.shard_size=40",
            "train.batch_size=8", "train.max_steps=12", "train.log_every=4", "data.num_workers=1"]


def rectrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """A prepared directory whose second shard lost about half of it: (data dir, shard path, its samples)."""
    root = tmp_path_factory.mktemp("bad-shard")
    data = root / "data"
    done = rectrain("prepare", str(CONFIG), f"data.dir={data}", *SETTINGS, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3
    shard = manifest["shards"][1]
    path = data / shard["name"]
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2 + 100])  # cut inside a record
    return data, str(path), shard["samples"]


def test_fail_stops_with_the_shards_name(damaged: tuple[Path, str, int], tmp_path: Path) -> None:
    data, shard, _ = damaged
    done = rectrain("train", str(CONFIG), f"data.dir={data}", f"output_dir={tmp_path / 'run'}", *SETTINGS, cwd=tmp_path)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rectrain: error: {shard}: corrupt shard after ") and "data.on_bad_shard=skip" in last
    assert "Traceback" not in done.stderr


def test_skip_trains_on_and_says_what_was_lost(damaged: tuple[Path, str, int], tmp_path: Path) -> None:
    data, shard, samples = damaged
    run = tmp_path / "run"
    done = rectrain("train", str(CONFIG), f"data.dir={data}", f"output_dir={run}", *SETTINGS,
                    "data.on_bad_shard=skip", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "corrupt shard" in line]
    assert len(warnings) == 1, warnings  # once, though every epoch meets it again
    assert f"rectrain: {shard}: corrupt shard after " in warnings[0]  # (the progress bar may share the line)
    read = int(warnings[0].split("corrupt shard after ")[1].split()[0])
    assert 0 < read < samples and warnings[0].endswith(f"skipped, {samples - read} of its {samples} samples lost")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [4, 8, 12]
    assert (run / "metrics.json").is_file()
