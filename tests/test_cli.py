"""End to end through the real console entry point: train, eval, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY = """\
output_dir: {run}
seed: 3
resume: auto
data:
  dir: {data}
  format: synthetic
  max_history: 5
  num_workers: {workers}
  shuffle_buffer: 100
  synthetic: {{num_users: 120, num_items: 40, num_categories: 4, num_brands: 4, min_length: 4, max_length: 8}}
prompt: {{max_user_tokens: 64, max_item_tokens: 12}}
model:
  architecture: {{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
                 num_attention_heads: 2, num_key_value_heads: 2}}
  tokenizer_vocab_size: 300
  projection_dim: 16
train: {{max_steps: 8, batch_size: 8, log_every: 1, save_every: 4, warmup_steps: 2}}
"""


def rectrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_config(tmp_path: Path, name: str, workers: int = 0) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(TINY.format(run=tmp_path / name, data=tmp_path / "data", workers=workers))
    return config


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


# model.user_encoder=items: the re-evaluation must find the same user tower in the checkpoint.
@pytest.mark.parametrize("extra", [[], ["model.user_encoder=items"]], ids=["text", "items"])
def test_train_then_eval_leaves_the_run_directory(tmp_path: Path, extra: list[str]) -> None:
    config = write_config(tmp_path, "run", workers=1)
    done = rectrain("train", str(config), *extra, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert "popularity" in done.stdout and "recall@10" in done.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["users"] == 120
    for key in ("recall@10", "ndcg@10", "mrr@10"):
        assert 0.0 <= metrics[key] <= 1.0 and 0.0 <= metrics["popularity"][key] <= 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all({"loss", "lr", "samples_per_s", "tokens_per_s", "temperature", "padded_tokens_per_s",
                "data_wait_share"} <= set(r) for r in rows)
    assert all(r["padded_tokens_per_s"] >= r["tokens_per_s"] > 0 and 0 <= r["data_wait_share"] < 1 for r in rows)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-8"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-4", "step-8"]
    assert (run / "checkpoints" / "step-8" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "step-8" / "user_tower.safetensors").is_file() == bool(extra)
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["counts"]["users"] == 120

    (run / "metrics.json").unlink()
    again = rectrain("eval", str(config), *extra, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    reevaluated = json.loads((run / "metrics.json").read_text())
    for key in ("recall@10", "ndcg@10", "mrr@10"):
        assert reevaluated[key] == pytest.approx(metrics[key], abs=1e-9)


# With catalog negatives the checkpoint must carry the catalog embeddings in use: the stop at
# step 5 falls between refreshes (before steps 1, 4, 7), so re-encoding on resume would differ.
# With the user tower, its dropout draws must resume where they stopped.
@pytest.mark.parametrize("extra", [[], ["loss.negatives=batch+catalog", "loss.catalog_refresh_every=3"],
                                   ["model.user_encoder=items"]], ids=["batch", "batch+catalog", "items"])
def test_resume_replays_the_uninterrupted_losses(tmp_path: Path, extra: list[str]) -> None:
    whole = write_config(tmp_path, "whole", workers=2)
    assert rectrain("train", str(whole), *extra, cwd=tmp_path).returncode == 0
    part = write_config(tmp_path, "part", workers=2)
    first = rectrain("train", str(part), "train.max_steps=8", "train.save_every=5", *extra, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # Pretend the run stopped after step 5: keep that checkpoint and the rows before it.
    run = tmp_path / "part"
    (run / "checkpoints" / "latest").write_text("step-5\n")
    rows = (run / "metrics.jsonl").read_text().splitlines()[:5]
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    resumed = rectrain("train", str(part), *extra, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, got = losses(tmp_path / "whole"), losses(run)
    assert sorted(got) == list(range(1, 9))
    for step in range(6, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.parametrize("override, key", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("train.batch_size=one", "train.batch_size"),
    ("loss.kind=hinge", "loss.kind"),
])
def test_bad_override_is_one_line_exit_2(tmp_path: Path, override: str, key: str) -> None:
    config = write_config(tmp_path, "bad")
    done = rectrain("train", str(config), override, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rectrain: error: {key}")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("chosen, metric", [([], "ndcg@5"),  # ndcg@<first k> by default
                                            (["eval.best_metric=with_history/mrr@10"], "with_history/mrr@10")])
def test_validation_keeps_and_evaluates_the_best_checkpoint(tmp_path: Path, chosen: list[str], metric: str) -> None:
    config = write_config(tmp_path, "best")
    done = rectrain("train", str(config), "train.eval_every=3", "train.keep_last=1", "eval.k=[5, 10]", *chosen,
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "best"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = {r["step"]: r[f"valid/{metric}"] for r in rows if f"valid/{metric}" in r}
    assert sorted(valid) == [3, 6, 8]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    best_step = max(valid, key=lambda s: (valid[s], -s))  # the first of equal values is kept
    assert best == {"checkpoint": f"step-{best_step}", "metric": metric, "value": valid[best_step]}
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == sorted({f"step-{best_step}", "step-8"})  # keep_last=1 never deletes the best
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == f"step-{best_step}"
    for block in (metrics, metrics["popularity"], metrics["with_history"], metrics["with_history"]["popularity"]):
        assert {"recall@5", "ndcg@5", "mrr@5", "hr@5", "recall@10", "ndcg@10", "mrr@10", "hr@10"} <= set(block)
    # keeping the history in the ranking can only push targets down
    assert metrics["with_history"]["popularity"]["recall@10"] <= metrics["popularity"]["recall@10"]


def test_transition_prior_is_fused_and_reported_beside_its_parts(tmp_path: Path) -> None:
    config = write_config(tmp_path, "fused")
    # Every setting named, so the reference below does not lean on the defaults.
    prior = ["eval.transitions.weight=1.0", "eval.transitions.window=2", "eval.transitions.recent=3",
             "eval.transitions.decay=0.7", "eval.transitions.popularity_power=0.3",
             "eval.transitions.max_successors=200"]
    done = rectrain("train", str(config), "train.eval_every=4", *prior, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoder alone" in done.stdout and "transitions alone, history kept" in done.stdout
    run = tmp_path / "fused"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validated = [row for row in rows if "valid/ndcg@10" in row]
    assert [row["step"] for row in validated] == [4, 8]
    assert all({"valid/encoder/ndcg@10", "valid/transitions/with_history/ndcg@10"} <= set(row) for row in validated)
    fused = json.loads((run / "metrics.json").read_text())
    assert fused["checkpoint"] == json.loads((run / "checkpoints" / "best.json").read_text())["checkpoint"]

    # The encoder part is what the same checkpoint ranks without the prior.
    plain = rectrain("eval", str(config), f"resume={run / 'checkpoints' / fused['checkpoint']}",
                     "eval.transitions.weight=0", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    alone = json.loads((run / "metrics.json").read_text())
    assert "encoder" not in alone and "transitions" not in alone
    for key in ("recall@10", "ndcg@10", "mrr@10"):
        assert fused["encoder"][key] == pytest.approx(alone[key], abs=1e-9)
        assert fused["encoder"]["with_history"][key] == pytest.approx(alone["with_history"][key], abs=1e-9)

    # The transitions part is the prior counted from the training sequences (the validation
    # split's histories: the test targets never count), ranked on its own.
    import pyarrow.parquet as pq
    import torch

    from train.evaluation.ranking import metric_sums, target_ranks
    from train.evaluation.transitions import count_transitions, user_prior
    valid, test = (pq.read_table(tmp_path / "data" / "splits" / f"{s}.parquet").to_pydict() for s in ("valid", "test"))
    counts = torch.from_numpy(pq.read_table(tmp_path / "data" / "catalog.parquet").column("train_count").to_numpy().copy())
    transitions = count_transitions(valid["history"], len(counts), window=2, max_successors=200)
    rows_, items, values = user_prior(transitions, test["history"], counts, 1.0, 3, 0.7, 0.3)
    dense = torch.zeros(len(test["target"]), len(counts))
    dense[rows_, items] = values
    ranks = target_ranks(dense, torch.tensor(test["target"]))
    for key, total in metric_sums(ranks, [10]).items():
        assert fused["transitions"]["with_history"][key] == pytest.approx(total / len(ranks), abs=1e-9)
