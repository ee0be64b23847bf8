"""A corpus of malformed and unusual raw inputs through `rectrain prepare`.

Each case writes an interaction log and a catalog (the small dataset of conftest.py, damaged one
way), runs prepare in-process and checks the outcome: either it prepares (what users expect to
work: BOM, CRLF, gzip, blank lines, ISO times, odd ids), or it fails with exit 2 and exactly one
printable line `rectrain: error: ...` that names the file (and the line where there is one),
never a traceback and never a partial data directory."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.cli import main

HEADER = "user_id,item_id,timestamp"
LOG = ["u1,a1,10", "u1,b2,20", "u1,c3,30", "u1,d4,40", "u2,a1,5", "u2,d4,6", "u2,e5,7", "u3,b2,1", "u3,c3,2",
       "u3,e5,3"]
CATALOG = ["item_id,title", "a1,Toy Story", "b2,Babe", "c3,Heat", "d4,Fargo", "e5,Casino"]


def text(lines: list[str], end: str = "\n") -> bytes:
    return (end.join(lines) + end).encode()


GOOD_LOG, GOOD_CATALOG = text([HEADER, *LOG]), text(CATALOG)
JSONL_LOG = text([json.dumps(dict(zip(HEADER.split(","), r.split(",")))) for r in LOG])
JSONL_CATALOG = text([json.dumps({"item_id": c.split(",")[0], "title": c.split(",")[1]}) for c in CATALOG[1:]])


@dataclass
class Case:
    """One input: the log's and catalog's bytes (or a writer), the format and file names, and the
    expected outcome: None to prepare, else a regex the error line must match (after 'rectrain: error: ')."""

    log: bytes | Callable[[Path], None] = GOOD_LOG
    catalog: bytes | Callable[[Path], None] = GOOD_CATALOG
    error: str | None = None
    fmt: str = "csv"
    log_name: str = "log.csv"
    catalog_name: str = "items.csv"
    users: int | None = None  # users prepared, when it prepares
    extra: tuple[str, ...] = ()


def symlink_to_nowhere(path: Path) -> None:
    path.symlink_to(path.with_name("gone.csv"))


def directory(path: Path) -> None:
    path.mkdir()


def parquet_log(rows: dict[str, list]) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.table(rows), path)


def truncated_parquet(path: Path) -> None:
    pq.write_table(pa.table({"user_id": ["u1"] * 4, "item_id": ["a1", "b2", "c3", "d4"], "timestamp": [1, 2, 3, 4]}),
                   path)
    path.write_bytes(path.read_bytes()[:-20])


TEN_MB = "x" * (10 << 20)

CASES: dict[str, Case] = {
    # What users expect to work.
    "utf8 byte-order mark": Case(log=b"\xef\xbb\xbf" + GOOD_LOG, users=3),
    "byte-order mark on the catalog": Case(catalog=b"\xef\xbb\xbf" + GOOD_CATALOG, users=3),
    "CRLF line ends": Case(log=text([HEADER, *LOG], "\r\n"), catalog=text(CATALOG, "\r\n"), users=3),
    "blank lines": Case(log=text([HEADER, LOG[0], "", *LOG[1:5], "", "", *LOG[5:], ""]), users=3),
    "gzipped log": Case(log=gzip.compress(GOOD_LOG), log_name="log.csv.gz", users=3),
    "gzipped catalog": Case(catalog=gzip.compress(GOOD_CATALOG), catalog_name="items.csv.gz", users=3),
    "gzip without .gz in the name": Case(log=gzip.compress(GOOD_LOG), users=3),
    "ISO-8601 times": Case(log=text([HEADER, *[",".join([u, i, f"2020-01-01T10:{int(t):02d}:00"])
                                               for u, i, t in (r.split(",") for r in LOG)]]), users=3),
    "ISO times with a zone": Case(log=text([HEADER, *[",".join([u, i, f"2020-01-01T10:{int(t):02d}:00+02:00"])
                                                      for u, i, t in (r.split(",") for r in LOG)]]), users=3),
    "negative times": Case(log=text([HEADER, *[",".join([u, i, str(-1000 + int(t))])
                                               for u, i, t in (r.split(",") for r in LOG)]]), users=3),
    "far-future times": Case(log=text([HEADER, *[",".join([u, i, str(4_000_000_000_000 + int(t))])
                                                 for u, i, t in (r.split(",") for r in LOG)]]), users=3),
    "ids with spaces and non-ASCII": Case(log=text([HEADER, *[r.replace("u1", "Zoë Ünal").replace("a1", "ä 1")
                                                               for r in LOG]]),
                                          catalog=text([c.replace("a1", "ä 1") for c in CATALOG]), users=3),
    "quoted fields with newlines and tabs": Case(catalog=text(["item_id,title", 'a1,"Toy\nStory"', 'b2,"Ba\tbe"',
                                                                *CATALOG[3:]]), users=3),
    "quoted commas and doubled quotes": Case(catalog=text(["item_id,title", 'a1,"Toy, ""Story"""', *CATALOG[2:]]),
                                             users=3),
    "items without text": Case(catalog=text(["item_id,title", "a1,", "b2,", *CATALOG[3:]]), users=3),
    "a 10 MB field": Case(catalog=text(["item_id,title", f"a1,{TEN_MB}", *CATALOG[2:]]), users=3),
    "users with one interaction": Case(log=text([HEADER, *LOG, "u9,a1,1", "u8,b2,2"]), users=3),
    "unknown items dropped": Case(log=text([HEADER, *LOG, "u1,zz,50"]), users=3),
    "extra columns": Case(log=text([HEADER + ",rating", *[r + ",5" for r in LOG]]), users=3),
    "a header only catalog column order": Case(catalog=text(["title,item_id", *[",".join(c.split(",")[::-1])
                                                                              for c in CATALOG[1:]]]), users=3),
    "tsv with CRLF": Case(log=text([r.replace(",", "\t") for r in [HEADER, *LOG]], "\r\n"), fmt="tsv",
                          log_name="log.tsv", catalog=text([c.replace(",", "\t") for c in CATALOG]),
                          catalog_name="items.tsv", users=3),
    "jsonl with blank lines": Case(log=JSONL_LOG + b"\n\n", fmt="jsonl", log_name="log.jsonl",
                                   catalog=JSONL_CATALOG, catalog_name="items.jsonl", users=3),
    # What cannot be read: one line that says why.
    "empty file": Case(log=b"", error=r".*log\.csv: the file is empty"),
    "header only": Case(log=text([HEADER]), error=r".*log\.csv: no interactions \(a header, no rows\)"),
    "blank lines only": Case(log=b"\n\n\n", error=r".*log\.csv: the file is empty"),
    "truncated gzip": Case(log=gzip.compress(GOOD_LOG * 50)[:60], log_name="log.csv.gz",
                           error=r".*log\.csv\.gz: cannot read as csv: .*(truncated|compressed|gzip|inflate).*"),
    "Latin-1 bytes": Case(log=text([HEADER, *LOG[:4]]) + "u2,a1,5\nu2,d4,6\nJosé,e5,7\n".encode("latin-1"),
                          error=r".*log\.csv line 8: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
    "UTF-16 (a spreadsheet's 'Unicode text')": Case(log=GOOD_LOG.decode().encode("utf-16"),
                                                    error=r".*log\.csv: UTF-16 text; save the file as UTF-8"),
    "NUL bytes": Case(log=text([HEADER, *LOG[:3]]) + b"u1,d\x004,40\n",
                      error=r".*log\.csv line 5: a NUL byte \(binary data in a text file\)"),
    "binary junk": Case(log=bytes(range(256)) * 8, error=r".*log\.csv: binary data, not csv text"),
    "a Parquet file read as csv": Case(log=parquet_log({"user_id": ["u1"], "item_id": ["a1"], "timestamp": [1]}),
                                       error=r".*log\.csv: a Parquet file; set data\.format=parquet"),
    "too many fields": Case(log=text([HEADER, *LOG[:5], "u2,d4,6,9", *LOG[6:]]),
                            error=r".*log\.csv line 7: expected 3 fields, found 4"),
    "too few fields": Case(log=text([HEADER, *LOG[:2], "u1,c3", *LOG[3:]]),
                           error=r".*log\.csv line 4: expected 3 fields, found 2"),
    "duplicate header columns": Case(log=text(["user_id,item_id,item_id", *LOG]),
                                     error=r".*log\.csv: column 'item_id' appears twice in the header"),
    "missing column": Case(log=text(["user,item_id,timestamp", *LOG]),
                           error=r".*log\.csv: missing column 'user_id' \(columns: user, item_id, timestamp\)"),
    "a control character in the header": Case(log=text(["user\x01id,item_id,timestamp", *LOG]),
                                              error=r".*log\.csv: missing column 'user_id' \(columns: "
                                                    r"user\\x01id, item_id, timestamp\)"),
    "an empty id": Case(log=text([HEADER, *LOG[:3], ",d4,40", *LOG[4:]]), error=r".*log\.csv line 5: empty 'user_id'"),
    "NaN time": Case(log=text([HEADER, *LOG[:3], "u1,d4,nan", *LOG[4:]]),
                     error=r".*log\.csv line 5: column 'timestamp': 'nan' is not a time"),
    "a word for a time": Case(log=text([HEADER, *LOG[:3], "u1,d4,yesterday", *LOG[4:]]),
                              error=r".*log\.csv line 5: column 'timestamp': 'yesterday' is not a number or an "
                                    r"ISO-8601 time"),
    "numbers and ISO times mixed": Case(log=text([HEADER, *LOG[:3], "u1,d4,2020-01-01", *LOG[4:]]),
                                        error=r".*log\.csv line 5: column 'timestamp': mixes numbers and dates"),
    "duplicate item ids with different text": Case(catalog=text([*CATALOG, "a1,Toy Story 2"]),
                                                   error=r".*items\.csv line 7: item 'a1' appears twice in the "
                                                         r"catalog.*"),
    "catalog and log share no id": Case(catalog=text(["item_id,title", "x1,X", "x2,Y"]),
                                        error=r".*log\.csv line 2: no interaction's item is in the catalog: 'a1'"),
    "a directory where the log should be": Case(log=directory,
                                                error=r"data\.interactions: .*log\.csv is a directory, not a file"),
    "a dangling symlink": Case(log=symlink_to_nowhere,
                               error=r"data\.interactions: .*log\.csv is a broken symbolic link \(to .*gone\.csv\)"),
    "an empty catalog": Case(catalog=b"", error=r".*items\.csv: the file is empty"),
    "a catalog without rows": Case(catalog=text(["item_id,title"]), error=r".*items\.csv: the catalog is empty"),
    "jsonl: a line that is not JSON": Case(log=text([json.dumps(dict(zip(HEADER.split(","), r.split(","))))
                                                     for r in LOG[:3]] + ["{not json"]), fmt="jsonl",
                                           log_name="log.jsonl", catalog=JSONL_CATALOG, catalog_name="items.jsonl",
                                           error=r".*log\.jsonl: cannot read as jsonl: .*"),
    "jsonl with a byte-order mark": Case(log=b"\xef\xbb\xbf" + JSONL_LOG, fmt="jsonl", log_name="log.jsonl",
                                         catalog=JSONL_CATALOG, catalog_name="items.jsonl", users=3),
    "a truncated Parquet file": Case(log=truncated_parquet, fmt="parquet", log_name="log.parquet",
                                     catalog=parquet_log({"item_id": ["a1", "b2", "c3", "d4"],
                                                          "title": ["A", "B", "C", "D"]}),
                                     catalog_name="items.parquet",
                                     error=r".*log\.parquet: cannot read as parquet: .*"),
}


def printable(line: str) -> bool:
    return all(c.isprintable() for c in line)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    case = CASES[name]
    raw = tmp_path / "raw"
    raw.mkdir()
    paths = []
    for content, file_name in ((case.log, case.log_name), (case.catalog, case.catalog_name)):
        path = raw / file_name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        paths.append(path)
    data_dir = tmp_path / "prepared"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 0\ndevice: cpu\n")
    code = main(["prepare", str(recipe), f"data.format={case.fmt}", f"data.interactions={paths[0]}",
                 f"data.catalog={paths[1]}", f"data.dir={data_dir}", "data.catalog_columns.text=[title]",
                 "data.max_history=3", *case.extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    if case.error is None:
        assert code == 0, captured.err[-2000:]
        manifest = json.loads((data_dir / "manifest.json").read_text())
        assert manifest["counts"]["test_users"] == case.users, manifest["counts"]
        return
    assert code == 2, captured.err[-2000:]
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rectrain: error: "), captured.err[-2000:]
    message = lines[0][len("rectrain: error: "):]
    assert printable(message) and len(message) < 400, message
    assert re.fullmatch(case.error, message), message
    assert not data_dir.exists() and not list(tmp_path.glob(".prepared*"))


def test_the_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 40
    assert sum(case.error is None for case in CASES.values()) >= 15
    assert len({case.fmt for case in CASES.values()}) >= 4
