"""Checkpoints: `checkpoints/step-<N>/` holding the LoRA adapter (safetensors), the projection
head, the user tower (model.user_encoder=items), and the trainer state (optimizer, scheduler, RNG, data position).

Each checkpoint is written under a temporary name and renamed when complete; the `latest`
pointer is replaced atomically after that, so a crash at any moment leaves either the old or
the new checkpoint reachable, never a torn one.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from model.encoder import RecEncoder
from model.objective import Objective
from train.errors import UserError

log = logging.getLogger(__name__)

ADAPTER_DIR, HEAD_FILE, STATE_FILE, LATEST, BEST = "adapter", "head.safetensors", "trainer_state.pt", "latest", "best.json"
TOWER_FILE = "user_tower.safetensors"
COMPLETE = "COMPLETE"  # written last into a staged checkpoint: its files and their sizes


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def trainer_state(step: int, batches_consumed: int, objective: Objective, catalog_embeddings: torch.Tensor | None,
                  world_size: int, shuffle: str) -> dict[str, Any]:
    """The trainer's part of a checkpoint (every rank calls it: each rank's RNG state is kept)."""
    rng = rng_state()
    ranks_rng = [rng] * world_size
    if dist.is_initialized():
        dist.all_gather_object(ranks_rng, rng)
    return {"step": step, "batches_consumed": batches_consumed, "shuffle": shuffle, "rng": ranks_rng,
            "objective": objective.state_dict(), "objective_calls": objective.calls,
            # The stale negatives in use, so that a resumed run takes exactly the same steps.
            "catalog_embeddings": None if catalog_embeddings is None else catalog_embeddings.cpu()}


def staging(run_dir: Path, step: int) -> Path:
    """The temporary directory checkpoint `step` is written into before `publish`."""
    return run_dir / "checkpoints" / f".step-{step}.tmp"


def write(directory: Path, encoder: RecEncoder, trainer_state: dict[str, Any]) -> None:
    """Adapter (peft, safetensors), projection head, user tower and trainer state into `directory` (rank 0)."""
    backbone = encoder.backbone
    if isinstance(backbone, PeftModel):  # model.trained_layers=0 trains no adapter
        backbone.save_pretrained(str(directory / ADAPTER_DIR))
    heads = {f"{name}.weight": head.weight.detach().cpu().contiguous() for name, head in _heads(encoder)}
    if heads:
        save_file(heads, str(directory / HEAD_FILE))
    if encoder.user_tower is not None:
        save_file({name: value.detach().cpu().contiguous() for name, value in encoder.user_tower.state_dict().items()},
                  str(directory / TOWER_FILE))
    torch.save(trainer_state, directory / STATE_FILE)


def publish(run_dir: Path, step: int, keep_last: int) -> Path:
    """Record the staged checkpoint's files (COMPLETE), rename it into place, move `latest` to it,
    drop all but the newest `keep_last`."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    staged = staging(run_dir, step)
    files = {str(f.relative_to(staged)): f.stat().st_size for f in sorted(staged.rglob("*")) if f.is_file()}
    (staged / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staged.rename(final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    pointer.replace(root / LATEST)
    prune(run_dir, keep_last)
    return final


def saved_steps(root: Path) -> list[int]:
    """The steps of the `step-N` folders under `root`, oldest first."""
    return sorted(int(p.name.split("-", 1)[1]) for p in root.glob("step-*") if p.name.split("-", 1)[1].isdigit())


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all checkpoints but the newest `keep_last` and the best (0 keeps everything)."""
    root = run_dir / "checkpoints"
    steps = saved_steps(root)
    best = read_best(run_dir)
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if best is None or best["checkpoint"] != f"step-{old}":
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """{"checkpoint": "step-N", "metric": ..., "value": ...} of the best validated checkpoint, if any."""
    path = run_dir / "checkpoints" / BEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_best(run_dir: Path, step: int, metric: str, value: float) -> None:
    """Name checkpoint `step` the best (atomically); pruning keeps it from then on."""
    path = run_dir / "checkpoints" / BEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"checkpoint": f"step-{step}", "metric": metric, "value": value}) + "\n")
    tmp.replace(path)


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (None: it is whole): a file its COMPLETE record
    lists is missing or has another size (a copy cut short, a full disk). Checkpoints written
    before that record existed count as whole when they have their trainer state."""
    if not (path / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    record = path / COMPLETE
    if not record.is_file():
        return None
    try:
        files = json.loads(record.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{COMPLETE} is unreadable"
    for name, size in files.items():
        found = path / name
        if not found.is_file():
            return f"{name} is missing"
        if found.stat().st_size != size:
            return f"{name} holds {found.stat().st_size} of its {size} bytes"
    return None


def latest(run_dir: Path) -> Path | None:
    """The newest whole checkpoint: the one `latest` names, or, when that one is damaged, the
    newest whole one before it (the log says which and why). Unfinished `.step-N.tmp` folders
    (a save killed mid-write) never count."""
    root = run_dir / "checkpoints"
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    newest_first = [root / f"step-{step}" for step in reversed(saved_steps(root))]
    candidates = ([named] if named is not None else []) + [p for p in newest_first if p != named]
    rejected: list[str] = []
    for path in candidates:
        why = damage(path)
        if why is None:
            if rejected:
                log.warning("skipped damaged checkpoint(s) %s; using %s", "; ".join(rejected), path.name)
            return path
        if path.exists():
            rejected.append(f"{path.name} ({why})")
    if rejected:
        log.warning("no whole checkpoint in %s: %s", root, "; ".join(rejected))
    return None


def resolve(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `resume` asks for: auto -> latest (or none), never -> none, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def _heads(encoder: RecEncoder) -> list[tuple[str, Any]]:
    """The encoder's small trained modules kept in HEAD_FILE (those it has), by their config names."""
    return [(name, head) for name, head in (("projection", encoder.projection),
                                            ("user_projection", encoder.user_projection),
                                            ("id_embeddings", encoder.id_embeddings),
                                            ("repeat_score", encoder.repeat_score)) if head is not None]


def best_or_latest(run_dir: Path) -> Path | None:
    """A run's best validated checkpoint when it is whole, else its newest whole one (or none)."""
    best = read_best(run_dir)
    if best is not None and damage(run_dir / "checkpoints" / best["checkpoint"]) is None:
        return run_dir / "checkpoints" / best["checkpoint"]
    return latest(run_dir)


def initial(path: Path) -> Path:
    """The checkpoint `model.init_from` names: a checkpoint folder, or a run directory's best
    validated checkpoint, else its newest whole one."""
    if (path / STATE_FILE).is_file():
        return path
    found = best_or_latest(path)
    if found is None:
        raise UserError(f"model.init_from: {path} is neither a checkpoint nor a run directory holding a whole one")
    return found


def load_weights(path: Path, encoder: RecEncoder, start: bool = False) -> None:
    """Put a checkpoint's adapter and projection into `encoder` (built with the same config).

    With `start` (model.init_from) a checkpoint without an adapter may start a model that trains
    one: the new adapter keeps its initial state, LoRA's B = 0, so the run starts from exactly the
    checkpoint's function (a LoRA stage after a frozen-backbone stage)."""
    backbone = encoder.backbone
    adapter = path / ADAPTER_DIR / "adapter_model.safetensors"
    fresh_adapter = isinstance(backbone, PeftModel) and not adapter.is_file()
    if fresh_adapter and not start:
        raise UserError(f"{path}: no adapter, but the model config trains one")
    if not isinstance(backbone, PeftModel) and adapter.is_file():
        raise UserError(f"{path}: holds an adapter, but model.trained_layers=0 trains none")
    if fresh_adapter:
        log.info("%s has no adapter: the adapter starts at zero, the rest from the checkpoint", path)
    elif isinstance(backbone, PeftModel):
        result: Any = set_peft_model_state_dict(backbone, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise UserError(f"{path}: adapter does not match the model config ({unexpected[0]} unexpected)")
    wanted = _heads(encoder)
    if wanted:
        heads = load_file(str(path / HEAD_FILE)) if (path / HEAD_FILE).is_file() else {}
        for name, head in wanted:
            if f"{name}.weight" not in heads:
                raise UserError(f"{path}: no {name} weights, but model.{name} asks for them")
            if heads[f"{name}.weight"].shape != head.weight.shape:
                raise UserError(f"{path}: {name} is {tuple(heads[f'{name}.weight'].shape)}, the model config "
                                f"makes it {tuple(head.weight.shape)}")
            head.weight.data.copy_(heads[f"{name}.weight"])
    if encoder.user_tower is not None:
        if not (path / TOWER_FILE).is_file():
            raise UserError(f"{path}: no user tower, but model.user_encoder=items asks for one")
        try:
            encoder.user_tower.load_state_dict(load_file(str(path / TOWER_FILE)))
        except RuntimeError as err:
            raise UserError(f"{path}: user tower does not match model.user_tower ({str(err).splitlines()[1].strip()})") from None


def _numpy_rng_types() -> list[Any]:
    """What numpy's RNG state (a uint32 array) unpickles through: all a trainer state holds
    besides tensors, numbers, strings and containers."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path` (step, data position, RNG, engine state).

    weights_only: unpickling runs no code from the file, only tensors, plain data and numpy's
    RNG state come back (a checkpoint from a shared folder cannot run anything)."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_types()):
            return torch.load(path / STATE_FILE, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path / STATE_FILE}: not a rectrain trainer state "
                        f"({str(err).strip().splitlines()[-1][:200]})") from None
