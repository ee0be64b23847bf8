"""Full-catalog ranking at scale: 10k users against a 1M-item catalog, as a validation ranks it.

    python benchmarks/eval_scale.py [--items 1000000] [--users 10000] [--dim 64] [--history 50]
                                    [--transitions]

Random unit embeddings stand in for the encoder's (encoding a million item texts is the
encoder's cost, measured by the throughput benchmarks); this measures what evaluation adds on
top: scoring every item for every user in blocks, with each user's history excluded and kept
(one pass gives both), and turning target ranks into Recall/NDCG/MRR/HR@K, without ever holding
a users x items matrix. With --transitions, the ranking is the fused one (eval.transitions):
the item-to-item counts of the users' histories are built (as from the training sequences) and
added to the scores of each user's recent items' successors, and the encoder alone and the
transitions alone are ranked in the same pass, as evaluate() reports them; the count time is
printed apart.
Prints wall time, peak memory (RSS) and the block sizes.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config.schema import TransitionSettings  # noqa: E402
from train.evaluation.ranking import Bonus, rank_catalog  # noqa: E402
from train.evaluation.transitions import count_transitions, user_prior  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64, help="embedding size")
    parser.add_argument("--history", type=int, default=50, help="history items excluded per user")
    parser.add_argument("--user-chunk", type=int, default=1024)
    parser.add_argument("--item-chunk", type=int, default=32768)
    parser.add_argument("--transitions", action="store_true", help="fuse the transition prior (eval.transitions "
                                                                    "defaults, weight 0.1)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    items = F.normalize(torch.randn(args.items, args.dim, generator=generator), dim=-1)
    targets = torch.randint(0, args.items, (args.users,), generator=generator)
    # Users close to their target, so ranks span the whole range rather than all being ~N/2.
    users = F.normalize(items[targets] + 1.2 * torch.randn(args.users, args.dim, generator=generator), dim=-1)
    histories = torch.randint(0, args.items, (args.users, args.history), generator=generator).tolist()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bonus: Bonus | None = None
    if args.transitions:
        started = time.perf_counter()
        settings = TransitionSettings(weight=0.1)
        counted = count_transitions(histories, args.items, settings.window, settings.max_successors)
        counts = torch.bincount(torch.tensor(histories).flatten(), minlength=args.items)

        def bonus(begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return user_prior(counted, histories[begin:end], counts, settings.weight, settings.recent, settings.decay,
                              settings.popularity_power)
        print(f"transitions counted in {time.perf_counter() - started:.1f} s: {len(counted.successors):,} "
              f"(item, successor) pairs from {args.users * args.history:,} history items")
    started = time.perf_counter()
    metrics = rank_catalog(users, items, targets, histories, [10, 50], user_chunk=args.user_chunk,
                           item_chunk=args.item_chunk, bonus=bonus, parts=bonus is not None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"command: python benchmarks/eval_scale.py --items {args.items} --users {args.users} --dim {args.dim} "
          f"--history {args.history} --user-chunk {args.user_chunk} --item-chunk {args.item_chunk}"
          f"{' --transitions' if args.transitions else ''}")
    print(f"{args.users:,} users x {args.items:,} items, dim {args.dim}, {args.history} history items excluded per user, "
          f"torch threads {torch.get_num_threads()}")
    print(f"ranking time {seconds:.1f} s ({args.users / seconds:,.0f} users/s)")
    print(f"peak RSS {peak:,.0f} MB (inputs alone {rss_before:,.0f} MB: the item embeddings are "
          f"{args.items * args.dim * 4 / 2**20:,.0f} MB; one score block is "
          f"{args.user_chunk * args.item_chunk * 4 / 2**20:,.0f} MB)")
    blocks = {"excluded": metrics, "kept": metrics["with_history"],
              **{f"{part} alone": metrics[part] for part in ("encoder", "transitions") if part in metrics}}
    for label, block in blocks.items():
        print(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in block.items() if k.endswith("@10")))


if __name__ == "__main__":
    main()
