"""Training engines: plain, DDP, Accelerate and DeepSpeed behind one small interface.

The step calls `forward`, `backward`, `step`, the recipe `save_state`/`load_state`; neither touches an
engine's own objects, so the step — and the loss, gathered over the default process group —
is the same code under every engine (the gradient proof of the loss holds for each).

Gradient averaging: DDP, Accelerate (DDP underneath) and DeepSpeed average gradients over ranks
after backward. That average is exactly what the loss's contract expects (see model/loss.py),
so no engine gets an extra scale factor.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from model.rec_model import RecModel
from train.config.schema import Config
from train.distributed import DistState, join_group_of_one
from train.errors import UserError

log = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """The plain engine: one process, the single-GPU and laptop debug mode."""

    name = "plain"

    def __init__(self, config: Config, dist_state: DistState) -> None:
        self.config = config
        self.dist = dist_state
        self.precision = config.train.precision
        self.scaler = torch.amp.GradScaler(dist_state.device.type) if self.precision == "fp16" else None

    def trainable(self, model: RecModel) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def build(self, model: RecModel) -> None:
        """Wrap the model and create the optimizer and the warmup + cosine schedule."""
        tc = self.config.train
        self.model = model
        if tc.optimizer == "sgd":
            self.optimizer: Any = torch.optim.SGD(self.trainable(model), lr=tc.lr, weight_decay=tc.weight_decay)
        else:
            # The fused kernel (CPU and CUDA) updates every tensor in one pass: about half the
            # time of the per-tensor loop, the same update up to float rounding.
            fused = self.dist.device.type in ("cpu", "cuda")
            self.optimizer = torch.optim.AdamW(self.trainable(model), lr=tc.lr, weight_decay=tc.weight_decay,
                                               fused=fused or None)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, tc.warmup_steps, tc.max_steps)
        self.wrapped: nn.Module = model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Where the forward runs in reduced precision (train.precision) around the wrapped model."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=AUTOCAST[self.precision])

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, every_position: bool = False,
               user: bool = False, item_sequence: torch.Tensor | None = None,
               lower_states: torch.Tensor | None = None, item_ids: torch.Tensor | None = None) -> Any:
        """The wrapped model's forward: [B, D] embeddings (and [B, T, D] with every_position); users
        from `item_sequence` through the user tower; items from their cached `lower_states`;
        `item_ids`, the items' catalog indices (model.id_embeddings)."""
        with self.autocast():
            return self.wrapped(input_ids, attention_mask, every_position, user, item_sequence, lower_states, item_ids)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    # Gradient caching (train/loop/cached_step.py) makes one step's gradient from several
    # backward calls, one per replayed chunk; the ranks must reduce it once, after the last.
    # The last backward reaches every trainable parameter (DDP's reducer waits for each).
    last_backward_reaches_all = False

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Around all of a step's backward calls: the engine reduces their sum across ranks once."""
        yield

    def deferred(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one call's forward and backward: all but the `last` keep their gradients local."""
        return contextlib.nullcontext()

    def step(self) -> bool:
        """Clip, step the optimizer and the schedule, clear gradients. False when a gradient is not
        finite: nothing is updated and the schedule keeps its place. The gradients are reduced
        before this (DDP averages them in backward), so every rank sees the same norm and skips
        with the others. Under fp16 the loss scaler skips overflowing steps itself."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        finite = self.clip() or self.scaler is not None
        if finite and self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def clip(self) -> bool:
        """Clip the gradients' norm to train.grad_clip (when set); whether that norm is finite."""
        grads = [p.grad for p in self.trainable(self.model) if p.grad is not None]
        if not grads:
            return True
        if self.config.train.grad_clip > 0:
            norm = self.clip_norm(self.config.train.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        return bool(torch.isfinite(norm))

    def clip_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.trainable(self.model), max_norm)

    def skip(self) -> None:
        """Leave this step's update out on every rank (a non-finite loss somewhere): no backward
        ran, the optimizer and the schedule stay where they are."""
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Inside: every trainable parameter is whole on this rank (ZeRO-3 partitions them)."""
        yield

    def save_state(self, directory: Path) -> dict[str, Any]:
        """Engine state for a checkpoint: returned to be pickled by rank 0, or written by the engine."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    @property
    def weights_in_engine_state(self) -> bool:
        """True when `load_state` restores the model weights itself (DeepSpeed)."""
        return False


class DDPEngine(Engine):
    """torch DistributedDataParallel (torchrun, srun, or any env:// launcher)."""

    name = "ddp"

    def build(self, model: RecModel) -> None:
        super().build(model)
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # Users and items are two forward calls before one backward; every trainable parameter
        # gets its gradient once per backward all the same, so the default (static) reducer is right.
        self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.wrapped = self.ddp

    last_backward_reaches_all = True

    def deferred(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


class AccelerateEngine(Engine):
    """Hugging Face Accelerate: its Accelerator prepares the model and optimizer."""

    name = "accelerate"

    def build(self, model: RecModel) -> None:
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin

        super().build(model)
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        if self.dist.accumulation > 1:
            log.warning("accelerate: gradient_accumulation_steps=%d is ignored: accumulating would shrink every "
                        "softmax to one micro-batch's negatives; train.grad_cache_chunk keeps the whole batch's at "
                        "one chunk's memory", self.dist.accumulation)
        # An explicit plugin: Accelerator would otherwise take the launcher's accumulation and divide
        # every loss by it in backward.
        self.accelerator = Accelerator(cpu=self.dist.device.type == "cpu", mixed_precision=mixed,
                                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1))
        self.scaler = None  # the Accelerator scales fp16 losses itself
        # The schedule stays ours: Accelerate's wrapper would advance it once per process per step.
        self.wrapped, self.optimizer = self.accelerator.prepare(model, self.optimizer)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # the prepared model casts itself (mixed_precision)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    last_backward_reaches_all = True  # DDP underneath at more than one process

    def deferred(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        # The wrapper's own no_sync: Accelerator.no_sync does nothing at one process, where a
        # process group of one still gets the model wrapped in DDP.
        if last or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def clip_norm(self, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(self.trainable(self.model), max_norm)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stages 0-3, configured from `deepspeed.config` (JSON) and the run config."""

    name = "deepspeed"

    def ds_config(self) -> dict[str, Any]:
        cfg = self.config
        path = Path(cfg.deepspeed.config)
        try:
            ds = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"deepspeed.config: file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
        # The run config is the one source of batch size, clipping and precision.
        accumulation = ds.get("gradient_accumulation_steps", 1)
        if accumulation not in (1, "auto"):
            log.warning("%s: gradient_accumulation_steps=%s is ignored: accumulating would shrink every softmax "
                        "to one micro-batch's negatives; train.grad_cache_chunk keeps the whole batch's at one "
                        "chunk's memory", path, accumulation)
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = cfg.train.batch_size * self.dist.world_size
        ds["gradient_clipping"] = cfg.train.grad_clip
        ds["bf16"] = {"enabled": self.precision == "bf16"}
        ds["fp16"] = {"enabled": self.precision == "fp16"}
        ds.setdefault("zero_optimization", {})
        if cfg.deepspeed.zero_stage >= 0:
            ds["zero_optimization"]["stage"] = cfg.deepspeed.zero_stage
        ds.setdefault("steps_per_print", 10**9)
        # The client optimizer is torch's own AdamW or SGD, which ZeRO handles like any other.
        ds.setdefault("zero_allow_untested_optimizer", True)
        return ds

    def build(self, model: RecModel) -> None:
        import deepspeed

        # One process, started without a launcher: DeepSpeed would look for MPI to find its peers.
        join_group_of_one(self.dist.device)
        super().build(model)
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        config = self.ds_config()
        self.stage = int(config["zero_optimization"].get("stage", 0))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=config,
            model_parameters=self.trainable(model))
        self.wrapped = self.engine

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed runs the module in its bf16/fp16 weights itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        # DeepSpeed clips, steps the optimizer and the schedule and clears the gradients itself,
        # from gradients partitioned over the ranks: a non-finite gradient behind a finite loss is
        # its own to handle (fp16's loss scaler skips the step; bf16 and fp32 take it).
        self.engine.step()
        return True

    def skip(self) -> None:
        pass  # no backward ran: nothing reached DeepSpeed's gradient buffers

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        # ZeRO 1-3 partition the gradients as they arrive: only coalesce_grad_reduction (DeepSpeed
        # >= 0.19) holds several backward calls' gradients locally and reduces them once on exit.
        # Without it (an older DeepSpeed, its bf16 optimizer wrapper) each backward reduces its own
        # gradients: the sum is the same, the communication is once per chunk.
        with contextlib.ExitStack() as stack:
            if self.stage > 0:
                try:
                    stack.enter_context(self.engine.coalesce_grad_reduction())
                except (AttributeError, NotImplementedError) as err:
                    if not getattr(self, "warned_uncoalesced", False):
                        log.warning("deepspeed cannot coalesce the gradient reduction of ZeRO-%d (%s): each "
                                    "replayed chunk of train.grad_cache_chunk reduces its own", self.stage, err)
                        self.warned_uncoalesced = True
            yield

    def deferred(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        # Stage 0 reduces after each backward unless told not to (no_sync refuses stages 2-3).
        return self.engine.no_sync() if self.stage == 0 and not last else contextlib.nullcontext()

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.trainable(self.model), modifier_rank=None):
            yield

    def save_state(self, directory: Path) -> dict[str, Any]:
        # Every rank writes its ZeRO partition of the optimizer (and, at stage 3, of the weights).
        # Frozen base weights are left out: they are the pretrained (or seeded) ones.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        return {"scheduler": self.scheduler.state_dict()}

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=True, load_module_strict=False)

    @property
    def weights_in_engine_state(self) -> bool:
        return True


ENGINES: dict[str, type[Engine]] = {"plain": Engine, "ddp": DDPEngine, "accelerate": AccelerateEngine,
                                    "deepspeed": DeepSpeedEngine}


def choose(config: Config, dist_state: DistState) -> type[Engine]:
    """The engine `config.engine` names; `auto` follows the launcher."""
    name = config.engine
    if name == "auto":
        name = {"deepspeed": "deepspeed", "accelerate": "accelerate"}.get(dist_state.launcher,
                                                                          "ddp" if dist_state.world_size > 1 else "plain")
    if name == "plain" and dist_state.world_size > 1:
        raise UserError(f"engine: plain runs one process, but {dist_state.world_size} were launched "
                        f"(by {dist_state.launcher}); use engine=auto, ddp, accelerate or deepspeed")
    return ENGINES[name]
