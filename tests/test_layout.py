"""The house rules of the tree: imports run one way (cli -> loop -> evaluation -> modeling ->
data -> config / distributed -> errors), model/ imports nothing from train/, and only
train/distributed.py reads the launchers' variables."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A module may import from its own wing and from wings of a lower level only.
LEVELS = {"errors": 0, "config": 1, "distributed": 1, "data": 2, "modeling": 3, "evaluation": 4, "loop": 5,
          "serve": 5, "cli": 6}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "train" and len(parts) > 1 and parts[1] in LEVELS else None


def test_imports_run_one_way() -> None:
    wrong = []
    for path in sorted((ROOT / "train").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        own = parts[1] if len(parts) > 1 and parts[1] != "__init__" else None
        if own is None:
            continue
        for module in imported_modules(path):
            other = wing(module)
            if other is not None and other != own and LEVELS[other] >= LEVELS[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_model_imports_nothing_from_train() -> None:
    wrong = [f"{path.relative_to(ROOT)} imports {module}" for path in sorted((ROOT / "model").rglob("*.py"))
             for module in imported_modules(path) if module == "train" or module.startswith("train.")]
    assert not wrong, "\n".join(wrong)


def test_only_distributed_reads_launcher_variables() -> None:
    readers = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "train").rglob("*.py"))
               if any(name in path.read_text() for name in ('"RANK"', "'RANK'", "SLURM_PROCID", "OMPI_COMM_WORLD"))]
    assert readers == ["train/distributed.py"]
