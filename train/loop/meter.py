"""The training meter: loss, samples/s, tokens/s and model-FLOP utilisation over a window of
steps, one metrics.jsonl row per window (the main rank writes it, and hands it to the
train.report_to reporters) and the progress bar's figures."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from train.loop.flops import StepFlops
from train.loop.reporters import Reporter
from train.loop.step import StepResult


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this rank has held so far: the accelerator's allocated peak on a GPU, the
    process's resident peak on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Meter:
    """Accumulates steps until `log`, which writes their row and starts a new window."""

    def __init__(self, path: Path, is_main: bool) -> None:
        self.path = path
        self.is_main = is_main
        self.reporters: list[Reporter] = []
        self.flops: StepFlops | None = None  # set with `peak` and `devices` once the model is built
        self.peak = 0.0  # one device's peak FLOP/s (0: unknown, no utilisation figure)
        self.devices = 1
        self.device = torch.device("cpu")
        self.restart()

    def restart(self) -> None:
        """A new window, starting now."""
        self.start = time.perf_counter()
        self.samples = self.tokens = self.padded = self.squares = self.steps = self.skipped = 0
        self.data_wait = 0.0
        # Summed on the device and read once a window: no host-device synchronisation a step.
        self.loss: torch.Tensor | float = 0.0

    def update(self, result: StepResult, data_wait: float = 0.0) -> None:
        """One step's figures; `data_wait`: seconds the step waited for its batch."""
        self.samples += result.samples
        self.tokens += result.tokens
        self.padded += result.padded_tokens
        self.squares += result.token_squares
        self.data_wait += data_wait
        self.steps += 1
        if result.skipped:  # its loss may be NaN: the window's mean is over the steps taken
            self.skipped += 1
        else:
            self.loss = self.loss + result.loss.float()

    def log(self, step: int, lr: float, temperature: float, bar: tqdm,
            repeat_score: float | None = None) -> dict[str, Any]:
        """The window's row: the loss is this rank's mean over the window (rank 0 writes);
        `repeat_score`: model.repeat_score's value now, when the model has one."""
        elapsed = time.perf_counter() - self.start
        taken = self.steps - self.skipped
        row = {"step": step, "loss": round(float(self.loss) / taken, 6) if taken else None, "lr": lr,
               "temperature": round(temperature, 5), "samples_per_s": round(self.samples / elapsed, 2),
               "tokens_per_s": round(self.tokens / elapsed, 1),
               # Padded positions are computed too: real / padded is the share of the work that counts.
               "padded_tokens_per_s": round(self.padded / elapsed, 1),
               # Waiting for the loader: above a few percent, add data.num_workers.
               "data_wait_share": round(self.data_wait / elapsed, 4)}
        if repeat_score is not None:
            row["repeat_score"] = round(repeat_score, 5)
        if self.flops is not None:
            # Per device: the global batch's useful FLOPs shared by the ranks that did them.
            achieved = self.flops(self.tokens, self.squares) / self.devices / elapsed
            row["model_tflops_per_s"] = round(achieved / 1e12, 6)
            if self.peak:
                row["mfu"] = round(achieved / self.peak, 4)
        row["peak_memory_mb"] = round(peak_memory_mb(self.device), 1)
        if self.skipped:
            row["skipped_steps"] = self.skipped
        self.write(row)
        if self.is_main:
            bar.set_postfix(loss=f"{row['loss']:.4f}" if row["loss"] is not None else "skipped", lr=f"{row['lr']:.2e}",
                            sps=f"{row['samples_per_s']:.0f}")
        self.restart()
        return row

    def write(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl (training windows and validations alike), from the main rank."""
        if self.is_main:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            for reporter in self.reporters:
                reporter.write(row)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []
