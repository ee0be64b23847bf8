"""The item catalog: each item's text fields by catalog index, read from the prepared
directory's catalog.parquet with Arrow (memory-mapped, so every loader worker looks items up
without a copy of its own), and the item tokens (model.item_tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import torch

from model.prompts import render_item, template_fields
from train.errors import UserError

ITEM_TOKEN = "item_token"


def item_token(index: int) -> str:
    """The token of catalog item `index` (model.item_tokens)."""
    return f"<item{index}>"


class Catalog:
    """Item texts by catalog index, read from `catalog.parquet` (Arrow, memory-mapped)."""

    def __init__(self, path: str | Path, item_template: str, history_item_template: str = "",
                 item_tokens: bool = False) -> None:
        self.table = pq.read_table(path, memory_map=True)
        self.templates = {"item": item_template, "history": history_item_template or item_template}
        for key, template in (("prompt.item_template", item_template), ("prompt.history_item_template",
                                                                        history_item_template)):
            for name in template_fields(template):
                if name == ITEM_TOKEN and not item_tokens:
                    raise UserError(f"{key}: {{{ITEM_TOKEN}}} needs model.item_tokens=true")
                if name != ITEM_TOKEN and name not in self.table.column_names:
                    text_fields = [c for c in self.table.column_names if c not in ("item_index", "train_count")]
                    raise UserError(f"{key}: unknown field {{{name}}} (catalog fields: {', '.join(text_fields)})")

    def __len__(self) -> int:
        return self.table.num_rows

    def texts(self, indices: Sequence[int], role: str = "item") -> list[str]:
        """Rendered texts of items `indices`, as targets (role "item") or inside a history ("history")."""
        template = self.templates[role]
        fields = [f for f in template_fields(template) if f != ITEM_TOKEN]
        # A table of no columns has no rows: a template of {item_token} alone needs no lookup.
        rows = self.table.select(fields).take(list(indices)).to_pylist() if fields else [{} for _ in indices]
        return [render_item(template, {**row, ITEM_TOKEN: item_token(index)}) for row, index in zip(rows, indices)]

    def train_counts(self) -> torch.Tensor:
        return torch.from_numpy(self.table.column("train_count").to_numpy().copy())
