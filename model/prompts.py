"""Prompt rendering: a user's history and an item as text."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence


def template_fields(template: str) -> list[str]:
    """Names of the `{fields}` a template uses."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_item(template: str, fields: Mapping[str, object]) -> str:
    """An item's text from its catalog fields; missing values render as empty strings."""
    return template.format_map({k: ("" if v is None else v) for k, v in fields.items()}).strip()


def render_user(template: str, instruction: str, history_texts: Sequence[str], separator: str) -> str:
    """A user's prompt: the instruction, then the history's item texts, most recent last."""
    return template.format(instruction=instruction, history=separator.join(history_texts))
