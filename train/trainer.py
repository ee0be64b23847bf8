"""The training loop: setup / train_step / train / evaluate / save / close.

A step is shaped as embed -> loss on embeddings -> backward, so that gradient caching can
later replace `embed` with chunked, graph-free encoding without touching the rest.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from model.encoder import RecEncoder
from model.objective import Objective
from train import checkpoint, prepare
from train.backbone import build_encoder
from train.collate import Catalog, PromptEncoder
from train.config import Config, save_config
from train.distributed import DistState
from train.evaluate import evaluate, format_table
from train.stream import TrainStream, expand_urls, make_loader
from train.tokenizer import load_or_build

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


class Trainer:
    """Trains one run directory from its config."""

    def __init__(self, config: Config, dist: DistState) -> None:
        self.config = config
        self.dist = dist
        self.run_dir = Path(config.output_dir)
        self.step = 0
        self.batches_consumed = 0
        self.group = None  # the process group of the loss's gather; None = the default group

    # ------------------------------------------------------------------ setup
    def setup_data(self) -> None:
        """Prepare data if needed, then build the catalog, tokenizer and prompt encoder."""
        config = self.config
        if not prepare.is_prepared(config):
            if prepare.read_manifest(config.data.dir) is not None:
                log.info("%s was prepared from other settings: preparing it again", config.data.dir)
            prepare.prepare(config, show_progress=self.dist.is_main)
        manifest = prepare.read_manifest(config.data.dir)
        assert manifest is not None, "prepare wrote no manifest"
        self.manifest = manifest
        data_dir = Path(config.data.dir)
        self.catalog = Catalog(data_dir / "catalog.parquet", config.prompt.item_template)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        corpus = None
        if not config.model.name_or_path:
            corpus = self.catalog.texts(range(len(self.catalog))) + [config.prompt.instruction, config.prompt.user_template]
        self.tokenizer = load_or_build(config.model, self.run_dir / "tokenizer", corpus)
        views = config.loss.augment if config.loss.user_cl_weight > 0 else None
        self.prompts = PromptEncoder(self.catalog, self.tokenizer, config.prompt, config.model.padding_side,
                                     views=views, seed=config.seed)

    def setup_model(self) -> None:
        config = self.config
        self.encoder: RecEncoder = build_encoder(config.model, len(self.tokenizer), self.tokenizer.pad_token_id,
                                                 config.seed).to(self.dist.device)
        lc = config.loss
        self.objective = Objective(lc.kind, lc.temperature, lc.learn_temperature, (lc.temperature_min, lc.temperature_max),
                                   lc.mask_false_negatives, lc.logq, lc.triplet_margin, lc.triplet_negative,
                                   lc.user_cl_weight).to(self.dist.device)

    def setup(self) -> None:
        """Everything before the first step: data, tokenizer, model, optimizer, resume."""
        config = self.config
        torch.manual_seed(config.seed)
        self.setup_data()
        self.setup_model()
        if self.dist.is_main:
            save_config(config, self.run_dir / "config.yaml")
        trainable = [p for p in [*self.encoder.parameters(), *self.objective.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, config.train.warmup_steps, config.train.max_steps)
        resume_from = checkpoint.resolve(config.resume, self.run_dir)
        if resume_from is not None:
            self.load(resume_from)
        urls = expand_urls(config.data.shards) if config.data.shards else \
            [str(Path(config.data.dir) / s["name"]) for s in self.manifest["shards"]]
        stream = TrainStream(urls, rank=self.dist.rank, world_size=self.dist.world_size, batch_size=config.train.batch_size,
                             collate=self.prompts, seed=config.seed, shuffle_buffer_size=config.data.shuffle_buffer,
                             skip_batches=self.batches_consumed)
        self.loader = make_loader(stream, config.data.num_workers)
        n_trainable = sum(p.numel() for p in trainable)
        n_total = sum(p.numel() for p in self.encoder.parameters())
        log.info("model: %s trainable of %s parameters (%.2f%%) on %s", f"{n_trainable:,}", f"{n_total:,}",
                 100 * n_trainable / n_total, self.dist.device)

    # ------------------------------------------------------------------ steps
    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """User, item (and augmented view) embeddings of a batch, with their autograd graphs."""
        out = {"query": self.encoder(batch["user_input_ids"], batch["user_attention_mask"]),
               "item": self.encoder(batch["item_input_ids"], batch["item_attention_mask"])}
        for view in ("view_a", "view_b"):
            if f"{view}_input_ids" in batch:
                out[view] = self.encoder(batch[f"{view}_input_ids"], batch[f"{view}_attention_mask"])
        return out

    def loss(self, embeddings: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        views = (embeddings["view_a"], embeddings["view_b"]) if "view_a" in embeddings else None
        return self.objective(embeddings["query"], embeddings["item"], batch["item_ids"], history_ids=batch["history_ids"],
                              logq=batch["logq"], views=views, group=self.group)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on one batch; returns the loss."""
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        loss = self.loss(self.embed(batch), batch)
        loss.backward()
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batches_consumed += 1
        return float(loss.detach())

    def train(self) -> dict[str, Any]:
        """Run to train.max_steps, logging, evaluating and checkpointing on schedule."""
        config, tc = self.config, self.config.train
        main = self.dist.is_main
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", disable=not main, dynamic_ncols=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        window_start, window_samples, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0, 0.0, 0
        batches = iter(self.loader)
        while self.step < tc.max_steps:
            batch = next(batches)
            loss = self.train_step(batch)
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {self.step}")
            window_samples += len(batch["item_ids"]) * self.dist.world_size
            window_tokens += int(batch["user_attention_mask"].sum() + batch["item_attention_mask"].sum()) * self.dist.world_size
            window_loss += loss
            window_steps += 1
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": self.step, "loss": round(window_loss / window_steps, 6),
                       "lr": self.scheduler.get_last_lr()[0], "temperature": round(float(self.objective.temperature()), 5),
                       "samples_per_s": round(window_samples / elapsed, 2), "tokens_per_s": round(window_tokens / elapsed, 1)}
                if main:
                    with metrics_path.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}")
                window_start, window_samples, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0, 0.0, 0
            bar.update(1)
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                valid = self.evaluate("valid", show_progress=False)
                if main:
                    with metrics_path.open("a") as handle:
                        handle.write(json.dumps({"step": self.step, **{f"valid/{k}": v for k, v in valid.items()
                                                                       if k != "popularity"}}) + "\n")
            if tc.save_every and self.step % tc.save_every == 0 and self.step < tc.max_steps:
                self.save()
        bar.close()
        self.save()
        metrics = self.evaluate(config.eval.split)
        if main:
            write_json_atomic(self.run_dir / "metrics.json", metrics)
            print(format_table(metrics, config.eval.k), flush=True)
        return metrics

    # ------------------------------------------------------------------ evaluation, state
    def evaluate(self, split: str | None = None, show_progress: bool = True) -> dict[str, Any]:
        return evaluate(self.encoder, self.prompts, self.config, self.dist.device, split,
                        show_progress and self.dist.is_main)

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "batches_consumed": self.batches_consumed, "objective": self.objective.state_dict(),
                "objective_calls": self.objective.calls, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state()}

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = checkpoint.save(self.run_dir, self.step, self.encoder, self.state(), self.config.train.keep_last)
        log.info("saved %s", path)
        return path

    def load(self, path: Path) -> None:
        checkpoint.load_weights(path, self.encoder)
        state = checkpoint.load_state(path)
        self.objective.load_state_dict(state["objective"])
        self.objective.calls = state["objective_calls"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        log.info("resumed from %s at step %d", path, self.step)

    def close(self) -> None:
        self.loader = None  # type: ignore[assignment]
