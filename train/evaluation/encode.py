"""Embedding items and users for evaluation and catalog refreshes: no gradients, batches formed
by length, rows split over the processes and gathered on every one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

from model.encoder import RecEncoder
from model.gather import gather_no_grad, gather_ragged
from model.layer_cache import StateCache
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
           device: torch.device, desc: str, show_progress: bool, user: bool = False,
           cache: StateCache | None = None, item_ids: list[int] | None = None,
           forward: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Embeddings of token lists (users' prompts when `user`), in their order; batches are formed
    by length to spare padding. Items are catalog items `item_ids` (one per token list); with
    `cache` they start from their cached lower-layer states instead of their tokens. `forward`:
    the training engine's (its precision, and its way to reach ZeRO-3's partitioned weights)
    instead of the encoder's own."""
    forward = forward or encoder
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out: torch.Tensor | None = None
    for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = order[begin:begin + batch_size]
        items = None if user or item_ids is None else torch.tensor([item_ids[i] for i in rows])
        if cache is not None:
            assert items is not None
            states, mask = cache.batch(items, collator.padding_side, device)
            vectors = forward(None, mask, lower_states=states, item_ids=items.to(device)).float()
        else:
            ids, mask = collator.pad([token_lists[i] for i in rows])
            vectors = forward(ids.to(device), mask.to(device), user=user,
                              item_ids=None if items is None else items.to(device)).float()
        if out is None:
            out = torch.empty(len(order), vectors.shape[1], device=device)
        out[torch.tensor(rows, device=device)] = vectors
    assert out is not None
    return out


def encode_sharded(encoder: RecEncoder, collator: PromptCollator, token_lists: list[list[int]], batch_size: int,
                   device: torch.device, desc: str, show_progress: bool, user: bool = False,
                   cache: StateCache | None = None, forward: Callable[..., torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """`encode` with the rows split over the processes (even_share) and gathered on every one.
    Unless `user`, the token lists are the catalog's, item i's at index i."""
    rows = even_share(len(token_lists))
    local = encode(encoder, collator, [token_lists[i] for i in rows], batch_size, device, desc, show_progress, user,
                   cache, None if user else rows, forward)
    return gather_no_grad(local.contiguous())[:len(token_lists)].cpu()


@torch.no_grad()
def cache_lower_states(encoder: RecEncoder, collator: PromptCollator, token_lists: list[list[int]], batch_size: int,
                       device: torch.device, show_progress: bool) -> StateCache:
    """Every catalog item's token states after the frozen lower layers (model.trained_layers),
    computed once: each process encodes its share in length-sorted batches, the packed states
    are gathered on every one and kept in host memory."""
    mine = [token_lists[i] for i in even_share(len(token_lists))]
    order = sorted(range(len(mine)), key=lambda i: len(mine[i]))
    states: list[torch.Tensor] = [torch.empty(0)] * len(mine)
    lengths = torch.zeros(len(mine), dtype=torch.long, device=device)  # cached states per item
    for begin in tqdm(range(0, len(order), batch_size), desc="cache frozen layers", disable=not show_progress,
                      leave=False):
        chunk = order[begin:begin + batch_size]
        ids, mask = collator.pad([mine[i] for i in chunk])
        packed, counts = StateCache.pack(*encoder.lower(ids.to(device), mask.to(device)))
        for i, item_states in zip(chunk, packed.split(counts.tolist())):
            states[i] = item_states
        lengths[torch.tensor(chunk, device=device)] = counts.to(device)
    packed = gather_ragged(torch.cat(states).contiguous())
    lengths = gather_no_grad(lengths)[:len(token_lists)].cpu()
    return StateCache(packed[:int(lengths.sum())].cpu(), lengths)


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
