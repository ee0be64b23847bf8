"""Guards around the loop: stop signals (a scheduler's preemption warning) honoured by every
rank at the same step boundary, and a loss that must be finite."""

from __future__ import annotations

import math
import signal
from types import FrameType
from typing import Any

import torch

from train.distributed import any_process

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopGuard:
    """Remembers SIGTERM / SIGUSR1 instead of dying; the loop asks `stop_requested` each step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.signal: int | None = None
        self.previous_handlers: dict[int, Any] = {}

    def install(self) -> None:
        """From here on a stop signal is remembered and honoured at the next step boundary, so a
        preemption warning that arrives during setup still ends in a checkpoint, not a kill."""
        self.previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def stop_requested(self) -> bool:
        """Whether any rank was signalled: all ranks must stop at the same step to checkpoint together."""
        return any_process(self.signal is not None, self.device)

    def reason(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "another rank's signal"

    def restore(self) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        self.previous_handlers = {}


def require_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at step {step}")
