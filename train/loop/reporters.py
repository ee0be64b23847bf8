"""Where metrics.jsonl's rows also go (train.report_to): TensorBoard event files in the run
directory's tb/ folder, Weights & Biases in offline mode (`wandb sync` uploads them later)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from train.errors import UserError


class Reporter(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers, by name (its step apart): what a dashboard plots."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """`tensorboard --logdir RUN_DIR/tb` plots every row's numbers against the step."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.report_to: tensorboard needs the tensorboard package (pip install tensorboard)") \
                from None
        self.writer = SummaryWriter(str(folder))

    def write(self, row: dict[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, row["step"])
        self.writer.flush()  # a dashboard open during the run sees each row as it comes

    def close(self) -> None:
        self.writer.close()


class WandbOffline:
    """A Weights & Biases run written under RUN_DIR/wandb, never sent from here (clusters are
    often offline); `wandb sync RUN_DIR/wandb/offline-run-*` uploads it."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("train.report_to: wandb needs the wandb package (pip install wandb)") from None
        self.run = wandb.init(mode="offline", dir=str(run_dir), name=run_dir.name, config=config)

    def write(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


def make_reporters(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[Reporter]:
    """The main rank's reporters for train.report_to."""
    made: list[Reporter] = []
    for name in names:
        made.append(TensorBoard(run_dir / "tb") if name == "tensorboard" else WandbOffline(run_dir, config))
    return made
