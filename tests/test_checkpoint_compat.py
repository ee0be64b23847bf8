"""Checkpoints written by an earlier rectrain still load: tests/fixtures/checkpoint-v1 holds two
tiny runs (users as text, users as sequences of items) trained for 3 steps by the code before
train/ was split into wings, with what that code measured from them (`expected.json`): the
re-evaluation of step-3 and the losses of steps 4-5 when training resumed from it. Any change
to what a checkpoint holds, how its trainer state unpickles or how its weights are put back
shows up here as a difference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint-v1"
METRICS = ("recall@10", "ndcg@10", "mrr@10")


def rectrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def figures(metrics: dict) -> dict[str, float]:
    """The model's and popularity's figures, history excluded and kept."""
    return {**{k: metrics[k] for k in METRICS}, **{f"kept/{k}": metrics["with_history"][k] for k in METRICS},
            **{f"popularity/{k}": metrics["popularity"][k] for k in METRICS}}


def assert_same_figures(metrics: dict, expected: dict) -> None:
    """`metrics` are `expected`'s, up to two users' ranks for the model's figures (popularity, which
    nothing trained moves, exactly).

    The fixture's figures come from another machine's CPU kernels, and on these tiny runs a float
    rounding difference flips a rank: re-evaluating the items run's step 3 gives NDCG@10 0.1582
    on AVX2 against the fixture's 0.1673, and after two more Adam steps (which divide near-zero
    gradients by their own tiny scale) the text run gives 0.1405 on AVX2, 0.1879 with
    ATEN_CPU_CAPABILITY=default and 0.1692 in the fixture, all from the same code. One user's
    rank moves a mean by at most 1 / users; a checkpoint put back wrong moves many."""
    got, want = figures(metrics), figures(expected)
    spread = 2 / metrics["users"]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9 if key.startswith("popularity/") else spread), key


@pytest.mark.parametrize("variant", ["text", "items"])
def test_a_checkpoint_from_before_the_move_evaluates_and_resumes_the_same(tmp_path: Path, variant: str) -> None:
    expected = json.loads((FIXTURES / variant / "expected.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / variant, run, ignore=shutil.ignore_patterns("expected.json"))
    paths = [f"output_dir={run}", f"data.dir={tmp_path / 'data'}"]  # the synthetic data is re-made from its seed
    # The fixture's figures come from peft's LoRA modules, transformers' norms and full prompts: on
    # these tiny runs a rounding difference flips a rank (assert_same_figures). The fused nodes and
    # the shared prefix are checked against those paths in test_fused_lora.py, test_fused_norm.py
    # and test_unpadded.py.
    paths += ["model.lora.fused=false", "model.shared_prefix=false", "model.fused_norm=false"]

    evaluated = rectrain("eval", str(run / "config.yaml"), *paths, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert_same_figures(json.loads((run / "metrics.json").read_text()), expected["eval"])

    resumed = rectrain("train", str(run / "config.yaml"), *paths, "train.max_steps=5", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-3" in resumed.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {str(row["step"]): row["loss"] for row in rows if "loss" in row}
    # Logged to 6 decimals: another CPU's rounding can tip the last one (2.802564 against 2.802565).
    assert losses == pytest.approx(expected["resumed_losses"], abs=2e-6)
    assert_same_figures(json.loads((run / "metrics.json").read_text()), expected["resumed_eval"])
