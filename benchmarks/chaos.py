"""Soak: training that is killed, again and again, must end where an undisturbed run ends.

    python benchmarks/chaos.py                                  # 20 min of chaos (about 45 in all)
    python benchmarks/chaos.py --minutes 4 --kill-every 40 80   # a quick look

What it does, in one work folder (--workdir, default runs/chaos):
1. prepares configs/debug.yaml's synthetic data in small shards and cuts one training shard short
   inside a record (a disk that filled up): both runs below read it with data.on_bad_shard=skip;
2. times a few steps to size the run so that it takes about --minutes undisturbed;
3. trains it undisturbed: `launch/torchrun.sh --nproc 2` on CPU (gloo), the reference;
4. trains it again under `--max-restarts`, while a chaos loop SIGKILLs a random rank every
   --kill-every MIN MAX seconds (uniform, seeded) until the run ends; torchrun stops the other
   rank and starts both again, and `resume: auto` takes the newest whole checkpoint (a kill in
   the middle of a save leaves one cut short, which must be passed over);
5. prints restarts, steps computed again, samples lost to the bad shard, wall times, and whether
   the final test metrics and the losses after the last restart equal the reference's (1e-6).
Exit 0 when they match, 1 when they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.distributed import free_port  # noqa: E402
from train.evaluation.report import flatten_metrics  # noqa: E402

SETTINGS = ["device=cpu", "seed=0", "resume=auto", "data.shard_size=200", "data.num_workers=1",
            "data.on_bad_shard=skip", "data.synthetic={num_users: 2000, num_items: 400}", "train.batch_size=32",
            "train.log_every=1", "train.collective_timeout=30", "train.keep_last=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def rectrain(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"chaos: rectrain {' '.join(args[:1])} failed:\n{done.stderr[-3000:]}")


def cut_a_shard(data: Path) -> tuple[str, int]:
    manifest = json.loads((data / "manifest.json").read_text())
    shard = manifest["shards"][1]
    path = data / shard["name"]
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2 + 100])  # inside a record
    return shard["name"], shard["samples"]


def torchrun(run: Path, data: Path, steps: int, save_every: int, restarts: int) -> subprocess.Popen[str]:
    command = ["bash", str(ROOT / "launch/torchrun.sh"), "--nproc", "2", "--max-restarts", str(restarts),
               "--master", f"127.0.0.1:{free_port()}", str(ROOT / "configs/debug.yaml"), *SETTINGS,
               f"data.dir={data}", f"output_dir={run}", f"train.max_steps={steps}", f"train.save_every={save_every}"]
    log = open(run.with_suffix(".log"), "w")
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)


def ranks_of(proc: subprocess.Popen[str]) -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            # A rank's DataLoader workers share its command line and environment: ranks are
            # the train.cli processes whose parent (torchrun's agent) has no RANK.
            parent = child.parent()
            if ("train.cli" in " ".join(child.cmdline()) and "RANK" in child.environ()
                    and (parent is None or "RANK" not in parent.environ())):
                found[int(child.environ()["RANK"])] = child
        except psutil.Error:
            pass  # gone between the listing and the look
    return found


def steps_per_second(data: Path, work: Path) -> float:
    run = work / "calibrate"
    proc = torchrun(run, data, 300, 10_000, 0)
    proc.wait()
    if proc.returncode != 0:
        sys.exit(f"chaos: the calibration run failed; see {run.with_suffix('.log')}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Each row's samples/s is over its own step (log_every=1), both ranks' samples.
    seconds = sum(2 * 32 / row["samples_per_s"] for row in rows if row.get("samples_per_s"))
    return 300 / seconds


def losses(run: Path) -> tuple[dict[int, float], list[int]]:
    """The last loss logged at each step, and the step order of the log (restarts log steps again)."""
    order, last = [], {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            order.append(row["step"])
            last[row["step"]] = row["loss"]
    return last, order


def recomputed(order: list[int]) -> int:
    """Steps trained twice or more: after each restart the log goes back to the checkpoint's step."""
    again, highest = 0, 0
    for step in order:
        if step <= highest:
            again += 1
        highest = max(highest, step)
    return again


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the run takes undisturbed (default 20)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(120.0, 240.0), metavar=("MIN", "MAX"),
                        help="seconds between kills, drawn uniformly (default 120 240)")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: about 20 s)")
    parser.add_argument("--seed", type=int, default=0, help="the chaos loop's draws")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "chaos")
    args = parser.parse_args()
    work = args.workdir.resolve()
    if work.exists():
        sys.exit(f"chaos: {work} exists; remove it or name another --workdir")
    work.mkdir(parents=True)
    data = work / "data"
    rectrain("prepare", str(ROOT / "configs/debug.yaml"), *SETTINGS, f"data.dir={data}")
    bad_shard, bad_samples = cut_a_shard(data)
    rate = steps_per_second(data, work)
    steps = max(200, int(rate * args.minutes * 60))
    save_every = args.save_every or max(10, int(rate * 20))
    print(f"chaos: {rate:.1f} steps/s undisturbed -> {steps} steps, a checkpoint every {save_every}", flush=True)

    started = time.time()
    reference = torchrun(work / "reference", data, steps, save_every, 0)
    reference.wait()
    reference_s = time.time() - started
    if reference.returncode != 0:
        sys.exit(f"chaos: the undisturbed run failed; see {work / 'reference.log'}")

    rng = random.Random(args.seed)
    expected_kills = int(args.minutes * 60 / min(args.kill_every)) + 2
    started = time.time()
    chaos = torchrun(work / "chaos", data, steps, save_every, expected_kills + 1)
    kills: list[tuple[float, int]] = []
    while chaos.poll() is None:
        deadline = time.time() + rng.uniform(*args.kill_every)
        while chaos.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        ranks = ranks_of(chaos) if chaos.poll() is None else {}
        if ranks and len(kills) < expected_kills:
            rank = rng.choice(sorted(ranks))
            try:
                ranks[rank].send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
            kills.append((time.time() - started, rank))
            print(f"chaos: {kills[-1][0]:7.1f} s  SIGKILL rank {rank}", flush=True)
    chaos_s = time.time() - started

    log = (work / "chaos.log").read_text(errors="replace")
    resumes = [int(m) for m in re.findall(r"rectrain: resumed from \S+ at step (\d+)", log)]
    passed_over = len(re.findall(r"skipped damaged checkpoint", log))
    lost = sorted({int(m) for m in re.findall(r"corrupt shard after \d+ samples .*?, (\d+) of its \d+ samples lost",
                                               log)})
    expected, _ = losses(work / "reference")
    got, order = losses(work / "chaos")
    after = resumes[-1] if resumes else 0
    same_losses = (chaos.returncode == 0 and sorted(got) == sorted(expected)
                   and all(abs(got[s] - expected[s]) <= 1e-6 for s in expected if s > after))
    final_ref = flatten_metrics(json.loads((work / "reference" / "metrics.json").read_text()))
    final_path = work / "chaos" / "metrics.json"
    final = flatten_metrics(json.loads(final_path.read_text())) if final_path.exists() else {}
    same_metrics = bool(final) and final.keys() == final_ref.keys() and all(
        abs(float(final[k]) - float(final_ref[k])) <= 1e-6 for k in final_ref)

    rows = [
        ("run", f"{steps} steps of 2 x 32 users, 2 CPU ranks (gloo), checkpoint every {save_every}"),
        ("undisturbed run", f"{reference_s / 60:.1f} min"),
        ("run under chaos", f"{chaos_s / 60:.1f} min, exit {chaos.returncode}"),
        ("SIGKILLs", f"{len(kills)} (" + ", ".join(f"rank {r} at {t:.0f} s" for t, r in kills) + ")"),
        ("restarts", f"{len(kills)}, each of both ranks; {len(resumes)} reached their resume (from steps {resumes}), "
                     "the others were killed again while starting"),
        ("checkpoints passed over", str(passed_over)),
        ("steps computed again", f"{recomputed(order)} of {steps}"),
        ("bad shard", f"{bad_shard}: {lost[0] if lost else '?'} of its {bad_samples} samples lost at each pass"),
        ("losses after the last restart", "equal (1e-6)" if same_losses else "DIFFER"),
        ("final test metrics", "equal (1e-6)" if same_metrics else "DIFFER"),
    ]
    print()
    for name, value in rows:
        print(f"{name:32s} {value}")
    print(f"\ncommand: python benchmarks/chaos.py {shlex.join(sys.argv[1:])}".rstrip())
    print(f"logs: {work / 'reference.log'}, {work / 'chaos.log'}")
    return 0 if same_losses and same_metrics else 1


if __name__ == "__main__":
    sys.exit(main())
