"""What a training or an evaluation starts from: the prepared data (prepared first where it is
missing or stale), the catalog, the tokenizer and the collator (`RunInputs`), then the model:
the encoder and the objective the config describes, as one `RecModel`."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from model.objective import Objective
from model.rec_model import RecModel
from train.config.schema import Config, LossConfig
from train.data.catalog import Catalog, item_token
from train.data.collate import PromptCollator
from train.data.layout import Layout, read_manifest
from train.data.prepare.run import ensure_prepared
from train.distributed import DistState, barrier
from train.modeling.backbone import build_encoder
from train.modeling.tokenizer import load_or_build


@dataclass
class RunInputs:
    """The prepared directory's manifest and catalog, the run's tokenizer and the collator."""

    manifest: dict[str, Any]
    catalog: Catalog
    tokenizer: PreTrainedTokenizerBase
    collator: PromptCollator
    item_token_ids: list[int]  # model.item_tokens: the token of each catalog item, by index
    token_items: torch.Tensor  # token id -> catalog index (-1 for every other token), for history positions


def load_inputs(config: Config, dist_state: DistState) -> RunInputs:
    """Prepare data if needed (the main process; the others wait), then catalog, tokenizer and
    collator. A random backbone's tokenizer is trained on the catalog once, by the main process,
    and saved in the run directory, so resume and eval tokenise identically."""
    run_dir, layout = Path(config.output_dir), Layout(Path(config.data.dir))
    if dist_state.is_main:
        ensure_prepared(config)
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    manifest = read_manifest(layout.root)
    assert manifest is not None, "prepare wrote no manifest"
    catalog = Catalog(layout.catalog, config.prompt.item_template, config.prompt.history_item_template,
                      config.model.item_tokens)
    item_tokens = [item_token(i) for i in range(len(catalog))] if config.model.item_tokens else []
    corpus = None
    if not config.model.name_or_path and dist_state.is_main:
        corpus = catalog.texts(range(len(catalog))) + [config.prompt.instruction, config.prompt.user_template]
        load_or_build(config.model, run_dir / "tokenizer", corpus, item_tokens)
    barrier()
    tokenizer = load_or_build(config.model, run_dir / "tokenizer", corpus, item_tokens)
    item_token_ids = [typing.cast(int, tokenizer.convert_tokens_to_ids(t)) for t in item_tokens]
    token_items = torch.full((len(tokenizer),), -1, dtype=torch.long)
    if item_token_ids:
        token_items[torch.tensor(item_token_ids)] = torch.arange(len(item_token_ids))
    views = config.loss.augment if config.loss.user_cl_weight > 0 else None
    collator = PromptCollator(catalog, tokenizer, config.prompt, config.model.padding_side, views=views,
                              seed=config.seed, history_negatives=config.loss.history_negatives,
                              item_sequences=config.model.user_encoder == "items")
    return RunInputs(manifest, catalog, tokenizer, collator, item_token_ids, token_items.to(dist_state.device))


def build_objective(loss: LossConfig) -> Objective:
    """The objective `loss` describes (its catalog refresh and history negatives live in the step
    and the collator, its augmentations in the collator)."""
    return Objective(kind=loss.kind, temperature=loss.temperature, learn_temperature=loss.learn_temperature,
                     temperature_range=(loss.temperature_min, loss.temperature_max),
                     mask_false_negatives=loss.mask_false_negatives, logq=loss.logq,
                     triplet_margin=loss.triplet_margin, triplet_negative=loss.triplet_negative,
                     user_cl_weight=loss.user_cl_weight, negatives=loss.negatives,
                     history_positions=loss.history_positions, mask_history=loss.mask_history,
                     uniformity=loss.uniformity)


def build_model(config: Config, inputs: RunInputs, device: torch.device) -> RecModel:
    """Encoder (the same initial weights on every process, from config.seed) and objective."""
    encoder = build_encoder(config.model, len(inputs.tokenizer), inputs.tokenizer.pad_token_id, config.seed,
                            inputs.item_token_ids, len(inputs.catalog))
    return RecModel(encoder, build_objective(config.loss)).to(device)
