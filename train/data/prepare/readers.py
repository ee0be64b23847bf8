"""Readers of raw interaction logs and item catalogs: CSV, TSV, Parquet, JSON lines, RecBole atomic,
Hugging Face `datasets` (named dataset layouts, MovieLens, Amazon, UniSRec, are in
train.data.prepare.formats).

Every reader returns an Arrow table holding just the requested columns, ids as strings (so
"007" stays "007"), and raises `UserError` naming the file and column or line on bad input.
Arrow keeps the columns compact and off the Python heap, which is what lets prepare group a
large log without a Python object per interaction.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime as dt
import os
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from train.data.prepare import sniff
from train.errors import UserError, first_line

_DELIMITERS = {"csv": ",", "tsv": "\t", "atomic": "\t"}


def _header(path: Path, fmt: str) -> list[str]:
    """The column names of a delimited file's first line (a byte-order mark is not part of the first)."""
    head = sniff.head_of(path, fmt)
    line = head.decode("utf-8-sig", errors="replace").splitlines()[0] if head.strip() else ""
    if fmt == "atomic":
        # RecBole atomic headers are `name:type`; quotes in its fields are literal.
        names = [name.split(":", 1)[0] for name in line.split("\t")]
    else:
        names = next(csv.reader([line], delimiter=_DELIMITERS[fmt]), [])
    twice = next((name for n, name in enumerate(names) if name in names[:n]), None)
    if twice is not None:
        raise UserError(f"{path}: column {twice!r} appears twice in the header")
    return names


def _first_row_of_header(fmt: str) -> int:
    """Line number of the first data row: 2 below a header line, 1 where there is none."""
    return 2 if fmt in _DELIMITERS else 1


def row_location(path: Path, fmt: str, row: int) -> str:
    """'file line N' for text formats, 'file row N' for Parquet and datasets (row counts from 1)."""
    if fmt in ("parquet", "hf"):
        return f"{path} row {row + 1}"
    return f"{path} line {row + _first_row_of_header(fmt)}"


def read_columns(path: str | Path, fmt: str, columns: list[str], role: str) -> pa.Table:
    """Read `columns` of `path` (format `fmt`) as strings. `role` names the config key in errors."""
    if fmt == "hf":
        table = hf_table(str(path), role)
        _require(Path(path), columns, table.column_names)
        return pa.table({c: _as_strings(table.column(c)) for c in columns})
    path = existing_file(path, role)
    if fmt in _DELIMITERS or fmt == "jsonl":
        sniff.check_text(path, fmt)
    try:
        if fmt in _DELIMITERS:
            table = pacsv.read_csv(sniff.open_stream(path), **_csv_options(path, fmt, columns, 1 << 24))
        elif fmt == "parquet":
            _require(path, columns, pq.read_schema(path).names)
            table = pq.read_table(path, columns=columns)
        elif fmt == "jsonl":
            table = pajson.read_json(pa.BufferReader(b"".join(_line_blocks(path, 1 << 24))))
            _require(path, columns, table.column_names)
            table = table.select(columns)
        else:
            raise UserError(f"data.format: cannot read {fmt!r} files")
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(path, fmt, err) from None
    return pa.table({c: _as_strings(table.column(c)) for c in columns})


def iter_columns(path: str | Path, fmt: str, columns: list[str], role: str,
                 block_bytes: int) -> Generator[pa.Table, None, None]:
    """`read_columns`, one block of about `block_bytes` of the file at a time, in file order.

    Memory is a block's (two for JSON lines: one is read ahead), whatever the file's length. A
    text block holds whole lines; a Parquet block is `block_bytes // ROW_BYTES` rows. Errors
    raise `UserError` as in read_columns, possibly after earlier blocks were yielded. Closing
    the generator closes the file.
    """
    if fmt == "hf":
        yield from (pa.table({c: _as_strings(batch.column(c)) for c in columns})
                    for batch in table_chunks(read_columns(path, fmt, columns, role), max(1, block_bytes // ROW_BYTES)))
        return
    path = existing_file(path, role)
    if fmt in _DELIMITERS or fmt == "jsonl":
        sniff.check_text(path, fmt)
    tables = _json_tables(path, columns, block_bytes) if fmt == "jsonl" else _batch_tables(path, fmt, columns,
                                                                                            block_bytes)
    try:
        with contextlib.closing(tables):
            for table in tables:
                yield pa.table({c: _as_strings(table.column(c)) for c in columns})
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(path, fmt, err) from None


# A log row of ids and a time is a few tens of bytes of text: a Parquet block's rows are its bytes / this.
ROW_BYTES = 32


def table_chunks(table: pa.Table, rows: int) -> Generator[pa.Table, None, None]:
    """`table` as tables of at most `rows` rows, in order."""
    for batch in table.to_batches(max_chunksize=rows):
        yield pa.Table.from_batches([batch])


def hf_table(location: str, role: str) -> pa.Table:
    """A Hugging Face `datasets` dataset as one Arrow table (memory-mapped, no copy): a folder
    written by `save_to_disk`, or a hub name (read when online). `NAME#SPLIT` picks a split;
    without one, a dataset of several splits gives "train", or its only split."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{role}: data.format=hf needs the datasets package (pip install datasets)") from None
    name, _, split = location.partition("#")
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise UserError(f"{role}: {name} is a file; data.format=hf reads a folder written by save_to_disk, "
                        "or a hub name")
    try:
        loaded = datasets.load_from_disk(name) if path.is_dir() else datasets.load_dataset(name)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise UserError(f"{role}: cannot load {name!r} as a datasets dataset: {first_line(err)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else "")
        if chosen not in splits:
            raise UserError(f"{role}: {name} has splits {', '.join(splits)}; name one as {name}#SPLIT")
        loaded = loaded[chosen]
    elif split:
        raise UserError(f"{role}: {name} is a single dataset, it has no split {split!r}")
    # A dataset narrowed by select/shuffle keeps an index mapping over the full table: apply it.
    if getattr(loaded, "_indices", None) is not None:
        loaded = loaded.flatten_indices()
    return loaded.data.table


def _batch_tables(path: Path, fmt: str, columns: list[str], block_bytes: int) -> Generator[pa.Table, None, None]:
    """The blocks of a delimited or Parquet file, the reader closed however the iteration ends."""
    if fmt in _DELIMITERS:
        with pacsv.open_csv(sniff.open_stream(path), **_csv_options(path, fmt, columns, block_bytes)) as reader:
            for batch in reader:
                yield pa.Table.from_batches([batch])
    elif fmt == "parquet":
        with pq.ParquetFile(path) as parquet:
            _require(path, columns, parquet.schema_arrow.names)
            for batch in parquet.iter_batches(batch_size=max(1, block_bytes // ROW_BYTES), columns=columns):
                yield pa.Table.from_batches([batch])
    else:
        raise UserError(f"data.format: cannot read {fmt!r} files")


def _json_tables(path: Path, columns: list[str], block_bytes: int) -> Generator[pa.Table, None, None]:
    """The requested columns of a JSON lines file (gzipped or not), a block of whole lines at a time.

    Each block is parsed alone, with types of its own: Arrow's streaming JSON reader would fix
    them, and the fields, from the first block, and fail on a field first seen later or on
    numbers that turn from integers to decimals. `_as_strings` evens the types out. A field
    absent from a block is null there, as a whole-file read makes it (the caller reports the
    first such line); one absent from every line is a missing column, said before the last
    block is yielded (so before any for a file of one block).
    """
    seen: dict[str, None] = {}  # the fields met so far, in order
    first_row = 0
    blocks = _line_blocks(path, block_bytes)
    with contextlib.closing(blocks):
        for block, last in _with_last(blocks):
            table = _json_block(block, first_row)
            seen.update(dict.fromkeys(table.column_names))
            if last:
                _require(path, columns, list(seen))
            if table.num_rows:
                yield pa.table({c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows, pa.string())
                                for c in columns})
            first_row += table.num_rows
    _require(path, columns, list(seen))  # an empty file


def _json_block(block: bytes, first_row: int) -> pa.Table:
    """One block of lines parsed as one Arrow block (so with one set of types), whose first row
    is row `first_row` of the file; Arrow's "in row N" in errors is made a row of the file."""
    try:
        return pajson.read_json(pa.BufferReader(block), read_options=pajson.ReadOptions(block_size=len(block) + 1))
    except pa.ArrowInvalid as err:
        message = re.sub(r"\bin row (\d+)", lambda match: f"in row {first_row + int(match.group(1))}", str(err))
        raise pa.ArrowInvalid(message) from None


def _line_blocks(path: Path, block_bytes: int) -> Generator[bytes, None, None]:
    """The file's bytes (decompressed for *.gz, *.bz2, ...) in blocks of whole lines of about
    `block_bytes`; a line longer than that is a block of its own."""
    with sniff.open_stream(path) as stream:
        start = bytes(stream.read(3))
        # The start of a line that has not ended yet (a byte-order mark is not part of it).
        pending: list[bytes] = [] if start == codecs.BOM_UTF8 else [start]
        while data := stream.read(max(1, block_bytes)):
            cut = data.rfind(b"\n") + 1
            if not cut:
                pending.append(data)
                continue
            yield b"".join([*pending, data[:cut]])
            pending = [data[cut:]]
        rest = b"".join(pending)
        if rest.strip():
            yield rest


def _with_last(blocks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Each block and whether it is the last (one block read ahead)."""
    block = next(blocks, None)
    while block is not None:
        following = next(blocks, None)
        yield block, following is None
        block = following


def _csv_options(path: Path, fmt: str, columns: list[str], block_bytes: int) -> dict[str, Any]:
    """Keyword arguments of pyarrow's read_csv/open_csv: every requested column as strings."""
    available = _header(path, fmt)
    _require(path, columns, available)
    return {"read_options": pacsv.ReadOptions(column_names=available, skip_rows=1, block_size=block_bytes),
            "parse_options": pacsv.ParseOptions(delimiter=_DELIMITERS[fmt], quote_char=False if fmt == "atomic" else '"',
                                                newlines_in_values=fmt == "csv"),
            "convert_options": pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                                    strings_can_be_null=False, quoted_strings_can_be_null=False)}


def existing_file(path: str | Path, role: str) -> Path:
    """`path`, or a `UserError` saying why the file `role` names cannot be opened."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_symlink():
        raise UserError(f"{role}: {path} is a broken symbolic link (to {os.readlink(path)})")
    if path.is_dir():
        raise UserError(f"{role}: {path} is a directory, not a file")
    raise UserError(f"{role}: file not found: {path}")


def _unreadable(path: Path, fmt: str, err: Exception) -> UserError:
    if fmt in _DELIMITERS and isinstance(err, pa.ArrowInvalid):
        # Arrow names a row of its read block, not a line of the file: find the line.
        where = sniff.locate(path, fmt, len(_header(path, fmt)), _DELIMITERS[fmt], quoting=fmt != "atomic")
        if where is not None:
            return UserError(where)
    first = first_line(err)
    # pyarrow >= 26 adds "Row #N: " counted inside its read block, not a file line: misleading here.
    first = re.sub(r"Row #\d+: ", "", first)
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
        seconds = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    else:
        infinite = np.flatnonzero(~np.isfinite(seconds))  # NaN and inf would sort anywhere
        if len(infinite):
            row = int(infinite[0])
            raise UserError(f"{where(row)}: column {name!r}: {column[row].as_py()!r} is not a time")
        return seconds, False
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
