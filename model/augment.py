"""CL4SRec's history augmentations: crop, mask and reorder (Xie et al., 2022)."""

from __future__ import annotations

import random

MASKED = -1  # a hidden item; prompts render it as a placeholder text


def crop(history: list[int], ratio: float, rng: random.Random) -> list[int]:
    """A random contiguous run holding `ratio` of the history (at least one item)."""
    keep = max(1, int(len(history) * ratio))
    start = rng.randrange(len(history) - keep + 1)
    return history[start:start + keep]


def mask(history: list[int], ratio: float, rng: random.Random) -> list[int]:
    """`ratio` of the items replaced by MASKED."""
    hidden = set(rng.sample(range(len(history)), int(len(history) * ratio)))
    return [MASKED if i in hidden else item for i, item in enumerate(history)]


def reorder(history: list[int], ratio: float, rng: random.Random) -> list[int]:
    """A random contiguous run of `ratio` of the history, shuffled."""
    span = max(1, int(len(history) * ratio))
    start = rng.randrange(len(history) - span + 1)
    middle = history[start:start + span]
    rng.shuffle(middle)
    return history[:start] + middle + history[start + span:]


def augment(history: list[int], rng: random.Random, crop_ratio: float, mask_ratio: float, reorder_ratio: float) -> list[int]:
    """One view: one of the three augmentations, chosen uniformly. Histories of one item stay as they are."""
    if len(history) < 2:
        return list(history)
    choice = rng.randrange(3)
    if choice == 0:
        return crop(history, crop_ratio, rng)
    if choice == 1:
        return mask(history, mask_ratio, rng)
    return reorder(history, reorder_ratio, rng)
