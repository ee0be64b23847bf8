"""A synthetic behaviour log with planted structure, for the debug recipe and the tests.

Items are described by words a text model can read: a brand, a category and two attributes.
Each user has one or two favourite categories and a few favourite brands; each step of a
sequence follows those tastes with probability `taste_strength`, else it follows global
popularity (Zipf). A model that reads the history's text can therefore find the user's
category and brands, which popularity alone cannot: the gap is what the debug run shows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from train.config.data import SyntheticConfig

_CATEGORIES = ["camera", "guitar", "novel", "sneaker", "coffee", "tent", "lamp", "puzzle", "kettle",
               "jacket", "drone", "violin", "backpack", "candle", "helmet", "blender"]
_ATTRIBUTES = ["red", "blue", "green", "black", "white", "vintage", "compact", "deluxe", "wooden",
               "steel", "silent", "rugged", "classic", "modern", "travel", "mini"]
_SYLLABLES = ["ka", "lo", "mi", "ru", "zen", "tor", "vex", "pa", "sol", "dri", "nu", "bel"]


def _brand_names(count: int, rng: np.random.Generator) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES, size=3)).capitalize()
        if name not in names:
            names.append(name)
    return names


def generate(config: SyntheticConfig, seed: int) -> tuple[pa.Table, pa.Table]:
    """Return (interactions[user_id, item_id, timestamp], catalog[item_id, title, category, brand])."""
    rng = np.random.default_rng(seed)
    n_items = config.num_items
    categories = [_CATEGORIES[c % len(_CATEGORIES)] + ("" if c < len(_CATEGORIES) else str(c // len(_CATEGORIES)))
                  for c in range(config.num_categories)]
    brands = _brand_names(config.num_brands, rng)
    item_category = rng.integers(0, config.num_categories, size=n_items)
    item_brand = rng.integers(0, config.num_brands, size=n_items)
    attributes = rng.choice(len(_ATTRIBUTES), size=(n_items, 2))
    titles = [f"{brands[item_brand[i]]} {_ATTRIBUTES[attributes[i, 0]]} {_ATTRIBUTES[attributes[i, 1]]} "
              f"{categories[item_category[i]]}" for i in range(n_items)]
    popularity = 1.0 / np.arange(1, n_items + 1) ** config.popularity_skew
    popularity = popularity[rng.permutation(n_items)]
    global_p = popularity / popularity.sum()

    users, items, times = [], [], []
    for user in range(config.num_users):
        n_fav = 1 if rng.random() < 0.7 else 2
        fav_categories = rng.choice(config.num_categories, size=n_fav, replace=False)
        fav_brands = rng.choice(config.num_brands, size=min(2, config.num_brands), replace=False)
        taste = popularity * np.isin(item_category, fav_categories) * np.where(np.isin(item_brand, fav_brands), 5.0, 1.0)
        length = int(rng.integers(config.min_length, config.max_length + 1))
        seen = np.zeros(n_items, dtype=bool)
        clock = int(rng.integers(1_600_000_000, 1_700_000_000))
        for _ in range(min(length, n_items)):
            weights = (taste if rng.random() < config.taste_strength and taste[~seen].sum() > 0 else global_p) * ~seen
            if weights.sum() == 0:
                weights = (~seen).astype(float)
            item = int(rng.choice(n_items, p=weights / weights.sum()))
            seen[item] = True
            clock += int(rng.integers(60, 86_400))
            users.append(f"u{user}")
            items.append(f"i{item}")
            times.append(clock)
    interactions = pa.table({"user_id": users, "item_id": items, "timestamp": pa.array(times, pa.int64())})
    catalog = pa.table({
        "item_id": [f"i{i}" for i in range(n_items)],
        "title": titles,
        "category": [categories[c] for c in item_category],
        "brand": [brands[b] for b in item_brand],
    })
    return interactions, catalog
