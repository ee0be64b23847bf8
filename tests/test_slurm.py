"""launch/slurm/train.sbatch on a real Slurm cluster: a 2-rank DDP job, and preemption + requeue.

Needs a cluster that answers `sinfo` (`bash launch/slurm/local_cluster.sh start` makes a
one-node one on this machine). Skipped without one, unless RECTRAIN_REQUIRE_SLURM=1 (CI),
where a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest

from test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
JOB_TIMEOUT_S = 300
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}

pytestmark = pytest.mark.slow


def _cluster_problem() -> str | None:
    """Why no Slurm cluster can be used here, or None when `sbatch` exists and `sinfo` answers."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo does not answer ({err})"
    if done.returncode != 0 or not done.stdout.strip():
        return f"sinfo does not answer ({done.stderr.strip() or 'no partitions'})"
    return None


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment to submit jobs with (the job inherits it: `rectrain` must be on PATH)."""
    problem = _cluster_problem()
    if problem is not None:
        if os.environ.get("RECTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"RECTRAIN_REQUIRE_SLURM=1 but {problem}; run `bash launch/slurm/local_cluster.sh start`")
        pytest.skip(f"no Slurm cluster: {problem}")
    env = dict(os.environ)
    # The console script sits next to the interpreter running the tests, even without an activated venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(run=tmp_path / "run", data=tmp_path / "data", workers=0))
    return config


def submit(tmp_path: Path, env: dict[str, str], *overrides: str) -> int:
    done = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", f"--chdir={tmp_path}",
                           str(TRAIN_SBATCH), str(write_config(tmp_path)), "device=cpu", "data.num_workers=0",
                           *overrides], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(";")[0])


def job_fields(job_id: int) -> dict[str, str]:
    """`scontrol show job` as key -> value (empty when Slurm no longer knows the job)."""
    done = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def job_output(tmp_path: Path, job_id: int) -> str:
    log = tmp_path / f"rectrain-{job_id}.out"
    return log.read_text(errors="replace") if log.exists() else f"(no {log})"


def fail(tmp_path: Path, job_id: int, message: str) -> NoReturn:
    subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
    fields = job_fields(job_id)
    pytest.fail(f"{message}\nscontrol: {fields}\n--- rectrain-{job_id}.out (tail) ---\n"
                f"{job_output(tmp_path, job_id)[-6000:]}")


def wait_until_final(tmp_path: Path, job_id: int, deadline: float) -> dict[str, str]:
    """Poll until the job is in a final state (a requeued job goes back to PENDING, which is not)."""
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        time.sleep(1)
    fail(tmp_path, job_id, f"job {job_id} not finished after {JOB_TIMEOUT_S} s")


def metrics_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "loss" in row]


def test_two_rank_job_trains_and_evaluates(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    job_id = submit(tmp_path, slurm_env)
    fields = wait_until_final(tmp_path, job_id, time.monotonic() + JOB_TIMEOUT_S)
    output = job_output(tmp_path, job_id)
    if fields["JobState"] != "COMPLETED" or fields.get("ExitCode") != "0:0":
        fail(tmp_path, job_id, f"job {job_id} ended {fields['JobState']} with exit code {fields.get('ExitCode')}")
    assert "engine ddp, 2 rank(s), launcher slurm" in output, output[-3000:]
    assert "rectrain: 2 task(s)" in output and "rectrain: master " in output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0.0 <= metrics["recall@10"] <= 1.0
    assert metrics_steps(tmp_path / "run") == list(range(1, 9))


def test_preemption_warning_checkpoints_requeues_and_resumes(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    max_steps = 40
    job_id = submit(tmp_path, slurm_env, f"train.max_steps={max_steps}", "train.save_every=0")
    run = tmp_path / "run"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    # Warn once training is under way (a row in metrics.jsonl), as the time limit would.
    while not metrics_steps(run):
        if time.monotonic() > deadline or job_fields(job_id).get("JobState") in FINAL_STATES:
            fail(tmp_path, job_id, f"job {job_id} logged no training step")
        time.sleep(0.2)
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], capture_output=True,
                               text=True, timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    fields = wait_until_final(tmp_path, job_id, deadline)
    output = job_output(tmp_path, job_id)
    if fields["JobState"] != "COMPLETED" or fields.get("ExitCode") != "0:0":
        fail(tmp_path, job_id, f"job {job_id} ended {fields['JobState']} with exit code {fields.get('ExitCode')}")

    assert int(fields["Restarts"]) >= 1, fields
    assert "preemption warning" in output and "requeueing" in output, output[-3000:]
    stopped = re.search(r"stopped at step (\d+) by SIGUSR1", output)
    assert stopped, output[-3000:]
    stop_step = int(stopped.group(1))
    assert 1 <= stop_step < max_steps
    assert re.search(rf"resumed from \S+step-{stop_step} at step {stop_step}", output), output[-3000:]
    assert f"job {job_id} (restart 0)" in output and f"job {job_id} (restart 1)" in output  # both runs' logs
    # Steps 1..stop_step from the first run, the rest from the requeued one: nothing lost or repeated.
    assert metrics_steps(run) == list(range(1, max_steps + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{max_steps}"
    assert json.loads((run / "metrics.json").read_text())["split"] == "test"
