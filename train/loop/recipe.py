"""The training recipe: setup / train_step / train / validate / evaluate / save / load / close.

`train` reads as its loop: next batch -> step -> guard -> meter -> validation or checkpoint
when due. The step (train/loop/step.py) embeds, takes the loss and steps the engine; the
engine (plain, DDP, Accelerate, DeepSpeed) wraps the forward, backward and optimizer step; the
Evaluator keeps evaluation's caches; each recurring job says itself when it is due.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from train.config.io import other_run, save_config, to_dict
from train.config.schema import Config
from train.data.layout import Layout
from train.data.stream import TrainStream, expand_urls, make_loader
from train.distributed import DistState, barrier, close_process_group, init_process_group
from train.errors import UserError
from train.evaluation.evaluate import Evaluator
from train.evaluation.report import flatten_metrics, format_table, write_json_atomic
from train.loop.engines import Engine, choose
from train.loop.flops import StepFlops, device_peak
from train.loop.guards import BadSteps, StopGuard
from train.loop.meter import Meter
from train.loop.reporters import make_reporters
from train.loop.schedule import Every
from train.loop.cached_step import CachedStep
from train.loop.step import StepResult, TrainStep
from train.modeling import checkpoint
from train.modeling.build import build_model, load_inputs

log = logging.getLogger(__name__)


class Trainer:
    """Trains one run directory from its config."""

    def __init__(self, config: Config, dist_state: DistState) -> None:
        self.config = config
        self.dist = dist_state
        self.run_dir = Path(config.output_dir)
        self.step = 0
        self.batches_consumed = 0
        self.shuffle = "block"  # the stream's shuffle; a checkpoint from before blocks says reservoir
        self.guard = StopGuard()
        tc = config.train
        self.validation = Every(tc.eval_every, tc.max_steps)
        self.checkpointing = Every(tc.save_every, tc.max_steps)
        self.logging = Every(tc.log_every, tc.max_steps, at_last=True)
        self.meter = Meter(self.run_dir / "metrics.jsonl", dist_state.is_main)
        self.bad_steps = BadSteps(config.train.max_bad_steps)

    # ------------------------------------------------------------------ setup
    def setup_data(self) -> None:
        """Prepared data, catalog, tokenizer and collator (train/modeling/build.py), and the Evaluator."""
        self.inputs = load_inputs(self.config, self.dist)
        self.collator = self.inputs.collator
        self.evaluator = Evaluator(self.config, self.collator, self.dist.device, self.dist.is_main)

    def claim_run_dir(self) -> None:
        """Save this run's config in output_dir, unless the directory holds another run's: then
        stop (every rank, before any of them writes), or with overwrite: true clear it first."""
        saved = self.run_dir / "config.yaml"
        changed = other_run(saved, self.config) if saved.is_file() else []
        if changed and not self.config.overwrite:
            shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise UserError(f"output_dir: {self.run_dir} holds another run ({shown}); set overwrite=true to replace "
                            "it, or choose another output_dir")
        if self.dist.is_main:
            if changed:
                log.warning("overwrite: clearing %s, which held another run (%s)", self.run_dir, changed[0])
                shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
                for name in ("metrics.jsonl", "metrics.json"):
                    (self.run_dir / name).unlink(missing_ok=True)
            save_config(self.config, saved)
        barrier()

    def setup_model(self) -> None:
        """Encoder (same initial weights on every rank) and objective, as one RecModel."""
        self.model = build_model(self.config, self.inputs, self.dist.device)
        self.encoder = self.model.encoder
        if self.config.model.init_from:  # a resumed run then replaces these with its checkpoint's
            start = checkpoint.initial(Path(self.config.model.init_from))
            checkpoint.load_weights(start, self.encoder, start=True)
            log.info("weights from %s (model.init_from)", start)
        if not self.config.model.train_heads:
            for head in self.encoder.heads():
                head.requires_grad_(False)
            log.info("only the LoRA adapters train (model.train_heads=false)")
        if self.config.train.compile:
            # In place (nn.Module.compile): parameter names, and so checkpoints, stay as they are.
            # Dynamic shapes: every batch has its own length, which must not recompile.
            self.encoder.backbone.compile(dynamic=True)

    def setup(self) -> None:
        """Everything before the first step: process group, data, model, engine, resume, loader."""
        config = self.config
        init_process_group(self.dist, config.train.collective_timeout)
        # After joining the group: a launcher's SIGTERM while a rank waits for its peers (torchrun
        # tearing down a failed rendezvous) must end the process, not be kept for a step boundary.
        self.guard.install()
        engine_class = choose(config, self.dist)
        self.setup_data()
        self.setup_model()
        self.engine: Engine = engine_class(config, self.dist)
        self.engine.build(self.model)
        step_class = CachedStep if config.train.grad_cache_chunk else TrainStep
        self.stepper = step_class(config, self.model, self.engine, self.collator, self.inputs.token_items,
                               self.dist.device, self.dist.world_size, self.evaluator.catalog_tokens,
                               self.evaluator.state_cache(self.encoder))
        self.stepper.stop_signal = self.guard.signalled
        # Per-rank randomness (LoRA dropout) after identical initialisation.
        torch.manual_seed(config.seed * 1000 + self.dist.rank)
        self.claim_run_dir()
        resume_from = checkpoint.resolve(config.resume, self.run_dir)
        if resume_from is not None:
            self.load(resume_from)
        prepared = Layout(Path(config.data.dir)).shard_urls(self.inputs.manifest)
        urls = expand_urls(config.data.shards) if config.data.shards else prepared
        shard_samples = {url: shard["samples"] for url, shard in zip(prepared, self.inputs.manifest["shards"])}
        stream = TrainStream(urls, rank=self.dist.rank, world_size=self.dist.world_size, batch_size=config.train.batch_size,
                             collate=self.collator, seed=config.seed, shuffle_buffer_size=config.data.shuffle_buffer,
                             skip_batches=self.batches_consumed, on_bad_shard=config.data.on_bad_shard,
                             shard_samples=shard_samples, shuffle=self.shuffle)
        self.loader = make_loader(stream, config.data.num_workers)
        # ZeRO-3 leaves each rank a partition; ds_numel is the whole parameter's size.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.trainable(self.model))
        total = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        log.info("engine %s, %d rank(s), launcher %s; %s trainable of %s parameters (%.2f%%) on %s", self.engine.name,
                 self.dist.world_size, self.dist.launcher, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                 self.dist.device)
        self.setup_meter()

    def setup_meter(self) -> None:
        """What the meter needs beyond the steps: the backbone's FLOPs a token, the device's peak,
        and (main rank) the train.report_to reporters."""
        config, backbone = self.config, self.encoder.backbone
        layers = int(getattr(backbone.config, "num_hidden_layers"))
        run = layers if config.model.trained_layers < 0 else config.model.trained_layers
        trained = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters() if p.requires_grad)
        self.meter.flops = StepFlops(backbone.config, run, trained)
        self.meter.peak, source = device_peak(self.dist.device, config.train.precision)
        self.meter.devices = self.dist.world_size
        self.meter.device = self.dist.device
        if self.meter.peak:
            log.info("model-FLOP utilisation (mfu) against %.2f TFLOP/s a device: %s", self.meter.peak / 1e12, source)
        else:
            log.info("no model-FLOP utilisation figure: %s", source)
        if self.dist.is_main:
            self.meter.reporters = make_reporters(config.train.report_to, self.run_dir, to_dict(config))

    # ------------------------------------------------------------------ the loop
    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One optimizer step on this rank's part of the global batch."""
        result = self.stepper(batch, self.step)
        self.step += 1
        self.batches_consumed += 1
        return result

    def train(self) -> dict[str, Any] | None:
        """Run to train.max_steps, logging, evaluating and checkpointing on schedule.

        SIGTERM or SIGUSR1 (a scheduler's preemption warning) finishes the current step, saves
        a checkpoint and returns None; `resume: auto` continues from it."""
        tc = self.config.train
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        self.meter.restart()
        batches = iter(self.loader)
        try:
            while self.step < tc.max_steps:
                asked = time.perf_counter()
                batch = next(batches)
                data_wait = time.perf_counter() - asked
                result = self.train_step(batch)
                self.bad_steps.check(result.skipped, result.loss, self.step, self.last_checkpoint)
                self.meter.update(result, data_wait)
                if self.logging.due(self.step):
                    repeat = self.encoder.repeat_score
                    self.meter.log(self.step, self.engine.lr(), float(self.model.objective.temperature()), bar,
                                   None if repeat is None else float(repeat()))
                bar.update(1)
                if result.stop:  # some rank was signalled: all stop here, together
                    self.save()
                    log.warning("stopped at step %d by %s; checkpoint saved, resume=auto continues", self.step,
                                self.guard.reason())
                    return None
                if self.validation.due(self.step):
                    self.validate()
                elif self.checkpointing.due(self.step):
                    self.save()
        finally:
            bar.close()
        if tc.eval_every:
            self.validate()
        else:
            self.save()
        return self.final_evaluation()

    def final_evaluation(self) -> dict[str, Any]:
        """eval.split's metrics of the best validated checkpoint (eval.use_best) or the last one,
        written to metrics.json and printed once."""
        config = self.config
        best = checkpoint.read_best(self.run_dir)
        if config.eval.use_best and best is not None and best["checkpoint"] != f"step-{self.step}":
            self.load_weights(self.run_dir / "checkpoints" / best["checkpoint"])
            log.info("final evaluation of the best checkpoint, %s (valid %s %.4f)", best["checkpoint"], best["metric"],
                     best["value"])
        metrics = self.evaluate(config.eval.split)
        if best is not None:
            metrics["checkpoint"] = best["checkpoint"] if config.eval.use_best else f"step-{self.step}"
        if self.dist.is_main:
            write_json_atomic(self.run_dir / "metrics.json", metrics)
            print(format_table(metrics, config.eval.k), flush=True)
        return metrics

    def validate(self) -> dict[str, Any]:
        """Validation metrics, logged to metrics.jsonl; checkpoints this step and names it the best
        when eval.best_metric improved."""
        valid = self.evaluate("valid", show_progress=False)
        flat = flatten_metrics(valid)
        metric = self.config.eval.best_metric
        self.meter.write({"step": self.step, **{f"valid/{k}": v for k, v in flat.items()}})
        self.save()
        best = checkpoint.read_best(self.run_dir)
        if best is None or flat[metric] > best["value"]:
            if self.dist.is_main:
                checkpoint.write_best(self.run_dir, self.step, metric, flat[metric])
                checkpoint.prune(self.run_dir, self.config.train.keep_last)  # the previous best may go now
            log.info("step %d: valid %s %.4f, the best so far", self.step, metric, flat[metric])
        barrier()
        return valid

    def evaluate(self, split: str | None = None, show_progress: bool = True) -> dict[str, Any]:
        """Full-catalog metrics; every rank computes them (ZeRO-3 needs all ranks in the forward)."""
        return self.evaluator.evaluate(self.encoder, split, show_progress)

    # ------------------------------------------------------------------ state
    def save(self) -> Path:
        """Checkpoint the current step on every rank's behalf; returns its final path."""
        staging = checkpoint.staging(self.run_dir, self.step)
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        state = checkpoint.trainer_state(self.step, self.batches_consumed, self.model.objective,
                                         self.stepper.catalog_embeddings, self.dist.world_size, self.shuffle)
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

    def last_checkpoint(self) -> str | None:
        found = checkpoint.latest(self.run_dir)
        return found.name if found else None

    def load_weights(self, path: Path) -> None:
        """Only the trained weights of checkpoint `path` (the best one, for the final evaluation)."""
        if self.engine.weights_in_engine_state:
            self.engine.load_state(path, {})
        else:
            checkpoint.load_weights(path, self.encoder)
            self.model.objective.load_state_dict(checkpoint.load_state(path)["objective"])

    def load(self, path: Path) -> None:
        """Everything of checkpoint `path`: weights, engine, RNG, data position, stale catalog."""
        state = checkpoint.load_state(path)
        if not self.engine.weights_in_engine_state:
            checkpoint.load_weights(path, self.encoder)
            self.model.objective.load_state_dict(state["objective"])
        self.engine.load_state(path, state["engine"])
        self.model.objective.calls = state["objective_calls"]
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        self.step, self.batches_consumed = state["step"], state["batches_consumed"]
        self.shuffle = state.get("shuffle", "reservoir")  # the batches it was trained with, continued
        if state.get("catalog_embeddings") is not None:
            self.stepper.catalog_embeddings = state["catalog_embeddings"].to(self.dist.device)
        log.info("resumed from %s at step %d", path, self.step)

    def close(self, failed: bool = False) -> None:
        """Drop the loader, restore the signal handlers, leave the process group (without
        waiting for the peers when this rank `failed`)."""
        self.loader = None  # type: ignore[assignment]
        self.meter.close()
        self.guard.restore()
        close_process_group(meet=not failed)
