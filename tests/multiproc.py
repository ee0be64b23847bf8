"""Run a function on N gloo ranks: spawn, free port, timeout, errors re-raised in the parent."""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, results: Any, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # N ranks share 2 cores; more threads only thrash
    # What torchrun would set: engines (Accelerate, DeepSpeed) read them.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))
        # Serialised to bytes: tensors put on the queue directly travel as shared-memory handles
        # that die with the rank process before the parent reads them.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` spawned gloo ranks; their results in rank order.

    `fn` must be importable (module level). The first rank error is raised here with the
    rank's traceback; a rank that neither answers nor fails within `timeout` is reported.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    procs = [context.Process(target=_worker, args=(fn, rank, world_size, port, results, args), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    answers: dict[int, Any] = {}
    try:
        while len(answers) < world_size:
            try:
                rank, status, payload = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(answers))
                raise TimeoutError(f"ranks {missing} gave no result within {timeout}s") from None
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            answers[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [answers[rank] for rank in range(world_size)]
