"""How much of a run's top k does the user already have? The history-kept figures' main loss.

    python benchmarks/seen_in_top.py RUN [RUN ...] [--split test] [--k 10]

Each run directory is re-encoded as benchmarks/paired.py does (its best validated checkpoint,
else its newest, by its own config.yaml) and ranks the full catalog for every user of the
split, history kept. Printed per run: how many of each user's top k are items already in their
history, the share of users whose most recent item is among them, and how many of those items
are older than the data.max_history items the user embedding reads (which it cannot know of).
On a log where users never take an item twice (MovieLens ratings), each such slot is lost, so
this says how far the history-kept NDCG is from the history-excluded one and why.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import ROOT, encode_run  # noqa: E402  (a sibling script, not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    from train.errors import UserError

    print(f"command: (cd {ROOT.name} && python benchmarks/seen_in_top.py "
          f"{' '.join(shlex.quote(str(run)) for run in args.runs)} --split {args.split} --k {args.k})")
    print(f"{'run':<40}{'users':>7}{f'seen in top {args.k}':>16}{'last item in':>14}{'older than window':>19}")
    for run_dir in args.runs:
        try:
            run = encode_run(run_dir, args.split)
        except UserError as error:
            sys.exit(f"seen_in_top.py: {error}")
        seen = last_in = older = 0
        for begin in range(0, len(run.targets), 1024):  # one block of scores at a time
            top = run.scores(begin, begin + 1024).topk(args.k, dim=1).indices.tolist()
            for history, chosen in zip(run.histories[begin:begin + 1024], top):
                age = {item: len(history) - i for i, item in enumerate(history)}  # 1 = the most recent
                ages = [age[item] for item in chosen if item in age]
                seen += len(ages)
                last_in += 1 in ages
                older += sum(a > run.max_history for a in ages)
        users = len(run.targets)
        print(f"{str(run_dir):<40}{users:>7}{seen / users:>16.2f}{last_in / users:>14.1%}"
              f"{older / max(seen, 1):>19.1%}")


if __name__ == "__main__":
    main()
