"""The proof: at 1, 2 and 4 gloo ranks, every loss of the family gives the one-process loss and,
after the engine's gradient averaging, the one-process gradient of every trainable parameter
(through the real LoRA encoder), with duplicates and history hits planted in the batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from model.loss import (Temperature, candidate_columns, candidate_scores, catalog_loss, contrastive_loss, distinct_items,
                        next_item_loss, next_item_positions, position_loss, pairwise_softmax_loss, symmetric_loss,
                        triplet_loss, uniformity_loss, user_contrastive_loss)
from model.user_tower import UserTower, sequence_inputs
from multiproc import run_ranks
from train.modeling.backbone import build_encoder
from train.config.io import load_config

GLOBAL_BATCH = 8
VOCAB = 64
# Planted false negatives: rows 0 and 2 share item 3, rows 1 and 5 share item 5 (they land on
# different ranks at 2 and 4 ranks); row 0's history holds 7 (row 3's item), row 6's holds 2 (row 7's).
ITEM_IDS = torch.tensor([3, 5, 3, 7, 9, 5, 11, 2])
HISTORY = torch.tensor([[7, 1, -1], [4, -1, -1], [8, 6, 1], [0, -1, -1], [1, 4, -1], [6, -1, -1], [2, 13, 1], [12, -1, -1]])
PLANTED = {(0, 2), (2, 0), (1, 5), (5, 1), (0, 3), (6, 7)}
# The catalog's embeddings: fixed, the same on every rank (in training, a recent no-grad pass).
CATALOG = torch.nn.functional.normalize(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
KINDS = ("infonce", "infonce_logq", "infonce_unmasked", "symmetric", "triplet_hardest", "triplet_random",
         "pairwise", "user_cl", "batch_catalog", "history_positions", "history_negatives", "uniformity",
         "item_sequences")
# Two negatives per row drawn from its history (repeated when it holds one item). Row 6's 2 is
# row 7's positive: a false negative for row 7, wherever the two rows live.
# The text of catalog items 0-15 (model.user_encoder=items encodes each distinct item once).
ITEM_TEXT = torch.randint(3, VOCAB, (16, 5), generator=torch.Generator().manual_seed(11))
ITEM_TEXT_MASK = (torch.arange(5).unsqueeze(0) >= torch.arange(16).remainder(3).unsqueeze(1)).long()
HISTORY_NEGATIVES = torch.tensor([[7, 1], [4, 4], [8, 6], [0, 0], [1, 4], [6, 6], [2, 13], [12, 12]])


def make_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)

    def tokens(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, width), generator=generator)
        lengths = torch.randint(width // 2, width + 1, (GLOBAL_BATCH,), generator=generator)
        mask = (torch.arange(width).unsqueeze(0) >= width - lengths.unsqueeze(1)).long()  # left padding
        return ids * mask, mask

    user_ids, user_mask = tokens(12)
    view_ids, view_mask = tokens(10)
    item_ids, item_mask = tokens(6)
    negative_tokens = [tokens(6) for _ in range(2)]
    return {"user_ids": user_ids, "user_mask": user_mask, "view_ids": view_ids, "view_mask": view_mask,
            "item_tok": item_ids, "item_mask": item_mask, "item_ids": ITEM_IDS, "history_ids": HISTORY,
            "logq": torch.linspace(-4.0, -1.0, GLOBAL_BATCH),
            # [rows, 2, ...]: slicing rows takes each row's own negatives
            "negative_tok": torch.stack([t[0] for t in negative_tokens], dim=1),
            "negative_mask": torch.stack([t[1] for t in negative_tokens], dim=1),
            "negative_ids": HISTORY_NEGATIVES, "negative_logq": torch.linspace(-5.0, -2.0, 2 * GLOBAL_BATCH).view(-1, 2)}


def make_encoder() -> torch.nn.Module:
    config = load_config(None, ["model.architecture={model_type: llama, hidden_size: 32, intermediate_size: 64, "
                                "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4}",
                                "model.projection_dim=16", "model.pooling=last", "model.lora.r=4"])
    encoder = build_encoder(config.model, VOCAB, 0, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return encoder


def make_tower() -> UserTower:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=1, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    return UserTower(LlamaModel(config), item_dim=16)  # 16 -> 8 -> 16: the tower's own projections too


def step(kind: str, rows: slice, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of `kind` on batch rows `rows` and the gradients it leaves (before any averaging)."""
    batch = {k: v[rows] for k, v in make_batch().items()}
    encoder = make_encoder()
    temperature = Temperature(0.1, learnable=True)
    query = encoder(batch["user_ids"], batch["user_mask"])
    item = encoder(batch["item_tok"], batch["item_mask"])
    common = {"history_ids": batch["history_ids"], "group": group}
    tau = temperature()
    if kind.startswith("infonce"):
        loss = contrastive_loss(query, item, batch["item_ids"], temperature=tau,
                                logq=batch["logq"] if kind == "infonce_logq" else None,
                                mask_false_negatives=kind != "infonce_unmasked", **common)
    elif kind == "symmetric":
        loss = symmetric_loss(query, item, batch["item_ids"], temperature=tau, **common)
    elif kind.startswith("triplet"):
        loss = triplet_loss(query, item, batch["item_ids"], margin=0.5, negative=kind.split("_")[1], seed=3, **common)
        loss = loss + 0.0 * tau  # the temperature takes no part; keep its gradient defined
    elif kind == "pairwise":
        loss = pairwise_softmax_loss(query, item, batch["item_ids"], temperature=tau, **common)
    elif kind == "batch_catalog":
        loss = (contrastive_loss(query, item, batch["item_ids"], temperature=tau, **common)
                + catalog_loss(query, batch["item_ids"], CATALOG, temperature=tau)) / 2
    elif kind == "history_positions":  # tokens 40-55 are items 0-15; ranks hold different numbers of them
        query, states = encoder(batch["user_ids"], batch["user_mask"], every_position=True)
        token_items = torch.full((VOCAB,), -1)
        token_items[40:56] = torch.arange(16)
        positions = next_item_positions(batch["user_ids"], batch["user_mask"], token_items, batch["item_ids"])
        loss = contrastive_loss(query, item, batch["item_ids"], temperature=tau, **common) \
            + position_loss(states, *positions, CATALOG, temperature=tau, group=group)
    elif kind == "uniformity":  # rows 0 and 2 share item 3: their pair is left out
        loss = contrastive_loss(query, item, batch["item_ids"], temperature=tau, **common) \
            + 0.5 * uniformity_loss(item, batch["item_ids"], group=group)
    elif kind == "item_sequences":  # each rank embeds the distinct items of its rows; items 3, 5, 7, 1, 4, 6... on several ranks
        encoder.user_tower = make_tower()
        distinct = sorted(set(batch["item_ids"].tolist()) | {i for i in batch["history_ids"].flatten().tolist() if i >= 0})
        local = encoder(ITEM_TEXT[distinct], ITEM_TEXT_MASK[distinct])
        candidates, candidate_ids, first = distinct_items(local, torch.tensor(distinct), group)
        sequence, mask, next_ids = sequence_inputs(batch["history_ids"], batch["item_ids"])
        _, states = encoder(None, mask, every_position=True,
                            item_sequence=candidates[candidate_columns(sequence, candidate_ids, first)])
        known = next_ids >= 0
        loss = next_item_loss(states[known], candidate_columns(next_ids[known], candidate_ids, first), candidates, first,
                              temperature=tau, group=group)
    elif kind == "history_negatives":  # each rank's item block: its positives, then its rows' negatives
        negatives = encoder(batch["negative_tok"].flatten(0, 1), batch["negative_mask"].flatten(0, 1))
        loss = contrastive_loss(query, torch.cat([item, negatives]),
                                torch.cat([batch["item_ids"], batch["negative_ids"].flatten()]), temperature=tau,
                                logq=torch.cat([batch["logq"], batch["negative_logq"].flatten()]), group=group)
    else:
        view = encoder(batch["view_ids"], batch["view_mask"])
        loss = contrastive_loss(query, item, batch["item_ids"], temperature=tau, **common) \
            + 0.5 * user_contrastive_loss(query, view, temperature=tau, group=group)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in encoder.named_parameters() if p.requires_grad}
    grads["temperature"] = temperature.log_value.grad.detach().clone()
    return loss.detach(), grads


def ranks_fn(rank: int, world_size: int) -> dict[str, object]:
    rows_per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    out: dict[str, object] = {}
    for kind in KINDS:
        loss, grads = step(kind, rows, None if world_size == 1 else dist.group.WORLD)
        dist.all_reduce(loss)
        for grad in grads.values():  # what DDP / DeepSpeed do: average gradients over ranks
            dist.all_reduce(grad)
            grad /= world_size
        out[kind] = (loss / world_size, grads)
    # The mask each rank applies, to compare with the one-process mask's rows.
    batch = make_batch()
    scores, positive_column, removed = candidate_scores(torch.randn(rows_per_rank, 4), torch.randn(rows_per_rank, 4),
                                                        batch["item_ids"][rows], history_ids=batch["history_ids"][rows])
    out["removed"] = removed
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    return {kind: step(kind, slice(0, GLOBAL_BATCH), None) for kind in KINDS}


def test_planted_false_negatives_are_exactly_the_mask() -> None:
    batch = make_batch()
    _, positive_column, removed = candidate_scores(torch.randn(8, 4), torch.randn(8, 4), batch["item_ids"],
                                                   history_ids=batch["history_ids"])
    assert {tuple(ij) for ij in removed.nonzero().tolist()} == PLANTED
    assert positive_column.tolist() == list(range(8))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_loss_matches_one_process(world_size: int, reference: dict) -> None:
    results = run_ranks(ranks_fn, world_size)
    for kind in KINDS:
        ref_loss, ref_grads = reference[kind]
        loss, grads = results[0][kind]
        assert torch.allclose(loss, ref_loss, atol=1e-5, rtol=0), (kind, loss, ref_loss)
        assert set(grads) == set(ref_grads)
        for name, ref in ref_grads.items():
            assert ref.abs().sum() > 0 or name == "temperature" and kind.startswith("triplet"), (kind, name)
            assert torch.allclose(grads[name], ref, atol=1e-5, rtol=1e-4), (kind, name, (grads[name] - ref).abs().max())
    full_mask = torch.cat([r["removed"] for r in results])
    assert {tuple(ij) for ij in full_mask.nonzero().tolist()} == PLANTED
