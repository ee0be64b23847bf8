"""How `rectrain prepare` scales: time and peak memory on generated interaction logs.

    python benchmarks/prepare_scale.py [--interactions 1000000 4000000] [--users N] [--items N] [--keep DIR]
    python benchmarks/prepare_scale.py --write-only [--samples 200000]
    python benchmarks/prepare_scale.py --profile [--interactions 200000]
    python benchmarks/prepare_scale.py --generate DIR [--interactions N]   # just write the CSVs

Default mode, for each size in `--interactions` (default 1M and 4M, the same 50,000-item
catalog), generates a log of that many rows (users active by a log-normal spread, one user per
50 rows unless --users; items by a Zipf popularity; timestamps; shuffled file order) as
interactions.csv plus a catalog.csv in a temporary directory (in a child process, timed
apart), then runs `python -m train.cli prepare` on it in a child process, and prints the sizes
side by side: counts, shard sizes, wall time and that child's peak RSS (from os.wait4:
`/usr/bin/time -v`'s figure), next to the peak RSS of a child that only imports the CLI (the
fixed cost of Python, torch and pyarrow). Prepare's memory is bounded by the catalog and
train.data.prepare.pipeline.Budget, so the peak RSS should stay level from one size to the next.

--write-only times just prepare's last stage on synthetic arrays of `--samples` training
samples: the samples and their histories into shuffle buckets (`train.data.prepare.shuffle.SampleBuckets`,
as many at once as `train.data.prepare.pipeline.Budget.samples_at_once`), then the shards written bucket by
bucket (`train.data.prepare.shards.ShardWriter`).

--profile runs prepare() in this process under cProfile and prints the top costs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------- the log

def generate(directory: Path, interactions: int, users: int, items: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `interactions.csv` (user_id,item_id,timestamp) and `catalog.csv` (item_id,title,genre)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    # Every user gets at least one interaction; the rest follow a log-normal activity spread.
    activity = rng.lognormal(0.0, 1.0, users)
    per_user = 1 + rng.multinomial(interactions - users, activity / activity.sum())
    user_of = np.repeat(np.arange(users), per_user)
    # Zipf popularity over items, with the popular ones scattered over the id space.
    popularity = 1.0 / np.arange(1, items + 1) ** 1.0
    item_of = rng.permutation(items)[rng.choice(items, interactions, p=popularity / popularity.sum())]
    timestamps = 1_600_000_000 + rng.integers(0, 3 * 365 * 86_400, interactions)
    shuffle = rng.permutation(interactions)  # file order is not time order
    item_names = np.char.add("i", np.arange(items).astype(str))
    pacsv.write_csv(pa.table({"user_id": pa.array(np.char.add("u", user_of[shuffle].astype(str))),
                              "item_id": pa.array(item_names[item_of[shuffle]]),
                              "timestamp": pa.array(timestamps[shuffle])}), directory / "interactions.csv")
    genres = np.array(["Drama", "Comedy", "Action", "Sci-Fi", "Romance", "Horror"])
    pacsv.write_csv(pa.table({"item_id": pa.array(item_names),
                              "title": pa.array(np.char.add("Item title number ", np.arange(items).astype(str))),
                              "genre": pa.array(genres[rng.integers(0, len(genres), items)])}),
                    directory / "catalog.csv")
    return directory / "interactions.csv", directory / "catalog.csv"


def _write_config(directory: Path, max_history: int, shard_size: int) -> Path:
    path = directory / "prepare.yaml"
    path.write_text("# python -m train.cli prepare prepare.yaml data.interactions=... data.catalog=... data.dir=...\n"
                    "data:\n  format: csv\n"
                    f"  max_history: {max_history}\n  shard_size: {shard_size}\n"
                    "  catalog_columns:\n    text: [title, genre]\n")
    return path


def _run_measured(command: list[str], log: Path) -> tuple[float, float, int]:
    """Run `command` with its output in `log`; return its wall seconds, peak RSS in MB and exit code.

    The peak is the child's own (os.wait4), not RUSAGE_CHILDREN's largest-of-all-children; and
    this process stays small (the log is generated in a child too), because Linux starts a
    forked child's peak RSS at its parent's size.
    """
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss / 1024, process.returncode  # ru_maxrss: KiB on Linux


def _check(code: int, what: str, log: Path) -> None:
    if code:
        sys.exit(f"{what} failed ({code}):\n{log.read_text()[-4000:]}")


@dataclass
class Run:
    """The figures of one prepare run."""

    counts: dict[str, int]
    shards: int
    shard_bytes: int
    log_bytes: int
    generated: float  # seconds generating the log (a separate child)
    wall: float  # seconds of the prepare child, imports included
    seconds: float  # prepare's own seconds (the manifest's)
    peak_rss: float  # MB
    commands: list[list[str]]


def _prepare_once(directory: Path, interactions: int, args: argparse.Namespace) -> Run:
    """Generate a log of `interactions` rows in `directory` and prepare it in a child process."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    users = args.users or max(1, interactions // 50)
    generate_command = [sys.executable, str(Path(__file__).resolve()), "--generate", str(directory),
                        "--interactions", str(interactions), "--users", str(users),
                        "--items", str(args.items), "--seed", str(args.seed)]
    generated, _, code = _run_measured(generate_command, directory / "generate.log")
    _check(code, "generating the log", directory / "generate.log")
    config = _write_config(directory, args.max_history, args.shard_size)
    data_dir = directory / "prepared"
    command = [sys.executable, "-m", "train.cli", "prepare", str(config), "data.format=csv",
               f"data.interactions={directory / 'interactions.csv'}", f"data.catalog={directory / 'catalog.csv'}",
               f"data.dir={data_dir}"]
    wall, peak_rss, code = _run_measured(command, directory / "prepare.log")
    _check(code, "prepare", directory / "prepare.log")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return Run(counts=manifest["counts"], shards=len(manifest["shards"]),
               shard_bytes=sum((data_dir / s["name"]).stat().st_size for s in manifest["shards"]),
               log_bytes=(directory / "interactions.csv").stat().st_size, generated=generated, wall=wall,
               seconds=manifest["seconds"], peak_rss=peak_rss, commands=[generate_command, command])


def run_prepare(args: argparse.Namespace) -> None:
    """Prepare a generated log of each size in `--interactions` (the same catalog) and print the
    figures side by side: with memory bounded by the catalog, peak RSS stays level as the log grows."""
    with tempfile.TemporaryDirectory(prefix="prepare-scale-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        _, import_rss, code = _run_measured([sys.executable, "-c", "import train.cli, train.data.prepare.run"],
                                            root / "import.log")
        _check(code, "importing the CLI", root / "import.log")
        runs = []
        for interactions in args.interactions:
            directory = root / f"log-{interactions}"
            runs.append(_prepare_once(directory, interactions, args))
            if not args.keep:  # shards take about 1 KB a sample: free the disk before the next size
                shutil.rmtree(directory)
        rows = [
            ("interactions", [f"{r.counts['interactions']:,}" for r in runs]),
            ("users", [f"{r.counts['users']:,}" for r in runs]),
            ("items", [f"{r.counts['items']:,}" for r in runs]),
            ("training samples", [f"{r.counts['train_samples']:,}" for r in runs]),
            ("log file", [f"{r.log_bytes / 2**20:.0f} MiB" for r in runs]),
            ("shards", [f"{r.shards} ({r.shard_bytes / 2**20:.0f} MiB)" for r in runs]),
            ("generating the log", [f"{r.generated:.1f} s" for r in runs]),
            ("prepare wall time", [f"{r.wall:.1f} s" for r in runs]),
            ("prepare's own time", [f"{r.seconds:.1f} s" for r in runs]),
            ("peak RSS", [f"{r.peak_rss:.0f} MB" for r in runs]),
            ("peak RSS over imports", [f"{r.peak_rss - import_rss:.0f} MB" for r in runs]),
        ]
        width = max(len(name) for name, _ in rows)
        widths = [max(len(values[i]) for _, values in rows) for i in range(len(runs))]
        for name, values in rows:
            print(f"{name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths)))
        print(f"peak RSS, imports only: {import_rss:.0f} MB (python -c 'import train.cli, train.data.prepare.run'); "
              f"cores: {os.cpu_count()}")
        print("prepare wall time: the child process, imports included; prepare's own time: the manifest's "
              "'seconds'; generating the log: a separate child, not part of prepare")
        print("reproduce (from the repository root; per size, the second line alone re-runs prepare on kept files):")
        print("  " + " ".join(shlex.quote(part) for part in [sys.executable, *sys.argv]))
        for run in runs:
            for line in run.commands:
                print("  " + " ".join(shlex.quote(part) for part in line))
        if not args.keep:
            print("  (these files were in a temporary directory, now removed; --keep DIR keeps them)")


# ---------------------------------------------------------------- the writer alone

def synthetic_samples(samples: int, items: int, max_length: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays as prepare hands them to the writer: sequences with about `samples` training positions."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    total = 0
    while total < samples:
        length = int(rng.integers(3, max_length + 1))
        lengths.append(length)
        total += length - 3  # positions 1 .. length-3: the last two are held out
    bounds = np.r_[0, np.cumsum(lengths)]
    popularity = 1.0 / np.arange(1, items + 1)
    item_seq = rng.choice(items, int(bounds[-1]), p=popularity / popularity.sum())
    users = np.repeat(np.arange(len(lengths)), np.array(lengths) - 3)
    starts = bounds[:-1][users]
    ts = np.concatenate([np.arange(1, length - 2) for length in lengths])
    logq = np.log(np.maximum(np.bincount(item_seq[starts + ts], minlength=items), 1) / len(ts))
    return {"items": item_seq, "starts": starts, "ts": ts, "users": users, "logq": logq}


def run_write_only(args: argparse.Namespace) -> None:
    from train.data.prepare.pipeline import Budget
    from train.data.prepare.shards import ShardWriter, histories
    from train.data.prepare.shuffle import SampleBuckets, write_shards

    arrays = synthetic_samples(args.samples, args.items, seed=args.seed)
    n = len(arrays["ts"])
    budget = Budget()
    print(f"{n:,} samples, {args.items:,} items, max_history={args.max_history}, shard_size={args.shard_size}")
    times: list[tuple[float, float]] = []
    for run in range(args.repeat):  # the fastest of a few: writing to disk is what varies
        with tempfile.TemporaryDirectory(prefix="write-only-") as tmp:
            bucket_dir, shard_dir = Path(tmp) / "buckets", Path(tmp) / "shards"
            bucket_dir.mkdir()
            shard_dir.mkdir()
            started = time.perf_counter()
            buckets = SampleBuckets(bucket_dir, n, args.seed, args.shard_size, budget.bucket_samples)
            for begin in range(0, n, budget.samples_at_once):
                taken = slice(begin, begin + budget.samples_at_once)
                starts, ts = arrays["starts"][taken], arrays["ts"][taken]
                history, lengths = histories(arrays["items"], starts, ts, args.max_history)
                buckets.add(begin, arrays["users"][taken], ts, arrays["items"][starts + ts], history, lengths)
            filled = time.perf_counter()
            shards = write_shards(buckets, ShardWriter(shard_dir, arrays["logq"]).write, lambda samples: None)
            times.append((filled - started, time.perf_counter() - filled))
            if run == 0:
                size = sum(p.stat().st_size for p in shard_dir.iterdir())
                print(f"{size / 2**20:.0f} MiB in {len(shards)} shards")
    fill, write = min(times, key=sum)
    print(f"buckets filled {fill:7.2f} s, shards written {write:7.2f} s: {1e6 * (fill + write) / n:6.2f} µs/sample "
          f"(fastest of {', '.join(f'{sum(t):.2f}' for t in times)} s)")


# -------------------------------------------------------------------- the profile

def run_profile(args: argparse.Namespace) -> None:
    from train.config.io import load_config
    from train.data.prepare.run import prepare

    with tempfile.TemporaryDirectory(prefix="prepare-profile-") as tmp:
        directory = Path(tmp)
        interactions, catalog = generate(directory, args.interactions, args.users, args.items, args.seed)
        config = load_config(_write_config(directory, args.max_history, args.shard_size),
                             ["data.format=csv", f"data.interactions={interactions}", f"data.catalog={catalog}",
                              f"data.dir={directory / 'prepared'}"])
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        manifest = prepare(config, show_progress=False)
        profiler.disable()
        print(f"prepare(): {time.perf_counter() - started:.2f} s under cProfile, "
              f"{manifest['counts']['train_samples']:,} samples")
        for key in ("cumulative", "tottime"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(args.top)
            print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, nargs="+", default=[1_000_000, 4_000_000],
                        help="rows of the generated log; several sizes are prepared one after another")
    parser.add_argument("--users", type=int, default=0, help="users (default: interactions / 50)")
    parser.add_argument("--items", type=int, default=50_000, help="catalog items")
    parser.add_argument("--max-history", type=int, default=20, help="data.max_history")
    parser.add_argument("--shard-size", type=int, default=10_000, help="data.shard_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default="", help="generate and prepare in DIR and keep the files")
    parser.add_argument("--write-only", action="store_true", help="time just the shuffle buckets and shard writer")
    parser.add_argument("--samples", type=int, default=200_000, help="--write-only: training samples")
    parser.add_argument("--repeat", type=int, default=3, help="--write-only: runs (the fastest counts)")
    parser.add_argument("--profile", action="store_true", help="profile prepare() in-process with cProfile")
    parser.add_argument("--generate", default="", metavar="DIR", help="only write the log and catalog CSVs into DIR")
    parser.add_argument("--top", type=int, default=25, help="--profile: rows per table")
    args = parser.parse_args()
    if args.generate or args.profile:
        args.interactions = args.interactions[0]
        args.users = args.users or max(1, args.interactions // 50)
    if args.generate:
        generate(Path(args.generate), args.interactions, args.users, args.items, args.seed)
    elif args.write_only:
        run_write_only(args)
    elif args.profile:
        run_profile(args)
    else:
        run_prepare(args)


if __name__ == "__main__":
    main()
