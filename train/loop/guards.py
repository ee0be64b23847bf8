"""Guards around the loop: stop signals (a scheduler's preemption warning) honoured by every
rank at the same step boundary, and the count of steps skipped for a non-finite loss."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from train.errors import UserError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopGuard:
    """Remembers SIGTERM / SIGUSR1 instead of dying; each step asks `signalled`."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous_handlers: dict[int, Any] = {}

    def install(self) -> None:
        """From here on a stop signal is remembered and honoured at the next step boundary, so a
        preemption warning that arrives during setup still ends in a checkpoint, not a kill."""
        self.previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def signalled(self) -> bool:
        """Whether this rank was signalled; the step settles whether any was (TrainStep.stop), so
        that all ranks stop at the same step and checkpoint together."""
        return self.signal is not None

    def reason(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "another rank's signal"

    def restore(self) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        self.previous_handlers = {}


class BadSteps:
    """Counts steps skipped for a non-finite loss or gradient (the step decided on every rank
    together, so every rank counts the same); `limit` of them in a row stop the run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def check(self, skipped: bool, loss_value: torch.Tensor, step: int,
              last_checkpoint: Callable[[], str | None]) -> None:
        """Count this step; `last_checkpoint()` names the checkpoint a stop leaves (asked only then)."""
        if not skipped:
            self.in_a_row = 0
            return
        loss = float(loss_value)  # read only here: a taken step's loss stays on the device
        self.in_a_row += 1
        self.total += 1
        what = f"loss {loss}" if not math.isfinite(loss) else "a non-finite gradient"
        log.warning("step %d: %s; the step is skipped on every rank (%d in a row, %d in all)", step, what,
                    self.in_a_row, self.total)
        if self.in_a_row > self.limit:
            name = last_checkpoint()
            kept = f"the last checkpoint, {name}, is intact" if name else "no checkpoint was saved"
            raise TrainingDiverged(f"{self.in_a_row} steps in a row had a non-finite loss or gradient (the last, "
                                   f"step {step}: {what}); stopped after train.max_bad_steps={self.limit}, {kept}. "
                                   "Lower train.lr or turn on train.grad_clip, then resume")


class TrainingDiverged(UserError):
    """Training stopped on non-finite losses: the CLI's one line, not a traceback."""
