"""Bad raw data through `rectrain prepare`: exit code 2, one precise line on stderr, nothing written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from train.cli import main


def _run_prepare(tmp_path: Path, dataset: dict[str, Any], *extra: str,
                 capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 0\ndevice: cpu\n")
    code = main(["prepare", str(recipe), *dataset["overrides"], *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_clean_failure(code: int, out: str, err: str, dataset: dict[str, Any], expected: str) -> None:
    assert code == 2
    assert err == f"rectrain: error: {expected}\n"  # exactly one line
    assert "Traceback" not in out + err
    data_dir: Path = dataset["dir"]
    assert not data_dir.exists()
    assert not data_dir.with_name(f".{data_dir.name}.tmp").exists()
    assert not data_dir.with_name(f".{data_dir.name}.old").exists()
    assert not data_dir.with_name(f".{data_dir.name}.lock").exists()


def test_valid_data_prepares(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    # The baseline the failures below differ from: the same call succeeds on good data.
    dataset = write_dataset("csv")
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    assert code == 0
    assert re.fullmatch(rf"prepared {re.escape(str(dataset['dir']))}: 4 users, 8 items, 5 training samples "
                        r"in 2 shards, 3 test users \(\d+\.\ds\)\n", out)
    assert "dropped 1 interactions whose item is not in the catalog" in err
    assert "Traceback" not in err
    assert (dataset["dir"] / "manifest.json").is_file()


def test_missing_interactions_file(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv")
    missing = tmp_path / "nowhere" / "interactions.csv"
    code, out, err = _run_prepare(tmp_path, dataset, f"data.interactions={missing}", capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"data.interactions: file not found: {missing}")


def test_missing_catalog_file(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv")
    missing = tmp_path / "catalog.csv"
    code, out, err = _run_prepare(tmp_path, dataset, f"data.catalog={missing}", capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"data.catalog: file not found: {missing}")


def test_missing_column(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv", interaction_columns=("user_id", "item_id", "time"))
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    _assert_clean_failure(code, out, err, dataset,
                          f"{dataset['interactions']}: missing column 'timestamp' (columns: user_id, item_id, time)")


def test_missing_catalog_text_column(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("atomic")
    code, out, err = _run_prepare(tmp_path, dataset, "data.catalog_columns.text=[title, year]", capsys=capsys)
    _assert_clean_failure(code, out, err, dataset,
                          f"{dataset['catalog']}: missing column 'year' (columns: item_id, title, genre)")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "atomic", "jsonl"])
def test_non_numeric_timestamp_names_file_and_line(tmp_path: Path, write_dataset, fmt: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Times as text throughout: a JSON column that changes type between lines is refused by
    # Arrow's reader before any value is looked at.
    rows = [("u1", "a1", "5"), ("u1", "b2", "6"), ("u1", "c3", "7"), ("u1", "d4", "next week"), ("u1", "e5", "9")]
    dataset = write_dataset(fmt, interactions=rows)
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    line = 4 if fmt == "jsonl" else 5  # JSON lines have no header line
    _assert_clean_failure(code, out, err, dataset, f"{dataset['interactions']} line {line}: column 'timestamp': "
                                                   "'next week' is not a number or an ISO-8601 time")


def test_empty_timestamp_names_file_and_line(tmp_path: Path, write_dataset,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv", interactions=[("u1", "a1", 5), ("u1", "b2", ""), ("u1", "c3", 7)])
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"{dataset['interactions']} line 3: empty 'timestamp'")


def test_empty_user_id_names_file_and_line(tmp_path: Path, write_dataset,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv", interactions=[("u1", "a1", 5), ("u1", "b2", 6), ("", "c3", 7)])
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"{dataset['interactions']} line 4: empty 'user_id'")


def test_empty_catalog(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv", catalog=[])
    assert dataset["catalog"].read_text() == "item_id,title,genre\n"
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"{dataset['catalog']}: the catalog is empty")


def test_zero_byte_catalog(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv")
    dataset["catalog"].write_bytes(b"")
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"{dataset['catalog']}: the file is empty")


def test_unknown_item_with_fail(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv")
    code, out, err = _run_prepare(tmp_path, dataset, "data.unknown_items=fail", capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"{dataset['interactions']} line 9: item not in the catalog "
                                                   "(data.unknown_items=drop skips such rows): 'zz'")


def test_unknown_item_with_fail_in_parquet_names_the_row(tmp_path: Path, write_dataset,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("parquet")
    code, out, err = _run_prepare(tmp_path, dataset, "data.unknown_items=fail", capsys=capsys)
    _assert_clean_failure(code, out, err, dataset, f"{dataset['interactions']} row 8: item not in the catalog "
                                                   "(data.unknown_items=drop skips such rows): 'zz'")


def test_duplicate_catalog_id(tmp_path: Path, write_dataset, small_dataset_rows,
                              capsys: pytest.CaptureFixture[str]) -> None:
    catalog = list(small_dataset_rows[1])
    catalog.insert(5, ("a1", "Toy Story 2", "Animation"))  # line 7; a1 first appears on line 3
    dataset = write_dataset("csv", catalog=catalog)
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    _assert_clean_failure(code, out, err, dataset,
                          f"{dataset['catalog']} line 7: item 'a1' appears twice in the catalog (8 distinct of 9)")


def test_ragged_csv_row_names_the_file_and_row(tmp_path: Path, write_dataset,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv")
    path: Path = dataset["interactions"]
    path.write_text(path.read_text() + "u9,a1\n")
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    _assert_clean_failure(code, out, err, dataset,
                          f"{path} line 18: expected 3 fields, found 2")


def test_broken_json_line(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("jsonl")
    path: Path = dataset["interactions"]
    path.write_text(path.read_text() + '{"user_id": "u9", "item_id": \n')
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    assert code == 2
    assert err.startswith(f"rectrain: error: {path}: cannot read as jsonl: ")
    _assert_clean_failure(code, out, err, dataset, err.removeprefix("rectrain: error: ").rstrip("\n"))


def test_not_a_parquet_file(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("parquet")
    dataset["catalog"].write_text("item_id,title\na1,Toy Story\n")
    code, out, err = _run_prepare(tmp_path, dataset, capsys=capsys)
    assert err.startswith(f"rectrain: error: {dataset['catalog']}: cannot read as parquet: ")
    _assert_clean_failure(code, out, err, dataset, err.removeprefix("rectrain: error: ").rstrip("\n"))


def test_failed_prepare_keeps_an_earlier_preparation(tmp_path: Path, write_dataset,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv")
    assert _run_prepare(tmp_path, dataset, capsys=capsys)[0] == 0
    manifest = (dataset["dir"] / "manifest.json").read_bytes()
    code, out, err = _run_prepare(tmp_path, dataset, "data.unknown_items=fail", capsys=capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("rectrain: error: ")
    assert (dataset["dir"] / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in dataset["dir"].parent.iterdir()) == ["data"]
