"""What a raw text file is, before a reader opens it, and where it went wrong after one failed.

Users hand prepare what their tools wrote: gzipped exports (named .gz or not), spreadsheets'
byte-order marks and UTF-16 "Unicode text", Latin-1 files, a Parquet file under a .csv name,
junk. Arrow's readers either mis-read these (a BOM glued to the first column's name, compressed
bytes taken for a header) or fail with messages about their own internals. `open_text` looks at
the file's first bytes once and says, in one line naming the file (and line), what is wrong,
or how to open it; `locate` finds the line of an error Arrow reported without one. Neither
costs a pass over a good file: `locate` only runs after a failure."""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

import pyarrow as pa

from train.errors import UserError, first_line

HEAD_BYTES = 1 << 16
# Leading bytes of compressed files -> the codec Arrow opens them with.
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz"}
EXTENSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz"}
TEXT_CONTROLS = {9, 10, 12, 13}  # tab, newline, form feed, carriage return


def compression(path: Path) -> str | None:
    """The codec a file is compressed with, by its leading bytes (whatever its name says)."""
    with path.open("rb") as handle:
        head = handle.read(6)
    return next((codec for magic, codec in MAGIC.items() if head.startswith(magic)), None)


def open_stream(path: Path) -> pa.NativeFile:
    """The file's bytes, decompressed when its leading bytes say it is compressed."""
    return pa.input_stream(str(path), compression=compression(path))


def head_of(path: Path, fmt: str) -> bytes:
    """The first HEAD_BYTES bytes of the decompressed file (a UserError when they cannot be read)."""
    try:
        with open_stream(path) as stream:
            return bytes(stream.read(HEAD_BYTES))
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"{path}: cannot read as {fmt}: {first_line(err)}") from None


def check_text(path: Path, fmt: str) -> None:
    """A UserError naming what is wrong when `path` is not UTF-8 text of a delimited or JSON lines
    format: empty, Parquet, binary, UTF-16, a NUL byte or a byte that is not UTF-8 in its head."""
    head = head_of(path, fmt)
    if not head.strip():
        raise UserError(f"{path}: the file is empty")
    if head.startswith(b"PAR1"):
        raise UserError(f"{path}: a Parquet file; set data.format=parquet")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{path}: UTF-16 text; save the file as UTF-8")
    controls = sum(byte < 32 and byte not in TEXT_CONTROLS for byte in head)
    if controls > len(head) // 20:  # text has next to none; any binary format has plenty
        raise UserError(f"{path}: binary data, not {fmt} text")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{path} line {line_of(head, nul)}: a NUL byte (binary data in a text file)")
    bad = first_bad_utf8(head, complete=len(head) < HEAD_BYTES)
    if bad is not None:
        raise UserError(not_utf8(path, head, bad))


def line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def not_utf8(path: Path, data: bytes, offset: int) -> str:
    return f"{path} line {line_of(data, offset)}: not UTF-8 text (byte 0x{data[offset]:02x}); save the file as UTF-8"


def first_bad_utf8(data: bytes, complete: bool = True) -> int | None:
    """Offset of the first byte that is not UTF-8 (a sequence cut by the end of `data` counts
    only when `data` is the whole file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(data, final=complete)
    except UnicodeDecodeError as err:
        return err.start
    return None


def locate(path: Path, fmt: str, header_fields: int, delimiter: str, quoting: bool) -> str | None:
    """After Arrow failed to read `path`: the first line that is not UTF-8 or whose number of
    fields is not the header's, as 'FILE line N: why'; None when no line is at fault."""
    with open_stream(path) as stream:
        data = bytes(stream.read())
    bad = first_bad_utf8(data)
    if bad is not None:
        return not_utf8(path, data, bad)
    text = io.StringIO(data.decode("utf-8-sig"), newline="")
    reader = csv.reader(text, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
    try:
        for fields in reader:
            if fields and len(fields) != header_fields and reader.line_num > 1:
                return f"{path} line {reader.line_num}: expected {header_fields} fields, found {len(fields)}"
    except csv.Error as err:
        return f"{path} line {reader.line_num}: {err}"
    return None
