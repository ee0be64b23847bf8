"""Evaluation: encode the catalog and held-out users (sharded over processes), rank every item
(the users sharded over processes again, each share on its process's device, the sums added
up), and report metrics with the user's history excluded (top level) and kept (`with_history`,
the way RecBole-style numbers are reported). With eval.transitions.weight > 0 the ranking is
the fused one (encoder + the log's transitions, train/evaluation/transitions.py), and each part
alone is reported beside it (`encoder`, `transitions`).

`evaluate` computes everything from scratch; an `Evaluator` keeps what does not change between
validations of one run (catalog tokens, transition counts, popularity's figures)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from model.encoder import RecEncoder
from model.gather import world
from model.layer_cache import StateCache
from train.config.schema import Config
from train.data.collate import PromptCollator
from train.data.layout import load_split
from train.distributed import barrier, share
from train.evaluation import frozen_store
from train.evaluation.encode import cache_lower_states, encode_item_sequences, encode_sharded, eval_mode
from train.evaluation.ranking import Bonus, mean_metrics, rank_sums
from train.evaluation.report import baseline_of, numbers, refill
from train.evaluation.transitions import Transitions, count_transitions, user_prior


def training_transitions(config: Config, num_items: int) -> Transitions:
    """The transition counts of the training sequences: the validation split's histories, which
    hold every user's sequence up to (not including) the validation target."""
    settings = config.eval.transitions
    return count_transitions(load_split(config.data.dir, "valid")["history"], num_items, settings.window,
                             settings.max_successors)


def evaluate(encoder: RecEncoder, collator: PromptCollator, config: Config, device: torch.device,
             split: str | None = None, show_progress: bool = True,
             catalog_tokens: list[list[int]] | None = None, transitions: Transitions | None = None,
             baseline: dict[str, Any] | None = None, cache: StateCache | None = None) -> dict[str, Any]:
    """Model and popularity metrics on `split` (default: eval.split), history excluded and kept.

    Every process must call it (ZeRO-3 needs all of them in each forward); each gets the same
    metrics. `catalog_tokens`, `transitions`, `baseline`: what an `Evaluator` kept from an
    earlier call (computed here when None). `cache`: the catalog's frozen lower-layer states
    (model.trained_layers); without it items are encoded from their tokens, to the same result."""
    split = split or config.eval.split
    rows = load_split(config.data.dir, split)
    ks = config.eval.k
    users, items = embed_users_and_items(encoder, collator, config, device, rows["history"], catalog_tokens,
                                         show_progress, cache)
    targets = torch.tensor(rows["target"], dtype=torch.long)
    metrics: dict[str, Any] = {"split": split, "users": len(targets)}
    settings = config.eval.transitions
    bonus = None
    if settings.weight > 0:
        counted = transitions or training_transitions(config, len(collator.catalog))
        train_counts = collator.catalog.train_counts()

        def bonus(begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return user_prior(counted, rows["history"][begin:end], train_counts, settings.weight, settings.recent,
                              settings.decay, settings.popularity_power)
    repeat = None
    if encoder.repeat_score is not None:
        repeat = repeat_bonus(rows["history"], config.data.max_history, float(encoder.repeat_score().detach()))
    # One pass over the catalog ranks everything reported: history excluded and kept, and with
    # the prior on, the encoder alone and the transitions alone (so a fused figure can be read
    # against its parts); with a repeat score, the inner products without it.
    metrics.update(rank_in_shares(users, items, targets, rows["history"], ks, device, bonus, parts=bonus is not None,
                                  groups=target_buckets(collator.catalog.train_counts(), targets,
                                                        config.eval.target_buckets), repeat=repeat))
    if "groups" in metrics:
        metrics["by_target_count"] = metrics.pop("groups")
    popular = dict(baseline) if baseline is not None else popularity(collator, targets, rows["history"], ks, device)
    metrics["with_history"]["popularity"] = dict(popular.pop("with_history"))
    metrics["popularity"] = popular
    barrier()
    return metrics


def embed_users_and_items(encoder: RecEncoder, collator: PromptCollator, config: Config, device: torch.device,
                          histories: list[list[int]], catalog_tokens: list[list[int]] | None = None,
                          show_progress: bool = True, cache: StateCache | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(user embeddings [U, D], every catalog item's [N, D]) as ranking scores them: each user
    from the last data.max_history items of their history. Every process must call it."""
    if catalog_tokens is None:
        catalog_tokens = collator.item_tokens(range(len(collator.catalog)))
    with eval_mode(encoder):
        items = encode_sharded(encoder, collator, catalog_tokens, config.eval.batch_size, device, "encode catalog",
                               show_progress, cache=cache)
        histories = [h[-config.data.max_history:] for h in histories]
        if encoder.user_tower is not None:
            users = encode_item_sequences(encoder, items, histories, config.eval.batch_size, device)
        else:
            users = encode_sharded(encoder, collator, collator.user_tokens(histories), config.eval.batch_size, device,
                                   "encode users", show_progress, user=True)
    return users, items


def repeat_bonus(histories: list[list[int]], max_history: int, value: float) -> Bonus:
    """model.repeat_score as sparse scores: `value` on each distinct item of a user's last
    `max_history` (the items the user tower read, as in training)."""
    def scores(begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        windows = [sorted(set(history[-max_history:])) for history in histories[begin:end]]
        rows = torch.tensor([row for row, items in enumerate(windows) for _ in items], dtype=torch.long)
        items = torch.tensor([item for window in windows for item in window], dtype=torch.long)
        return rows, items, torch.full((len(items),), value)
    return scores


def target_buckets(train_counts: torch.Tensor, targets: torch.Tensor, edges: list[int]
                   ) -> tuple[torch.Tensor, list[str]] | None:
    """Each user's bucket by how often their target occurs in training (edges [1, 5, 20]: 0,
    1-4, 5-19, 20+): cold and long-tail items are what text is for, and a mean over all users
    hides them behind the popular ones."""
    if not edges:
        return None
    bounds = [0, *edges]
    names = [str(low) if high == low + 1 else f"{low}-{high - 1}" for low, high in zip(bounds, bounds[1:])]
    names.append(f"{bounds[-1]}+")
    return torch.bucketize(train_counts[targets].long(), torch.tensor(edges), right=True), names


def popularity(collator: PromptCollator, targets: torch.Tensor, histories: list[list[int]], ks: list[int],
               device: torch.device) -> dict[str, Any]:
    """The baseline every recommender must beat: rank items by their training count (history
    excluded at the top level, kept under "with_history")."""
    counts = collator.catalog.train_counts().double()
    # One "user" vector [1] against item "embeddings" [count] gives count as every user's score.
    return rank_in_shares(torch.ones(len(targets), 1, dtype=torch.float64), counts[:, None], targets, histories, ks,
                          device)


def rank_in_shares(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, histories: list[list[int]],
                   ks: list[int], device: torch.device, bonus: Bonus | None = None,
                   parts: bool = False, groups: tuple[torch.Tensor, list[str]] | None = None,
                   repeat: Bonus | None = None) -> dict[str, Any]:
    """`rank_catalog` with the users split over the processes: each ranks its share of the users
    on its own device, and the metric sums are added up over the processes (every one gets the
    means). With 8 processes, each scores an eighth of the users x items blocks."""
    mine = share(len(targets))
    begin, end = min(mine.start, len(targets)), min(mine.stop, len(targets))

    def shared(full: Bonus | None) -> Bonus | None:
        """`full`, whose users are all the users, for this process's share (rows still counted
        from the chunk's first)."""
        return None if full is None else lambda first, last: full(begin + first, begin + last)
    mine_groups = None if groups is None else (groups[0][begin:end], groups[1])
    sums = rank_sums(users[begin:end], items, targets[begin:end], histories[begin:end], ks, bonus=shared(bonus),
                     parts=parts, device=device, groups=mine_groups, repeat=shared(repeat))
    if world(None)[1] > 1:  # the same keys in the same order on every process: one vector to add up
        totals = torch.tensor(numbers(sums), dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        sums = refill(sums, iter(totals.tolist()))
    return mean_metrics(sums, len(targets))


class Evaluator:
    """Full-catalog evaluation for one run, keeping what does not change between its calls:
    every item's prompt tokens (tokenising a large catalog each validation would cost more than
    encoding it), the training transition counts, and popularity's figures per split (the
    model changes between validations, the baseline does not, and at catalog scale it costs as
    much to rank as the model)."""

    def __init__(self, config: Config, collator: PromptCollator, device: torch.device, is_main: bool) -> None:
        self.config = config
        self.collator = collator
        self.device = device
        self.is_main = is_main
        self.transitions: Transitions | None = None
        self.baselines: dict[str, dict[str, Any]] = {}
        self._catalog_tokens: list[list[int]] | None = None
        self._state_cache: StateCache | None = None

    def catalog_tokens(self) -> list[list[int]]:
        """Every catalog item's prompt tokens, tokenised once (catalog refreshes reuse them too)."""
        if self._catalog_tokens is None:
            self._catalog_tokens = self.collator.item_tokens(range(len(self.collator.catalog)))
        return self._catalog_tokens

    def state_cache(self, encoder: RecEncoder) -> StateCache | None:
        """The catalog's frozen lower-layer states (model.trained_layers), computed once per run:
        the frozen layers never change, so every step and evaluation reuses them."""
        if encoder.split is not None and self._state_cache is None:
            tokens = self.catalog_tokens()

            def compute() -> StateCache:
                with eval_mode(encoder):
                    return cache_lower_states(encoder, self.collator, tokens, self.config.eval.batch_size,
                                              self.device, self.is_main)

            # Kept in the data directory: a later run over the same backbone and catalog reads it.
            self._state_cache = frozen_store.with_store(self.config, encoder.split, encoder.frozen, tokens,
                                                        self.device, self.is_main, compute)
        return self._state_cache

    def evaluate(self, encoder: RecEncoder, split: str | None = None, show_progress: bool = True) -> dict[str, Any]:
        """`evaluate` with this run's kept parts; every process calls it and gets the same metrics."""
        split = split or self.config.eval.split
        if self.config.eval.transitions.weight > 0 and self.transitions is None:
            self.transitions = training_transitions(self.config, len(self.collator.catalog))
        metrics = evaluate(encoder, self.collator, self.config, self.device, split, show_progress and self.is_main,
                           self.catalog_tokens(), self.transitions, self.baselines.get(split),
                           self.state_cache(encoder))
        self.baselines[split] = baseline_of(metrics)
        return metrics
