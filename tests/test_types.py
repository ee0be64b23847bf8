"""The type hints are checked, not decorative: mypy over the packages must pass."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists(),
                    reason="mypy is part of the test extra")
def test_mypy_passes() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "model", "train"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
