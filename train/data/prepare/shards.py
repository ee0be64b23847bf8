"""Fast writer of the training WebDataset shards (POSIX ustar tar files of `<key>.json` members).

Python's `tarfile` plus one `json.dumps` per sample costs about 80 µs a sample: over a minute
for a million. Here a whole shard is built with numpy, with no Python work per sample: the
512-byte ustar headers are rows of one array, each JSON payload is assembled from byte runs
(constant text, the user's digits, the history's item numbers from a catalog-sized table, the
target's tail from another) written straight into one buffer, and the buffer goes to disk in
one call. The bytes are exactly those of `tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)`
with `addfile(TarInfo(name), size=len(payload), mtime=0)` and of `json.dumps(sample,
separators=(",", ":"))`, which prepare wrote before, so shards stay byte-identical for the same
data and every tar reader accepts them; tests/test_shards.py checks both against tarfile itself.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 512
# tarfile pads the archive to whole records of 20 blocks (its default blocking factor).
RECORD = 20 * BLOCK

# A run of bytes per row: the rows' bytes back to back, and each row's length.
Runs = tuple[np.ndarray, np.ndarray]


def _header_template() -> np.ndarray:
    """The header of a regular file with the per-member fields (name, size, checksum) blank.

    Fixed fields as tarfile writes them: mode 0644, uid/gid 0, mtime 0 (so the same data gives
    the same bytes), type '0', magic "ustar\\0" version "00", empty user/group names, and empty
    device numbers (tarfile fills those only for device files).
    """
    header = bytearray(BLOCK)
    for offset, text in ((100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"), (136, b"00000000000\0"),
                         (148, b" " * 8), (156, b"0"), (257, b"ustar\0"), (263, b"00")):
        header[offset:offset + len(text)] = text  # the checksum (148) is summed over its field as spaces
    return np.frombuffer(bytes(header), np.uint8)


_TEMPLATE = _header_template()
_NAME_WIDTH, _SIZE_AT, _CHECKSUM_AT = 100, 124, 148


# ------------------------------------------------------------------- byte runs

def _scatter(target: np.ndarray, starts: np.ndarray, runs: Runs) -> None:
    """Copy row i's run of `runs` to `target[starts[i]:]`, for every row at once."""
    flat, lengths = runs
    if len(flat):
        run_starts = np.cumsum(lengths) - lengths
        target[np.repeat(starts - run_starts, lengths) + np.arange(len(flat))] = flat


def gather(values: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The runs `values[starts[i]:starts[i] + lengths[i]]`, back to back (`_scatter`'s inverse)."""
    lengths = np.asarray(lengths, np.int64)
    first = np.cumsum(lengths) - lengths
    return values[np.repeat(np.asarray(starts, np.int64) - first, lengths) + np.arange(int(lengths.sum()))]


def _write_runs(target: np.ndarray, starts: np.ndarray, parts: list[Runs]) -> np.ndarray:
    """Write each row's runs of `parts` one after another from `target[starts[i]]`; return the ends."""
    position = starts
    for runs in parts:
        _scatter(target, position, runs)
        position = position + runs[1]
    return position


def _constant(text: bytes, rows: int) -> Runs:
    return np.tile(np.frombuffer(text, np.uint8), rows), np.full(rows, len(text), np.int64)


def _flatten(matrix: np.ndarray, lengths: np.ndarray) -> Runs:
    """Left-aligned rows of `matrix`, row i cut to `lengths[i]` bytes, as runs."""
    return matrix[np.arange(matrix.shape[1]) < lengths[:, None]], lengths


def _decimal_rows(values: np.ndarray, min_width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ints as left-aligned ASCII decimal rows, zero-padded to `min_width` digits:
    `f"{v:0{min_width}d}"` for each value, as an `[n, widest]` matrix and the row lengths."""
    values = np.asarray(values, np.int64)
    if len(values) and values.min() < 0:
        raise ValueError("negative value in a decimal field")
    digits = np.full(len(values), max(1, min_width), np.int64)
    power = 10 ** max(1, min_width)
    while len(values) and power <= values.max():  # one more digit for the values >= power
        digits += values >= power
        power *= 10
    width = int(digits.max()) if len(values) else 1
    exponent = np.maximum(digits[:, None] - 1 - np.arange(width), 0)
    return (48 + values[:, None] // 10 ** exponent % 10).astype(np.uint8), digits


def _text_rows(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """ASCII strings as left-aligned rows of a matrix, and their lengths."""
    encoded = [text.encode("ascii") for text in texts]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    matrix = np.zeros((len(encoded), int(lengths.max()) if len(encoded) else 0), np.uint8)
    matrix[np.arange(matrix.shape[1]) < lengths[:, None]] = np.frombuffer(b"".join(encoded), np.uint8)
    return matrix, lengths


def _octal(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative ints as zero-padded octal ASCII, one row of `width` digits each."""
    shifts = 3 * np.arange(width - 1, -1, -1, dtype=np.int64)
    return (48 + ((values.astype(np.int64)[:, None] >> shifts) & 7)).astype(np.uint8)


# ---------------------------------------------------------------------- ustar

def _headers(name_parts: list[Runs], sizes: np.ndarray) -> np.ndarray:
    """ustar headers, `[n, 512]`, of regular files named by the row-wise concatenation of `name_parts`."""
    rows = len(sizes)
    headers = np.tile(_TEMPLATE, (rows, 1))
    if not rows:
        return headers
    name_lengths = np.sum([lengths for _, lengths in name_parts], axis=0)
    if name_lengths.max() > _NAME_WIDTH or name_lengths.min() == 0:
        raise ValueError("member names must have 1 to 100 ASCII characters (no ustar prefix split)")
    if sizes.min() < 0 or sizes.max() >= 8 ** 11:
        raise ValueError("member sizes must be 0 to 8 GiB")
    _write_runs(headers.reshape(-1), np.arange(rows, dtype=np.int64) * BLOCK, name_parts)
    headers[:, _SIZE_AT:_SIZE_AT + 11] = _octal(sizes, 11)  # then the field's NUL
    # tarfile's checksum field: six octal digits, NUL, and the last of the spaces left in place.
    headers[:, _CHECKSUM_AT:_CHECKSUM_AT + 6] = _octal(headers.sum(axis=1, dtype=np.int64), 6)
    headers[:, _CHECKSUM_AT + 6] = 0
    return headers


def ustar_headers(names: list[str], sizes: np.ndarray) -> np.ndarray:
    """ustar headers of regular files `names` of `sizes` bytes, as tarfile writes them: `[n, 512]` uint8."""
    sizes = np.asarray(sizes, np.int64)
    if len(names) != len(sizes):
        raise ValueError(f"{len(names)} names but {len(sizes)} sizes")
    return _headers([_flatten(*_text_rows(names))] if names else [], sizes)


def _archive(headers: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A zeroed archive with `headers` in place; return it and where each member's data starts."""
    blocks = 1 + (sizes + BLOCK - 1) // BLOCK  # header, then the data padded to whole blocks
    header_blocks = np.cumsum(blocks) - blocks
    used = (int(blocks.sum()) + 2) * BLOCK  # two zero blocks end the archive
    archive = np.zeros(-(-used // RECORD) * RECORD, np.uint8)
    archive.reshape(-1, BLOCK)[header_blocks] = headers
    return archive, (header_blocks + 1) * BLOCK


def tar_bytes(names: list[str], payloads: list[bytes]) -> np.ndarray:
    """A whole ustar archive holding `payloads` as regular files `names`, in order, as uint8."""
    sizes = np.fromiter(map(len, payloads), np.int64, len(payloads))
    archive, data_starts = _archive(ustar_headers(names, sizes), sizes)
    _scatter(archive, data_starts, (np.frombuffer(b"".join(payloads), np.uint8), sizes))
    return archive


def write_tar(path: Path, names: list[str], payloads: list[bytes]) -> None:
    """Write a ustar archive of `payloads` named `names` to `path` (via `<path>.tmp`, then rename)."""
    _write_atomically(path, tar_bytes(names, payloads))


def _write_atomically(path: Path, archive: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(archive.data)
    os.replace(tmp, path)


# ------------------------------------------------------------ training shards

def _logq_text(logq: float) -> str:
    # What json.dumps writes for round(logq, 6): float.__repr__, or NaN/Infinity.
    rounded = round(logq, 6)
    return float.__repr__(rounded) if math.isfinite(rounded) else json.dumps(rounded)


class ShardWriter:
    """Writes training shards into one directory, one call a shard, with the catalog-sized byte
    tables (item numbers, and each target's JSON tail with its logq) built once."""

    def __init__(self, shard_dir: Path, logq: np.ndarray) -> None:
        self.shard_dir = shard_dir
        logq = np.asarray(logq, np.float64)
        # A history item is its number and a comma: the last comma of each history is then
        # overwritten by "]", and the target's tail follows.
        numbers, number_lengths = _decimal_rows(np.arange(len(logq)))
        self._tokens = np.concatenate([numbers, np.zeros((len(logq), 1), np.uint8)], axis=1)
        self._tokens[np.arange(len(logq)), number_lengths] = ord(",")
        self._token_lengths = number_lengths + 1
        self._tails, self._tail_lengths = _text_rows([f',"item":{index},"logq":{_logq_text(value)}}}'
                                                      for index, value in enumerate(logq.tolist())])

    def write(self, shard: int, users: np.ndarray, ts: np.ndarray, history: np.ndarray, history_lengths: np.ndarray,
              targets: np.ndarray) -> dict[str, Any]:
        """Write `train-<shard>.tar` holding samples `users[i]`, `ts[i]`, `targets[i]` in that order,
        sample i's history being the next `history_lengths[i]` (>= 1) catalog indices of `history`.

        Returns `{"name": "shards/train-NNNNNN.tar", "samples": n}`.
        """
        users, ts, history, history_lengths, targets = (np.asarray(a, np.int64) for a in (
            users, ts, history, history_lengths, targets))
        rows = len(users)
        if rows and history_lengths.min() < 1:
            raise ValueError("a training sample needs a history of at least one item")
        first_token = np.cumsum(history_lengths) - history_lengths
        user_digits = _flatten(*_decimal_rows(users))
        history_runs = _flatten(self._tokens[history], self._token_lengths[history])
        history_bytes = np.add.reduceat(history_runs[1], first_token) if rows else history_runs[1]
        tail_runs = _flatten(self._tails[targets], self._tail_lengths[targets])
        payload = [_constant(b'{"user":', rows), user_digits, _constant(b',"history":[', rows),
                   (history_runs[0], history_bytes), tail_runs]
        name = [_constant(b"u", rows), _flatten(*_decimal_rows(users, 9)), _constant(b"t", rows),
                _flatten(*_decimal_rows(ts, 6)), _constant(b".json", rows)]
        sizes = np.sum([lengths for _, lengths in payload], axis=0)
        archive, data_starts = _archive(_headers(name, sizes), sizes)
        tails_at = _write_runs(archive, data_starts, payload[:4])
        archive[tails_at - 1] = ord("]")  # the history's last comma
        _scatter(archive, tails_at, tail_runs)
        file_name = f"train-{shard:06d}.tar"
        _write_atomically(self.shard_dir / file_name, archive)
        return {"name": f"shards/{file_name}", "samples": rows}


def histories(items: np.ndarray, starts: np.ndarray, ts: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's history, the (at most `max_history`) items of `items[starts:starts + ts]`
    before its target: (the histories back to back, their lengths)."""
    hi = np.asarray(starts, np.int64) + ts
    lo = np.maximum(starts, hi - max_history)
    return gather(items, hi - lo, lo), hi - lo
