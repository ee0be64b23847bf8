"""On a CUDA device (skipped without one; launch/device_check.sh runs them on a lent GPU): the
unpadded forward and a bf16 training step, the parts whose kernels differ from the CPU's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_engines import GLOBAL_BATCH, tiny_config
from test_unpadded import GQA
from train.config.schema import ModelConfig
from train.loop.flops import device_peak
from train.modeling.backbone import build_encoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_unpadded_equals_padded_on_cuda(dtype: str, tolerance: float) -> None:
    lengths = torch.tensor([1, 19, 7, 12, 19, 3], device="cuda")
    mask = (torch.arange(19, device="cuda")[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 300, mask.shape, device="cuda") * mask
    outputs = []
    for unpadded in (False, True):
        config = ModelConfig(unpadded=unpadded, pooling="mean", projection_dim=16, architecture=GQA, dtype=dtype)
        encoder = build_encoder(config, 300, 0, seed=3).cuda()
        pooled, states = encoder(ids, mask, every_position=True)
        outputs.append((pooled, states * mask[..., None]))
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


def test_a_bf16_step_trains_on_cuda(tmp_path: Path) -> None:
    from train.config.io import load_config
    from train.data.stream import read_shard
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    config = load_config(None, [*tiny_config(tmp_path, "plain", -1, 1), "device=cuda", "train.precision=bf16",
                                "train.optimizer=adamw", "train.lr=0.01"])
    trainer = Trainer(config, from_environment("cuda"))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    shard = Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
    samples = list(read_shard(str(shard)))[:GLOBAL_BATCH]
    result = trainer.train_step(trainer.collator(samples))
    assert torch.isfinite(result.loss) and not result.skipped
    assert any("lora_B" in n and not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()
               if p.requires_grad)
    trainer.close()
    peak, source = device_peak(torch.device("cuda"), "bf16")
    if "not in" not in source:  # a GPU in the table of peaks
        assert peak > 1e13
