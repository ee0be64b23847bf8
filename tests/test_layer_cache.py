"""model.trained_layers: an item encoded from its cached lower-layer states equals the same item
encoded from its tokens (embeddings and LoRA gradients), whatever the batch it was cached in or
is encoded in; the lower layers are frozen and get no adapters; bad settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.layer_cache import StateCache
from test_model import PAD_ID, SEQUENCES, TINY, randomise_lora, tiny_encoder
from train.config.io import load_config
from train.data.collate import pad
from train.errors import UserError
from train.evaluation.report import flatten_metrics

THREE_LAYERS = [*TINY, "model.architecture.num_hidden_layers=3", "model.user_encoder=items", "model.projection_dim=8"]


def cached(encoder, side: str) -> StateCache:  # type: ignore[no-untyped-def]
    """Every sequence's lower states, cached one at a time (no padding at all when cached)."""
    states, lengths = [], []
    for sequence in SEQUENCES:
        ids, mask = pad([sequence], PAD_ID, side)
        packed, count = StateCache.pack(*encoder.lower(ids, mask))
        states.append(packed)
        lengths.append(count)
    return StateCache(torch.cat(states), torch.cat(lengths))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("trained", [0, 1, 3])
def test_cached_lower_states_give_the_full_forward(side: str, trained: int) -> None:
    encoder = tiny_encoder(*THREE_LAYERS, f"model.trained_layers={trained}", f"model.padding_side={side}")
    randomise_lora(encoder)
    encoder.train(False)
    cache = cached(encoder, side)
    order = torch.tensor([2, 0, 3, 1])  # another batch than the one each item was cached in
    ids, mask = pad([SEQUENCES[i] for i in order.tolist()], PAD_ID, side)
    full = encoder(ids, mask)
    states, cache_mask = cache.batch(order, side, torch.device("cpu"))
    # With every layer frozen the cache keeps one pooled state per item, else its token states.
    assert torch.equal(cache_mask, torch.ones(4, 1, dtype=torch.long) if trained == 0 else mask)
    from_cache = encoder(None, cache_mask, lower_states=states)
    assert torch.allclose(from_cache, full, atol=1e-5)

    # The item path's trainable weights: the adapters of the top layers and the projection.
    trainable = [p for name, p in encoder.named_parameters() if p.requires_grad and "user_tower" not in name]
    assert len(trainable) == 1 + 2 * 7 * trained  # projection, and A and B of 7 modules a trained layer
    grads_full = torch.autograd.grad(full.square().sum(), trainable)
    grads_cached = torch.autograd.grad(encoder(None, cache_mask, lower_states=states).square().sum(), trainable)
    for a, b in zip(grads_full, grads_cached):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("trained", [0, 1, 2])
def test_only_the_top_layers_carry_adapters(trained: int) -> None:
    encoder = tiny_encoder(*THREE_LAYERS, f"model.trained_layers={trained}")
    adapted = {int(name.split("layers.")[1].split(".")[0]) for name, p in encoder.named_parameters()
               if "lora_" in name and p.requires_grad}
    assert adapted == set(range(3 - trained, 3))
    frozen = [name for name, p in encoder.backbone.named_parameters() if p.requires_grad and "lora_" not in name]
    assert frozen == []


def test_all_layers_is_the_default_and_bad_settings_are_refused() -> None:
    assert load_config(None, []).model.trained_layers == -1
    with pytest.raises(UserError, match=r"^model\.trained_layers: needs model\.user_encoder=items"):
        load_config(None, ["model.trained_layers=1"])
    with pytest.raises(UserError, match=r"^model\.trained_layers: must be"):
        load_config(None, ["model.trained_layers=-2"])
    with pytest.raises(UserError, match=r"^model\.trained_layers: cannot train item tokens"):
        load_config(None, ["model.trained_layers=1", "model.user_encoder=items", "model.item_tokens=true"])
    with pytest.raises(UserError, match=r"^model\.trained_layers: cannot train model\.lora\.modules_to_save"):
        load_config(None, ["model.trained_layers=1", "model.user_encoder=items", "model.lora.modules_to_save=[embed_tokens]"])
    with pytest.raises(UserError, match=r"^model\.trained_layers: 4 is more than the backbone's 3 layers"):
        tiny_encoder(*THREE_LAYERS, "model.trained_layers=4")


def test_a_cached_step_trains_as_the_full_forward_does(tmp_path: Path) -> None:
    from test_engines import CACHED, GLOBAL_BATCH, tiny_config
    from train.data.stream import read_shard
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    runs = {}
    for name in ("cached", "full"):
        # The full forward would compute the item prompts' common leading tokens once (model.shared_prefix,
        # exact, checked in test_unpadded.py); its other rounding then drifts 3e-5 apart in three Adam steps.
        config = load_config(None, [*tiny_config(tmp_path / name, "plain", -1, 1, CACHED), "train.optimizer=adamw",
                                    "model.shared_prefix=false"])
        trainer = Trainer(config, from_environment("cpu"))
        trainer.setup()
        assert trainer.stepper.state_cache is not None and len(trainer.stepper.state_cache) == len(trainer.inputs.catalog)
        if name == "full":
            trainer.stepper.state_cache = None  # items from their tokens through both layers
        samples = list(read_shard(str(Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"])))
        losses = [float(trainer.train_step(trainer.collator(samples[step * GLOBAL_BATCH:][:GLOBAL_BATCH])).loss)
                  for step in range(3)]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[name] = (losses, weights, trainer.evaluate("valid", show_progress=False))
        trainer.close()
    (losses, weights, metrics), (full_losses, full_weights, full_metrics) = runs["cached"], runs["full"]
    assert losses == pytest.approx(full_losses, abs=1e-5) and losses[0] != losses[-1]
    assert any("lora_B" in n for n in weights)
    for n, value in weights.items():
        assert torch.allclose(value, full_weights[n], atol=1e-5), n
    assert metrics["ndcg@10"] == pytest.approx(full_metrics["ndcg@10"], abs=1e-6)


# K = 0 trains no adapter (the frozen backbone, the projection, the tower and here the id table):
# its checkpoints hold none, and a re-evaluation finds the figures training reported.
@pytest.mark.parametrize("trained", [0, 1])
def test_train_then_eval_with_frozen_lower_layers(tmp_path: Path, trained: int) -> None:
    from test_cli import rectrain, write_config

    config = write_config(tmp_path, "run")
    extra = ["model.user_encoder=items", f"model.trained_layers={trained}", "train.max_steps=4",
             f"model.id_embeddings={trained == 0}"]
    done = rectrain("train", str(config), *extra, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    step = tmp_path / "run" / "checkpoints" / "step-4"
    assert (step / "adapter").is_dir() == (trained > 0) and (step / "user_tower.safetensors").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    again = rectrain("eval", str(config), *extra, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["ndcg@10"] == pytest.approx(metrics["ndcg@10"],
                                                                                                   abs=1e-9)
    wrong = rectrain("eval", str(config), "model.user_encoder=items", f"model.trained_layers={1 - trained}",
                     cwd=tmp_path)
    assert wrong.returncode == 2 and "adapter" in wrong.stderr and "Traceback" not in wrong.stderr
    if trained == 1:  # a checkpoint without an id table, asked for one
        missing = rectrain("eval", str(config), *extra[:-1], "model.id_embeddings=true", cwd=tmp_path)
        assert missing.returncode == 2 and "id_embeddings" in missing.stderr and "Traceback" not in missing.stderr


# A LoRA stage started from a frozen stage (model.init_from): its new adapter is zero, so before it
# learns anything it is the frozen stage's model, figure for figure.
def test_a_lora_stage_starts_from_the_frozen_stage(tmp_path: Path) -> None:
    from test_cli import rectrain, write_config

    frozen = ["model.user_encoder=items", "model.trained_layers=0", "model.id_embeddings=true", "train.max_steps=4"]
    done = rectrain("train", str(write_config(tmp_path, "frozen")), *frozen, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lora = ["model.user_encoder=items", "model.trained_layers=1", "model.id_embeddings=true",
            f"model.init_from={tmp_path / 'frozen'}"]
    # One step at a learning rate too small to move a weight: the figures are those of the start.
    started = rectrain("train", str(write_config(tmp_path, "lora")), *lora, "train.max_steps=1", "train.lr=1e-12",
                       cwd=tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]
    assert f"weights from {tmp_path / 'frozen' / 'checkpoints' / 'step-4'}" in started.stderr
    first, second = (flatten_metrics(json.loads((tmp_path / name / "metrics.json").read_text()))
                     for name in ("frozen", "lora"))
    assert second == pytest.approx(first, abs=1e-6)
    assert (tmp_path / "lora" / "checkpoints" / "step-1" / "adapter").is_dir()
    # It learns from there; a checkpoint that does not fit is one line.
    learned = rectrain("train", str(write_config(tmp_path, "lora2")), *lora, "train.max_steps=3", cwd=tmp_path)
    assert learned.returncode == 0, learned.stderr[-3000:]
    assert flatten_metrics(json.loads((tmp_path / "lora2" / "metrics.json").read_text())) != first
    wrong = rectrain("train", str(write_config(tmp_path, "wrong")), *lora[:-1], f"model.init_from={tmp_path / 'nowhere'}",
                     cwd=tmp_path)
    assert wrong.returncode == 2 and "model.init_from" in wrong.stderr and "Traceback" not in wrong.stderr


# model.train_heads=false: the LoRA stage moves the LLM alone; the heads stay as the frozen stage left them.
def test_a_lora_stage_can_train_the_adapters_alone(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from test_cli import rectrain, write_config
    from train.modeling.checkpoint import HEAD_FILE, TOWER_FILE

    frozen = ["model.user_encoder=items", "model.trained_layers=0", "model.id_embeddings=true", "train.max_steps=2"]
    done = rectrain("train", str(write_config(tmp_path, "frozen")), *frozen, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lora = ["model.user_encoder=items", "model.trained_layers=1", "model.id_embeddings=true",
            f"model.init_from={tmp_path / 'frozen'}", "train.max_steps=3"]
    checkpoints = {}
    for name, heads in (("alone", "false"), ("all", "true")):
        run = rectrain("train", str(write_config(tmp_path, name)), *lora, f"model.train_heads={heads}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert ("only the LoRA adapters train" in run.stderr) == (heads == "false")
        checkpoints[name] = tmp_path / name / "checkpoints" / "step-3"
    start = tmp_path / "frozen" / "checkpoints" / "step-2"
    for file in (HEAD_FILE, TOWER_FILE):
        before, alone, both = (load_file(str(c / file)) for c in (start, checkpoints["alone"], checkpoints["all"]))
        assert before.keys() == alone.keys() and all(torch.equal(before[k], alone[k]) for k in before)
        assert any(not torch.equal(before[k], both[k]) for k in before)  # without the switch they move
    adapter = load_file(str(checkpoints["alone"] / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and bool(v.abs().max() > 0) for k, v in adapter.items())  # the adapter learned
    for wrong, said in ((["model.init_from="], "set model.init_from"),
                        (["model.trained_layers=0"], "leaves nothing to train")):
        bad = rectrain("train", str(write_config(tmp_path, "bad")), *lora, "model.train_heads=false", *wrong,
                       cwd=tmp_path)
        assert bad.returncode == 2 and said in bad.stderr and "Traceback" not in bad.stderr
