"""The pieces every config section is made of: a documented field, and the checks that name the
key they reject."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from train.errors import UserError


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description (shown by `--help`)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(d)) if isinstance(default, (list, dict)) else type(default)
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


def one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, f"must be one of {', '.join(choices)} (got {value!r})")
