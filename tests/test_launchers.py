"""The launchers in launch/ on CPU: two torchrun agents as two nodes, DeepSpeed and Accelerate at
2 ranks, stop-on-signal and resume (plain and DeepSpeed), and a dead rank that must not hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from multiproc import free_port, run_ranks
from test_cli import TINY, losses
from train.evaluation.report import flatten_metrics

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def config(tmp_path: Path, name: str, steps: int = 8) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(run=tmp_path / name, data=tmp_path / "data", workers=0)
                    .replace("max_steps: 8", f"max_steps: {steps}"))
    return path


def launch(script: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    # A port of its own: the launchers' default (29500) may still be held by the previous launch's
    # store, and an agent that joins a stale store waits for peers that never come.
    env = {**ENV, "MASTER_PORT": str(free_port())}
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_teaches_and_bad_calls_fail() -> None:
    for script in ("torchrun.sh", "deepspeed.sh", "accelerate.sh"):
        done = launch(script, "--help")
        assert done.returncode == 0 and "CONFIG" in done.stdout and "--nproc" in done.stdout, script
        missing = launch(script, "no/such.yaml")
        assert missing.returncode == 2 and "config file not found: no/such.yaml" in missing.stderr


def test_two_torchrun_agents_train_as_two_nodes(tmp_path: Path) -> None:
    cfg = config(tmp_path, "nodes")
    port = free_port()
    nodes = [subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc", "1", "--master", f"127.0.0.1:{port}", str(cfg), "device=cpu"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "engine ddp, 2 rank(s), launcher torchrun" in outputs[0]
    assert json.loads((tmp_path / "nodes" / "metrics.json").read_text())["users"] == 120


@pytest.mark.parametrize("script, extra, engine", [
    ("deepspeed.sh", ["deepspeed.zero_stage=2"], "deepspeed"),
    ("accelerate.sh", [], "accelerate"),
])
def test_launcher_trains_two_ranks_to_the_end(tmp_path: Path, script: str, extra: list[str], engine: str) -> None:
    cfg = config(tmp_path, engine)
    done = launch(script, "--nproc", "2", str(cfg), "device=cpu", *extra)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"engine {engine}, 2 rank(s)" in done.stderr
    assert sorted(losses(tmp_path / engine)) == list(range(1, 9))
    assert (tmp_path / engine / "metrics.json").is_file()


def test_deepspeed_trains_one_process_without_a_launcher(tmp_path: Path) -> None:
    """`rectrain train` alone with engine=deepspeed (debugging on one GPU): a group of one, not a
    search for MPI peers."""
    cfg = config(tmp_path, "ds-alone", 3)
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "train.cli", "train", str(cfg), "device=cpu", "engine=deepspeed",
                           "deepspeed.zero_stage=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "engine deepspeed, 1 rank(s)" in done.stderr
    assert sorted(losses(tmp_path / "ds-alone")) == [1, 2, 3]


def test_cpu_ranks_share_the_cores_when_nobody_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from train.distributed import DistState, share_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        share_cpu_threads(DistState(0, 0, 2, torch.device("cpu")))
        cores = len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == (max(1, cores // 2) if cores == os.cpu_count() else cores)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a choice is kept
        torch.set_num_threads(2)
        share_cpu_threads(DistState(0, 0, 2, torch.device("cpu")))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_sigterm_checkpoints_and_resume_replays_the_losses(tmp_path: Path) -> None:
    steps = 150
    whole = subprocess.run([sys.executable, "-m", "train.cli", "train", str(config(tmp_path, "whole", steps))],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cfg = config(tmp_path, "cut", steps)
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "train", str(cfg)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                          len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped at step" in stderr and "SIGTERM" in stderr
    stopped = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 3 <= stopped < steps and not (run / "metrics.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "train.cli", "train", str(cfg)], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped}'} at step {stopped}" in resumed.stderr
    expected, got = losses(tmp_path / "whole"), losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(stopped + 1, steps + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def deepspeed_run(rank: int, world_size: int, cfg: str, stop_after: int | None) -> dict[int, float] | None:
    from train.config.io import load_config
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    trainer = Trainer(load_config(cfg, ["device=cpu", "engine=deepspeed", "deepspeed.zero_stage=2"]),
                      from_environment("cpu"))
    trainer.setup()
    if stop_after is not None and rank == 0:
        step = trainer.train_step

        def signalled_step(batch):  # a real signal, to rank 0 only: every rank must stop with it
            loss = step(batch)
            if trainer.step == stop_after:
                os.kill(os.getpid(), signal.SIGUSR1)
            return loss
        trainer.train_step = signalled_step  # type: ignore[method-assign]
    metrics = trainer.train()
    trainer.close()
    return None if metrics is None else {"step": trainer.step}


def test_deepspeed_signal_and_resume_replay_the_losses(tmp_path: Path) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    whole = config(tmp_path, "ds-whole", 10)
    run_ranks(deepspeed_run, 2, str(whole), None, timeout=600)
    cut = config(tmp_path, "ds-cut", 10)
    first = run_ranks(deepspeed_run, 2, str(cut), 4, timeout=600)
    assert first == [None, None]  # both ranks stopped
    # Signalled after step 4: the ranks learn of it in step 5's all-reduce and stop together after it.
    assert (tmp_path / "ds-cut" / "checkpoints" / "latest").read_text().strip() == "step-5"
    assert (tmp_path / "ds-cut" / "checkpoints" / "step-5" / "deepspeed").is_dir()
    second = run_ranks(deepspeed_run, 2, str(cut), None, timeout=600)
    assert second == [{"step": 10}, {"step": 10}]
    expected, got = losses(tmp_path / "ds-whole"), losses(tmp_path / "ds-cut")
    assert sorted(got) == list(range(1, 11))
    for step in range(6, 11):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_a_dead_rank_ends_the_job_with_its_name(tmp_path: Path) -> None:
    cfg = config(tmp_path, "dead", 5000)
    proc = subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), "--nproc", "2", "--master",
                             f"127.0.0.1:{free_port()}", str(cfg), "device=cpu", "train.collective_timeout=30"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "dead"
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.cli" in " ".join(p.cmdline())
               and p.environ().get("RANK") == "1"]
    assert workers, "rank 1 not found"
    killed_at = time.time()
    workers[0].kill()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60
    assert "rank" in output and ("local_rank: 1" in output or "rank 1" in output), output[-3000:]


def restart_run(tmp_path: Path, name: str, kill_after: int | None) -> tuple[Path, str]:
    """launch/torchrun.sh --max-restarts 2 at 2 CPU ranks; with kill_after, rank 1 is SIGKILLed
    once a step past that checkpoint is logged."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(TINY.format(run=tmp_path / name, data=tmp_path / "data", workers=0)
                   .replace("max_steps: 8", "max_steps: 400").replace("save_every: 4", "save_every: 25"))
    run = tmp_path / name
    proc = subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), "--nproc", "2", "--max-restarts", "2",
                             "--master", f"127.0.0.1:{free_port()}", str(cfg), "device=cpu",
                             "train.collective_timeout=30"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_after is not None:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / "checkpoints" / f"step-{kill_after}" / "COMPLETE").exists():
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "train.cli" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert workers, "rank 1 not found"
        workers[0].kill()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return run, output


# A rank killed outright (no signal handler runs): torchrun stops the other, starts both again, and
# they resume from the newest whole checkpoint, ending where an undisturbed run ends.
def test_a_killed_rank_restarts_from_the_checkpoint_and_ends_as_an_undisturbed_run(tmp_path: Path) -> None:
    whole, _ = restart_run(tmp_path, "whole", None)
    cut, output = restart_run(tmp_path, "cut", 25)
    resumed = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if "rectrain: resumed from" in line]
    assert len(resumed) == 1 and 25 <= resumed[0] < 400, output[-4000:]
    assert "connectFullMesh failed" not in output  # the restarted group formed at its first try
    expected, got = losses(whole), losses(cut)
    assert sorted(got) == list(range(1, 401))
    for step in range(resumed[0] + 1, 401):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    final, final_cut = (flatten_metrics(json.loads((run / "metrics.json").read_text())) for run in (whole, cut))
    assert len(final) > 10 and final_cut == pytest.approx(final, abs=1e-6)


# The eval recipe joins the process group like training: each rank encodes and ranks its share,
# the sums are added up, rank 0 alone prints and writes. The same figures as one process.
@pytest.mark.parametrize("extra", [["eval.transitions.weight=0.5"], ["model.user_encoder=items"]],
                         ids=["text+transitions", "items"])
def test_eval_under_torchrun_ranks_shares_and_reports_once(tmp_path: Path, extra: list[str]) -> None:
    cfg = config(tmp_path, "eval", 4)
    trained = subprocess.run([sys.executable, "-m", "train.cli", "train", str(cfg), "device=cpu", *extra],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "eval"
    one = subprocess.run([sys.executable, "-m", "train.cli", "eval", str(cfg), "device=cpu", *extra], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    alone = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    two = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python",
                          "rectrain", "eval", str(cfg), "device=cpu", *extra], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("popularity, history kept") == 1  # one table, from rank 0
    assert "2 process(es)" in two.stderr
    shared = json.loads((run / "metrics.json").read_text())
    assert shared.keys() == alone.keys() and shared["users"] == alone["users"] == 120

    def flat(tree: dict, prefix: str = "") -> dict[str, float]:
        return {k: v for key, value in tree.items() if key not in ("split", "checkpoint")
                for k, v in (flat(value, f"{prefix}{key}/").items() if isinstance(value, dict)
                             else [(f"{prefix}{key}", value)])}
    assert flat(shared) == pytest.approx(flat(alone), abs=1e-6)
    if extra == ["eval.transitions.weight=0.5"]:
        assert "transitions" in shared and "encoder" in shared
