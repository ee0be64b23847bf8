"""Export, reload and serve: a small trained run exported, loaded back through peft, transformers
and sentence-transformers (each giving rectrain's own embeddings), `rectrain recommend`, and the
HTTP service under real requests on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from train.serve.export import read_items  # noqa: E402
from train.serve.index import ItemIndex  # noqa: E402

TINY = ["data.synthetic.num_users=120", "data.synthetic.num_items=40", "train.max_steps=6", "train.save_every=6",
        "train.batch_size=16", "train.log_every=3", "device=cpu", "data.num_workers=0"]
VARIANTS = {"text": [], "items": ["model.user_encoder=items"]}


def rectrain(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, export folder) of a 6-step run of the debug recipe."""
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    run = root / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    trained = rectrain("train", str(config), f"output_dir={run}", f"data.dir={root / 'data'}", *TINY,
                       *VARIANTS[request.param], cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = rectrain("export", str(run), cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported step-6" in done.stdout
    return run, run / "export"


def catalog_texts(export: Path) -> list[str]:
    from train.serve.recommender import Recommender

    recommender = Recommender(export)
    return recommender.collator.catalog.texts(range(recommender.catalog_size))


def test_sentence_transformers_gives_the_item_embeddings(exported: tuple[Path, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    _, export = exported
    _, vectors = read_items(export / "items.parquet")
    texts = catalog_texts(export)
    # Batches of 7 mix lengths, so right padding is exercised against rectrain's left padding.
    encoded = SentenceTransformer(str(export / "model"), device="cpu").encode(texts, batch_size=7)
    assert encoded.shape == vectors.shape
    np.testing.assert_allclose(encoded, vectors, atol=1e-5)


def test_transformers_and_peft_load_what_was_trained(exported: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from model.pooling import POOLERS, position_ids

    run, export = exported
    manifest = json.loads((export / "rectrain.json").read_text())
    config = json.loads(json.dumps(manifest))
    assert config["adapter"] and config["base"] == "base"
    _, vectors = read_items(export / "items.parquet")
    texts = catalog_texts(export)[:9]
    tokenizer = AutoTokenizer.from_pretrained(str(export / "model"))
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # the folder's tokenizer appends EOS
    mask = batch["attention_mask"]
    merged = AutoModel.from_pretrained(str(export / "model")).eval()
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(str(export / "base")), str(export / "adapter")).eval()
    with torch.no_grad():
        states = merged(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        via_peft = adapted(input_ids=batch["input_ids"], attention_mask=mask,
                           position_ids=position_ids(mask)).last_hidden_state
    assert torch.allclose(states, via_peft, atol=1e-5)
    # Pooling, projection and normalisation as rectrain.json and the heads say: the index's vectors.
    pooled = POOLERS[manifest["pooling"]](states, mask)
    heads = load_file(str(export / "model" / "rectrain_heads.safetensors"))
    embedded = torch.nn.functional.normalize(pooled @ heads["projection.weight"].T, dim=-1)
    assert torch.allclose(embedded, torch.from_numpy(vectors[:9]), atol=1e-5)
    assert (run / "checkpoints" / manifest["checkpoint"]).is_dir()


def test_recommend_gives_k_items_outside_the_history(exported: tuple[Path, Path]) -> None:
    run, export = exported
    table, _ = read_items(export / "items.parquet")
    ids = [str(i) for i in table.column("item_id").to_pylist()]
    history = ids[:3]
    done = rectrain("recommend", str(export), "--history", ",".join(history), "-k", "7", "--json", cwd=run)
    assert done.returncode == 0, done.stderr[-2000:]
    items = json.loads(done.stdout)["items"]
    assert len(items) == 7
    assert not {item["item_id"] for item in items} & set(history)
    assert all(item["item_id"] in ids for item in items)
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    for item in items:  # reasons are history items, most similar first
        reasons = item["because"]
        assert {r["item_id"] for r in reasons} <= set(history) and len(reasons) == 3
        assert [r["similarity"] for r in reasons] == sorted((r["similarity"] for r in reasons), reverse=True)
    table_out = rectrain("recommend", str(export), "--history", history[0], "--history-text", "a new gadget", cwd=run)
    assert table_out.returncode == 0 and "because" in table_out.stdout
    unknown = rectrain("recommend", str(export), "--history", f"{history[0]},nope", cwd=run)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1] == "rectrain: error: history: unknown item id(s) nope"


def test_export_refuses_to_overwrite_and_names_missing_checkpoints(exported: tuple[Path, Path]) -> None:
    run, export = exported
    again = rectrain("export", str(run), cwd=run)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    missing = rectrain("export", str(run), "--out", str(run / "other"), "--checkpoint", "step-99", cwd=run)
    assert missing.returncode == 2 and "step-99" in missing.stderr and "step-6" in missing.stderr
    assert not (run / "other").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(base: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture(scope="module")
def service(exported: tuple[Path, Path]) -> Any:
    run, export = exported
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "train.cli", "serve", str(export), "--port", str(port)],
                               cwd=run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if call(base, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
        assert process.poll() is None, process.communicate()[1][-3000:]
    else:
        process.kill()
        pytest.fail("the service did not come up in 120 s")
    yield base, export
    process.terminate()
    process.wait(timeout=30)


def test_service_answers_and_rejects_bad_requests_with_4xx(service: tuple[str, Path]) -> None:
    base, export = service
    table, _ = read_items(export / "items.parquet")
    ids = [str(i) for i in table.column("item_id").to_pylist()]
    status, health = call(base, "/health")
    assert status == 200 and health["items"] == len(ids)
    status, answer = call(base, "/recommend", {"history": ids[:2], "k": 5, "exclude": ids[2:4]})
    assert status == 200 and len(answer["items"]) == 5
    assert not {i["item_id"] for i in answer["items"]} & set(ids[:4])
    assert call(base, "/recommend", raw=b'{"history": [')[0] == 422  # malformed JSON
    assert call(base, "/recommend", {"history": ids[:2], "k": 0})[0] == 422
    assert call(base, "/recommend", {"history": ids[:2], "k": 100000})[0] == 422
    assert call(base, "/recommend", {"history": ids * 100})[0] == 422  # oversized history
    status, error = call(base, "/recommend", {"history": [ids[0], "no-such-item"]})
    assert status == 404 and "no-such-item" in error["detail"]
    assert call(base, "/recommend", {"history": []})[0] == 422
    assert call(base, "/recommend", {"history": "not a list"})[0] == 422
    status, embedded = call(base, "/embed", {"texts": ["a blue pen", "paper"]})
    assert status == 200 and np.asarray(embedded["embeddings"]).shape == (2, health["dim"])
    assert call(base, "/embed", {})[0] == 422
    assert call(base, "/openapi.json")[0] == 200


def test_a_new_item_is_searchable_at_once(service: tuple[str, Path]) -> None:
    base, export = service
    table, _ = read_items(export / "items.parquet")
    ids = [str(i) for i in table.column("item_id").to_pylist()]
    _, answer = call(base, "/recommend", {"history": ids[:3], "k": 1})
    best = answer["items"][0]["item_id"]
    fields = {k: v for k, v in table.to_pylist()[ids.index(best)].items()
              if k not in ("item_id", "item_index", "train_count")}
    # Its twin by text: the same embedding (no id vector in this run), so the same score.
    status, added = call(base, "/items", {"items": [{"item_id": "twin", **fields}]})
    assert status == 200 and added["added"] == ["twin"] and added["items"] == len(ids) + 1
    _, answer = call(base, "/recommend", {"history": ids[:3], "k": 2})
    assert {i["item_id"] for i in answer["items"]} == {best, "twin"}
    assert call(base, "/items", {"items": [{"item_id": "twin", **fields}]})[0] == 409
    assert call(base, "/items", {"items": [{"title": "no id"}]})[0] == 422


def test_service_takes_1000_requests_from_8_clients(service: tuple[str, Path]) -> None:
    base, export = service
    table, _ = read_items(export / "items.parquet")
    ids = [str(i) for i in table.column("item_id").to_pylist()]
    rng = np.random.default_rng(0)
    bodies = [{"history": list(rng.choice(ids[:len(table)], size=int(rng.integers(1, 8)), replace=False)), "k": 10}
              for _ in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda body: call(base, "/recommend", body), bodies))
    assert [status for status, _ in results] == [200] * 1000
    assert all(len(answer["items"]) == 10 for _, answer in results)


def test_index_past_its_exact_limit_is_hnsw_and_finds_the_same_items() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:50] + 0.1 * rng.normal(size=(50, 16)).astype(np.float32)
    exact, approximate = ItemIndex.build(vectors), ItemIndex.build(vectors, exact_limit=1000)
    assert (exact.kind, approximate.kind) == ("exact", "hnsw")
    truth = exact.search(queries, 10)
    found = approximate.search(queries, 10)
    recall = np.mean([len({r for r, _ in a} & {r for r, _ in t}) / 10 for a, t in zip(found, truth)])
    assert recall >= 0.95
    scores = (queries @ vectors.T)
    assert [r for r, _ in truth[0]] == list(np.argsort(-scores[0])[:10])
    left_out = exact.search(queries[:1], 5, exclude=[[r for r, _ in truth[0][:3]]])
    assert [r for r, _ in left_out[0]] == [r for r, _ in truth[0][3:8]]
    approximate.add(queries[:1])
    assert approximate.search(queries[:1], 1)[0][0][0] == 3000
