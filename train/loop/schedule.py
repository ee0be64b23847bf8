"""When a recurring job is due, so the loop asks each job instead of doing modulo arithmetic."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """Due every `interval` steps (0 = never) before `last_step`; at `last_step` too when `at_last`
    (the others are done once at the end by their owner)."""

    interval: int
    last_step: int
    at_last: bool = False

    def due(self, step: int) -> bool:
        if step == self.last_step:
            return self.at_last
        return self.interval > 0 and step % self.interval == 0
