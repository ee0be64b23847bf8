"""Is run B better than run A? Both ranked on the same users and targets, compared user by user.

    python benchmarks/paired.py RUN_A RUN_B [RUN_A2 RUN_B2 ...] [--split test] [--k 10] [--resamples 10000]

Each run directory is re-encoded with its best validated checkpoint (else its newest), by its
own config.yaml, and ranks the full catalog for every user of the split. The two runs must share
the split (the same data.dir, or at least the same users and targets). More pairs (A2 against
B2 on their own split: another seed's held-out items, say) pool their users into one
comparison, each user still compared with themselves. Printed, for all users and for each
bucket of how often the target occurs in training (eval.target_buckets; with data.cold_items
the "0" bucket is what the text alone carries), with the history kept and excluded: NDCG@k of A and of B, the mean paired difference B - A, its 95% bootstrap interval
(users resampled with replacement, each carrying both runs' figures), the share of resamples in
which B wins, and how many users B ranks better, worse and the same.

With --untrained-a RECENT, A is RUN_A's backbone with nothing trained (each item its frozen
pooled state, each user the mean of their last RECENT items, cosine scores): does training on
the log beat the off-the-shelf LLM embedding, user by user?

Why paired: two runs' means over ~500 users differ by about 0.005 from the seed alone, but most
of that is which users happen to be easy; the same users' differences cancel it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Ranked:
    """One run's per-user figures on a split."""

    checkpoint: Path
    targets: torch.Tensor  # [U]
    kept: torch.Tensor  # [U] NDCG@k with the history kept
    excluded: torch.Tensor  # [U] ... excluded
    buckets: torch.Tensor | None  # [U] index into names
    names: list[str]


@dataclass
class Encoded:
    """A run's users and catalog as its best checkpoint embeds them on a split."""

    checkpoint: Path
    users: torch.Tensor  # [U, D]
    items: torch.Tensor  # [N, D]
    histories: list[list[int]]
    targets: torch.Tensor  # [U]
    train_counts: torch.Tensor  # [N] each item's count as a training target
    target_buckets: list[int]  # the run's eval.target_buckets
    max_history: int  # the run's data.max_history: how many recent items a user embedding reads
    repeat: float = 0.0  # the run's model.repeat_score on the items among a user's last max_history

    def scores(self, begin: int, end: int) -> torch.Tensor:
        """[end - begin, N] users begin..end-1 against every item, as evaluation ranks them."""
        from train.evaluation.evaluate import repeat_bonus

        scores = self.users[begin:end].float() @ self.items.float().T
        if self.repeat:  # the same window and value evaluation adds
            rows, items, values = repeat_bonus(self.histories, self.max_history, self.repeat)(begin, end)
            scores.index_put_((rows, items), values, accumulate=True)
        return scores


def encode_run(run_dir: Path, split: str) -> Encoded:
    """Re-encode `run_dir` with its best validated checkpoint (else its newest), by its own config."""
    from train.config.io import load_config
    from train.data.layout import load_split
    from train.distributed import from_environment
    from train.errors import UserError
    from train.evaluation.evaluate import Evaluator, embed_users_and_items
    from train.modeling import checkpoint
    from train.modeling.build import build_model, load_inputs

    config = load_config(run_dir / "config.yaml")
    path = checkpoint.best_or_latest(run_dir)
    if path is None:
        raise UserError(f"{run_dir}: no whole checkpoint; train it first")
    dist_state = from_environment(config.device)
    inputs = load_inputs(config, dist_state)
    model = build_model(config, inputs, dist_state.device)
    checkpoint.load_weights(path, model.encoder)
    evaluator = Evaluator(config, inputs.collator, dist_state.device, True)
    rows = load_split(config.data.dir, split)
    users, items = embed_users_and_items(model.encoder, inputs.collator, config, dist_state.device, rows["history"],
                                         evaluator.catalog_tokens(), True, evaluator.state_cache(model.encoder))
    repeat = model.encoder.repeat_score
    return Encoded(path, users, items, rows["history"], torch.tensor(rows["target"], dtype=torch.long),
                   inputs.collator.catalog.train_counts(), config.eval.target_buckets, config.data.max_history,
                   0.0 if repeat is None else float(repeat().detach()))


def rank(run: Encoded, k: int) -> Ranked:
    """Each user's NDCG@k over the full catalog, history kept and excluded, and their target bucket."""
    from train.evaluation.evaluate import target_buckets
    from train.evaluation.ranking import ndcg_at, target_ranks

    kept, excluded = [], []
    for begin in range(0, len(run.targets), 1024):  # one block of scores at a time
        scores = run.scores(begin, begin + 1024)
        chunk = run.targets[begin:begin + 1024].to(scores.device)
        kept.append(target_ranks(scores, chunk).cpu())
        excluded.append(target_ranks(scores, chunk, run.histories[begin:begin + 1024]).cpu())
    grouped = target_buckets(run.train_counts, run.targets, run.target_buckets)
    buckets, names = grouped if grouped is not None else (None, [])
    return Ranked(run.checkpoint, run.targets, ndcg_at(torch.cat(kept), k), ndcg_at(torch.cat(excluded), k), buckets,
                  names)


def encode_untrained(run_dir: Path, split: str, recent: int) -> Encoded:
    """The off-the-shelf baseline of run_dir's backbone, nothing trained: each item its frozen
    pooled state (the run's backbone, pooling and item prompts), each user the mean of their
    last `recent` items' unit vectors, cosine scores (the issue's "frozen LLM, no training" row)."""
    from train.config.io import load_config
    from train.data.layout import load_split
    from train.distributed import from_environment
    from train.errors import UserError
    from train.evaluation.evaluate import Evaluator
    from train.modeling.build import build_model, load_inputs

    config = load_config(run_dir / "config.yaml", ["model.trained_layers=0", "model.init_from="])
    dist_state = from_environment(config.device)
    inputs = load_inputs(config, dist_state)
    model = build_model(config, inputs, dist_state.device)
    cache = Evaluator(config, inputs.collator, dist_state.device, True).state_cache(model.encoder)
    if cache is None or not bool((cache.lengths == 1).all()):
        raise UserError(f"{run_dir}: --untrained-a needs a pretrained backbone (model.name_or_path)")
    items = torch.nn.functional.normalize(cache.states.float(), dim=-1)
    rows = load_split(config.data.dir, split)
    users = torch.stack([items[torch.tensor(history[-recent:])].mean(dim=0) for history in rows["history"]])
    return Encoded(Path(f"{run_dir} (untrained backbone, user = mean of last {recent})"), users, items,
                   rows["history"], torch.tensor(rows["target"], dtype=torch.long),
                   inputs.collator.catalog.train_counts(), config.eval.target_buckets, config.data.max_history)


def pool(runs: list[Ranked]) -> Ranked:
    """Several runs' users as one population (their buckets share names)."""
    if len(runs) == 1:
        return runs[0]
    buckets = None if runs[0].buckets is None else torch.cat([run.buckets for run in runs])  # type: ignore[misc]
    return Ranked(runs[0].checkpoint, torch.cat([run.targets for run in runs]), torch.cat([run.kept for run in runs]),
                  torch.cat([run.excluded for run in runs]), buckets, runs[0].names)


def paired(a: torch.Tensor, b: torch.Tensor, resamples: int, generator: torch.Generator) -> dict[str, float]:
    """Means of a and b, the mean of b - a with its 95% bootstrap interval over users, the share
    of resamples where b's mean is above a's, and the per-user wins, losses and ties."""
    diff = b - a
    means = torch.cat([diff[torch.randint(len(diff), (min(1000, resamples - done), len(diff)), generator=generator)]
                       .mean(dim=1) for done in range(0, resamples, 1000)])  # 1,000 resamples in memory at a time
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": float(diff.mean()), "low": low, "high": high,
            "b_wins": float((means > 0).double().mean()), "better": int((diff > 0).sum()),
            "worse": int((diff < 0).sum()), "same": int((diff == 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="RUN_A RUN_B, then optionally more pairs to pool")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0, help="seeds the bootstrap's draws")
    parser.add_argument("--untrained-a", type=int, default=0, metavar="RECENT",
                        help="A is RUN_A's backbone with nothing trained: items its frozen pooled states, a user "
                             "the mean of their last RECENT items, cosine scores; 0 = A is RUN_A as trained")
    args = parser.parse_args()
    from train.errors import UserError

    if len(args.runs) % 2:
        sys.exit("paired.py: give runs in pairs: RUN_A RUN_B [RUN_A2 RUN_B2 ...]")
    pairs = []
    try:
        for run_a, run_b in zip(args.runs[::2], args.runs[1::2]):
            first = (encode_untrained(run_a, args.split, args.untrained_a) if args.untrained_a
                     else encode_run(run_a, args.split))
            pair = rank(first, args.k), rank(encode_run(run_b, args.split), args.k)
            if not torch.equal(pair[0].targets, pair[1].targets):
                raise UserError(f"{run_a} and {run_b} rank different {args.split} targets: compare runs over the "
                                "same prepared split")
            if pair[0].names != pair[1].names:
                raise UserError(f"{run_a} and {run_b} bucket targets differently (eval.target_buckets)")
            pairs.append(pair)
    except UserError as error:
        sys.exit(f"paired.py: {error}")
    print(f"command: (cd {ROOT.name} && python benchmarks/paired.py "
          f"{' '.join(shlex.quote(str(run)) for run in args.runs)} --split {args.split} --k {args.k} "
          f"--resamples {args.resamples} --seed {args.seed}"
          f"{f' --untrained-a {args.untrained_a}' if args.untrained_a else ''})")
    for a_run, b_run in pairs:
        print(f"A: {a_run.checkpoint}  B: {b_run.checkpoint}  ({len(a_run.targets)} users)")
    a, b = pool([a_run for a_run, _ in pairs]), pool([b_run for _, b_run in pairs])
    print(f"{args.split} split, NDCG@{args.k}, {len(a.targets)} users")
    groups = [("all", torch.ones(len(a.targets), dtype=torch.bool))]
    if a.buckets is not None:
        groups += [(f"target seen {name}x", a.buckets == index) for index, name in enumerate(a.names)]
    generator = torch.Generator().manual_seed(args.seed)
    header = f"{'users':<18}{'history':<10}{'n':>6}{'A':>9}{'B':>9}{'B - A':>9}{'95% interval':>21}" \
             f"{'B wins':>8}{'better/worse/same':>20}"
    print(header)
    for label, member in groups:
        if not member.any():
            continue
        for view in ("kept", "excluded"):
            s = paired(getattr(a, view)[member], getattr(b, view)[member], args.resamples, generator)
            interval = f"[{s['low']:+.4f}, {s['high']:+.4f}]"
            counts = f"{s['better']}/{s['worse']}/{s['same']}"
            print(f"{label:<18}{view:<10}{int(member.sum()):>6}{s['a']:>9.4f}{s['b']:>9.4f}{s['diff']:>+9.4f}"
                  f"{interval:>21}{s['b_wins']:>8.1%}{counts:>20}")


if __name__ == "__main__":
    main()
