"""Nothing reaches for a network: with HF_HUB_OFFLINE=1 a whole run (prepare, train, evaluate,
export, recommend) opens no connection beyond this machine, and no code is taken from anywhere."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from train.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
ROOT = Path(__file__).resolve().parents[1]


def test_a_whole_run_stays_on_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[object] = []
    connect = socket.socket.connect

    def local_only(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1") and not isinstance(address, (str, bytes)):
            attempts.append(address)
            raise OSError(f"network access to {address} during a run")
        return connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", local_only)
    run = tmp_path / "run"
    assert main(["train", str(CONFIG), f"output_dir={run}", f"data.dir={tmp_path / 'data'}", "device=cpu",
                 "data.num_workers=0", "data.synthetic={num_users: 80, num_items: 30}", "train.batch_size=8",
                 "train.max_steps=2"]) == 0
    assert main(["export", str(run)]) == 0
    assert main(["recommend", str(run / "export"), "--history", "i1,i2", "-k", "3"]) == 0
    assert attempts == []


def test_no_code_is_trusted_from_a_checkpoint_or_a_hub() -> None:
    sources = [p for folder in ("train", "model") for p in (ROOT / folder).rglob("*.py")]
    text = "\n".join(p.read_text() for p in sources)
    assert "trust_remote_code=True" not in text
    assert "weights_only=False" not in text
    assert "yaml.load(" not in text and "eval(" not in text.replace(".eval(", "").replace("_eval(", "")
