"""Named dataset layouts (MovieLens, Amazon, UniSRec) and the log filters (min_rating, k-core).

Every format gets the same small log, written by hand in its own layout. Two users rate the
same five items; the catalog lists them in id order, so item_index 0-4 = items 1-5:

    user 1: items 1 2 3 4 5 at times 100..500, ratings 5 3 4 2 5  -> 0 1 2 3 4
    user 2: items 4 3 1 5 2 at times 50..450,  ratings 4 5 1 4 3  -> 3 2 0 4 1

The files list the ratings in a shuffled order, so only the times can give these sequences.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from train.cli import main
from train.config.io import load_config
from train.errors import UserError
from train.data.prepare.filters import k_core
from train.data.prepare.run import prepare


# (user, item, rating, time) in file order.
RATINGS = [(2, 5, 4, 350), (1, 1, 5, 100), (1, 4, 2, 400), (2, 4, 4, 50), (1, 2, 3, 200), (2, 2, 3, 450),
           (2, 3, 5, 150), (1, 5, 5, 500), (2, 1, 1, 250), (1, 3, 4, 300)]
VALID = [{"user_index": 0, "history": [0, 1, 2], "target": 3}, {"user_index": 1, "history": [3, 2, 0], "target": 4}]
TEST = [{"user_index": 0, "history": [0, 1, 2, 3], "target": 4},
        {"user_index": 1, "history": [3, 2, 0, 4], "target": 1}]


def _prepare(tmp_path: Path, fmt: str, interactions: Path, catalog: Path, *extra: str) -> dict[str, Any]:
    data_dir = tmp_path / "prepared"
    config = load_config(None, [f"data.format={fmt}", f"data.interactions={interactions}", f"data.catalog={catalog}",
                                f"data.dir={data_dir}", "data.shard_size=2", "device=cpu", *extra])
    manifest = prepare(config, show_progress=False)
    catalog = pq.read_table(data_dir / "catalog.parquet").drop_columns(["item_index", "train_count"])
    return {"manifest": manifest, "dir": data_dir, "catalog": catalog.to_pylist(),
            "valid": pq.read_table(data_dir / "splits" / "valid.parquet").to_pylist(),
            "test": pq.read_table(data_dir / "splits" / "test.parquet").to_pylist()}


def _splits(users: list[str], valid: list[dict[str, Any]] = VALID,
            test: list[dict[str, Any]] = TEST) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The expected splits with the format's user ids (users sort as strings: index = position)."""
    return ([{**row, "user_id": users[row["user_index"]]} for row in valid],
            [{**row, "user_id": users[row["user_index"]]} for row in test])


def _check_splits(result: dict[str, Any], users: list[str]) -> None:
    valid, test = _splits(users)
    assert (result["valid"], result["test"]) == (valid, test)
    assert result["manifest"]["counts"] == {"users": 2, "items": 5, "interactions": 10, "dropped_unknown_items": 0,
                                            "train_samples": 4, "valid_users": 2, "test_users": 2}


# -------------------------------------------------------------------------- MovieLens

ML_TITLES = {1: "Misérables, Les (1995)", 2: "Toy Story (1995)", 3: 'Say "Anything" (1989)', 4: "unknown",
             5: "Heat (1995)"}
ML_GENRES = {1: [8, 14], 2: [3, 4, 5], 3: [5, 8, 14], 4: [0], 5: [1, 6, 16]}  # u.genre indices
ML_GENRE_NAMES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                  "War", "Western"]
ML_CATALOG = [{"item_id": str(i), "title": ML_TITLES[i], "genres": ", ".join(ML_GENRE_NAMES[g] for g in ML_GENRES[i])}
              for i in range(1, 6)]


def _write_ml_100k(raw: Path, genre_file: bool = True) -> tuple[Path, Path]:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    lines = []
    for item in range(1, 6):
        flags = ["1" if g in ML_GENRES[item] else "0" for g in range(19)]
        date = "" if item == 4 else "01-Jan-1995"
        lines.append("|".join([str(item), ML_TITLES[item], date, "", f"http://us.imdb.com/M/title-exact?{item}",
                               *flags]))
    (raw / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    if genre_file:
        (raw / "u.genre").write_text("".join(f"{name}|{g}\n" for g, name in enumerate(ML_GENRE_NAMES)) + "\n")
    return raw / "u.data", raw / "u.item"


def _write_ml_1m(raw: Path) -> tuple[Path, Path]:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    movies = "".join(f"{i}::{ML_TITLES[i]}::{'|'.join(ML_GENRE_NAMES[g] for g in ML_GENRES[i])}\n" for i in range(1, 6))
    (raw / "movies.dat").write_bytes(movies.encode("latin-1"))  # ml-1m's movies.dat is latin-1
    return raw / "ratings.dat", raw / "movies.dat"


def _write_ml_latest(raw: Path) -> tuple[Path, Path]:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" +
                                     "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in RATINGS))
    rows = []
    for i in range(1, 6):
        title = '"' + ML_TITLES[i].replace('"', '""') + '"' if ("," in ML_TITLES[i] or '"' in ML_TITLES[i]) \
            else ML_TITLES[i]
        genres = "|".join(ML_GENRE_NAMES[g] for g in ML_GENRES[i]) if i != 4 else "(no genres listed)"
        rows.append(f"{i},{title},{genres}\n")
    (raw / "movies.csv").write_text("movieId,title,genres\n" + "".join(rows), encoding="utf-8")
    return raw / "ratings.csv", raw / "movies.csv"


def test_movielens_100k_reads_u_data_and_latin1_u_item(tmp_path: Path) -> None:
    inter, catalog = _write_ml_100k(tmp_path / "ml-100k")
    assert "Mis\xe9rables".encode("latin-1") in catalog.read_bytes()  # a byte that is not UTF-8
    result = _prepare(tmp_path, "movielens", inter, catalog, "data.catalog_columns.text=[title, genres]")
    assert result["catalog"] == ML_CATALOG
    assert result["catalog"][0] == {"item_id": "1", "title": "Misérables, Les (1995)", "genres": "Drama, Romance"}
    assert result["manifest"]["text_fields"] == ["title", "genres"]
    _check_splits(result, ["1", "2"])


def test_movielens_100k_genre_names_come_from_u_genre(tmp_path: Path) -> None:
    inter, catalog = _write_ml_100k(tmp_path / "ml-100k")
    (tmp_path / "ml-100k" / "u.genre").write_text("".join(f"G{g}|{g}\n" for g in range(19)))
    result = _prepare(tmp_path, "movielens", inter, catalog, "data.catalog_columns.text=[genres]")
    assert [row["genres"] for row in result["catalog"]] == ["G8, G14", "G3, G4, G5", "G5, G8, G14", "G0", "G1, G6, G16"]
    # Without u.genre beside u.item, the standard names.
    (tmp_path / "ml-100k" / "u.genre").unlink()
    result = _prepare(tmp_path, "movielens", inter, catalog, "data.catalog_columns.text=[title, genres]")
    assert result["catalog"] == ML_CATALOG


def test_movielens_1m_reads_double_colon_files(tmp_path: Path) -> None:
    inter, catalog = _write_ml_1m(tmp_path / "ml-1m")
    result = _prepare(tmp_path, "movielens", inter, catalog, "data.catalog_columns.text=[title, genres]")
    assert result["catalog"] == ML_CATALOG
    _check_splits(result, ["1", "2"])


def test_movielens_latest_reads_the_csv_files(tmp_path: Path) -> None:
    inter, catalog = _write_ml_latest(tmp_path / "ml-latest-small")
    result = _prepare(tmp_path, "movielens", inter, catalog, "data.catalog_columns.text=[title, genres]")
    expected = [dict(row) for row in ML_CATALOG]
    expected[3]["genres"] = ""  # "(no genres listed)"
    assert result["catalog"] == expected
    _check_splits(result, ["1", "2"])


def test_min_rating_keeps_ratings_at_or_above_it(tmp_path: Path) -> None:
    inter, catalog = _write_ml_100k(tmp_path / "ml-100k")
    result = _prepare(tmp_path, "movielens", inter, catalog, "data.min_rating=3")
    # user 1 loses item 4 (rated 2), user 2 loses item 1 (rated 1).
    valid, test = _splits(["1", "2"], valid=[{"user_index": 0, "history": [0, 1], "target": 2},
                                             {"user_index": 1, "history": [3, 2], "target": 4}],
                          test=[{"user_index": 0, "history": [0, 1, 2], "target": 4},
                                {"user_index": 1, "history": [3, 2, 4], "target": 1}])
    assert result["valid"] == valid
    assert result["test"] == test
    manifest = result["manifest"]
    assert manifest["counts"]["interactions"] == 8
    assert manifest["counts"]["items"] == 5  # no k-core: the catalog stays whole
    assert manifest["filters"] == {"min_rating": 3.0, "removed_by_min_rating": 2, "k_core": 0, "k_core_iterations": 0,
                                   "removed_by_k_core_interactions": 0, "k_core_users_removed": 0,
                                   "k_core_items_removed": 0}
    assert manifest["fingerprint"]["min_rating"] == 3.0
    # Half-stars: 4.5 keeps only the 5s.
    many = tmp_path / "many"
    many.mkdir()
    (many / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u in (1, 2) for i, r, t in
                                         [(1, 5, 1), (2, 5, 2), (3, 4, 3), (4, 5, 4), (5, 5, 5)]))
    result = _prepare(tmp_path, "movielens", many / "u.data", catalog, "data.min_rating=4.5")
    assert result["manifest"]["filters"]["removed_by_min_rating"] == 2
    assert result["test"][0]["history"] == [0, 1, 3]


def test_min_rating_reads_the_rating_column_of_a_csv(tmp_path: Path, write_dataset, small_dataset_rows) -> None:
    rows = [(u, i, 1.0 if i == "g7" else 4.0, t) for u, i, t in small_dataset_rows[0]]
    dataset = write_dataset("csv", interactions=rows, interaction_columns=("user_id", "item_id", "stars", "timestamp"))
    manifest = prepare(load_config(None, [*dataset["overrides"], "data.min_rating=2", "data.columns.rating=stars"]),
                       show_progress=False)
    assert manifest["filters"]["removed_by_min_rating"] == 2  # u1 and u4 each rated g7
    assert manifest["counts"]["interactions"] == 13
    # Without the filter the column is not even read: a file without it prepares.
    plain = write_dataset("csv", name="plain")
    assert prepare(load_config(None, plain["overrides"]), show_progress=False)["filters"]["min_rating"] is None


# ----------------------------------------------------------------------------- Amazon

AMAZON_ITEMS = {  # item -> (title, brand, categories, description lines)
    1: ("Cotton  Tee", "Hanes", ["Clothing, Shoes & Jewelry", "Women"], ["", "  Soft cotton\n tee. ", "Second."]),
    2: ("Café Mug", "Émile Henry", ["Home & Kitchen"], ["Stoneware mug."]),
    3: ("Kettle", None, [], []),
    4: ("Lamp", "Ikea", ["Home", "Lighting"], None),
    5: (None, "", ["Tools"], ["  "]),
}
AMAZON_CATALOG = [
    {"item_id": "B01", "title": "Cotton Tee", "brand": "Hanes", "categories": "Clothing, Shoes & Jewelry, Women",
     "description": "Soft cotton tee."},
    {"item_id": "B02", "title": "Café Mug", "brand": "Émile Henry", "categories": "Home & Kitchen",
     "description": "Stoneware mug."},
    {"item_id": "B03", "title": "Kettle", "brand": "", "categories": "", "description": ""},
    {"item_id": "B04", "title": "Lamp", "brand": "Ikea", "categories": "Home, Lighting", "description": ""},
    {"item_id": "B05", "title": "", "brand": "", "categories": "Tools", "description": ""},
]
AMAZON_FIELDS = "data.catalog_columns.text=[title, brand, categories, description]"


def _write_lines(path: Path, records: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
    return path


def _amazon_2018(raw: Path, reviews: str = "Clothing.json.gz", meta: str = "meta_Clothing.json") -> tuple[Path, Path]:
    records = [{"overall": float(r), "verified": True, "reviewTime": "01 1, 2018", "reviewerID": f"A{u}",
                "asin": f"B0{i}", "style": {"Size:": " Large"}, "reviewerName": "Ann", "reviewText": "Fine.",
                "summary": "ok", "unixReviewTime": t} for u, i, r, t in RATINGS]
    items = []
    for item, (title, brand, categories, description) in AMAZON_ITEMS.items():
        record: dict[str, Any] = {"category": categories, "tech1": "", "fit": "", "also_buy": ["B0X"],
                                  "rank": "1 in Clothing", "price": "$9.99", "asin": f"B0{item}", "imageURL": [],
                                  "details": {"Shipping Weight:": "1 pounds"}}
        for key, value in (("title", title), ("brand", brand), ("description", description)):
            if value is not None:
                record[key] = value
        items.append(record)
    items.insert(3, {**items[0], "title": "A repeated line"})  # the metadata files repeat some products
    return _write_lines(raw / reviews, records), _write_lines(raw / meta, items)


def _amazon_2023(raw: Path) -> tuple[Path, Path]:
    records = [{"rating": float(r), "title": "ok", "text": "Fine.", "images": [], "asin": f"C{i}{u}",
                "parent_asin": f"B0{i}", "user_id": f"A{u}", "timestamp": 1_600_000_000_000 + t * 1000 + 7,
                "helpful_vote": 0, "verified_purchase": True} for u, i, r, t in RATINGS]
    items = []
    for item, (title, brand, categories, description) in AMAZON_ITEMS.items():
        items.append({"main_category": "All Beauty", "title": title, "average_rating": 4.5, "rating_number": 3,
                      "features": ["x"], "description": description if description is not None else [],
                      "price": None, "images": [{"large": "u"}], "videos": [], "store": brand,
                      "categories": categories, "details": {"Brand": brand}, "parent_asin": f"B0{item}",
                      "bought_together": None})
    return _write_lines(raw / "Beauty.jsonl", records), _write_lines(raw / "meta_Beauty.jsonl.gz", items)


def test_amazon_2018_gzipped_reviews_and_metadata(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inter, catalog = _amazon_2018(tmp_path / "amazon")
    assert inter.read_bytes()[:2] == b"\x1f\x8b"
    result = _prepare(tmp_path, "amazon", inter, catalog, AMAZON_FIELDS)
    assert result["catalog"] == AMAZON_CATALOG
    assert result["manifest"]["text_fields"] == ["title", "brand", "categories", "description"]
    _check_splits(result, ["A1", "A2"])
    assert "dropped 1 metadata lines repeating an earlier asin (the first is kept)" in caplog.text


def test_amazon_2023_reviews_in_milliseconds(tmp_path: Path) -> None:
    inter, catalog = _amazon_2023(tmp_path / "amazon")
    result = _prepare(tmp_path, "amazon", inter, catalog, AMAZON_FIELDS, "data.min_rating=1")
    assert result["catalog"] == AMAZON_CATALOG
    _check_splits(result, ["A1", "A2"])
    assert result["manifest"]["filters"]["removed_by_min_rating"] == 0


def test_amazon_default_text_is_the_title(tmp_path: Path) -> None:
    inter, catalog = _amazon_2018(tmp_path / "amazon", reviews="r.json", meta="m.json.gz")
    result = _prepare(tmp_path, "amazon", inter, catalog)
    assert result["catalog"] == [{"item_id": row["item_id"], "title": row["title"]} for row in AMAZON_CATALOG]


# ---------------------------------------------------------------------------- UniSRec

UNISREC_TEXT = ["Cotton Tee Hanes Clothing.", "Café Mug, Émile Henry.", 'Say "Kettle".', "Lamp.", "Tools."]


def _unisrec_text(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("item_id:token\ttext:token_seq\n" + "".join(f"{i}\t{text}\n" for i, text in
                                                                 enumerate(UNISREC_TEXT, 1)), encoding="utf-8")
    return path


def test_unisrec_text_and_atomic_inter(tmp_path: Path) -> None:
    catalog = _unisrec_text(tmp_path / "Scientific" / "Scientific.text")
    inter = tmp_path / "Scientific" / "Scientific.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" +
                     "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    result = _prepare(tmp_path, "unisrec", inter, catalog)
    assert result["catalog"] == [{"item_id": str(i), "title": text} for i, text in enumerate(UNISREC_TEXT, 1)]
    _check_splits(result, ["1", "2"])
    result = _prepare(tmp_path, "unisrec", inter, catalog, "data.catalog_columns.text=[text]",
                      "prompt.item_template='{text}'", "data.min_rating=3")
    assert result["catalog"][1] == {"item_id": "2", "text": "Café Mug, Émile Henry."}
    assert result["manifest"]["filters"]["removed_by_min_rating"] == 2


def test_unisrec_sequence_files(tmp_path: Path) -> None:
    # UniSRec's own .inter files hold prefixes of each user's sequence; the longest is the whole.
    catalog = _unisrec_text(tmp_path / "Scientific" / "Scientific.text")
    inter = tmp_path / "Scientific" / "Scientific.test.inter"
    inter.write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n"
                     "1\t1 2\t3\n"
                     "2\t4 3 1 5\t2\n"
                     "1\t1 2 3 4\t5\n"
                     "1\t1\t2\n"
                     "2\t4\t3\n")
    result = _prepare(tmp_path, "unisrec", inter, catalog)
    _check_splits(result, ["1", "2"])


# ---------------------------------------------------------------------------- k-core

# A log whose 2-core takes five rounds to reach: E and item v go first; then D (left with w),
# then w (left with C), then C (left with z), then z (left with A). A and B with x, y, p, q stay.
KCORE_LOG = [("A", "x", 1), ("A", "y", 2), ("A", "p", 3), ("A", "q", 4), ("A", "z", 5),
             ("B", "q", 1), ("B", "p", 2), ("B", "y", 3), ("B", "x", 4),
             ("C", "z", 1), ("C", "w", 2), ("D", "w", 1), ("D", "v", 2), ("E", "x", 1)]
KCORE_CATALOG = [(item, f"title {item}", "g") for item in ("z", "x", "w", "y", "v", "p", "u", "q")]


def test_k_core_reaches_its_fixed_point(write_dataset) -> None:
    dataset = write_dataset("csv", interactions=KCORE_LOG, catalog=KCORE_CATALOG)
    manifest = prepare(load_config(None, [*dataset["overrides"], "data.k_core=2"]), show_progress=False)
    assert manifest["filters"] == {"min_rating": None, "removed_by_min_rating": 0, "k_core": 2, "k_core_iterations": 5,
                                   "removed_by_k_core_interactions": 6, "k_core_users_removed": 3,
                                   "k_core_items_removed": 4}
    assert manifest["counts"] == {"users": 2, "items": 4, "interactions": 8, "dropped_unknown_items": 0,
                                  "train_samples": 2, "valid_users": 2, "test_users": 2}
    assert manifest["fingerprint"]["k_core"] == 2
    # The catalog keeps the core's items (x y p q, in file order), renumbered.
    catalog = pq.read_table(dataset["dir"] / "catalog.parquet")
    assert catalog.column("item_id").to_pylist() == ["x", "y", "p", "q"]
    assert catalog.column("item_index").to_pylist() == [0, 1, 2, 3]
    assert pq.read_table(dataset["dir"] / "splits" / "test.parquet").to_pylist() == [
        {"user_index": 0, "user_id": "A", "history": [0, 1, 2], "target": 3},
        {"user_index": 1, "user_id": "B", "history": [3, 2, 1], "target": 0}]


def test_k_core_one_drops_only_items_without_interactions(write_dataset) -> None:
    dataset = write_dataset("csv", interactions=KCORE_LOG, catalog=KCORE_CATALOG)
    manifest = prepare(load_config(None, [*dataset["overrides"], "data.k_core=1"]), show_progress=False)
    assert manifest["filters"]["k_core_items_removed"] == 1  # u
    assert manifest["filters"]["removed_by_k_core_interactions"] == 0
    assert manifest["counts"]["interactions"] == len(KCORE_LOG)


def _naive_k_core(pairs: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """One removal at a time, in Python: the reference the vectorised k-core must agree with."""
    pairs = list(pairs)
    while True:
        users, items = Counter(u for u, _ in pairs), Counter(i for _, i in pairs)
        short = [(u, i) for u, i in pairs if users[u] < k or items[i] < k]
        if not short:
            return pairs
        pairs.remove(short[0])


@pytest.mark.parametrize("seed", range(5))
def test_k_core_matches_the_one_at_a_time_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 30, 400), (rng.zipf(1.6, 400) % 40)
    for k in (2, 3, 5):
        keep, items_kept, rounds = k_core(users, items, 30, 40, k)
        expected = _naive_k_core(list(zip(users.tolist(), items.tolist())), k)
        assert Counter(zip(users[keep].tolist(), items[keep].tolist())) == Counter(expected)
        assert set(np.flatnonzero(items_kept).tolist()) == {i for _, i in expected}
        assert rounds >= (1 if len(expected) < 400 else 0)


@pytest.mark.slow
def test_ml_100k_5_core(tmp_path: Path, ml_100k: list[str]) -> None:
    config = load_config(None, [*ml_100k, "data.catalog_columns.text=[movie_title]", "data.k_core=5"])
    manifest = prepare(config, show_progress=False)
    counts, filtered = manifest["counts"], manifest["filters"]
    # Every user has rated >= 20 movies: the 5-core drops items only, and few users' ratings.
    assert counts["users"] == 943
    assert filtered["k_core_users_removed"] == 0
    assert 1300 < counts["items"] < 1682
    assert counts["items"] + filtered["k_core_items_removed"] == 1682
    assert counts["interactions"] + filtered["removed_by_k_core_interactions"] == 100_000
    assert 99_000 < counts["interactions"] < 100_000
    assert filtered["k_core_iterations"] >= 1
    # The figures published for MovieLens 100K's 5-core.
    assert (counts["items"], counts["interactions"]) == (1349, 99_287)
    catalog = pq.read_table(tmp_path / "ml-100k" / "catalog.parquet")
    assert catalog.num_rows == counts["items"]
    assert min(catalog.column("train_count").to_pylist()) >= 1


# -------------------------------------------------------------------------- bad input

def _cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, str, Path]:
    data_dir = tmp_path / "out" / "data"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 0\ndevice: cpu\n")
    code = main(["prepare", str(recipe), f"data.dir={data_dir}", *overrides])
    err = capsys.readouterr().err
    return code, err, data_dir


def _fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], expected: str, *overrides: str) -> None:
    code, err, data_dir = _cli_prepare(tmp_path, capsys, *overrides)
    assert code == 2
    assert err == f"rectrain: error: {expected}\n"  # exactly one line
    assert not data_dir.exists()
    assert not data_dir.with_name(".data.tmp").exists()


def test_unknown_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(tmp_path, capsys, "data.format: must be one of synthetic, csv, tsv, parquet, jsonl, atomic, hf, "
                             "movielens, amazon, unisrec (got 'xml')", "data.format=xml", "data.interactions=a", "data.catalog=b")


def test_movielens_ratings_of_another_shape(tmp_path: Path, write_dataset,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv")
    _fails(tmp_path, capsys,
           f"data.interactions: {dataset['interactions']} is not a MovieLens ratings file: expected u.data "
           "(user<TAB>item<TAB>rating<TAB>time, 100K), ratings.dat (user::item::rating::time, 1M/10M) or ratings.csv "
           "(header userId,movieId,rating,timestamp: ml-latest, 20M, 25M, 32M); its first line is "
           "'user_id,item_id,timestamp'",
           "data.format=movielens", f"data.interactions={dataset['interactions']}",
           f"data.catalog={dataset['catalog']}")


def test_movielens_catalog_of_another_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, _ = _write_ml_100k(tmp_path / "ml-100k")
    _, movies = _write_ml_latest(tmp_path / "ml-latest")
    _fails(tmp_path, capsys,
           f"data.catalog: {movies} is not MovieLens 100K's u.item (id|title|release date|video release date|IMDb "
           "URL|19 genre flags), which goes with u.data; its first line is 'movieId,title,genres'",
           "data.format=movielens", f"data.interactions={inter}", f"data.catalog={movies}")


def test_amazon_file_that_is_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, catalog = _write_ml_latest(tmp_path / "ml-latest")
    _fails(tmp_path, capsys,
           f"data.interactions: {inter} is not an Amazon reviews file (JSON lines, gzipped or not): its first line "
           "is 'userId,movieId,rating,timestamp'",
           "data.format=amazon", f"data.interactions={inter}", f"data.catalog={catalog}")


def test_amazon_json_with_other_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter = _write_lines(tmp_path / "reviews.json.gz", [{"user": "A1", "item": "B01", "time": 1}])
    _, catalog = _amazon_2018(tmp_path / "amazon")
    _fails(tmp_path, capsys,
           f"data.interactions: {inter} is not an Amazon reviews file: expected the keys reviewerID, asin, overall, "
           "unixReviewTime (2018) or user_id, parent_asin, rating, timestamp (2023); its first line has item, time, "
           "user", "data.format=amazon", f"data.interactions={inter}", f"data.catalog={catalog}")


def test_amazon_reviews_and_metadata_of_different_releases(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    inter, _ = _amazon_2018(tmp_path / "2018")
    _, catalog = _amazon_2023(tmp_path / "2023")
    _fails(tmp_path, capsys,
           f"data.catalog: {catalog} is not Amazon 2018 metadata, which has the key 'asin' like the 2018 reviews "
           "in data.interactions (it looks like 2023 metadata)",
           "data.format=amazon", f"data.interactions={inter}", f"data.catalog={catalog}")


def test_amazon_catalog_that_never_meets_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, _ = _amazon_2018(tmp_path / "amazon")
    catalog = _write_lines(tmp_path / "meta.json", [{"asin": "Z1", "title": "Other"}])
    _fails(tmp_path, capsys, f"{inter} line 1: no interaction's item is in the catalog: 'B05'",
           "data.format=amazon", f"data.interactions={inter}", f"data.catalog={catalog}")


def test_unisrec_text_without_its_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = tmp_path / "x.text"
    catalog.write_text("1\tCotton Tee\n")
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n")
    _fails(tmp_path, capsys, f"data.catalog: {catalog} is not a UniSRec .text file (header "
                             "item_id:token<TAB>text:token_seq); its header is '1\\tCotton Tee'",
           "data.format=unisrec", f"data.interactions={inter}", f"data.catalog={catalog}")


def test_min_rating_without_ratings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = _unisrec_text(tmp_path / "x.text")
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n1\t1 2 3\t4\n")
    _fails(tmp_path, capsys, f"data.min_rating: {inter} has no ratings to filter on",
           "data.format=unisrec", f"data.interactions={inter}", f"data.catalog={catalog}", "data.min_rating=3")


def test_min_rating_that_removes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, catalog = _write_ml_1m(tmp_path / "ml-1m")
    _fails(tmp_path, capsys, "data.min_rating: no interaction is rated 6 or more (of 10); lower data.min_rating",
           "data.format=movielens", f"data.interactions={inter}", f"data.catalog={catalog}", "data.min_rating=6")


def test_k_core_that_removes_every_user(tmp_path: Path, write_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_dataset("csv", interactions=KCORE_LOG, catalog=KCORE_CATALOG)
    code, err, _ = _cli_prepare(tmp_path, capsys, *dataset["overrides"], "data.k_core=5")
    assert code == 2
    assert err == "rectrain: error: data.k_core: the 5-core removes every user (of 5 users, 14 interactions); " \
                  "lower data.k_core\n"
    assert not dataset["dir"].exists()
    assert not dataset["dir"].parent.exists()


def test_text_field_the_format_does_not_have(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, catalog = _write_ml_1m(tmp_path / "ml-1m")
    _fails(tmp_path, capsys, "data.catalog_columns.text: data.format=movielens catalogs have no field 'brand' "
                             "(fields: title, genres)",
           "data.format=movielens", f"data.interactions={inter}", f"data.catalog={catalog}",
           "data.catalog_columns.text=[title, brand]")


def test_bad_rating_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, catalog = _write_ml_latest(tmp_path / "ml-latest")
    inter.write_text(inter.read_text().replace("2,3,5.0,150", "2,3,five,150"))
    _fails(tmp_path, capsys, f"{inter} line 8: column 'rating': 'five' is not a number",
           "data.format=movielens", f"data.interactions={inter}", f"data.catalog={catalog}", "data.min_rating=3")


def test_config_rejects_impossible_filters() -> None:
    for override, message in [("data.k_core=-1", "data.k_core: must be >= 0 (0 = off)"),
                              ("data.min_rating=.nan", "data.min_rating: must be a number or -.inf (got .nan)")]:
        with pytest.raises(UserError) as caught:
            load_config(None, ["data.format=csv", "data.interactions=a", "data.catalog=b", override])
        assert str(caught.value) == message
    with pytest.raises(UserError) as caught:
        load_config(None, ["data.min_rating=3"])
    assert str(caught.value) == "data.min_rating: the synthetic log has no ratings"
