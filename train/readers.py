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
from collections.abc import Callable
from pathlib import Path

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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{role}: file not found: {path}")
    try:
        if fmt in _DELIMITERS:
            available = _header(path, fmt)
            _require(path, columns, available)
            read = pacsv.ReadOptions(column_names=available, skip_rows=1, block_size=1 << 24)
            parse = pacsv.ParseOptions(delimiter=_DELIMITERS[fmt], quote_char=False if fmt == "atomic" else '"',
                                       newlines_in_values=fmt == "csv")
            convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                           strings_can_be_null=False, quoted_strings_can_be_null=False)
            table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
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
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"{path}: cannot read as {fmt}: {first}") from None
    return pa.table({c: _as_strings(table.column(c)) for c in columns})


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


def parse_timestamps(column: pa.ChunkedArray, name: str, where: Callable[[int], str]) -> np.ndarray:
    """Numbers, or ISO-8601 dates, as float64 seconds; the first unreadable value is reported.

    `where(row)` names a row's place in its file ("file line N") for the message.
    """
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Naive times first, then times with a zone offset ("Z", "+02:00"), which Arrow parses only
    # into a zoned type; nanoseconds for the text of native nanosecond columns (e.g. Parquet).
    for stamp_type, per_second in ((pa.timestamp("us"), 1e6), (pa.timestamp("ns"), 1e9),
                                   (pa.timestamp("us", tz="UTC"), 1e6), (pa.timestamp("ns", tz="UTC"), 1e9)):
        try:
            stamps = pc.cast(column, stamp_type)
            return pc.cast(stamps, pa.int64()).to_numpy(zero_copy_only=False) / per_second
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
