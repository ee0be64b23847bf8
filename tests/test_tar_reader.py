"""train/data/tar_reader.py against webdataset's tarfile-based reader: the same samples from every
kind of tar Python's tarfile writes, and an error from every damaged one."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from train.data import tar_reader

MEMBERS = [("000001.json", b'{"a":1}'), ("000001.TXT", b"upper-case extension"), ("000002.json", b"{}"),
           ("sub/dir/000003.json", b"x" * 1500), ("sub/dir/000003.meta.json", b"two dots"),
           ("d" * 120 + "/000004.json", b"a long path"), ("caf\u00e9/000005.json", "non-ASCII".encode()),
           ("000006.json", b"")]


def archive(path: Path, fmt: int) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a file: skipped by both readers
        for name, body in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


def webdataset_samples(path: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in wds.tarfile_samples([{"url": str(path)}])]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_the_same_samples_as_webdataset(tmp_path: Path, fmt: int) -> None:
    path = archive(tmp_path / "s.tar", fmt)
    got = list(tar_reader.samples(path))
    assert got == webdataset_samples(path)
    assert [s["__key__"] for s in got] == ["000001", "000002", "sub/dir/000003", "d" * 120 + "/000004",
                                           "caf\u00e9/000005", "000006"]
    assert got[0]["txt"] == b"upper-case extension" and got[2]["meta.json"] == b"two dots"


def test_ustar_prefix_names(tmp_path: Path) -> None:
    path = tmp_path / "u.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        name = "p" * 90 + "/" + "q" * 60 + "/000001.json"  # stored as prefix + name
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert [s["__key__"] for s in tar_reader.samples(path)] == [name.removesuffix(".json")]


def test_damage_is_an_error_where_tarfile_would_stop_short_or_fail(tmp_path: Path) -> None:
    data = archive(tmp_path / "s.tar", tarfile.PAX_FORMAT).read_bytes()
    cut = tmp_path / "cut.tar"
    for length in (3000, 5000):  # inside a header, inside the 1500-byte member
        cut.write_bytes(data[:length])
        with pytest.raises(EOFError):
            list(tar_reader.samples(cut))
    damaged = bytearray(data)
    damaged[512 * 3 + 10] ^= 0xFF  # a name byte of a later header: its checksum no longer adds up
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(damaged))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_reader.samples(bad))
    # tarfile takes a bad header after the first for the archive's end: fewer samples, no error
    # (the stream's sample count against the manifest is what catches it there).
    assert len(webdataset_samples(bad)) < len(webdataset_samples(tmp_path / "s.tar"))


def test_only_local_paths_are_read_here() -> None:
    assert tar_reader.local_path("/data/shards/train-000000.tar") == "/data/shards/train-000000.tar"
    assert tar_reader.local_path("shards/train-000000.tar") == "shards/train-000000.tar"
    assert tar_reader.local_path("file:///data/a.tar") == "/data/a.tar"
    assert tar_reader.local_path("pipe:aws s3 cp s3://b/a.tar -") is None
    assert tar_reader.local_path("https://host/a.tar") is None and tar_reader.local_path("gs://b/a.tar") is None
