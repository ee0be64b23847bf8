"""The configured objective dispatches to the right loss; the CL4SRec augmentations do what they say."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from model.augment import MASKED, augment, crop, mask, reorder
from model.loss import (Temperature, candidate_scores, catalog_loss, contrastive_loss, next_item_positions,
                        pairwise_softmax_loss, position_loss, symmetric_loss, triplet_loss, uniformity_loss,
                        user_contrastive_loss)
from model.objective import Objective


def embeddings(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)


ITEM_IDS = torch.tensor([1, 2, 1, 4, 5, 6])
HISTORY = torch.tensor([[4, -1], [3, 9], [-1, -1], [7, 8], [1, -1], [0, -1]])


@pytest.mark.parametrize("kind", ["infonce", "symmetric", "triplet", "pairwise"])
def test_objective_computes_the_named_loss(kind: str) -> None:
    query, item = embeddings(6, 0), embeddings(6, 1)
    objective = Objective(kind, temperature=0.1, triplet_margin=0.3)
    got = objective(query, item, ITEM_IDS, history_ids=HISTORY, logq=torch.zeros(6))
    direct = {
        "infonce": lambda: contrastive_loss(query, item, ITEM_IDS, temperature=0.1, history_ids=HISTORY),
        "symmetric": lambda: symmetric_loss(query, item, ITEM_IDS, temperature=0.1, history_ids=HISTORY),
        "triplet": lambda: triplet_loss(query, item, ITEM_IDS, margin=0.3, history_ids=HISTORY),
        "pairwise": lambda: pairwise_softmax_loss(query, item, ITEM_IDS, temperature=0.1, history_ids=HISTORY),
    }[kind]()
    assert torch.allclose(got, direct)


def test_user_term_is_added_with_its_weight() -> None:
    query, item, view_a, view_b = (embeddings(6, s) for s in range(4))
    objective = Objective("infonce", temperature=0.1, user_cl_weight=0.25)
    got = objective(query, item, ITEM_IDS, views=(view_a, view_b))
    expected = contrastive_loss(query, item, ITEM_IDS, temperature=0.1) \
        + 0.25 * user_contrastive_loss(view_a, view_b, temperature=0.1)
    assert torch.allclose(got, expected)


def test_infonce_matches_a_naive_loop() -> None:
    query, item = embeddings(6, 5), embeddings(6, 6)
    logq = torch.linspace(-3, -1, 6)
    got = contrastive_loss(query, item, ITEM_IDS, temperature=0.2, history_ids=HISTORY, logq=logq)
    total = 0.0
    for i in range(6):
        kept = [j for j in range(6) if j == i or (ITEM_IDS[j] != ITEM_IDS[i] and ITEM_IDS[j] not in HISTORY[i])]
        logits = torch.stack([query[i] @ item[j] / 0.2 - logq[j] for j in kept])
        total += float(-torch.log_softmax(logits, 0)[kept.index(i)])
    assert float(got) == pytest.approx(total / 6, rel=1e-5)



@pytest.mark.parametrize("block_elements", [6, 12, 30])  # blocks of one row, two rows, five (the last short)
def test_infonce_in_row_blocks_gives_the_whole_matrix_gradients(monkeypatch: pytest.MonkeyPatch,
                                                                block_elements: int) -> None:
    import model.loss

    monkeypatch.setattr(model.loss, "BLOCK_ELEMENTS", block_elements)

    def leaves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return embeddings(6, 7).requires_grad_(), embeddings(6, 8).requires_grad_(), torch.tensor(0.3, requires_grad=True)

    logq = torch.linspace(-3, -1, 6)
    query, item, tau = leaves()
    got = contrastive_loss(query, item, ITEM_IDS, temperature=tau, history_ids=HISTORY, logq=logq)
    got.backward()
    ref_query, ref_item, ref_tau = leaves()
    scores, positive, removed = candidate_scores(ref_query, ref_item, ITEM_IDS, history_ids=HISTORY)
    logits = (scores / ref_tau - logq).masked_fill(removed, torch.finfo(scores.dtype).min)
    expected = F.cross_entropy(logits, positive)
    expected.backward()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    for mine, ref in ((query, ref_query), (item, ref_item), (tau, ref_tau)):
        assert mine.grad is not None and torch.allclose(mine.grad, ref.grad, atol=1e-6), (mine.grad, ref.grad)


def test_uniformity_matches_a_naive_loop_and_skips_same_id_pairs() -> None:
    item = embeddings(6, 9)
    terms = [math.exp(-2 * float((item[i] - item[j]).pow(2).sum()))
             for i in range(6) for j in range(i + 1, 6) if ITEM_IDS[i] != ITEM_IDS[j]]
    assert len(terms) == 14  # 15 pairs less rows 0 and 2 (both item 1)
    assert float(uniformity_loss(item, ITEM_IDS)) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-5)
    # Spread items score lower than crowded ones.
    crowded = F.normalize(item * 0.1 + torch.ones(8), dim=-1)
    assert float(uniformity_loss(crowded, ITEM_IDS)) > float(uniformity_loss(item, ITEM_IDS))
    objective = Objective("infonce", temperature=0.1, uniformity=0.5)
    query = embeddings(6, 10)
    assert torch.allclose(objective(query, item, ITEM_IDS),
                          contrastive_loss(query, item, ITEM_IDS, temperature=0.1) + 0.5 * uniformity_loss(item, ITEM_IDS))


def test_catalog_softmax_matches_a_naive_loop_and_masks_nothing() -> None:
    query, catalog = embeddings(6, 7), embeddings(10, 8)
    got = catalog_loss(query, ITEM_IDS, catalog, temperature=0.2)
    # Every item is a candidate, the ones in the history included.
    expected = sum(float(-torch.log_softmax(catalog @ query[i] / 0.2, 0)[ITEM_IDS[i]]) for i in range(6)) / 6
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_held_out_items_are_no_catalog_candidate() -> None:
    """data.cold_items: the catalog softmax (and the history positions' one) over the other
    items only, as if the held-out rows were not in the catalog at all."""
    query, catalog = embeddings(6, 7), embeddings(10, 8)
    held_out = torch.zeros(10, dtype=torch.bool)
    held_out[[0, 3, 8]] = True
    kept = (~held_out).nonzero().squeeze(1)
    renumbered = torch.searchsorted(kept, ITEM_IDS)  # the targets' rows among the kept items
    expected = catalog_loss(query, renumbered, catalog[kept], temperature=0.2)
    assert torch.allclose(catalog_loss(query, ITEM_IDS, catalog, temperature=0.2, held_out=held_out), expected)
    assert not torch.allclose(catalog_loss(query, ITEM_IDS, catalog, temperature=0.2), expected)
    states, rows, columns = query.view(2, 3, 8), torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1])
    objective = Objective("infonce", temperature=0.2, negatives="catalog", history_positions=1.0)
    got = objective(query, query, ITEM_IDS, catalog=catalog, positions=(states, rows, columns, ITEM_IDS[:3]),
                    held_out=held_out)
    positions = position_loss(states, rows, columns, renumbered[:3], catalog[kept], temperature=0.2)
    assert torch.allclose(got, expected + positions)


def test_catalog_negatives_in_the_objective() -> None:
    query, item, catalog = embeddings(6, 0), embeddings(6, 1), embeddings(10, 2)
    batch = contrastive_loss(query, item, ITEM_IDS, temperature=0.1, history_ids=HISTORY)
    whole = catalog_loss(query, ITEM_IDS, catalog, temperature=0.1)
    for negatives, expected in (("catalog", whole), ("batch+catalog", (batch + whole) / 2)):
        objective = Objective("infonce", temperature=0.1, negatives=negatives)
        assert torch.allclose(objective(query, item, ITEM_IDS, history_ids=HISTORY, catalog=catalog), expected)
        with pytest.raises(ValueError, match="catalog"):
            objective(query, item, ITEM_IDS, history_ids=HISTORY)
    # The catalog is a constant: only the user side gets a gradient from it.
    query.requires_grad_(True)
    catalog.requires_grad_(False)
    catalog_loss(query, ITEM_IDS, catalog, temperature=0.1).backward()
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_mask_history_false_keeps_history_items_as_negatives() -> None:
    query, item = embeddings(6, 0), embeddings(6, 1)
    got = Objective("infonce", temperature=0.1, mask_history=False)(query, item, ITEM_IDS, history_ids=HISTORY)
    assert torch.allclose(got, contrastive_loss(query, item, ITEM_IDS, temperature=0.1))  # duplicates still masked
    assert not torch.allclose(got, contrastive_loss(query, item, ITEM_IDS, temperature=0.1, history_ids=HISTORY))


def test_next_item_positions_follow_each_history() -> None:
    token_items = torch.full((10,), -1)
    token_items[5:9] = torch.arange(4)  # tokens 5-8 are items 0-3
    ids = torch.tensor([[0, 0, 1, 5, 2, 7, 3], [1, 6, 2, 5, 2, 8, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # row 0 left-padded with token 0
    rows, columns, following = next_item_positions(ids, mask, token_items, torch.tensor([1, 0]))
    # row 0: item 0 (col 3) -> item 2, item 2 (col 5) -> its target 1; row 1: 1 -> 0 -> 3 -> target 0
    assert rows.tolist() == [0, 0, 1, 1, 1] and columns.tolist() == [3, 5, 1, 3, 5]
    assert following.tolist() == [2, 1, 0, 3, 0]


def test_position_loss_is_the_mean_over_positions() -> None:
    states = embeddings(12, 3).view(2, 6, 8)
    catalog = embeddings(10, 4)
    rows, columns, following = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 2]), torch.tensor([3, 9, 0])
    got = position_loss(states, rows, columns, following, catalog, temperature=0.1)
    expected = sum(float(-torch.log_softmax(catalog @ states[r, c] / 0.1, 0)[t])
                   for r, c, t in zip(rows.tolist(), columns.tolist(), following.tolist())) / 3
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_learned_temperature_is_clamped_and_trainable() -> None:
    temperature = Temperature(0.05, learnable=True, minimum=0.02, maximum=0.5)
    assert temperature.log_value.requires_grad and float(temperature()) == pytest.approx(0.05)
    with torch.no_grad():
        temperature.log_value.fill_(10.0)
    assert float(temperature()) == pytest.approx(0.5)
    assert not Temperature(0.05).log_value.requires_grad


def test_augmentations() -> None:
    history = list(range(10))
    rng = random.Random(0)
    cropped = crop(history, 0.6, rng)
    assert len(cropped) == 6 and cropped == list(range(cropped[0], cropped[0] + 6))
    masked = mask(history, 0.3, rng)
    assert masked.count(MASKED) == 3 and [h for h in masked if h != MASKED] == [h for h in history if h in masked]
    reordered = reorder(history, 0.5, rng)
    assert sorted(reordered) == history and reordered != history
    assert augment([7], rng, 0.6, 0.3, 0.3) == [7]
    assert augment(history, random.Random(1), 0.6, 0.3, 0.3) == augment(history, random.Random(1), 0.6, 0.3, 0.3)
