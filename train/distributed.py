"""Distributed state, read from the launcher's environment in this one place, and the few
process-group helpers everything else shares (joining the group, the barrier, each process's
share of some rows, and "did any process ask for this").

torchrun and DeepSpeed set RANK/WORLD_SIZE/LOCAL_RANK; Slurm's srun sets SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID; Open MPI sets OMPI_COMM_WORLD_*. Nothing else in rectrain reads
these variables: everything asks for the `DistState` record.

The word "rank" here means a process; ranking items is train/evaluation/ranking.py's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from model.gather import world

log = logging.getLogger(__name__)

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
    # Gradient accumulation a launcher asked for (accelerate launch --gradient_accumulation_steps):
    # rectrain does not accumulate (see train.grad_cache_chunk), so the engine warns and overrides it.
    accumulation: int = 1

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
            return DistState(rank, local, size, _pick_device(device, local), launcher(env), _accumulation(env))
    return DistState(0, 0, 1, _pick_device(device, 0), launcher(env), _accumulation(env))


def _accumulation(env: dict[str, str] | os._Environ[str]) -> int:
    value = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    return int(value) if value.isdigit() else 1


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group of one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def join_group_of_one(device: torch.device) -> None:
    """A process group of this process alone, unless one exists: for libraries that need a group
    (DeepSpeed) in a run started without a launcher (which would look for MPI, needing mpi4py)."""
    if dist.is_initialized():
        return
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def share_cpu_threads(dist_state: DistState) -> None:
    """CPU ranks on one machine split its cores when nobody chose (OMP_NUM_THREADS unset, as
    DeepSpeed's launcher and srun leave it): each rank's default of one thread per core makes
    their spinning OpenMP threads fight (2 ranks on 2 cores: DDP 3x, ZeRO-2 15x slower a step)."""
    if dist_state.device.type != "cpu" or dist_state.world_size == 1 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = os.sched_getaffinity(0)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or dist_state.world_size)
    # A launcher that bound this rank to its own cores has shared them out already.
    threads = max(1, len(cores) // ranks_here) if len(cores) == os.cpu_count() else len(cores)
    if torch.get_num_threads() > threads:
        log.info("%d CPU thread(s) per rank for %d rank(s) on this machine (OMP_NUM_THREADS chooses)", threads,
                 ranks_here)
        torch.set_num_threads(threads)


def init_process_group(dist_state: DistState, timeout_s: int) -> None:
    """Join the default process group (env:// rendezvous) when launched with several processes."""
    share_cpu_threads(dist_state)
    if dist_state.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if dist_state.device.type == "cuda" else "gloo"
    if dist_state.device.type == "cuda":
        torch.cuda.set_device(dist_state.device)
    if (dist_state.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
        log.warning("torchrun restarts with its shared rendezvous store: a restarted group can read the previous "
                    "attempt's addresses and fail to connect (pytorch/pytorch#135712); export "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (launch/torchrun.sh does)")
    dist.init_process_group(backend, rank=dist_state.rank, world_size=dist_state.world_size,
                            timeout=timedelta(seconds=timeout_s))


def close_process_group(timeout_s: float = 60.0, meet: bool = True) -> None:
    """Leave the default process group, waiting at most `timeout_s`.

    With `meet` (a run that ended normally) the ranks first meet at a barrier, so no rank tears
    its side down while another still talks to it; a failing rank passes meet=False, its peers
    may never arrive. The teardown itself runs in a daemon thread because a backend's shutdown can
    block on a peer that is already gone (seen once at a Slurm job's end), and a finished job
    must exit rather than hang until the scheduler kills it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    rank = dist.get_rank()

    def teardown() -> None:
        try:
            if meet and dist.get_world_size() > 1:
                dist.barrier()
                # gloo's worker thread releases the barrier's work (and its tensor, which takes the
                # GIL) just after the barrier returns. If the group's last reference drops first,
                # in a thread that holds the GIL (DDP's reducer freed with the trainer), the group's
                # destructor joins that worker while the worker waits for the GIL: the job hangs
                # after its final table (seen under Slurm; py-spy showed ~ProcessGroupGloo joining a
                # runLoop stuck in ~AsyncBarrierWork). Sleeping releases the GIL and lets it finish.
                time.sleep(0.25)
        finally:
            dist.destroy_process_group()

    closer = threading.Thread(target=teardown, name="rectrain-close-group", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        log.warning("rank %d: the process group did not close within %.0f s; exiting without it", rank, timeout_s)
    else:
        log.debug("rank %d: process group closed", rank)


def barrier() -> None:
    """Wait for every process (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def share(count: int) -> range:
    """This process's contiguous share of `count` rows, ceil(count / processes) long; on the last
    processes it may run past `count`."""
    index, size = world(None)
    per_process = -(-count // size)
    return range(index * per_process, (index + 1) * per_process)


def even_share(count: int) -> list[int]:
    """This process's share of `count` rows: the same number on every process (the last row
    repeated), so every process runs the same number of forward passes: ZeRO-3 gathers weights
    inside each forward and would hang on a process that ran one fewer."""
    return [min(i, count - 1) for i in share(count)]


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any process: a decision every process must take together (to stop
    at the same step, to skip the same step)."""
    return anywhere([flag], device)[0]


def anywhere(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag: whether it is set on any process; several decisions in one all-reduce (and one
    host-device synchronisation)."""
    values = torch.tensor([1 if flag else 0 for flag in flags], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]
