"""The training loop: setup / train_step / train / evaluate / save / close.

A step is shaped as embed -> loss on embeddings -> backward, so that gradient caching can
later replace `embed` with chunked, graph-free encoding without touching the rest. The engine
(plain, DDP, Accelerate, DeepSpeed) only wraps encoding, backward and the optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
import typing
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.loss import candidate_columns, distinct_items, next_item_positions
from model.objective import Objective
from model.user_tower import sequence_inputs
from train import checkpoint, prepare
from train.backbone import build_encoder
from train.collate import Catalog, PromptEncoder, item_token
from train.config import Config
from train.config_io import save_config
from train.distributed import DistState
from train.engines import Engine, RecModel, choose, init_process_group
from train.evaluate import baseline_of, encode_sharded, eval_mode, evaluate, format_table, training_transitions
from train.stream import TrainStream, expand_urls, make_loader
from train.tokenizer import load_or_build
from train.transitions import Transitions

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`with_history/ndcg@10`-style keys for the nested metric blocks (popularity and the split name left out)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            if key != "popularity":
                flat.update(flatten_metrics(value, f"{prefix}{key}/"))
        elif key != "split":
            flat[f"{prefix}{key}"] = value
    return flat


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Trainer:
    """Trains one run directory from its config."""

    def __init__(self, config: Config, dist_state: DistState) -> None:
        self.config = config
        self.dist = dist_state
        self.run_dir = Path(config.output_dir)
        self.step = 0
        self.batches_consumed = 0
        # Every item's embedding (no grad) for catalog negatives and history positions.
        self.catalog_embeddings: torch.Tensor | None = None
        self.transitions: Transitions | None = None  # counted at the first evaluation, kept for the later ones
        # Popularity's metrics by split: the model changes between validations, the baseline does not
        # (and at catalog scale it costs as much to rank as the model).
        self.baselines: dict[str, dict[str, Any]] = {}
        self.catalog_tokens: list[list[int]] | None = None
        self.stop_signal: int | None = None
        self.previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ setup
    def setup_data(self) -> None:
        """Prepare data if needed (rank 0; the others wait), then catalog, tokenizer and prompts."""
        config = self.config
        if self.dist.is_main:
            prepare.ensure_prepared(config)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        manifest = prepare.read_manifest(config.data.dir)
        assert manifest is not None, "prepare wrote no manifest"
        self.manifest = manifest
        self.catalog = Catalog(Path(config.data.dir) / "catalog.parquet", config.prompt.item_template,
                               config.prompt.history_item_template, config.model.item_tokens)
        item_tokens = [item_token(i) for i in range(len(self.catalog))] if config.model.item_tokens else []
        corpus = None
        if not config.model.name_or_path and self.dist.is_main:
            corpus = self.catalog.texts(range(len(self.catalog))) + [config.prompt.instruction, config.prompt.user_template]
            load_or_build(config.model, self.run_dir / "tokenizer", corpus, item_tokens)
        barrier()
        self.tokenizer = load_or_build(config.model, self.run_dir / "tokenizer", corpus, item_tokens)
        self.item_token_ids: list[int] = [typing.cast(int, self.tokenizer.convert_tokens_to_ids(t)) for t in item_tokens]
        # token id -> catalog index (-1 for every other token), for the history-positions loss
        self.token_items = torch.full((len(self.tokenizer),), -1, dtype=torch.long)
        if self.item_token_ids:
            self.token_items[torch.tensor(self.item_token_ids)] = torch.arange(len(self.item_token_ids))
        self.token_items = self.token_items.to(self.dist.device)
        views = config.loss.augment if config.loss.user_cl_weight > 0 else None
        self.prompts = PromptEncoder(self.catalog, self.tokenizer, config.prompt, config.model.padding_side,
                                     views=views, seed=config.seed, history_negatives=config.loss.history_negatives,
                                     item_sequences=config.model.user_encoder == "items")

    def setup_model(self) -> None:
        """Encoder (same initial weights on every rank) and objective, as one RecModel."""
        config, lc = self.config, self.config.loss
        encoder = build_encoder(config.model, len(self.tokenizer), self.tokenizer.pad_token_id, config.seed,
                                self.item_token_ids)
        objective = Objective(lc.kind, lc.temperature, lc.learn_temperature, (lc.temperature_min, lc.temperature_max),
                              lc.mask_false_negatives, lc.logq, lc.triplet_margin, lc.triplet_negative, lc.user_cl_weight,
                              lc.negatives, lc.history_positions, lc.mask_history, lc.uniformity)
        self.model = RecModel(encoder, objective).to(self.dist.device)
        self.encoder = self.model.encoder

    def setup(self) -> None:
        """Everything before the first step: process group, data, model, engine, resume, loader."""
        config = self.config
        # From here on a stop signal is remembered and honoured at the next step boundary, so a
        # preemption warning that arrives during setup still ends in a checkpoint, not a kill.
        self.previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        init_process_group(self.dist, config.train.collective_timeout)
        engine_class = choose(config, self.dist)
        self.setup_data()
        self.setup_model()
        self.engine: Engine = engine_class(config, self.dist)
        self.engine.build(self.model)
        # Per-rank randomness (LoRA dropout) after identical initialisation.
        torch.manual_seed(config.seed * 1000 + self.dist.rank)
        if self.dist.is_main:
            save_config(config, self.run_dir / "config.yaml")
        resume_from = checkpoint.resolve(config.resume, self.run_dir)
        if resume_from is not None:
            self.load(resume_from)
        urls = expand_urls(config.data.shards) if config.data.shards else \
            [str(Path(config.data.dir) / s["name"]) for s in self.manifest["shards"]]
        stream = TrainStream(urls, rank=self.dist.rank, world_size=self.dist.world_size, batch_size=config.train.batch_size,
                             collate=self.prompts, seed=config.seed, shuffle_buffer_size=config.data.shuffle_buffer,
                             skip_batches=self.batches_consumed)
        self.loader = make_loader(stream, config.data.num_workers)
        # ZeRO-3 leaves each rank a partition; ds_numel is the whole parameter's size.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.trainable(self.model))
        total = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        log.info("engine %s, %d rank(s), launcher %s; %s trainable of %s parameters (%.2f%%) on %s", self.engine.name,
                 self.dist.world_size, self.dist.launcher, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 self.dist.device)

    # ------------------------------------------------------------------ steps
    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """User, item (and augmented view) embeddings of a batch, with their autograd graphs."""
        if "batch_item_ids" in batch:
            return self.embed_item_sequences(batch)
        if self.model.objective.history_positions > 0:
            out = dict(zip(("query", "states"), self.engine.encode(batch["user_input_ids"], batch["user_attention_mask"],
                                                                   every_position=True, user=True)))
        else:
            out = {"query": self.engine.encode(batch["user_input_ids"], batch["user_attention_mask"], user=True)}
        out["item"] = self.engine.encode(batch["item_input_ids"], batch["item_attention_mask"])
        for view in ("view_a", "view_b"):
            if f"{view}_input_ids" in batch:
                out[view] = self.engine.encode(batch[f"{view}_input_ids"], batch[f"{view}_attention_mask"], user=True)
        return out

    def embed_item_sequences(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """model.user_encoder=items: each distinct item of the batch embedded once, gathered from
        every rank; users are the user tower over their items' rows of that gathered matrix, so a
        history item's gradient reaches its one encoding wherever it was encoded."""
        local = self.engine.encode(batch["item_input_ids"], batch["item_attention_mask"])
        candidates, candidate_ids, first = distinct_items(local, batch["batch_item_ids"])
        sequence, mask, next_ids = sequence_inputs(batch["history_ids"], batch["item_ids"])
        inputs = candidates[candidate_columns(sequence, candidate_ids, first)]
        _, states = self.engine.encode(None, mask, every_position=True, user=True, item_sequence=inputs)
        known = next_ids >= 0
        return {"states": states[known], "next_columns": candidate_columns(next_ids[known], candidate_ids, first),
                "candidates": candidates, "first": first}

    def loss(self, embeddings: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "next_columns" in embeddings:
            return self.model.objective.next_item(embeddings["states"], embeddings["next_columns"],
                                                  embeddings["candidates"], embeddings["first"])
        views = (embeddings["view_a"], embeddings["view_b"]) if "view_a" in embeddings else None
        positions = None
        if "states" in embeddings:
            positions = (embeddings["states"], *next_item_positions(batch["user_input_ids"], batch["user_attention_mask"],
                                                                     self.token_items, batch["item_ids"]))
        negatives = (batch["negative_ids"], batch["negative_logq"]) if "negative_ids" in batch else None
        return self.model.objective(embeddings["query"], embeddings["item"], batch["item_ids"],
                                    history_ids=batch["history_ids"], logq=batch["logq"], views=views,
                                    catalog=self.catalog_embeddings, positions=positions, negatives=negatives)

    def refresh_catalog(self) -> None:
        """Re-encode every item (no grad, sharded over ranks) for a softmax over the whole catalog.

        Between refreshes the catalog is up to catalog_refresh_every steps stale (model/loss.py's
        catalog_loss says why the positive is stale too)."""
        stale = self.catalog_embeddings is None or self.step % self.config.loss.catalog_refresh_every == 0
        if not self.model.objective.needs_catalog or not stale:
            return
        with eval_mode(self.encoder):
            self.catalog_embeddings = encode_sharded(self.encoder, self.prompts, self.item_token_lists(),
                                                     self.config.eval.batch_size, self.dist.device, "encode catalog",
                                                     False).to(self.dist.device)

    def item_token_lists(self) -> list[list[int]]:
        """Every catalog item's prompt tokens, tokenised once per run (refreshes and validations reuse them)."""
        if self.catalog_tokens is None:
            self.catalog_tokens = self.prompts.item_tokens(range(len(self.catalog)))
        return self.catalog_tokens

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on this rank's part of the global batch; returns the local loss."""
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        self.refresh_catalog()
        loss = self.loss(self.embed(batch), batch)
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        self.batches_consumed += 1
        return float(loss.detach())

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank was signalled: all ranks must stop at the same step to checkpoint together."""
        flag = torch.tensor([1 if self.stop_signal else 0], device=self.dist.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> dict[str, Any] | None:
        """Run to train.max_steps, logging, evaluating and checkpointing on schedule.

        SIGTERM or SIGUSR1 (a scheduler's preemption warning) finishes the current step, saves
        a checkpoint and returns None; `resume: auto` continues from it."""
        config, tc = self.config, self.config.train
        main = self.dist.is_main
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", disable=not main, dynamic_ncols=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        window: dict[str, float] = {"start": time.perf_counter(), "samples": 0, "tokens": 0, "loss": 0.0, "steps": 0}
        batches = iter(self.loader)
        try:
            while self.step < tc.max_steps:
                if self._stop_requested():
                    name = signal.Signals(self.stop_signal).name if self.stop_signal else "another rank's signal"
                    self.save()
                    log.warning("stopped at step %d by %s; checkpoint saved, resume=auto continues", self.step, name)
                    return None
                batch = next(batches)
                loss = self.train_step(batch)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss} at step {self.step}")
                window["samples"] += len(batch["item_ids"]) * self.dist.world_size
                window["tokens"] += sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask")) \
                    * self.dist.world_size
                window["loss"] += loss
                window["steps"] += 1
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self._log(window, metrics_path, bar)
                    window = {"start": time.perf_counter(), "samples": 0, "tokens": 0, "loss": 0.0, "steps": 0}
                bar.update(1)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                    self.validate()
                elif tc.save_every and self.step % tc.save_every == 0 and self.step < tc.max_steps:
                    self.save()
        finally:
            bar.close()
        if tc.eval_every:
            self.validate()
        else:
            self.save()
        best = checkpoint.read_best(self.run_dir)
        if config.eval.use_best and best is not None and best["checkpoint"] != f"step-{self.step}":
            self.load_weights(self.run_dir / "checkpoints" / best["checkpoint"])
            log.info("final evaluation of the best checkpoint, %s (valid %s %.4f)", best["checkpoint"], best["metric"],
                     best["value"])
        metrics = self.evaluate(config.eval.split)
        if best is not None:
            metrics["checkpoint"] = best["checkpoint"] if config.eval.use_best else f"step-{self.step}"
        if main:
            write_json_atomic(self.run_dir / "metrics.json", metrics)
            print(format_table(metrics, config.eval.k), flush=True)
        return metrics

    def validate(self) -> dict[str, Any]:
        """Validation metrics, logged to metrics.jsonl; checkpoints this step and names it the best
        when eval.best_metric improved."""
        valid = self.evaluate("valid", show_progress=False)
        flat = flatten_metrics(valid)
        metric = self.config.eval.best_metric
        if self.dist.is_main:
            with (self.run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": self.step, **{f"valid/{k}": v for k, v in flat.items()}}) + "\n")
        self.save()
        best = checkpoint.read_best(self.run_dir)
        if best is None or flat[metric] > best["value"]:
            if self.dist.is_main:
                checkpoint.write_best(self.run_dir, self.step, metric, flat[metric])
                checkpoint.prune(self.run_dir, self.config.train.keep_last)  # the previous best may go now
            log.info("step %d: valid %s %.4f, the best so far", self.step, metric, flat[metric])
        barrier()
        return valid

    def load_weights(self, path: Path) -> None:
        """Only the trained weights of checkpoint `path` (the best one, for the final evaluation)."""
        if self.engine.weights_in_engine_state:
            self.engine.load_state(path, {})
        else:
            checkpoint.load_weights(path, self.encoder)
            self.model.objective.load_state_dict(checkpoint.load_state(path)["objective"])

    def _log(self, window: dict[str, float], path: Path, bar: tqdm) -> None:
        """One row of metrics.jsonl. The loss is this rank's mean over the window (rank 0 writes)."""
        elapsed = time.perf_counter() - window["start"]
        row = {"step": self.step, "loss": round(window["loss"] / window["steps"], 6), "lr": self.engine.lr(),
               "temperature": round(float(self.model.objective.temperature()), 5),
               "samples_per_s": round(window["samples"] / elapsed, 2), "tokens_per_s": round(window["tokens"] / elapsed, 1)}
        if self.dist.is_main:
            with path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}")

    # ------------------------------------------------------------------ evaluation, state
    def evaluate(self, split: str | None = None, show_progress: bool = True) -> dict[str, Any]:
        """Full-catalog metrics; every rank computes them (ZeRO-3 needs all ranks in the forward)."""
        if self.config.eval.transitions.weight > 0 and self.transitions is None:
            self.transitions = training_transitions(self.config, len(self.prompts.catalog))
        split = split or self.config.eval.split
        metrics = evaluate(self.encoder, self.prompts, self.config, self.dist.device, split,
                           show_progress and self.dist.is_main, self.item_token_lists(), self.transitions,
                           self.baselines.get(split))
        self.baselines[split] = baseline_of(metrics)
        return metrics

    def state(self) -> dict[str, Any]:
        rng = checkpoint.rng_state()
        ranks_rng = [rng] * self.dist.world_size
        if dist.is_initialized():
            dist.all_gather_object(ranks_rng, rng)
        return {"step": self.step, "batches_consumed": self.batches_consumed, "rng": ranks_rng,
                "objective": self.model.objective.state_dict(), "objective_calls": self.model.objective.calls,
                # The stale negatives in use, so that a resumed run takes exactly the same steps.
                "catalog_embeddings": None if self.catalog_embeddings is None else self.catalog_embeddings.cpu()}

    def save(self) -> Path:
        """Checkpoint the current step on every rank's behalf; returns its final path."""
        staging = checkpoint.staging(self.run_dir, self.step)
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        state = self.state()
        state["engine"] = self.engine.save_state(staging)
        with self.engine.full_weights():
            if self.dist.is_main:
                checkpoint.write(staging, self.encoder, state)
        barrier()
        final = self.run_dir / "checkpoints" / f"step-{self.step}"
        if self.dist.is_main:
            checkpoint.publish(self.run_dir, self.step, self.config.train.keep_last)
            log.info("saved %s", final)
        barrier()
        return final

    def load(self, path: Path) -> None:
        state = checkpoint.load_state(path)
        if not self.engine.weights_in_engine_state:
            checkpoint.load_weights(path, self.encoder)
            self.model.objective.load_state_dict(state["objective"])
        self.engine.load_state(path, state["engine"])
        self.model.objective.calls = state["objective_calls"]
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        if state.get("catalog_embeddings") is not None:
            self.catalog_embeddings = state["catalog_embeddings"].to(self.dist.device)
        log.info("resumed from %s at step %d", path, self.step)

    def close(self) -> None:
        self.loader = None  # type: ignore[assignment]
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
