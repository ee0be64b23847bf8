"""Readers of raw interaction logs and item catalogs: CSV, TSV, Parquet, JSON lines, RecBole atomic
(named dataset layouts, MovieLens, Amazon, UniSRec, are in train.formats).

Every reader returns an Arrow table holding just the requested columns, ids as strings (so
"007" stays "007"), and raises `UserError` naming the file and column or line on bad input.
Arrow keeps the columns compact and off the Python heap, which is what lets prepare group a
large log without a Python object per interaction.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from train.errors import UserError

_DELIMITERS = {"csv": ",", "tsv": "\t", "atomic": "\t"}


def _header(path: Path, fmt: str) -> list[str]:
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        if fmt == "atomic":
            # RecBole atomic headers are `name:type`; quotes in its fields are literal.
            return [name.split(":", 1)[0] for name in handle.readline().rstrip("\r\n").split("\t")]
        return next(csv.reader(handle, delimiter=_DELIMITERS[fmt]), [])


def _first_row_of_header(fmt: str) -> int:
    """Line number of the first data row: 2 below a header line, 1 where there is none."""
    return 2 if fmt in _DELIMITERS else 1


def row_location(path: Path, fmt: str, row: int) -> str:
    """'file line N' for text formats, 'file row N' for Parquet (row counts from 1)."""
    if fmt == "parquet":
        return f"{path} row {row + 1}"
    return f"{path} line {row + _first_row_of_header(fmt)}"


def read_columns(path: str | Path, fmt: str, columns: list[str], role: str) -> pa.Table:
    """Read `columns` of `path` (format `fmt`) as strings. `role` names the config key in errors."""
    path = _existing(path, role)
    try:
        if fmt in _DELIMITERS:
            table = pacsv.read_csv(path, **_csv_options(path, fmt, columns, 1 << 24))
        elif fmt == "parquet":
            _require(path, columns, pq.read_schema(path).names)
            table = pq.read_table(path, columns=columns)
        elif fmt == "jsonl":
            table = pajson.read_json(path)
            _require(path, columns, table.column_names)
            table = table.select(columns)
        else:
            raise UserError(f"data.format: cannot read {fmt!r} files")
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(path, fmt, err) from None
    return pa.table({c: _as_strings(table.column(c)) for c in columns})


def iter_columns(path: str | Path, fmt: str, columns: list[str], role: str, block_bytes: int) -> Iterator[pa.Table]:
    """`read_columns`, one block of about `block_bytes` of the file at a time, in file order.

    Memory is a block's, whatever the file's length. A text block holds whole lines; a Parquet
    block is `block_bytes // ROW_BYTES` rows. Errors raise `UserError` as in read_columns,
    possibly after earlier blocks were yielded.
    """
    path = _existing(path, role)
    try:
        batches = _open_batches(path, fmt, columns, block_bytes)
        for batch in batches:
            table = pa.Table.from_batches([batch])
            yield pa.table({c: _as_strings(table.column(c)) for c in columns})
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(path, fmt, err) from None


# A log row of ids and a time is a few tens of bytes of text: a Parquet block's rows are its bytes / this.
ROW_BYTES = 32


def _open_batches(path: Path, fmt: str, columns: list[str], block_bytes: int) -> Iterator[pa.RecordBatch]:
    if fmt in _DELIMITERS:
        return iter(pacsv.open_csv(path, **_csv_options(path, fmt, columns, block_bytes)))
    if fmt == "parquet":
        parquet = pq.ParquetFile(path)
        _require(path, columns, parquet.schema_arrow.names)
        return parquet.iter_batches(batch_size=max(1, block_bytes // ROW_BYTES), columns=columns)
    if fmt == "jsonl":
        # Arrow infers the JSON types from the first block; one line must fit in a block.
        reader = pajson.open_json(path, read_options=pajson.ReadOptions(block_size=block_bytes))
        _require(path, columns, reader.schema.names)
        return iter(reader)
    raise UserError(f"data.format: cannot read {fmt!r} files")


def _csv_options(path: Path, fmt: str, columns: list[str], block_bytes: int) -> dict[str, Any]:
    """Keyword arguments of pyarrow's read_csv/open_csv: every requested column as strings."""
    available = _header(path, fmt)
    _require(path, columns, available)
    return {"read_options": pacsv.ReadOptions(column_names=available, skip_rows=1, block_size=block_bytes),
            "parse_options": pacsv.ParseOptions(delimiter=_DELIMITERS[fmt], quote_char=False if fmt == "atomic" else '"',
                                                newlines_in_values=fmt == "csv"),
            "convert_options": pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                                    strings_can_be_null=False, quoted_strings_can_be_null=False)}


def _existing(path: str | Path, role: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{role}: file not found: {path}")
    return path


def _unreadable(path: Path, fmt: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return UserError(f"{path}: cannot read as {fmt}: {first}")


def _require(path: Path, columns: list[str], available: list[str]) -> None:
    for column in columns:
        if column not in available:
            raise UserError(f"{path}: missing column {column!r} (columns: {', '.join(available) or 'none'})")


def _as_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_floating(column.type):
        # Ids written as 1.0 by some exporters are the integer 1.
        as_int = pc.cast(column, pa.int64(), safe=False)
        if pc.all(pc.equal(pc.cast(as_int, column.type), column)).as_py() in (True, None):
            return pc.cast(as_int, pa.string())
    return pc.cast(column, pa.string())


def parse_timestamps(column: pa.ChunkedArray, name: str, where: Callable[[int], str]) -> tuple[np.ndarray, bool]:
    """Numbers, or ISO-8601 dates, as float64 seconds, and whether they were dates; the first
    unreadable value is reported.

    `where(row)` names a row's place in its file ("file line N") for the message.
    """
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), False
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Naive times first, then times with a zone offset ("Z", "+02:00"), which Arrow parses only
    # into a zoned type; nanoseconds for the text of native nanosecond columns (e.g. Parquet).
    for stamp_type, per_second in ((pa.timestamp("us"), 1e6), (pa.timestamp("ns"), 1e9),
                                   (pa.timestamp("us", tz="UTC"), 1e6), (pa.timestamp("ns", tz="UTC"), 1e9)):
        try:
            stamps = pc.cast(column, stamp_type)
            return pc.cast(stamps, pa.int64()).to_numpy(zero_copy_only=False) / per_second, True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    first_date: int | None = None
    for row, value in enumerate(column.to_pylist()):
        try:
            float(value)
        except (TypeError, ValueError):
            try:
                dt.datetime.fromisoformat(str(value))
                first_date = row if first_date is None else first_date
            except ValueError:
                raise UserError(f"{where(row)}: column {name!r}: "
                                f"{value!r} is not a number or an ISO-8601 time") from None
    raise UserError(f"{where(first_date or 0)}: column {name!r}: mixes numbers and dates")


def parse_numbers(column: pa.ChunkedArray, name: str, where: Callable[[int], str]) -> np.ndarray:
    """Numbers (or their text) as float64; the first value that is not a number is reported."""
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    for row, value in enumerate(column.to_pylist()):
        try:
            float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where(row)}: column {name!r}: {value!r} is not a number") from None
    raise UserError(f"{where(0)}: column {name!r}: cannot read as numbers")


def first_empty(column: pa.ChunkedArray) -> int | None:
    """Row of the first null (or, in text, empty string) in `column`, or None."""
    bad = pc.is_null(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        bad = pc.or_(bad, pc.equal(pc.utf8_length(pc.fill_null(column, "")), 0))
    if not pc.any(bad).as_py():
        return None
    return int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
