"""Embedding items and users for evaluation and catalog refreshes: no gradients, batches formed
by length, rows split over the processes and gathered on every one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

from model.encoder import RecEncoder
from model.gather import gather_no_grad, world
from model.user_tower import sequence_inputs
from train.data.collate import PromptCollator, history_tensor
from train.distributed import even_share


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
def encode(encoder: RecEncoder, collator: PromptCollator, token_lists: list[list[int]], batch_size: int,
           device: torch.device, desc: str, show_progress: bool, user: bool = False) -> torch.Tensor:
    """Embeddings of token lists (users' prompts when `user`), in their order; batches are formed
    by length to spare padding."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: torch.Tensor | None = None
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = order[begin:begin + batch_size]
        ids, mask = collator.pad([token_lists[i] for i in rows])
        vectors = encoder(ids.to(device), mask.to(device), user=user).float()
        if out is None:
            out = torch.empty(len(order), vectors.shape[1], device=device)
        out[torch.tensor(rows, device=device)] = vectors
    assert out is not None
    return out


def encode_sharded(encoder: RecEncoder, collator: PromptCollator, token_lists: list[list[int]], batch_size: int,
                   device: torch.device, desc: str, show_progress: bool, user: bool = False) -> torch.Tensor:
    """`encode` with the rows split over the processes (even_share) and gathered on every one."""
    if world(None)[1] == 1:
        return encode(encoder, collator, token_lists, batch_size, device, desc, show_progress, user).cpu()
    mine = [token_lists[i] for i in even_share(len(token_lists))]
    local = encode(encoder, collator, mine, batch_size, device, desc, show_progress, user)
    return gather_no_grad(local.contiguous())[:len(token_lists)].cpu()


@torch.no_grad()
def encode_item_sequences(encoder: RecEncoder, items: torch.Tensor, histories: list[list[int]], batch_size: int,
                          device: torch.device) -> torch.Tensor:
    """User embeddings from the user tower over each history's item embeddings (model.user_encoder=items),
    the rows split over the ranks and gathered on every rank."""
    rows = even_share(len(histories))
    local = torch.empty(len(rows), items.shape[1], device=device)
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin:begin + batch_size]
        history = history_tensor([histories[i] for i in chunk])
        sequence, mask, _ = sequence_inputs(history, torch.zeros(len(chunk), dtype=torch.long))
        local[begin:begin + len(chunk)] = encoder(None, mask.to(device), user=True,
                                                  item_sequence=items[sequence].to(device)).float()
    return gather_no_grad(local.contiguous())[:len(histories)].cpu()
