"""Readers of named public dataset layouts: MovieLens, Amazon Reviews and UniSRec.

`read(fmt, interactions, catalog)` recognises which variant the files are from their first
line, not their names, and returns two `Source`s with the column names the rest of prepare
uses, so that one prompt template works across datasets:

- interactions: `user_id`, `item_id` (strings, as in readers.read_columns), `timestamp`
  (numbers or their text, in seconds), `rating` (numbers or their text; absent where the
  files have none);
- catalog: `item_id` and text fields with common names: `title`, `genres` (MovieLens) or
  `categories` (Amazon), `brand`, `description`; UniSRec's one text is both `text` and `title`.
  Lists become one string joined by ", ", a missing value the empty string.

A file that does not have the shape of the format raises `UserError` saying what was expected.

Why one module of about 375 lines: the three layouts share the sniffing and cleaning helpers
below, and each reader is some 60 lines; split, one concern (what a named layout looks like)
would be spread over four files that import each other's private helpers.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from train.data.prepare import readers
from train.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("movielens", "amazon", "unisrec")


class Named:
    """Something read under the standard column names that knows the file's own (`names`)."""

    names: dict[str, str]  # standard column -> the file's own name

    def name(self, column: str) -> str:
        return self.names.get(column, column)


@dataclass(frozen=True)
class Source(Named):
    """A table read from a file, under the standard column names, and how to point at its rows."""

    table: pa.Table
    where: Callable[[int], str]  # row -> "file line N" (or just the file), for messages
    names: dict[str, str] = field(default_factory=dict)


def lines_from(path: Path, first_line: int) -> Callable[[int], str]:
    """Row r of a table is line r + first_line of `path` (1 without a header line, 2 below one)."""
    return lambda row: f"{path} line {row + first_line}"


def read(fmt: str, interactions: str | Path, catalog: str | Path) -> tuple[Source, Source]:
    """(interactions, catalog) of a dataset in one of FORMATS."""
    readers_of: dict[str, Callable[[Path, Path], tuple[Source, Source]]] = {
        "movielens": _movielens, "amazon": _amazon, "unisrec": _unisrec}
    if fmt not in readers_of:
        raise UserError(f"data.format: cannot read {fmt!r} files")
    return readers_of[fmt](readers.existing_file(interactions, "data.interactions"),
                           readers.existing_file(catalog, "data.catalog"))


# ---------------------------------------------------------------------------- helpers

def _first_line(path: Path) -> str:
    """The first line, read as latin-1 (which decodes any bytes), through gzip for *.gz."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as handle:
            raw = handle.readline()
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    return raw.decode("latin-1").removeprefix("\ufeff").removeprefix("ï»¿").rstrip("\r\n")


def _shown(line: str) -> str:
    return repr(line if len(line) <= 80 else line[:77] + "...")


def _text(raw: bytes) -> bytes:
    """UTF-8 bytes of a file that is UTF-8 or, failing that, latin-1 (MovieLens 100K and 1M are)."""
    try:
        raw.decode("utf-8")
        return raw
    except UnicodeDecodeError:
        return raw.decode("latin-1").encode("utf-8")


def _read_delimited(data: bytes, path: Path, what: str, names: list[str], delimiter: str) -> pa.Table:
    """Headerless delimited text, every column as strings, quotes literal."""
    try:
        return pacsv.read_csv(pa.BufferReader(data),
                              read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
                              parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
                              convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                   strings_can_be_null=False))
    except pa.ArrowInvalid as err:
        raise UserError(f"{path}: cannot read as {what}: {_first(err)}") from None


def _first(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


def _clean(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Whitespace runs (newlines included) become one space, ends trimmed, missing -> ""."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.fill_null(column, ""), r"\s+", " "))


def _joined(lists: pa.ChunkedArray) -> pa.Array:
    """A list of strings per row -> one string, elements joined by ", "."""
    return _clean(pc.binary_join(lists.combine_chunks(), ", "))


def _first_element(lists: pa.ChunkedArray) -> pa.Array:
    """The first non-blank element of each row's list, cleaned; "" where there is none."""
    lists = lists.combine_chunks()
    values = _clean(pc.list_flatten(lists))
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    filled = np.flatnonzero(pc.greater(pc.utf8_length(values), 0).to_numpy(zero_copy_only=False))
    rows, first = np.unique(parents[filled], return_index=True)  # first filled element of each row
    index = np.full(len(lists), -1, np.int64)
    index[rows] = filled[first]
    return pc.fill_null(values.take(pa.array(index, mask=index < 0)), "")


# -------------------------------------------------------------------------- MovieLens

_ML_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
              "War", "Western"]
_ML_RATINGS = ("u.data (user<TAB>item<TAB>rating<TAB>time, 100K), ratings.dat (user::item::rating::time, "
               "1M/10M) or ratings.csv (header userId,movieId,rating,timestamp: ml-latest, 20M, 25M, 32M)")
_ML_CATALOGS = {
    "100k": "MovieLens 100K's u.item (id|title|release date|video release date|IMDb URL|19 genre flags), "
            "which goes with u.data",
    "dat": "a MovieLens 1M/10M movies.dat (id::title::genres), which goes with ratings.dat",
    "latest": "a MovieLens movies.csv (header movieId,title,genres), which goes with ratings.csv",
}
_ML_NAMES = ["user_id", "item_id", "rating", "timestamp"]


def movielens_variant(path: Path) -> str:
    """'100k', 'dat' (1M, 10M) or 'latest' (ml-latest, 20M, 25M, 32M), from the ratings file's first line."""
    line = _first_line(path)
    if line.count("::") == 3:
        return "dat"
    if line.replace('"', "").strip() == "userId,movieId,rating,timestamp":
        return "latest"
    fields = line.split("\t")
    if len(fields) == 4 and all(f.strip().replace(".", "", 1).isdigit() for f in fields[2:]):
        return "100k"
    raise UserError(f"data.interactions: {path} is not a MovieLens ratings file: expected {_ML_RATINGS}; "
                    f"its first line is {_shown(line)}")


def _movielens(inter_path: Path, catalog_path: Path) -> tuple[Source, Source]:
    variant = movielens_variant(inter_path)
    line = _first_line(catalog_path)
    shape_ok = {"100k": len(line.split("|")) == 24, "dat": line.count("::") == 2,
                "latest": line.replace('"', "").startswith("movieId,title,genres")}[variant]
    if not shape_ok:
        raise UserError(f"data.catalog: {catalog_path} is not {_ML_CATALOGS[variant]}; "
                        f"its first line is {_shown(line)}")
    if variant == "latest":
        ratings = readers.read_columns(inter_path, "csv", ["userId", "movieId", "rating", "timestamp"],
                                       "data.interactions").rename_columns(_ML_NAMES)
        names = {"user_id": "userId", "item_id": "movieId"}
        interactions = Source(ratings, lines_from(inter_path, 2), names)
        movies = readers.read_columns(catalog_path, "csv", ["movieId", "title", "genres"], "data.catalog")
        genres = movies.column("genres")
        genres = pc.if_else(pc.equal(genres, "(no genres listed)"), "", genres)
        catalog = _movie_table(movies.column("movieId"), movies.column("title"), genres, catalog_path, 2)
        return interactions, catalog
    if variant == "dat":
        raw = inter_path.read_bytes().replace(b"::", b"\t")
        ratings = _read_delimited(raw, inter_path, "MovieLens ratings.dat", _ML_NAMES, "\t")
        movies = _read_delimited(_text(catalog_path.read_bytes()).replace(b"::", b"\t"), catalog_path,
                                 "MovieLens movies.dat", ["item_id", "title", "genres"], "\t")
        catalog = _movie_table(movies.column("item_id"), movies.column("title"), movies.column("genres"),
                               catalog_path, 1)
        return Source(ratings, lines_from(inter_path, 1)), catalog
    ratings = _read_delimited(inter_path.read_bytes(), inter_path, "MovieLens u.data", _ML_NAMES, "\t")
    flags = [f"genre{g}" for g in range(19)]
    movies = _read_delimited(_text(catalog_path.read_bytes()), catalog_path, "MovieLens u.item",
                             ["item_id", "title", "release_date", "video_release_date", "url", *flags], "|")
    genre_names = _genre_names(catalog_path.with_name("u.genre"))
    is_set = np.column_stack([pc.equal(movies.column(f), "1").to_numpy(zero_copy_only=False) for f in flags])
    genres = pa.array([", ".join(genre_names[g] for g in np.flatnonzero(row)) for row in is_set], pa.string())
    catalog = _movie_table(movies.column("item_id"), movies.column("title"), genres, catalog_path, 1)
    return Source(ratings, lines_from(inter_path, 1)), catalog


def _genre_names(path: Path) -> list[str]:
    """u.genre (`name|index` per line) beside u.item; the 19 standard names where it is absent."""
    if not path.is_file():
        return _ML_GENRES
    names = dict(enumerate(_ML_GENRES))
    for number, line in enumerate(_text(path.read_bytes()).decode().splitlines(), 1):
        if not line.strip():
            continue
        name, sep, index = line.strip().rpartition("|")
        if not sep or not index.isdigit() or int(index) >= 19:
            raise UserError(f"{path} line {number}: expected genre|index with index 0-18, got {_shown(line)}")
        names[int(index)] = name
    return [names[g] for g in range(19)]


def _movie_table(ids: pa.ChunkedArray, titles: pa.ChunkedArray, genres: pa.ChunkedArray | pa.Array, path: Path,
                 first_line: int) -> Source:
    genres = genres.combine_chunks() if isinstance(genres, pa.ChunkedArray) else genres
    genres = _clean(pc.replace_substring(genres, "|", ", "))
    table = pa.table({"item_id": ids, "title": _clean(titles), "genres": genres})
    return Source(table, lines_from(path, first_line))


# ----------------------------------------------------------------------------- Amazon

# Review fields (user, item, rating, time) and metadata fields by release.
_AMAZON_REVIEWS = {"2018": ("reviewerID", "asin", "overall", "unixReviewTime"),
                   "2023": ("user_id", "parent_asin", "rating", "timestamp")}
_AMAZON_META = {"2018": {"item_id": "asin", "title": "title", "brand": "brand", "categories": "category",
                         "description": "description"},
                "2023": {"item_id": "parent_asin", "title": "title", "brand": "store", "categories": "categories",
                         "description": "description"}}
_LIST_FIELDS = ("categories", "description")


def _json_keys(path: Path, role: str, what: str) -> set[str]:
    line = _first_line(path)
    try:
        record = json.loads(line.encode("latin-1").decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{role}: {path} is not {what} (JSON lines, gzipped or not): its first line is "
                        f"{_shown(line)}")
    return set(record)


def amazon_release(path: Path) -> str:
    """'2018' or '2023', from the keys of the reviews file's first line."""
    expected = " or ".join(f"{', '.join(keys)} ({release})" for release, keys in _AMAZON_REVIEWS.items())
    keys = _json_keys(path, "data.interactions", "an Amazon reviews file")
    for release, wanted in _AMAZON_REVIEWS.items():
        if keys.issuperset(wanted):
            return release
    raise UserError(f"data.interactions: {path} is not an Amazon reviews file: expected the keys {expected}; "
                    f"its first line has {', '.join(sorted(keys)) or 'none'}")


def _read_json(path: Path, schema: pa.Schema, what: str) -> pa.Table:
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        # Big blocks: one line must fit in a block, and product descriptions can be long.
        return pajson.read_json(path, read_options=pajson.ReadOptions(block_size=1 << 26), parse_options=options)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: cannot read as {what}: {_first(err)}") from None


def _amazon(inter_path: Path, catalog_path: Path) -> tuple[Source, Source]:
    release = amazon_release(inter_path)
    meta = _AMAZON_META[release]
    keys = _json_keys(catalog_path, "data.catalog", f"Amazon {release} metadata")
    if meta["item_id"] not in keys:
        other = "2023" if release == "2018" else "2018"
        hint = f" (it looks like {other} metadata)" if _AMAZON_META[other]["item_id"] in keys else ""
        raise UserError(f"data.catalog: {catalog_path} is not Amazon {release} metadata, which has the key "
                        f"{meta['item_id']!r} like the {release} reviews in data.interactions{hint}")
    user, item, rating, time = _AMAZON_REVIEWS[release]
    reviews = _read_json(inter_path, pa.schema([(user, pa.string()), (item, pa.string()), (rating, pa.float64()),
                                                (time, pa.float64())]), f"Amazon {release} reviews")
    seconds = reviews.column(time)
    if release == "2023":
        seconds = pc.divide(seconds, 1000.0)  # milliseconds
    interactions = pa.table({"user_id": reviews.column(user), "item_id": reviews.column(item),
                             "timestamp": seconds, "rating": reviews.column(rating)})
    names = {"user_id": user, "item_id": item, "timestamp": time, "rating": rating}

    schema = pa.schema([(name, pa.list_(pa.string()) if common in _LIST_FIELDS else pa.string())
                        for common, name in meta.items()])
    items = _read_json(catalog_path, schema, f"Amazon {release} metadata")
    catalog = pa.table({
        "item_id": items.column(meta["item_id"]), "title": _clean(items.column(meta["title"])),
        "brand": _clean(items.column(meta["brand"])), "categories": _joined(items.column(meta["categories"])),
        "description": _first_element(items.column(meta["description"]))})
    catalog, kept = _first_of_each_id(catalog)
    if kept is not None:
        log.warning("%s: dropped %d metadata lines repeating an earlier %s (the first is kept)", catalog_path,
                    items.num_rows - catalog.num_rows, meta["item_id"])
    first_line = lines_from(catalog_path, 1)
    where = first_line if kept is None else (lambda row: first_line(int(kept[row])))
    return (Source(interactions, lines_from(inter_path, 1), names),
            Source(catalog, where, {"item_id": meta["item_id"]}))


def _first_of_each_id(catalog: pa.Table) -> tuple[pa.Table, np.ndarray | None]:
    """Amazon's metadata files repeat some products; keep each id's first line (and say which rows)."""
    ids = pc.fill_null(catalog.column("item_id"), "").combine_chunks()
    if pc.count_distinct(ids).as_py() == catalog.num_rows:
        return catalog, None
    codes = ids.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    kept = np.sort(np.unique(codes, return_index=True)[1])
    return catalog.take(pa.array(kept)), kept


# ---------------------------------------------------------------------------- UniSRec

def _atomic_header(path: Path) -> list[str]:
    return [name.split(":", 1)[0] for name in _first_line(path).split("\t")]


def _unisrec(inter_path: Path, catalog_path: Path) -> tuple[Source, Source]:
    header = _atomic_header(catalog_path)
    if not {"item_id", "text"}.issubset(header):
        raise UserError(f"data.catalog: {catalog_path} is not a UniSRec .text file (header "
                        f"item_id:token<TAB>text:token_seq); its header is {_shown(_first_line(catalog_path))}")
    texts = readers.read_columns(catalog_path, "atomic", ["item_id", "text"], "data.catalog")
    text = _clean(texts.column("text"))
    catalog = Source(pa.table({"item_id": texts.column("item_id"), "title": text, "text": text}),
                     lines_from(catalog_path, 2))

    header = _atomic_header(inter_path)
    if {"user_id", "item_id_list", "item_id"}.issubset(header):
        return _unisrec_sequences(inter_path), catalog
    if not {"user_id", "item_id"}.issubset(header):
        raise UserError(f"data.interactions: {inter_path} is not a RecBole .inter file: expected a header with "
                        "user_id:token, item_id:token and timestamp:float (or UniSRec's user_id, item_id_list, "
                        f"item_id); its header is {_shown(_first_line(inter_path))}")
    columns = ["user_id", "item_id", *[c for c in ("timestamp", "rating") if c in header]]
    table = readers.read_columns(inter_path, "atomic", columns, "data.interactions")
    if "timestamp" not in header:  # no times: the file's order is the order
        table = table.append_column("timestamp", pa.array(np.arange(table.num_rows, dtype=np.float64)))
    return Source(table, lines_from(inter_path, 2)), catalog


def _unisrec_sequences(path: Path) -> Source:
    """UniSRec's `user_id, item_id_list, item_id` rows -> one interaction per item.

    Its .train/.valid/.test files hold, per user, prefixes of one sequence (the history, cut to
    the last 50, then the next item). The longest row of a user is the fullest sequence: the test
    file's row is the whole of it. Positions stand in for times.
    """
    table = readers.read_columns(path, "atomic", ["user_id", "item_id_list", "item_id"], "data.interactions")
    if table.num_rows == 0:
        return Source(table.drop_columns(["item_id_list"]).append_column("timestamp", pa.array([], pa.float64())),
                      lambda row: str(path))
    lists = pc.utf8_split_whitespace(table.column("item_id_list").combine_chunks())
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    users = table.column("user_id").combine_chunks()
    codes = users.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    order = np.lexsort((np.arange(len(codes)), lengths, codes))  # by user, then length, then file order
    last_of_user = np.flatnonzero(np.r_[codes[order][1:] != codes[order][:-1], True])
    chosen = pa.array(order[last_of_user])
    histories, counts = lists.take(chosen), lengths[order[last_of_user]]
    parents = pc.list_parent_indices(histories).to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    positions = np.arange(len(parents)) - starts[parents]
    owners = np.r_[parents, np.arange(len(chosen))]
    items = pa.concat_arrays([pc.list_flatten(histories),
                              table.column("item_id").combine_chunks().take(chosen)])
    return Source(pa.table({"user_id": users.take(chosen).take(pa.array(owners)), "item_id": items,
                            "timestamp": pa.array(np.r_[positions, counts].astype(np.float64))}),
                  lambda row: str(path))
