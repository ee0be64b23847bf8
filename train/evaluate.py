"""Evaluation: encode the catalog and held-out users, rank every item, report metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from model.encoder import RecEncoder
from train.collate import PromptEncoder
from train.config import Config
from train.ranking import rank_in_chunks


@torch.no_grad()
def encode(encoder: RecEncoder, prompts: PromptEncoder, token_lists: list[list[int]], batch_size: int,
           device: torch.device, desc: str, show_progress: bool) -> torch.Tensor:
    """Embeddings of token lists, in their order; batches are formed by length to spare padding."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: torch.Tensor | None = None
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = order[begin:begin + batch_size]
        ids, mask = prompts.pad([token_lists[i] for i in rows])
        vectors = encoder(ids.to(device), mask.to(device)).float().cpu()
        if out is None:
            out = torch.empty(len(order), vectors.shape[1])
        out[torch.tensor(rows)] = vectors
    assert out is not None
    return out


def load_split(data_dir: str | Path, split: str) -> dict[str, Any]:
    table = pq.read_table(Path(data_dir) / "splits" / f"{split}.parquet")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def evaluate(encoder: RecEncoder, prompts: PromptEncoder, config: Config, device: torch.device,
             split: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Model and popularity metrics on `split` (default: eval.split), history excluded if configured."""
    split = split or config.eval.split
    rows = load_split(config.data.dir, split)
    ks = config.eval.k
    was_training = encoder.training
    encoder.eval()
    catalog_size = len(prompts.catalog)
    items = encode(encoder, prompts, prompts.item_tokens(range(catalog_size)), config.eval.batch_size, device,
                   "encode catalog", show_progress)
    histories = [h[-config.data.max_history:] for h in rows["history"]]
    users = encode(encoder, prompts, prompts.user_tokens(histories), config.eval.batch_size, device,
                   "encode users", show_progress)
    encoder.train(was_training)
    targets = torch.tensor(rows["target"], dtype=torch.long)
    exclude = rows["history"] if config.eval.exclude_history else None
    metrics: dict[str, Any] = {"split": split, "users": len(targets)}
    metrics.update(rank_in_chunks(users, items, targets, exclude, ks))
    metrics["popularity"] = popularity(prompts, targets, exclude, ks)
    return metrics


def popularity(prompts: PromptEncoder, targets: torch.Tensor, exclude: list[list[int]] | None, ks: list[int]) -> dict[str, float]:
    """The baseline every recommender must beat: rank items by their training count."""
    counts = prompts.catalog.train_counts().double()
    # One "user" vector [1] against item "embeddings" [count] gives count as every user's score.
    return rank_in_chunks(torch.ones(len(targets), 1, dtype=torch.float64), counts[:, None], targets, exclude, ks)


def format_table(metrics: dict[str, Any], ks: list[int]) -> str:
    """A small text table: rectrain beside popularity."""
    keys = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr")]
    header = f"{metrics['split']} ({metrics['users']} users)"
    lines = [f"{header:<24}" + "".join(f"{k:>12}" for k in keys)]
    lines.append(f"{'rectrain':<24}" + "".join(f"{metrics[k]:>12.4f}" for k in keys))
    lines.append(f"{'popularity':<24}" + "".join(f"{metrics['popularity'][k]:>12.4f}" for k in keys))
    return "\n".join(lines)
