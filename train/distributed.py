"""Distributed state, read from the launcher's environment in this one place.

torchrun and DeepSpeed set RANK/WORLD_SIZE/LOCAL_RANK; Slurm's srun sets SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID; Open MPI sets OMPI_COMM_WORLD_*. Nothing else in rectrain reads
these variables: everything asks for the `DistState` record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_SOURCES = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclass(frozen=True)
class DistState:
    """Where this process stands: its rank, its rank on the node, how many ranks, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from train.errors import UserError
            raise UserError("device: cuda was asked for but no CUDA device is visible")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def launcher(env: dict[str, str] | os._Environ[str]) -> str:
    """Which launcher started this process: accelerate, deepspeed, torchrun, slurm, mpi or none.
    (accelerate launch runs torchrun underneath, so it is asked first.)"""
    if any(key.startswith("ACCELERATE_") for key in env) and "RANK" in env:
        return "accelerate"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpi"
    return "none"


def from_environment(device: str = "auto", environ: dict[str, str] | None = None) -> DistState:
    """Read rank, local rank and world size from the first launcher whose variables are set."""
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key in _SOURCES:
        if rank_key in env and size_key in env:
            rank, size = int(env[rank_key]), int(env[size_key])
            local = int(env.get(local_key, rank))
            if rank_key != "RANK" and size > 1:
                # torch.distributed's env:// rendezvous reads these; srun and mpirun set their own.
                os.environ.setdefault("RANK", str(rank))
                os.environ.setdefault("WORLD_SIZE", str(size))
                os.environ.setdefault("LOCAL_RANK", str(local))
            return DistState(rank, local, size, _pick_device(device, local), launcher(env))
    return DistState(0, 0, 1, _pick_device(device, 0), launcher(env))
