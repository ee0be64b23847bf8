"""What prepare reads: the item catalog, whole and checked, and the interaction log, one checked
chunk at a time in file order, mapped to catalog indices, filtered and spilled to disk.

The log is never held whole for csv, tsv, atomic, parquet and jsonl files: each chunk is
checked, its items looked up in the catalog (which is held whole), its unknown items and low
ratings dropped, and what is left appended to a `partition.LogSpill`. The named formats
(train.data.prepare.formats) and the synthetic log are built whole by their readers, then go through the
same chunks. Rows keep their place in the file, both for messages ("file line N", right in any
chunk) and to break ties of time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from train.config.schema import Config
from train.data.prepare import formats, readers, synthetic
from train.data.prepare.partition import LogSpill
from train.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogSource(formats.Named):
    """The interaction log as chunks under the standard column names (user_id, item_id, timestamp
    [, rating]), in file order, and how to point at its rows (as a formats.Source does)."""

    chunks: Generator[pa.Table, None, None]
    columns: list[str]  # the standard columns the chunks hold
    where: Callable[[int], str]  # row of the whole log -> "file line N" (or just the file), for messages
    names: dict[str, str]

    def close(self) -> None:
        """Close the file the chunks come from, if it is still open."""
        self.chunks.close()


def _renamed(chunks: Generator[pa.Table, None, None], names: dict[str, str]) -> Generator[pa.Table, None, None]:
    """`chunks` with columns renamed from the file's (`names` values) to the standard (keys);
    closing this closes `chunks`, so the file."""
    with contextlib.closing(chunks):
        for chunk in chunks:
            yield pa.table({name: chunk.column(column) for name, column in names.items()})


def read(config: Config, chunk_bytes: int, chunk_bytes_per_item: int) -> tuple[LogSource, pa.Table]:
    """(the log, the checked catalog: item_id and text fields).

    The log comes in chunks of `chunk_bytes` of text (rows of readers.ROW_BYTES where there is
    no text), or `chunk_bytes_per_item` a catalog item if that is more: each chunk's item lookup
    hashes the whole catalog, which chunks at least that long keep to a small share of the time.
    """
    data, cols = config.data, config.data.columns

    def rows(catalog: pa.Table) -> int:
        return max(1, max(chunk_bytes, catalog.num_rows * chunk_bytes_per_item) // readers.ROW_BYTES)

    if data.format == "synthetic":
        interactions, catalog = synthetic.generate(data.synthetic, config.seed)
        return LogSource(readers.table_chunks(interactions, rows(catalog)), interactions.column_names,
                         lambda row: "interactions", {}), catalog
    if data.format in formats.FORMATS:
        source, catalog_source = formats.read(data.format, data.interactions, data.catalog)
        catalog = _checked_catalog(config, catalog_source)
        return (LogSource(readers.table_chunks(source.table, rows(catalog)), source.table.column_names, source.where,
                          source.names), catalog)
    id_col = data.catalog_columns.item
    catalog = readers.read_columns(data.catalog, data.format, [id_col, *dict.fromkeys(data.catalog_columns.text)],
                                   "data.catalog")
    catalog = _checked_catalog(config, formats.Source(catalog.rename_columns(["item_id", *catalog.column_names[1:]]),
                                                      _lines(data.catalog, data.format), {"item_id": id_col}))
    names = {"user_id": cols.user, "item_id": cols.item, "timestamp": cols.timestamp}
    if data.min_rating > float("-inf"):
        names["rating"] = cols.rating
    file_chunks = readers.iter_columns(data.interactions, data.format, list(dict.fromkeys(names.values())),
                                       "data.interactions", rows(catalog) * readers.ROW_BYTES)
    return LogSource(_renamed(file_chunks, names), list(names), _lines(data.interactions, data.format), names), catalog


def _lines(path: str, fmt: str) -> Callable[[int], str]:
    return lambda row: readers.row_location(Path(path), fmt, row)


def _checked_catalog(config: Config, source: formats.Source) -> pa.Table:
    """item_id and the data.catalog_columns.text fields; ids present and unique."""
    data, table = config.data, source.table
    text_cols = list(dict.fromkeys(data.catalog_columns.text))
    for name in text_cols:
        if name not in table.column_names:  # only the named formats get here: read_columns checks the rest
            fields = ", ".join(c for c in table.column_names if c != "item_id")
            raise UserError(f"data.catalog_columns.text: data.format={data.format} catalogs have no field "
                            f"{name!r} (fields: {fields})")
    table = table.select(["item_id", *text_cols])
    if table.num_rows == 0:
        raise UserError(f"{data.catalog}: the catalog is empty")
    id_name = source.name("item_id")
    empty = readers.first_empty(table.column("item_id"))
    if empty is not None:
        raise UserError(f"{source.where(empty)}: empty {id_name!r}")
    ids = table.column("item_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        unique = pc.unique(ids)
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        row = int(np.flatnonzero(pc.equal(ids, dup).to_numpy(zero_copy_only=False))[1])
        raise UserError(f"{source.where(row)}: item {dup!r} appears twice "
                        f"in the catalog ({len(unique)} distinct of {table.num_rows})")
    return table


class _TimeKinds:
    """A log's times must all be numbers or all dates: remembers which the first chunk held."""

    def __init__(self) -> None:
        self.dates: bool | None = None
        self.first_date_row: int | None = None

    def check(self, dates: bool, first_row: int, source: LogSource) -> None:
        if dates and self.first_date_row is None:
            self.first_date_row = first_row
        if self.dates is None:
            self.dates = dates
        elif dates != self.dates:
            raise UserError(f"{source.where(self.first_date_row or 0)}: column {source.name('timestamp')!r}: "
                            "mixes numbers and dates")


def _checked_chunk(chunk: pa.Table, first_row: int, source: LogSource, with_ratings: bool,
                   kinds: _TimeKinds) -> dict[str, pa.Array]:
    """user_id, item_id, timestamp (float64 seconds) and, with ratings, rating (float64) of a chunk
    whose first row is row `first_row` of the log."""
    def where(row: int) -> str:
        return source.where(first_row + row)

    names = ["user_id", "item_id", "timestamp", *(["rating"] if with_ratings else [])]
    for name in names:  # a null time would sort silently as NaN
        empty = readers.first_empty(chunk.column(name))
        if empty is not None:
            raise UserError(f"{where(empty)}: empty {source.name(name)!r}")
    seconds, dates = readers.parse_timestamps(chunk.column("timestamp"), source.name("timestamp"), where)
    kinds.check(dates, first_row, source)
    columns = {"user_id": pc.cast(chunk.column("user_id"), pa.string()).combine_chunks(),
               "item_id": pc.cast(chunk.column("item_id"), pa.string()).combine_chunks(),
               "timestamp": pa.array(seconds, pa.float64())}
    if with_ratings:
        columns["rating"] = pa.array(readers.parse_numbers(chunk.column("rating"), source.name("rating"), where),
                                     pa.float64())
    return columns


def spill_log(config: Config, source: LogSource, catalog_ids: pa.Array, spill: LogSpill) -> dict[str, int]:
    """Check, map and filter the log chunk by chunk into `spill`; return what was dropped:
    {"dropped_unknown_items": n, "removed_by_min_rating": n}."""
    data = config.data
    with_ratings = data.min_rating > float("-inf")
    if with_ratings and "rating" not in source.columns:
        raise UserError(f"data.min_rating: {data.interactions} has no ratings to filter on")
    kinds = _TimeKinds()
    read = known = 0
    first_unknown: tuple[int, str] | None = None
    for chunk in source.chunks:
        columns = _checked_chunk(chunk, read, source, with_ratings, kinds)
        item = pc.index_in(columns["item_id"], value_set=catalog_ids)
        keep = pc.is_valid(item)
        unknown = np.flatnonzero(~keep.to_numpy(zero_copy_only=False))
        if len(unknown) and first_unknown is None:
            first_unknown = (read + int(unknown[0]), columns["item_id"][int(unknown[0])].as_py())
            if data.unknown_items == "fail":
                raise UserError(f"{source.where(first_unknown[0])}: item not in the catalog "
                                f"(data.unknown_items=drop skips such rows): {first_unknown[1]!r}")
        known += chunk.num_rows - len(unknown)
        if with_ratings:  # NaN ratings compare False: they are removed too
            keep = pc.and_(keep, pc.fill_null(pc.greater_equal(columns["rating"], data.min_rating), False))
        rows = pa.array(np.arange(read, read + chunk.num_rows, dtype=np.int64))
        spill.append(pa.table({"user_id": columns["user_id"], "item": item, "timestamp": columns["timestamp"],
                               "row": rows}).filter(keep))
        read += chunk.num_rows
    if read == 0:
        raise UserError(f"{data.interactions}: no interactions"
                        f"{' (a header, no rows)' if data.format in ('csv', 'tsv', 'atomic') else ''}")
    dropped = read - known
    if dropped:
        if known == 0 and first_unknown is not None:
            raise UserError(f"{source.where(first_unknown[0])}: no interaction's item is in the catalog: "
                            f"{first_unknown[1]!r}")
        log.warning("dropped %d interactions whose item is not in the catalog", dropped)
    removed = known - spill.rows
    if with_ratings and spill.rows == 0:
        raise UserError(f"data.min_rating: no interaction is rated {data.min_rating:g} or more "
                        f"(of {known}); lower data.min_rating")
    return {"dropped_unknown_items": dropped, "removed_by_min_rating": removed}
