"""Gradient caching (train.grad_cache_chunk) gives the gradients of the one-graph step, under every
engine, at 1 and 2 gloo ranks, for both user encoders.

One SGD step at lr 1 from the same weights: the weights move by exactly minus the gradient, so
comparing the moves compares the gradients (each engine's reduction included).
- Dropout off: chunks of 2 and 4 against the unchunked step.
- Dropout on (LoRA's, the backbone's attention, the user tower's): against the one-graph step
  over the same chunks, the computation caching must reproduce. Dropout masks depend on how
  rows are split into calls, so no chunked step can equal the unchunked one there; the replay
  must draw exactly the masks of its graph-free pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from multiproc import run_ranks
from test_engines import ITEMS, tiny_config
from train.loop.cached_step import CachedStep

CHUNKS = (2, 4)
ENGINES = [("ddp", -1), ("accelerate", -1), ("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3)]
ONE_STEP = ("train.lr=1.0", "train.max_steps=1", "loss.temperature=0.2")
# The items encoder with a second item batch source: the whole catalog as candidates (and the
# repeat score, a parameter the loss reads outside the encoder's forward). The uncached test adds
# model.id_dropout: a replayed chunk must leave out the step's own draw.
CATALOG_ITEMS = (*ITEMS, "loss.negatives=catalog", "model.id_embeddings=true", "model.repeat_score=true")
DROPOUT_TEXT = ("model.lora.dropout=0.3", ("model.architecture={hidden_size: 32, intermediate_size: 64, "
                                          "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, "
                                          "attention_dropout: 0.3}"))
DROPOUT_ITEMS = (*ITEMS[:1], "model.user_tower_dropout=0.3", "model.lora.dropout=0.3",
                 ("model.user_tower={model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
                  "num_attention_heads: 2, num_key_value_heads: 2, attention_dropout: 0.3}"))
GLOBAL_BATCH = 8


def one_graph_step(stepper: CachedStep, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference for dropout on: the cached step's chunks, each encoded with its graph, one loss,
    one backward."""
    from model.loss import candidate_columns, distinct_items
    from model.user_tower import sequence_inputs
    from train.loop.cached_step import Chunked
    from train.loop.step import SequenceEmbeddings, TextEmbeddings

    def with_graph(chunked: Chunked) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat(parts) for parts in zip(*(chunked.run(rows) for rows in chunked.slices)))

    engine, chunk, device = stepper.engine, stepper.chunk, stepper.device
    if stepper.items_mode:
        ids = stepper.local_item_ids(batch)
        (local,) = with_graph(Chunked(lambda rows: stepper.encode_items(batch, ids, rows), len(ids), chunk, device,
                                      stepper.agreed_chunks(len(ids))))
        candidates, candidate_ids, first = distinct_items(local, ids)
        sequence, mask, next_ids = sequence_inputs(batch["history_ids"], batch["item_ids"])
        columns = candidate_columns(sequence, candidate_ids, first)
        inputs = candidates[columns]
        (states,) = with_graph(Chunked(lambda rows: engine.forward(None, mask[rows], every_position=True, user=True,
                                                                   item_sequence=inputs[rows])[1],
                                       len(sequence), chunk, device))
        known = next_ids >= 0
        embeddings = SequenceEmbeddings(states[known], candidate_columns(next_ids[known], candidate_ids, first),
                                        candidates, first, stepper.seen(columns, mask, known))
    else:
        def prompts(prefix: str, user: bool) -> tuple[torch.Tensor, ...]:
            ids, mask = batch[f"{prefix}_input_ids"], batch[f"{prefix}_attention_mask"]
            return with_graph(Chunked(lambda rows: engine.forward(ids[rows], mask[rows], user=user), len(ids), chunk,
                                      device))
        embeddings = TextEmbeddings(prompts("user", True)[0], prompts("item", False)[0])
    loss = stepper.loss(embeddings, batch)
    engine.backward(loss)
    return loss


def gradients(rank: int, world_size: int, tmp: str, engines: list[tuple[str, int]], settings: list[tuple[str, ...]],
              extra: tuple[str, ...], one_graph: bool = False) -> dict:
    """{(engine, settings): (loss, minus the gradient of each trainable parameter)} after one step."""
    from train.config.io import load_config
    from train.data.stream import read_shard
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    out = {}
    for engine, stage in engines:
        for setting in settings:
            config = load_config(None, tiny_config(Path(tmp), engine, stage, world_size, (*ONE_STEP, *extra, *setting)))
            trainer = Trainer(config, from_environment("cpu"))
            trainer.setup()
            if one_graph:
                trainer.stepper.forward_backward = lambda batch, s=trainer.stepper: one_graph_step(s, batch)
            reductions = [0]  # the engine's gradient reductions: once per step, not per chunk
            if isinstance(trainer.engine.wrapped, torch.nn.parallel.DistributedDataParallel):  # DDP, Accelerate's
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
                    allreduce_hook,
                )

                def counted(state, bucket, count=reductions):
                    count[0] += 1
                    return allreduce_hook(state, bucket)
                trainer.engine.wrapped.register_comm_hook(None, counted)
            if engine == "deepspeed":  # a spy on the reduction pass of the stage: the real method runs
                owner, name = {0: (trainer.engine.engine, "allreduce_gradients"),
                               2: (trainer.engine.optimizer, "reduce_ipg_grads"),
                               3: (trainer.engine.optimizer, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads")}[stage]
                real = getattr(owner, name)

                def spied(*args, real=real, count=reductions, **kwargs):
                    count[0] += 1
                    return real(*args, **kwargs)
                setattr(owner, name, spied)
            shard = Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
            samples = list(read_shard(str(shard)))[:GLOBAL_BATCH]
            per_rank = GLOBAL_BATCH // world_size
            # Each rank collates its own rows, as its loader would (the items encoder's distinct
            # items cannot be sliced from a global batch by row).
            local = trainer.collator(samples[rank * per_rank:(rank + 1) * per_rank])
            with trainer.engine.full_weights():
                before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
            loss = trainer.train_step(local).loss
            if world_size > 1:
                torch.distributed.all_reduce(loss)
            with trainer.engine.full_weights():
                moved = {name: p.detach() - before[name] for name, p in trainer.model.named_parameters()
                         if p.requires_grad}
            out[(f"{engine}{stage}", setting)] = (float(loss) / world_size, moved, reductions[0])
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return tmp_path_factory.mktemp("grad_cache")


def assert_same(result: tuple[float, dict, int], reference: tuple[float, dict, int], what: object) -> None:
    loss, moved, reductions = result
    ref_loss, ref_moved, ref_reductions = reference
    assert reductions == ref_reductions, (what, "gradient reductions", reductions, ref_reductions)
    assert loss == pytest.approx(ref_loss, abs=1e-5), what
    assert set(moved) == set(ref_moved), what
    assert any(float(g.abs().max()) > 1e-3 for g in ref_moved.values()), "the step must move the weights"
    for name, ref in ref_moved.items():
        assert torch.allclose(moved[name], ref, atol=1e-5), (what, name, float((moved[name] - ref).abs().max()))


CACHED = [(f"train.grad_cache_chunk={chunk}",) for chunk in CHUNKS]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("extra", [(), ITEMS, (*CATALOG_ITEMS, "model.id_dropout=0.3")],
                         ids=["text", "items", "items-catalog"])
def test_cached_gradients_equal_uncached(workdir: Path, world_size: int, extra: tuple[str, ...]) -> None:
    engines = [("plain", -1)] if world_size == 1 else ENGINES
    settings = [(), *CACHED]
    results = run_ranks(gradients, world_size, str(workdir), engines, settings, extra, timeout=900)
    for engine, stage in engines:
        key = f"{engine}{stage}"
        assert (results[0][(key, ())][2] >= 1) == (engine != "plain"), "the engine's reductions are counted"
        for setting in CACHED:
            assert_same(results[0][(key, setting)], results[0][(key, ())], (key, setting))
            if world_size > 1:  # both ranks hold the same gradient
                assert_same(results[1][(key, setting)], results[0][(key, setting)], (key, setting, "rank 1"))


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_catalog_table_caches(workdir: Path, world_size: int) -> None:
    """loss.catalog_table: the batch's items are chunked and replayed, the rest of the catalog read
    from the table; the gradient is the uncached step's."""
    engines = [("plain", -1)] if world_size == 1 else [("ddp", -1), ("deepspeed", 3)]
    results = run_ranks(gradients, world_size, str(workdir), engines, [(), *CACHED],
                        (*CATALOG_ITEMS, "loss.catalog_table=true"), timeout=900)
    for engine, stage in engines:
        key = f"{engine}{stage}"
        for setting in CACHED:
            assert_same(results[0][(key, setting)], results[0][(key, ())], (key, setting))
            if world_size > 1:
                assert_same(results[1][(key, setting)], results[0][(key, setting)], (key, setting, "rank 1"))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("extra", [DROPOUT_TEXT, DROPOUT_ITEMS], ids=["text", "items"])
def test_dropout_replays_identically(workdir: Path, world_size: int, extra: tuple[str, ...]) -> None:
    engines = [("plain", -1)] if world_size == 1 else [("ddp", -1), ("deepspeed", 3)]
    cached = run_ranks(gradients, world_size, str(workdir), engines, CACHED, extra, timeout=900)
    one_graph = run_ranks(gradients, world_size, str(workdir), engines, CACHED, extra, True, timeout=900)
    for engine, stage in engines:
        for setting in CACHED:
            key = (f"{engine}{stage}", setting)
            assert_same(cached[0][key], one_graph[0][key], key)
    # Dropout is on: chunking changes the masks, so the two chunk sizes' gradients differ.
    first, second = (cached[0][(f"{engines[0][0]}{engines[0][1]}", s)][1] for s in CACHED)
    assert any(not torch.allclose(first[n], second[n], atol=1e-4) for n in first)


# Every loss of the family and every extra term, users as prompts.
LOSSES = [("loss.kind=symmetric",), ("loss.kind=pairwise",),
          ("loss.kind=triplet", "loss.triplet_negative=random", "loss.learn_temperature=false"),
          ("loss.negatives=batch+catalog",), ("loss.history_negatives=2", "loss.mask_history=false", "loss.logq=true"),
          ("loss.user_cl_weight=0.5",), ("loss.uniformity=0.1",),
          ("model.item_tokens=true", "loss.history_positions=0.5", "loss.negatives=catalog")]


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_loss_caches(workdir: Path, world_size: int) -> None:
    engines = [("plain", -1)] if world_size == 1 else [("ddp", -1)]
    settings = [s for loss in LOSSES for s in (loss, (*loss, "train.grad_cache_chunk=3"))]
    results = run_ranks(gradients, world_size, str(workdir), engines, settings, (), timeout=900)
    key = f"{engines[0][0]}{engines[0][1]}"
    for loss in LOSSES:
        assert_same(results[0][(key, (*loss, "train.grad_cache_chunk=3"))], results[0][(key, loss)], loss)


def test_accumulation_asked_by_a_launcher_is_overridden(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """accelerate launch's --gradient_accumulation_steps and a DeepSpeed JSON's
    gradient_accumulation_steps would shrink the negatives (and Accelerate would divide the loss
    by it): both are overridden to 1, with a warning, and the gradients stay the plain step's."""
    import json

    from train.config.io import load_config
    from train.distributed import from_environment
    from train.loop.engines import DeepSpeedEngine

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    setting = ("train.grad_cache_chunk=2", f"deepspeed.config={ds_json}")
    config = load_config(None, tiny_config(workdir, "deepspeed", 2, 1, setting))
    assert DeepSpeedEngine(config, from_environment("cpu", {})).ds_config()["gradient_accumulation_steps"] == 1
    assert "gradient_accumulation_steps=4 is ignored" in caplog.text
    assert from_environment("cpu", {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}).accumulation == 4

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # what accelerate launch sets
    engines = [("plain", -1), ("accelerate", -1), ("deepspeed", 2)]
    (results,) = run_ranks(gradients, 1, str(workdir), engines, [setting], (), timeout=600)
    for engine in ("accelerate-1", "deepspeed2"):
        loss, moved, _ = results[(engine, setting)]
        ref_loss, ref_moved, _ = results[("plain-1", setting)]
        assert loss == pytest.approx(ref_loss, abs=1e-5), engine
        assert all(torch.allclose(moved[n], ref_moved[n], atol=1e-5) for n in ref_moved), engine
