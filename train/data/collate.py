"""Samples of ids -> prompts -> token tensors, padded for the pooling in use: the collator."""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from model.augment import MASKED, augment
from model.prompts import render_user
from train.config.schema import AugmentConfig, PromptConfig
from train.data.catalog import Catalog


# Items whose tokens a process keeps (about 30 MB at 32 tokens an item); past it, the rest are
# tokenised at each use.
ITEM_CACHE_LIMIT = 200_000


def pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), padded on `side`."""
    width = max(len(s) for s in sequences)
    # Filled in numpy: a torch.tensor per row cost a loader worker about a fifth of its batch.
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def history_tensor(histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """Histories as one [B, H] tensor, each row's items first and -1 after."""
    width = max(len(h) for h in histories)
    history = np.full((len(histories), width), -1, dtype=np.int64)
    for row, h in enumerate(histories):
        history[row, :len(h)] = h
    return torch.from_numpy(history)


class PromptCollator:
    """Renders and tokenizes user and item prompts into batches; one instance serves training
    (as the loader's collate function) and evaluation (its `item_tokens`, `user_tokens`, `pad`)."""

    def __init__(self, catalog: Catalog, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig, padding_side: str,
                 views: AugmentConfig | None = None, seed: int = 0, history_negatives: int = 0,
                 item_sequences: bool = False) -> None:
        self.catalog = catalog
        self.item_sequences = item_sequences
        self.views = views
        self.seed = seed
        self.history_negatives = history_negatives
        if history_negatives:
            # History items are drawn about as often as they were interacted with.
            counts = catalog.train_counts().double().clamp(min=1)
            self.item_logq = (counts / counts.sum()).log().float()
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.padding_side = padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = [tokenizer.eos_token_id] if prompt.append_eos and tokenizer.eos_token_id is not None else []
        # Tokens of the text before {history}: kept when a long history is cut, so the
        # instruction survives and only the oldest items go.
        head = prompt.user_template.split("{history}", 1)[0].format(instruction=prompt.instruction)
        self.head_tokens = len(self._ids([head])[0]) if head else 0
        # Each item's tokens, made once per process (a loader worker has its own): an item's text
        # never changes, and popular items recur in nearly every batch.
        self.item_cache: dict[int, list[int]] = {}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def user_texts(self, histories: Sequence[Sequence[int]]) -> list[str]:
        flat = [i for h in histories for i in h if i != MASKED]
        texts = iter(self.catalog.texts(flat, "history")) if flat else iter(())
        return [self.user_prompt([self.prompt.mask_text if i == MASKED else next(texts) for i in h])
                for h in histories]

    def user_prompt(self, history_texts: Sequence[str]) -> str:
        """A user's prompt from the texts of their history items, most recent last."""
        return render_user(self.prompt.user_template, self.prompt.instruction, history_texts,
                           self.prompt.history_separator)

    def user_tokens(self, histories: Sequence[Sequence[int]]) -> list[list[int]]:
        return self.tokenize_users(self.user_texts(histories))

    def tokenize_users(self, prompts: list[str]) -> list[list[int]]:
        """User prompts -> token lists: cut to max_user_tokens from the oldest history on, then EOS."""
        budget = self.prompt.max_user_tokens - len(self.eos)
        out = []
        for ids in self._ids(prompts):
            if len(ids) > budget:
                head = min(self.head_tokens, budget // 2)
                ids = ids[:head] + ids[len(ids) - (budget - head):]
            out.append(ids + self.eos)
        return out

    def item_tokens(self, item_indices: Sequence[int]) -> list[list[int]]:
        new = [i for i in dict.fromkeys(item_indices) if i not in self.item_cache]
        fresh = dict(zip(new, self.tokenize_items(self.catalog.texts(new)))) if new else {}
        if len(self.item_cache) + len(fresh) <= ITEM_CACHE_LIMIT:
            self.item_cache.update(fresh)
        return [self.item_cache[i] if i in self.item_cache else fresh[i] for i in item_indices]

    def tokenize_items(self, texts: list[str]) -> list[list[int]]:
        """Item texts -> token lists: cut to max_item_tokens - 1, then EOS."""
        budget = self.prompt.max_item_tokens - len(self.eos)
        return [ids[:budget] + self.eos for ids in self._ids(texts)]

    def pad(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad(token_lists, self.pad_id, self.padding_side)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A training batch: user and item token tensors plus the ids the loss needs."""
        histories = [s["history"] for s in samples]
        items = [s["item"] for s in samples]
        if self.item_sequences:
            return self._item_sequence_batch(histories, items)
        user_ids, user_mask = self.pad(self.user_tokens(histories))
        # Seeded by the samples themselves: the same batch gets the same draws whichever worker
        # builds it, so a resumed run replays them exactly.
        keys = "".join(str(s.get("__key__", s["item"])) for s in samples)
        negatives = self._history_negatives(histories, random.Random(zlib.crc32(keys.encode()) ^ self.seed ^ 0x6e6567))
        # One item pass: the positives, then the negatives (model.loss.candidate_scores's layout).
        item_ids, item_mask = self.pad(self.item_tokens(items + negatives))
        batch = {
            "user_input_ids": user_ids, "user_attention_mask": user_mask,
            "item_input_ids": item_ids, "item_attention_mask": item_mask,
            "item_ids": torch.tensor(items, dtype=torch.long), "history_ids": history_tensor(histories),
            "logq": torch.tensor([s.get("logq", 0.0) for s in samples], dtype=torch.float32),
        }
        if negatives:
            batch["negative_ids"] = torch.tensor(negatives, dtype=torch.long)
            batch["negative_logq"] = self.item_logq[batch["negative_ids"]]
        if self.views is not None:
            rng = random.Random(zlib.crc32(keys.encode()) ^ self.seed)
            for name in ("view_a", "view_b"):
                views = [augment(list(h), rng, self.views.crop, self.views.mask, self.views.reorder) for h in histories]
                batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = self.pad(self.user_tokens(views))
        return batch

    def _item_sequence_batch(self, histories: list[Sequence[int]], items: list[int]) -> dict[str, torch.Tensor]:
        """model.user_encoder=items: the distinct items of the batch (histories and targets), each
        tokenised once (sorted by id, so the batch is the same whichever worker builds it), and
        the ids the user tower and its loss index them by; no user prompt."""
        distinct = sorted(set(items).union(*histories))
        item_ids, item_mask = self.pad(self.item_tokens(distinct))
        return {"item_input_ids": item_ids, "item_attention_mask": item_mask,
                "batch_item_ids": torch.tensor(distinct, dtype=torch.long),
                "item_ids": torch.tensor(items, dtype=torch.long), "history_ids": history_tensor(histories)}

    def _history_negatives(self, histories: list[Sequence[int]], rng: random.Random) -> list[int]:
        """`history_negatives` distinct items drawn from each user's history (repeated when it
        holds fewer), row after row: negatives that teach the model not to recommend what the
        user already has."""
        out: list[int] = []
        if not self.history_negatives:
            return out
        for history in histories:
            distinct = list(dict.fromkeys(history))
            drawn = rng.sample(distinct, min(self.history_negatives, len(distinct)))
            out += [drawn[i % len(drawn)] for i in range(self.history_negatives)]
        return out
