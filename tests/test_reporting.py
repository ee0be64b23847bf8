"""What a run reports about its speed: model FLOPs counted as torch's own FLOP counter counts
them, a utilisation figure in metrics.jsonl, and the same rows in TensorBoard (train.report_to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from test_engines import tiny_config
from train.config.schema import ModelConfig
from train.loop.flops import StepFlops
from train.modeling.backbone import build_encoder

ARCH = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_step_flops_match_torchs_flop_counter() -> None:
    """A LoRA step's forward and backward on unpadded prompts: what torch counts in matrix products
    against StepFlops (torch counts the sdpa kernel's whole [T, T] square and LoRA's small products,
    StepFlops the causal half and no LoRA: they agree within a few percent on 40-token prompts)."""
    encoder = build_encoder(ModelConfig(architecture=ARCH, pooling="mean"), 500, 0, seed=0)
    lengths = torch.tensor([40, 33, 40, 25])
    mask = (torch.arange(40)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 500, mask.shape) * mask
    with FlopCounterMode(display=False) as counter:
        encoder(ids, mask).sum().backward()
    trained = sum(p.numel() for p in encoder.backbone.parameters() if p.requires_grad)
    counted = StepFlops(encoder.backbone.config, ARCH["num_hidden_layers"], trained)(
        int(lengths.sum()), int(lengths.square().sum()))
    assert counted == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_a_run_reports_utilisation_and_writes_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.config.io import load_config
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    config = load_config(None, [*tiny_config(tmp_path, "plain", -1, 1), "train.max_steps=6", "train.log_every=2",
                                "train.report_to=[tensorboard]"])
    trainer = Trainer(config, from_environment("cpu"))
    trainer.setup()
    trainer.train()
    trainer.close()
    run = Path(config.output_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [row for row in rows if "samples_per_s" in row]
    assert [row["step"] for row in windows] == [2, 4, 6]
    for row in windows:
        assert 0 < row["mfu"] < 1 and row["model_tflops_per_s"] > 0
        assert row["tokens_per_s"] <= row["padded_tokens_per_s"]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"loss", "mfu", "samples_per_s"} <= set(events.Tags()["scalars"])
    plotted = {e.step: e.value for e in events.Scalars("loss")}
    assert plotted == pytest.approx({row["step"]: row["loss"] for row in windows}, rel=1e-6)


def test_a_missing_reporter_package_is_one_line(tmp_path: Path) -> None:
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    config = tmp_path / "config.yaml"
    config.write_text("seed: 5\n")
    done = subprocess.run([sys.executable, "-m", "train.cli", "train", str(config),
                           *tiny_config(tmp_path, "plain", -1, 1), "train.report_to=[wandb]"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "rectrain: error: train.report_to: wandb needs the wandb package (pip install wandb)"
    assert "Traceback" not in done.stderr
