"""Recommendations from an export folder (train/serve/export.py): embed a user from the items
they had (catalog ids, or the texts of items the catalog lacks), search the item index, leave
out what they have, and say which of their items each recommendation comes from.

"Because": item j is recommended for the user's history items h_1..h_n; the reasons are the
history items whose embeddings are most similar to j's (inner products, the model's own score
between items), best first. It is what a person reads as "because you bought ...", computed
from the same vectors that ranked j."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from model.encoder import RecEncoder
from model.prompts import render_item
from model.user_tower import UserTower
from train.config.io import load_config
from train.data.catalog import Catalog
from train.data.collate import PromptCollator
from train.errors import UserError
from train.modeling.backbone import DTYPES, attention_of, random_model
from train.serve.export import HEADS_FILE, MANIFEST, read_items
from train.serve.index import ItemIndex

BATCH = 64  # rows a forward pass: bounds a burst's memory, keeps a request's latency steady


@dataclass
class Query:
    """One user: catalog ids of the items they had, texts of items outside the catalog (both most
    recent last; texts come after ids), ids never to recommend, how many to give."""

    history: list[str] = field(default_factory=list)
    history_texts: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    k: int = 10


class UnknownItems(UserError):
    """Ids that are not in the index (the message names them)."""


class Recommender:
    """An export folder loaded for answering: the encoder, the items' vectors and the index."""

    def __init__(self, export_dir: Path | str, because: int = 3) -> None:
        root = Path(export_dir)
        if not (root / MANIFEST).is_file():
            raise UserError(f"{root}: not a rectrain export (no {MANIFEST}; make one with rectrain export RUN_DIR)")
        self.manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text())
        self.config = load_config(root / "config.yaml", [])
        self.because = because
        model = self.config.model
        tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
        # The folder's limit is sentence-transformers' item length; the collator cuts prompts itself.
        tokenizer.model_max_length = max(self.config.prompt.max_user_tokens, self.config.prompt.max_item_tokens)
        backbone = AutoModel.from_pretrained(str(root / "model"), dtype=DTYPES[model.dtype],
                                             attn_implementation=attention_of(model))
        hidden = int(getattr(backbone.config, "hidden_size"))
        tower = None
        if model.user_encoder == "items":
            tower = UserTower(random_model(model.user_tower, "model.user_tower", model, 1, None, bos_token_id=None,
                                           eos_token_id=None), model.projection_dim or hidden, 0.0)
            tower.load_state_dict(load_file(str(root / "user_tower" / "model.safetensors")))
        self.encoder = RecEncoder(backbone, hidden, model.pooling, model.projection_dim, model.user_projection, tower,
                                  model.normalize, share_prefix=model.shared_prefix)
        heads = root / "model" / HEADS_FILE
        if heads.is_file():
            self.encoder.load_state_dict(load_file(str(heads)), strict=False)
        self.encoder.eval()
        catalog = Catalog(root / "items.parquet", self.config.prompt.item_template,
                          self.config.prompt.history_item_template, model.item_tokens)
        self.collator = PromptCollator(catalog, tokenizer, self.config.prompt, model.padding_side)
        table, vectors = read_items(root / "items.parquet")
        self.catalog_size = len(table)
        self.item_ids: list[str] = [str(i) for i in table.column("item_id").to_pylist()]
        self.rows = {item_id: row for row, item_id in enumerate(self.item_ids)}
        self.vectors = torch.from_numpy(vectors)
        self.added_history_texts: list[str] = []  # history texts of items added after export, in row order
        self.index = ItemIndex.load(root / "items.faiss")
        self.lock = threading.Lock()  # adding items vs. reading the index and vectors

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows_of(self, ids: Sequence[str], what: str = "history") -> list[int]:
        unknown = [i for i in ids if i not in self.rows]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise UnknownItems(f"{what}: unknown item id(s) {shown}")
        return [self.rows[i] for i in ids]

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Item embeddings of item texts (as rendered by prompt.item_template): [N, D]."""
        out = []
        for begin in range(0, len(texts), BATCH):
            ids, mask = self.collator.pad(self.collator.tokenize_items(texts[begin:begin + BATCH]))
            out.append(self.encoder(ids, mask).float())
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def item_text(self, fields: dict[str, Any]) -> tuple[str, str]:
        """(item text, history text) of a new item's fields, by the run's templates."""
        prompt = self.config.prompt
        return render_item(prompt.item_template, fields), render_item(prompt.history_item_template or
                                                                       prompt.item_template, fields)

    @torch.no_grad()
    def embed_users(self, histories: list[list[int]], history_texts: list[list[str]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(user embeddings [B, D], each user's history item vectors [n_i, D]) from catalog rows
        and outside texts (which follow the rows: the newest items last)."""
        text_vectors = self.embed_texts([t for texts in history_texts for t in texts]).split(
            [len(texts) for texts in history_texts])
        items = [torch.cat([self.vectors[rows], extra]) for rows, extra in zip(histories, text_vectors)]
        limit = self.config.data.max_history
        users = []
        for begin in range(0, len(histories), BATCH):
            if self.encoder.user_tower is not None:
                sequences = [v[-limit:] for v in items[begin:begin + BATCH]]
                width = max(len(s) for s in sequences)
                # Left-padded: the newest item last, where the tower's user state is read.
                padded = torch.stack([F.pad(s, (0, 0, width - len(s), 0)) for s in sequences])
                mask = torch.stack([torch.arange(width) >= width - len(s) for s in sequences]).long()
                users.append(self.encoder(None, mask, user=True, item_sequence=padded).float())
            else:
                prompts = [self.collator.user_prompt(self.history_texts(rows) + texts)
                           for rows, texts in zip(histories[begin:begin + BATCH], history_texts[begin:begin + BATCH])]
                ids, mask = self.collator.pad(self.collator.tokenize_users(prompts))
                users.append(self.encoder(ids, mask, user=True).float())
        return torch.cat(users), items

    def history_texts(self, rows: list[int]) -> list[str]:
        texts = self.collator.catalog.texts([r for r in rows if r < self.catalog_size], "history")
        known = iter(texts)
        return [next(known) if r < self.catalog_size else self.added_history_texts[r - self.catalog_size] for r in rows]

    def recommend(self, queries: list[Query]) -> list[list[dict[str, Any]]]:
        """For each query, its k best items, none from its history or exclude list, each with a
        score and the history items it comes from. Unknown ids raise UnknownItems."""
        with self.lock:
            histories = [self.rows_of(q.history) for q in queries]
            excluded = [self.rows_of(q.exclude, "exclude") for q in queries]
            for query, rows in zip(queries, histories):
                if not rows and not query.history_texts:
                    raise UserError("history: give at least one item id or item text")
            users, history_vectors = self.embed_users(histories, [q.history_texts for q in queries])
            hits = self.index.search(users.numpy(), max(q.k for q in queries),
                                     [h + e for h, e in zip(histories, excluded)])
            answers = []
            for query, rows, vectors, found in zip(queries, histories, history_vectors, hits):
                names = [self.item_ids[r] for r in rows] + [f"text:{t}" for t in query.history_texts]
                answer = []
                for row, score in found[:query.k]:
                    similarity = vectors @ self.vectors[row]
                    reasons = similarity.argsort(descending=True)[:self.because].tolist()
                    answer.append({"item_id": self.item_ids[row], "score": score,
                                   "because": [{"item_id": names[r], "similarity": float(similarity[r])}
                                               for r in reasons]})
                answers.append(answer)
            return answers

    def add_items(self, items: list[dict[str, Any]]) -> list[str]:
        """New items (each: item_id and its text fields) embedded from their text and added to the
        index without a restart: they can be recommended from the next query on."""
        ids = [str(item["item_id"]) for item in items]
        duplicates = sorted({i for i in ids if i in self.rows} | {i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise UserError(f"items: item id(s) already in the index or repeated: {', '.join(duplicates[:5])}")
        texts = [self.item_text({k: v for k, v in item.items() if k != "item_id"}) for item in items]
        vectors = self.embed_texts([text for text, _ in texts])
        with self.lock:
            for item_id, (_, history_text) in zip(ids, texts):
                self.rows[item_id] = len(self.item_ids)
                self.item_ids.append(item_id)
                self.added_history_texts.append(history_text)
            self.vectors = torch.cat([self.vectors, vectors])
            self.index.add(vectors.numpy())
        return ids
