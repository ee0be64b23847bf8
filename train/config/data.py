"""The `data` section: where the interaction log and catalog come from, their columns, the
filters, and how the prepared directory is cut into shards."""

from __future__ import annotations

from dataclasses import dataclass

from train.config.fields import check, doc, one_of


DATA_FORMATS = ("synthetic", "csv", "tsv", "parquet", "jsonl", "atomic", "hf", "movielens", "amazon", "unisrec")


@dataclass
class SyntheticConfig:
    """Generator of a behaviour log with planted structure (used when data.format=synthetic)."""

    num_users: int = doc(2000, "users to generate")
    num_items: int = doc(400, "catalog size")
    num_categories: int = doc(8, "item categories; each user prefers one or two of them")
    num_brands: int = doc(10, "brands; each user also leans towards a few brands")
    min_length: int = doc(6, "shortest user sequence")
    max_length: int = doc(24, "longest user sequence")
    taste_strength: float = doc(0.9, "probability that a step follows the user's tastes")
    popularity_skew: float = doc(1.0, "Zipf exponent of item popularity")

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_categories", "num_brands"):
            check(getattr(self, name) >= 1, f"data.synthetic.{name}", "must be >= 1")
        check(self.min_length >= 1, "data.synthetic.min_length", "must be >= 1")
        check(self.max_length >= self.min_length, "data.synthetic.max_length", "must be >= min_length")
        check(0.0 <= self.taste_strength <= 1.0, "data.synthetic.taste_strength", "must be in [0, 1]")
        check(self.popularity_skew >= 0.0, "data.synthetic.popularity_skew", "must be >= 0")


@dataclass
class InteractionColumns:
    """Column names in the interaction log."""

    user: str = doc("user_id", "user id column")
    item: str = doc("item_id", "item id column")
    timestamp: str = doc("timestamp", "time column (numeric, or ISO-8601 text)")
    rating: str = doc("rating", "rating column, read only when data.min_rating is set")


@dataclass
class CatalogColumns:
    """Column names in the item catalog."""

    item: str = doc("item_id", "item id column")
    text: list[str] = doc(["title"], "text fields copied into catalog.parquet for the prompts")


@dataclass
class DataConfig:
    """Where the data comes from, how it is prepared and how it is streamed."""

    dir: str = doc("data/debug", "prepared data directory (shards, catalog, splits, manifest)")
    shards: str = doc("", "training shard URLs overriding the manifest's: paths, brace patterns, pipe: commands")
    format: str = doc("synthetic", "synthetic | csv | tsv | parquet | jsonl | atomic (RecBole) | hf (a Hugging "
                                   "Face datasets folder from save_to_disk, or a hub name; NAME#SPLIT) | movielens "
                                   "(100K, 1M/10M, latest; detected) | amazon (2018, 2023; detected) | unisrec")
    interactions: str = doc("", "interaction log file (any format but synthetic; data.format=hf: a dataset)")
    catalog: str = doc("", "item catalog file (any format but synthetic; data.format=hf: a dataset)")
    min_rating: float = doc(float("-inf"), "keep only interactions rated at least this (needs ratings); "
                                           "-.inf = keep all")
    k_core: int = doc(0, "k-core: drop users and items with fewer than k interactions, repeatedly, until all "
                         "left have k (catalog items outside the core go too); 0 = off")
    columns: InteractionColumns = doc(InteractionColumns(), "interaction column names (the named formats, "
                                                            "movielens, amazon, unisrec, have their own)")
    catalog_columns: CatalogColumns = doc(CatalogColumns(), "catalog column names")
    cold_items: float = doc(0.0, "share of the catalog held out of training entirely (drawn with `seed`): never a "
                                 "target, never in a training history, kept in evaluation, so the users whose "
                                 "target is one (by_target_count's 0 bucket) measure what the text alone carries")
    max_history: int = doc(20, "most recent items kept as a training sample's history")
    samples: str = doc("every", "training samples: every (one per training target t >= 1, its history the items "
                                "before it) | last (one per user, their last training target: with "
                                "model.user_encoder=items the tower's loss covers every earlier position of it, "
                                "each once an epoch, as SASRec trains; `every` repeats a user's early positions "
                                "once per later target)")
    unknown_items: str = doc("drop", "interactions whose item is not in the catalog: drop | fail")
    shard_size: int = doc(10000, "training samples per WebDataset shard")
    num_workers: int = doc(1, "DataLoader worker processes per rank (0 = in the main process)")
    shuffle_buffer: int = doc(2000, "samples shuffled together: each rank's stream is shuffled in blocks of this "
                                    "many consecutive samples (a resumed run reads from its block's shard); 0 or 1 = "
                                    "no shuffle")
    on_bad_shard: str = doc("fail", "a corrupt or truncated training shard: fail (every rank stops, the shard named) | "
                                    "skip (its name and the samples lost are logged; every rank still takes the same "
                                    "steps)")
    synthetic: SyntheticConfig = doc(SyntheticConfig(), "synthetic generator settings")

    def __post_init__(self) -> None:
        one_of(self.format, "data.format", DATA_FORMATS)
        one_of(self.unknown_items, "data.unknown_items", ("drop", "fail"))
        one_of(self.on_bad_shard, "data.on_bad_shard", ("fail", "skip"))
        one_of(self.samples, "data.samples", ("every", "last"))
        if self.format != "synthetic":
            check(bool(self.interactions), "data.interactions", f"required when data.format={self.format}")
            check(bool(self.catalog), "data.catalog", f"required when data.format={self.format}")
        check(self.min_rating == self.min_rating,  # NaN is the one float unequal to itself
               "data.min_rating", "must be a number or -.inf (got .nan)")
        check(not (self.format == "synthetic" and self.min_rating > float("-inf")), "data.min_rating",
               "the synthetic log has no ratings")
        check(self.k_core >= 0, "data.k_core", "must be >= 0 (0 = off)")
        check(self.max_history >= 1, "data.max_history", "must be >= 1")
        check(0.0 <= self.cold_items < 1.0, "data.cold_items", "must be in [0, 1)")
        check(self.shard_size >= 1, "data.shard_size", "must be >= 1")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        check(bool(self.catalog_columns.text), "data.catalog_columns.text", "name at least one text field")
