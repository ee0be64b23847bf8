"""`rectrain export RUN_DIR`: a trained run in the formats other stacks load, plus the catalog
embedded and indexed.

    EXPORT/
      rectrain.json       what this is: source run and checkpoint, embedding size, scores, layout
      config.yaml         the run's resolved config (prompt, pooling, normalisation, tower)
      model/              the merged backbone: AutoModel.from_pretrained(model/) and its tokenizer;
                          also a sentence-transformers folder (SentenceTransformer(model/)), and
                          rectrain_heads.safetensors (projection heads)
      adapter/            the LoRA adapter alone: PeftModel.from_pretrained(base, adapter/)
      base/               only for a random backbone: the weights the adapter was trained on
      user_tower/         model.user_encoder=items: the tower (safetensors) that reads item vectors
      items.parquet       every catalog item: item_id, item_index, its text fields, embedding
      items.faiss         the item index (train/serve/index.py)

Everything is written into a temporary folder beside EXPORT and renamed at the end: an export
cut short leaves no half-written folder behind.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from peft import PeftModel
from safetensors.torch import save_file

from model.encoder import RecEncoder
from train.config.io import load_config, save_config
from train.config.schema import Config
from train.distributed import from_environment
from train.errors import UserError
from train.evaluation.encode import encode_sharded, eval_mode
from train.modeling import checkpoint
from train.modeling.build import RunInputs, build_model, load_inputs
from train.serve.index import ItemIndex

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST, HEADS_FILE = "rectrain.json", "rectrain_heads.safetensors"


def pick_checkpoint(run_dir: Path, name: str | None) -> Path:
    """The checkpoint to export: `name` (step-N or a path), else the best validated one, else the newest."""
    root = run_dir / "checkpoints"
    if name:
        path = Path(name) if Path(name).is_dir() else root / name
        if not (path / checkpoint.STATE_FILE).is_file():
            found = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
            raise UserError(f"--checkpoint: {name} is not a complete checkpoint of {run_dir}"
                            f"{' (it has ' + ', '.join(found) + ')' if found else ''}")
        return path
    chosen = checkpoint.best_or_latest(run_dir)
    if chosen is None:
        raise UserError(f"{run_dir}: holds no checkpoint; run rectrain train first")
    return chosen


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(path, [f"output_dir={run_dir}"])


def export_run(run_dir: Path, out: Path, checkpoint_name: str | None = None, exact_limit: int = 200_000,
               overwrite: bool = False) -> dict[str, Any]:
    """Write the export of `run_dir`'s checkpoint into `out`; returns its manifest."""
    if out.exists() and not overwrite:
        raise UserError(f"--out: {out} exists (pass --overwrite to replace it)")
    config = load_run_config(run_dir)
    source = pick_checkpoint(run_dir, checkpoint_name)
    dist_state = from_environment("cpu")
    inputs = load_inputs(config, dist_state)
    model = build_model(config, inputs, dist_state.device)
    checkpoint.load_weights(source, model.encoder)
    encoder = model.encoder
    log.info("exporting %s", source)
    with eval_mode(encoder):
        # The catalog's vectors as evaluation computes them (id vectors included): the index.
        items = encode_sharded(encoder, inputs.collator, inputs.collator.item_tokens(range(len(inputs.catalog))),
                               config.eval.batch_size, dist_state.device, "encode catalog", True)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    base = _write_adapter(encoder, config, staging)
    _write_merged(encoder, inputs, config, staging / "model")
    if encoder.user_tower is not None:
        (staging / "user_tower").mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.user_tower.state_dict().items()},
                  str(staging / "user_tower" / "model.safetensors"))
    _write_items(inputs, items, staging / "items.parquet")
    index = ItemIndex.build(items.numpy(), exact_limit=exact_limit)
    index.save(staging / "items.faiss")
    save_config(config, staging / "config.yaml")
    manifest = {"format_version": FORMAT_VERSION, "run_dir": str(run_dir.resolve()), "checkpoint": source.name,
                "items": len(inputs.catalog), "dim": int(items.shape[1]), "normalize": config.model.normalize,
                "user_encoder": config.model.user_encoder, "pooling": config.model.pooling,
                "index": index.kind, "adapter": base is not None, "base": base,
                "sentence_transformers": (staging / "model" / "modules.json").is_file()}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def _write_adapter(encoder: RecEncoder, config: Config, out: Path) -> str | None:
    """The LoRA adapter as a PEFT folder, pointing at its base: the backbone's name, or for a
    random backbone the base weights saved beside it. None: the run trained no adapter
    (model.trained_layers=0)."""
    backbone = encoder.backbone
    if not isinstance(backbone, PeftModel):
        return None
    if config.model.name_or_path:
        base = config.model.name_or_path
    else:
        # unload() strips the LoRA layers without merging them (on a copy: the encoder keeps its own).
        copy.deepcopy(backbone).unload().save_pretrained(str(out / "base"))
        base = "base"
    backbone.save_pretrained(str(out / "adapter"))
    adapter_config = out / "adapter" / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    # A relative base resolves from where the user stands, not from this folder: say where it is.
    settings["base_model_name_or_path"] = base
    adapter_config.write_text(json.dumps(settings, indent=2) + "\n")
    return base


def merged_backbone(encoder: RecEncoder) -> torch.nn.Module:
    """The backbone with its LoRA folded into the weights (a copy: the encoder keeps its adapter)."""
    backbone = encoder.backbone
    if isinstance(backbone, PeftModel):
        return copy.deepcopy(backbone).merge_and_unload()
    return backbone


def _write_merged(encoder: RecEncoder, inputs: RunInputs, config: Config, out: Path) -> None:
    """The merged transformers model, its tokenizer, the heads, and a sentence-transformers folder
    over the same files (when sentence-transformers is installed)."""
    getattr(merged_backbone(encoder), "save_pretrained")(str(out))
    inputs.tokenizer.save_pretrained(str(out))
    heads = {f"{name}.weight": module.weight.detach().cpu().float().contiguous()
             for name, module in (("projection", encoder.projection), ("user_projection", encoder.user_projection))
             if module is not None}
    if heads:
        save_file(heads, str(out / HEADS_FILE))
    try:
        from train.serve.sentence import write_sentence_transformers
    except ImportError:
        log.info("sentence-transformers is not installed: no sentence-transformers files "
                 "(pip install sentence-transformers, then export again)")
        return
    write_sentence_transformers(out, encoder, config)


def _write_items(inputs: RunInputs, items: torch.Tensor, path: Path) -> None:
    table = inputs.catalog.table
    vectors = items.float().numpy()
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])
    pq.write_table(table.append_column("embedding", embedding), path)


def read_items(path: Path) -> tuple[pa.Table, np.ndarray]:
    """items.parquet: (the table without its embeddings, the embeddings [N, D] float32)."""
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(table), -1).astype(np.float32)
    return table.drop_columns(["embedding"]), vectors
