"""Evaluation: encode the catalog and held-out users (sharded over ranks), rank every item
(the users sharded over ranks again, each share on its rank's device, the sums added up), and
report metrics with the user's history excluded (top level) and kept (`with_history`, the way
RecBole-style numbers are reported). With eval.transitions.weight > 0 the ranking is the fused
one (encoder + the log's transitions, train/transitions.py), and each part alone is reported
beside it (`encoder`, `transitions`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from model.encoder import RecEncoder
from model.gather import gather_no_grad, world
from model.user_tower import sequence_inputs
from train.collate import PromptEncoder, history_tensor
from train.config import Config
from train.ranking import Bonus, mean_metrics, rank_sums
from train.transitions import Transitions, count_transitions, user_prior


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def encode(encoder: RecEncoder, prompts: PromptEncoder, token_lists: list[list[int]], batch_size: int,
           device: torch.device, desc: str, show_progress: bool, user: bool = False) -> torch.Tensor:
    """Embeddings of token lists (users' prompts when `user`), in their order; batches are formed
    by length to spare padding."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: torch.Tensor | None = None
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = order[begin:begin + batch_size]
        ids, mask = prompts.pad([token_lists[i] for i in rows])
        vectors = encoder(ids.to(device), mask.to(device), user=user).float()
        if out is None:
            out = torch.empty(len(order), vectors.shape[1], device=device)
        out[torch.tensor(rows, device=device)] = vectors
    assert out is not None
    return out


def encode_sharded(encoder: RecEncoder, prompts: PromptEncoder, token_lists: list[list[int]], batch_size: int,
                   device: torch.device, desc: str, show_progress: bool, user: bool = False) -> torch.Tensor:
    """`encode` with the rows split over the ranks (rank_rows) and the embeddings gathered on every rank."""
    if world(None)[1] == 1:
        return encode(encoder, prompts, token_lists, batch_size, device, desc, show_progress, user).cpu()
    mine = [token_lists[i] for i in rank_rows(len(token_lists))]
    local = encode(encoder, prompts, mine, batch_size, device, desc, show_progress, user)
    return gather_no_grad(local.contiguous())[:len(token_lists)].cpu()


def rank_share(count: int) -> range:
    """This rank's contiguous share of `count` rows, ceil(count / world size) long; on the last
    ranks it may run past `count`."""
    rank, size = world(None)
    per_rank = -(-count // size)
    return range(rank * per_rank, (rank + 1) * per_rank)


def rank_rows(count: int) -> list[int]:
    """This rank's share of `count` rows: the same number on every rank (the last row repeated),
    so every rank runs the same number of forward passes: ZeRO-3 gathers weights inside each
    forward and would hang on a rank that ran one fewer."""
    return [min(i, count - 1) for i in rank_share(count)]


@torch.no_grad()
def encode_item_sequences(encoder: RecEncoder, items: torch.Tensor, histories: list[list[int]], batch_size: int,
                          device: torch.device) -> torch.Tensor:
    """User embeddings from the user tower over each history's item embeddings (model.user_encoder=items),
    the rows split over the ranks and gathered on every rank."""
    rows = rank_rows(len(histories))
    local = torch.empty(len(rows), items.shape[1], device=device)
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin:begin + batch_size]
        history = history_tensor([histories[i] for i in chunk])
        sequence, mask, _ = sequence_inputs(history, torch.zeros(len(chunk), dtype=torch.long))
        local[begin:begin + len(chunk)] = encoder(None, mask.to(device), user=True,
                                                  item_sequence=items[sequence].to(device)).float()
    return gather_no_grad(local.contiguous())[:len(histories)].cpu()


def load_split(data_dir: str | Path, split: str) -> dict[str, Any]:
    table = pq.read_table(Path(data_dir) / "splits" / f"{split}.parquet")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def training_transitions(config: Config, num_items: int) -> Transitions:
    """The transition counts of the training sequences: the validation split's histories, which
    hold every user's sequence up to (not including) the validation target."""
    settings = config.eval.transitions
    return count_transitions(load_split(config.data.dir, "valid")["history"], num_items, settings.window,
                             settings.max_successors)


def evaluate(encoder: RecEncoder, prompts: PromptEncoder, config: Config, device: torch.device,
             split: str | None = None, show_progress: bool = True,
             catalog_tokens: list[list[int]] | None = None, transitions: Transitions | None = None,
             baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model and popularity metrics on `split` (default: eval.split), history excluded and kept.

    `catalog_tokens`: every item's prompt tokens when the caller keeps them (training validates
    often; tokenising a large catalog each time would cost more than encoding it). `transitions`:
    the training transition counts when the caller keeps them (built here otherwise). `baseline`:
    popularity's metrics on this split as `baseline_of` took them from an earlier call (ranked
    here otherwise)."""
    split = split or config.eval.split
    rows = load_split(config.data.dir, split)
    ks = config.eval.k
    if catalog_tokens is None:
        catalog_tokens = prompts.item_tokens(range(len(prompts.catalog)))
    with eval_mode(encoder):
        items = encode_sharded(encoder, prompts, catalog_tokens, config.eval.batch_size, device, "encode catalog",
                               show_progress)
        histories = [h[-config.data.max_history:] for h in rows["history"]]
        if encoder.user_tower is not None:
            users = encode_item_sequences(encoder, items, histories, config.eval.batch_size, device)
        else:
            users = encode_sharded(encoder, prompts, prompts.user_tokens(histories), config.eval.batch_size, device,
                                   "encode users", show_progress, user=True)
    targets = torch.tensor(rows["target"], dtype=torch.long)
    metrics: dict[str, Any] = {"split": split, "users": len(targets)}
    settings = config.eval.transitions
    bonus = None
    if settings.weight > 0:
        counted = transitions or training_transitions(config, len(prompts.catalog))
        train_counts = prompts.catalog.train_counts()

        def bonus(begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return user_prior(counted, rows["history"][begin:end], train_counts, settings.weight, settings.recent,
                              settings.decay, settings.popularity_power)
    # One pass over the catalog ranks everything reported: history excluded and kept, and with
    # the prior on, the encoder alone and the transitions alone (so a fused figure can be read
    # against its parts).
    metrics.update(rank_shared(users, items, targets, rows["history"], ks, device, bonus, parts=bonus is not None))
    popular = dict(baseline) if baseline is not None else popularity(prompts, targets, rows["history"], ks, device)
    metrics["with_history"]["popularity"] = dict(popular.pop("with_history"))
    metrics["popularity"] = popular
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return metrics


def popularity(prompts: PromptEncoder, targets: torch.Tensor, histories: list[list[int]], ks: list[int],
               device: torch.device) -> dict[str, Any]:
    """The baseline every recommender must beat: rank items by their training count (history
    excluded at the top level, kept under "with_history")."""
    counts = prompts.catalog.train_counts().double()
    # One "user" vector [1] against item "embeddings" [count] gives count as every user's score.
    return rank_shared(torch.ones(len(targets), 1, dtype=torch.float64), counts[:, None], targets, histories, ks,
                       device)


def rank_shared(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, histories: list[list[int]],
                ks: list[int], device: torch.device, bonus: Bonus | None = None, parts: bool = False) -> dict[str, Any]:
    """`rank_catalog` with the users split over the ranks: each ranks its share of the users on
    its own device, and the metric sums are added up over the ranks (every rank gets the means).
    With 8 ranks, each scores an eighth of the users x items blocks instead of all of them."""
    share = rank_share(len(targets))
    begin, end = min(share.start, len(targets)), min(share.stop, len(targets))
    share_bonus: Bonus | None = None
    if bonus is not None:
        full = bonus

        def share_bonus(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return full(begin + first, begin + last)  # rows still counted from `first`
    sums = rank_sums(users[begin:end], items, targets[begin:end], histories[begin:end], ks, bonus=share_bonus,
                     parts=parts, device=device)
    if world(None)[1] > 1:  # the same keys in the same order on every rank: one vector to add up
        totals = torch.tensor(numbers(sums), dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        sums = refill(sums, iter(totals.tolist()))
    return mean_metrics(sums, len(targets))


def numbers(tree: dict[str, Any]) -> list[float]:
    """Every number of a nested metrics dict, in its key order."""
    return [x for value in tree.values() for x in (numbers(value) if isinstance(value, dict) else [float(value)])]


def refill(tree: dict[str, Any], values: Iterator[float]) -> dict[str, Any]:
    """`tree` with its numbers replaced, in `numbers` order, by `values`."""
    return {key: refill(value, values) if isinstance(value, dict) else next(values) for key, value in tree.items()}


def baseline_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """Popularity's metrics out of `evaluate`'s, in the shape its `baseline` argument takes."""
    return {**metrics["popularity"], "with_history": metrics["with_history"]["popularity"]}


def format_table(metrics: dict[str, Any], ks: list[int]) -> str:
    """A small text table: rectrain beside popularity (and its parts, when the ranking is fused),
    history excluded and kept."""
    keys = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr")]
    header = f"{metrics['split']} ({metrics['users']} users)"
    lines = [f"{header:<36}" + "".join(f"{k:>12}" for k in keys)]
    parts = [(name, metrics[name]) for name in ("encoder", "transitions") if name in metrics]
    rows = [("rectrain", metrics), *((f"  {name} alone", part) for name, part in parts),
            ("popularity", metrics["popularity"]), ("rectrain, history kept", metrics["with_history"]),
            *((f"  {name} alone, history kept", part["with_history"]) for name, part in parts),
            ("popularity, history kept", metrics["with_history"]["popularity"])]
    for label, source in rows:
        lines.append(f"{label:<36}" + "".join(f"{source[k]:>12.4f}" for k in keys))
    return "\n".join(lines)
