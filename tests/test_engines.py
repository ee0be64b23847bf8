"""Every engine at 2 gloo ranks, fed the same global batches (rank r takes its slice), gives the
losses and LoRA weights of a 1-rank run on the whole batches.

Plain SGD, not AdamW: Adam's update is nearly invariant to the gradient's scale, so a gradient
summed instead of averaged over ranks would pass unseen; SGD's update shows it."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

from multiproc import run_ranks

GLOBAL_BATCH = 8
STEPS = 3
ENGINES = [("ddp", -1), ("accelerate", -1), ("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3)]


def tiny_config(tmp: Path, engine: str, zero_stage: int, world_size: int, extra: tuple[str, ...] = ()) -> list[str]:
    # A run directory per configuration: one holding another run's config is refused (overwrite).
    name = f"run-{engine}{zero_stage}-{world_size}-{zlib.crc32(chr(10).join(extra).encode()):08x}"
    return [f"output_dir={tmp}/{name}", f"data.dir={tmp}/data", "device=cpu",
            f"engine={engine}", f"deepspeed.zero_stage={zero_stage}", "resume=never", "seed=5",
            "data.synthetic={num_users: 60, num_items: 30, num_categories: 3, num_brands: 3, min_length: 4, max_length: 7}",
            "data.num_workers=0", "model.tokenizer_vocab_size=200", "model.projection_dim=8",
            "model.architecture={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
            "num_key_value_heads: 2}", "prompt.max_user_tokens=48", "prompt.max_item_tokens=8",
            f"train.batch_size={GLOBAL_BATCH // world_size}", "train.lr=0.5", "train.optimizer=sgd", "train.grad_clip=0", "train.warmup_steps=0",
            f"train.max_steps={STEPS}", "loss.learn_temperature=true", "loss.temperature=0.1",
            f"deepspeed.config={Path(__file__).resolve().parents[1] / 'configs/deepspeed/zero2.json'}", *extra]


# The hierarchical encoder, without dropout (ranks draw their own): each rank collates its own
# rows, as its loader would, since the batch's distinct items cannot be sliced by row.
ITEMS = ("model.user_encoder=items", "model.user_tower_dropout=0",
         "model.user_tower={model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
         "num_attention_heads: 2, num_key_value_heads: 2, attention_dropout: 0.0}")
# ... with LoRA on the top layer of two, the lower one's states cached per item (model.trained_layers),
# an id table (model.id_embeddings) and the whole catalog as candidates, each rank encoding its share
# (a fifth of the items held out: data.cold_items, no candidate either, so the shares split 24 items),
# and the repeat score on the items each position's user already has. A tenth of the others' SGD
# rate: the repeat score is 10x its weight (RepeatScore.SPEED), which SGD's step squares, and at
# 0.5 the third step diverges, where float rounding is amplified past any tolerance.
LAYER_CACHE = (*ITEMS, "model.id_embeddings=true", "model.repeat_score=true", "train.lr=0.05", "loss.negatives=catalog",
               "data.cold_items=0.2", "model.architecture={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
               "num_attention_heads: 2, num_key_value_heads: 2}", "model.trained_layers=1")
# ... and each step leaving out a third of the id vectors (model.id_dropout): every rank must draw the same.
CACHED = (*LAYER_CACHE, "model.id_dropout=0.3")
# ... with the catalog read from the table (loss.catalog_table), re-encoded at steps 0 and 2: step 1
# reads it stale, and every rank must hold the same table.
TABLE = (*LAYER_CACHE, "loss.catalog_table=true", "loss.catalog_refresh_every=2")


def train_on_fixed_batches(rank: int, world_size: int, tmp: str, runs: list[tuple[str, int]],
                           extra: tuple[str, ...] = ()) -> dict:
    from train.config.io import load_config
    from train.distributed import from_environment
    from train.data.stream import read_shard
    from train.loop.recipe import Trainer

    out = {}
    for engine, stage in runs:
        config = load_config(None, tiny_config(Path(tmp), engine, stage, world_size, extra))
        trainer = Trainer(config, from_environment("cpu"))
        trainer.setup()
        shard = Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
        samples = list(read_shard(str(shard)))
        per_rank = GLOBAL_BATCH // world_size
        losses = []
        for step in range(STEPS):
            if "model.user_encoder=items" in extra:
                local = trainer.collator(samples[step * GLOBAL_BATCH + rank * per_rank:][:per_rank])
            else:
                global_batch = trainer.collator(samples[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH])
                local = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in global_batch.items()}
            loss = trainer.train_step(local).loss
            if world_size > 1:
                torch.distributed.all_reduce(loss)
            losses.append(float(loss) / world_size)
        with trainer.engine.full_weights():
            weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        out[f"{engine}{stage}"] = (losses, weights)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return tmp_path_factory.mktemp("engines")


@pytest.mark.parametrize("extra, engines", [((), ENGINES), (ITEMS, [("ddp", -1), ("accelerate", -1), ("deepspeed", 3)]),
                                            (CACHED, [("ddp", -1), ("deepspeed", 3)]),
                                            (TABLE, [("ddp", -1), ("deepspeed", 3)])],
                         ids=["text", "items", "items-cached", "items-table"])
def test_engines_at_two_ranks_match_one_rank(workdir: Path, extra: tuple[str, ...], engines: list) -> None:
    (reference,) = run_ranks(train_on_fixed_batches, 1, str(workdir), [("plain", -1)], extra)
    ref_losses, ref_weights = reference["plain-1"]
    assert ref_losses[0] != ref_losses[-1]
    results = run_ranks(train_on_fixed_batches, 2, str(workdir), engines, extra, timeout=600)
    for engine, stage in engines:
        losses, weights = results[0][f"{engine}{stage}"]
        assert losses == pytest.approx(ref_losses, abs=1e-5), (engine, stage)
        assert set(weights) == set(ref_weights), (engine, stage)
        for name, ref in ref_weights.items():
            assert torch.allclose(weights[name], ref, atol=2e-5), (engine, stage, name, (weights[name] - ref).abs().max())
        # both ranks hold the same weights
        other = results[1][f"{engine}{stage}"][1]
        assert all(torch.equal(other[name], weights[name]) for name in weights), (engine, stage)


@pytest.mark.parametrize("overrides", [
    ["train.precision=bf16", "model.gradient_checkpointing=true", "model.attn_implementation=eager"],
    ["train.precision=bf16", "model.pooling=mean", "model.padding_side=right"],
])
def test_precision_checkpointing_and_attention_settings_train(tmp_path: Path, overrides: list[str]) -> None:
    from train.config.io import load_config
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    config = load_config(None, [*tiny_config(tmp_path, "plain", -1, 1), "loss.learn_temperature=false", *overrides])
    trainer = Trainer(config, from_environment("cpu"))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    shard = Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
    from train.data.stream import read_shard
    samples = list(read_shard(str(shard)))[:GLOBAL_BATCH]
    loss = float(trainer.train_step(trainer.collator(samples)).loss)
    assert loss == loss and loss > 0
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)
    if "model.gradient_checkpointing=true" in overrides:
        assert trainer.encoder.backbone.base_model.model.is_gradient_checkpointing


def test_a_compiled_backbone_trains_as_the_eager_one(tmp_path: Path) -> None:
    """train.compile: torch.compile's kernels (dynamic shapes, the unpadded attention inside) give
    the eager losses and weights, and the parameter names checkpoints use."""
    runs = {flag: train_on_fixed_batches(0, 1, str(tmp_path), [("plain", -1)], (f"train.compile={flag}",))["plain-1"]
            for flag in ("false", "true")}
    (eager_losses, eager_weights), (losses, weights) = runs["false"], runs["true"]
    # Relative: compiled kernels reorder float sums, and two SGD steps at lr 0.5 carry that into
    # the third loss (3.42086 against 3.42085 on an AVX2 CPU: 3e-6 of it).
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-5)
    assert set(weights) == set(eager_weights)
    for name, ref in eager_weights.items():
        assert torch.allclose(weights[name], ref, rtol=1e-4, atol=2e-5), name
