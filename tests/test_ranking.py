"""Full-catalog ranking metrics (train/evaluation/ranking.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from train.evaluation.ranking import metric_sums, rank_in_chunks, target_ranks

# 3 users x 6 items. Hand-worked ranks (0-based, ties broken by lower item index):
#   user 0, target 3 (0.9): item 1 ties at 0.9 with a lower index -> rank 1.
#          history [1, 4] removes item 1 -> rank 0.
#   user 1, target 4 (0.1): items 0..3 are higher -> rank 4.
#          history [0, 2] removes two of them -> rank 2.
#   user 2, target 2 (0.7): item 5 (0.8) higher, item 0 ties with a lower index, item 3 ties
#          with a higher index (not ahead) -> rank 2.
#          history [2, 5]: item 5 goes; item 2 is the target itself and stays -> rank 1.
SCORES = torch.tensor([
    [0.1, 0.9, 0.3, 0.9, 0.5, 0.2],
    [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
    [0.7, 0.1, 0.7, 0.7, 0.6, 0.8],
])
TARGETS = torch.tensor([3, 4, 2])
HISTORY = [[1, 4], [0, 2], [2, 5]]
RANKS_ALL = [1, 4, 2]
RANKS_EXCLUDED = [0, 2, 1]


def test_ranks_without_exclusion() -> None:
    assert target_ranks(SCORES, TARGETS).tolist() == RANKS_ALL


def test_ranks_with_history_excluded() -> None:
    assert target_ranks(SCORES, TARGETS, HISTORY).tolist() == RANKS_EXCLUDED


def test_target_in_history_is_not_excluded() -> None:
    # Only user 2's own target is in its history: removing it would sink it below every item.
    ranks = target_ranks(SCORES[2:], TARGETS[2:], [[2]])
    assert ranks.tolist() == [2]
    # And removing only the target from a user's ranking changes nothing.
    assert target_ranks(SCORES, TARGETS, [[3], [4], [2]]).tolist() == RANKS_ALL


def test_empty_histories_are_no_exclusion() -> None:
    assert target_ranks(SCORES, TARGETS, [[], [], []]).tolist() == RANKS_ALL


def test_ties_break_by_lower_item_index() -> None:
    constant = torch.zeros(1, 6)
    for item in range(6):
        assert target_ranks(constant, torch.tensor([item])).tolist() == [item]
    # With excluded items ahead of it, a tied target moves up by exactly their count.
    assert target_ranks(constant, torch.tensor([4]), [[0, 3, 5]]).tolist() == [2]


def test_ranks_do_not_modify_scores() -> None:
    scores = SCORES.clone()
    target_ranks(scores, TARGETS, HISTORY)
    assert torch.equal(scores, SCORES)


def test_metric_sums_by_hand() -> None:
    sums = metric_sums(torch.tensor(RANKS_ALL), [1, 2, 3, 5])
    # ranks 1, 4, 2
    assert sums["recall@1"] == 0.0
    assert sums["ndcg@1"] == 0.0
    assert sums["mrr@1"] == 0.0
    assert sums["recall@2"] == 1.0
    assert sums["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert sums["mrr@2"] == pytest.approx(1 / 2)
    assert sums["recall@3"] == 2.0
    assert sums["ndcg@3"] == pytest.approx(1 / math.log2(3) + 1 / math.log2(4))
    assert sums["mrr@3"] == pytest.approx(1 / 2 + 1 / 3)
    assert sums["recall@5"] == 3.0
    assert sums["ndcg@5"] == pytest.approx(1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(4))
    assert sums["mrr@5"] == pytest.approx(1 / 2 + 1 / 5 + 1 / 3)
    assert set(sums) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr", "hr") for k in (1, 2, 3, 5)}
    assert all(sums[f"hr@{k}"] == sums[f"recall@{k}"] for k in (1, 2, 3, 5))  # one target per user


def test_metric_single_ranks() -> None:
    assert metric_sums(torch.tensor([0]), [10]) == {"recall@10": 1.0, "hr@10": 1.0, "ndcg@10": 1.0, "mrr@10": 1.0}
    two = metric_sums(torch.tensor([2]), [10])
    assert two["ndcg@10"] == pytest.approx(0.5)  # 1 / log2(4)
    assert two["mrr@10"] == pytest.approx(1 / 3)
    # rank == k is outside the top k
    assert metric_sums(torch.tensor([10]), [10]) == {"recall@10": 0.0, "hr@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}


def test_rank_in_chunks_means() -> None:
    items = torch.eye(6)  # user_embeddings @ items.T == SCORES
    metrics = rank_in_chunks(SCORES, items, TARGETS, HISTORY, [1, 3])
    # excluded ranks 0, 2, 1
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["ndcg@1"] == pytest.approx(1 / 3)
    assert metrics["mrr@1"] == pytest.approx(1 / 3)
    assert metrics["recall@3"] == pytest.approx(1.0)
    assert metrics["ndcg@3"] == pytest.approx((1 + 0.5 + 1 / math.log2(3)) / 3)
    assert metrics["mrr@3"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    unexcluded = rank_in_chunks(SCORES, items, TARGETS, None, [3])
    assert unexcluded["recall@3"] == pytest.approx(2 / 3)
    assert unexcluded["mrr@3"] == pytest.approx((1 / 2 + 1 / 3) / 3)


@pytest.mark.parametrize("exclude", [None, HISTORY])
@pytest.mark.parametrize("chunk, item_chunk", [(1, 1), (2, 4), (1, 5), (3, 2)])
def test_chunked_equals_unchunked(chunk: int, item_chunk: int, exclude: list[list[int]] | None) -> None:
    generator = torch.Generator().manual_seed(0)
    users = torch.randn(3, 4, generator=generator)
    items = torch.randn(6, 4, generator=generator)
    whole = rank_in_chunks(users, items, TARGETS, exclude, [1, 2, 5])
    chunked = rank_in_chunks(users, items, TARGETS, exclude, [1, 2, 5], user_chunk=chunk, item_chunk=item_chunk)
    assert chunked.keys() == whole.keys()
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], abs=1e-12)
    # and both equal the metrics of the directly computed ranks
    ranks = target_ranks(users @ items.T, TARGETS, exclude)
    direct = {k: v / 3 for k, v in metric_sums(ranks, [1, 2, 5]).items()}
    for key in whole:
        assert whole[key] == pytest.approx(direct[key], abs=1e-12)


@pytest.mark.parametrize("chunk, item_chunk", [(1, 1), (2, 3), (5, 4), (16, 16)])
def test_ties_across_blocks_break_by_item_index(chunk: int, item_chunk: int) -> None:
    # Scores from {0, 1, 2}: most items tie with the target, in its block and in the blocks before
    # and after it; a tie ahead of the target's index beats it, one after it does not.
    generator = torch.Generator().manual_seed(1)
    users = torch.randint(0, 3, (9, 1), generator=generator).double()
    items = torch.randint(0, 3, (13, 1), generator=generator).double()
    targets = torch.randint(0, 13, (9,), generator=generator)
    exclude = [torch.randint(0, 13, (u % 5,), generator=generator).tolist() for u in range(9)]
    for histories in (exclude, None):
        got = rank_in_chunks(users, items, targets, histories, [1, 3, 8], user_chunk=chunk, item_chunk=item_chunk)
        expected = metric_sums(target_ranks(users @ items.T, targets, histories), [1, 3, 8])
        for key, total in expected.items():
            assert got[key] == pytest.approx(total / 9, abs=1e-12), (key, histories is None)


def test_popularity_ranking_orders_by_counts() -> None:
    # Popularity as evaluate.popularity scores it: a one-dimensional "user" of ones against
    # item "embeddings" equal to their training counts.
    counts = torch.tensor([5.0, 9.0, 1.0, 9.0, 0.0, 3.0], dtype=torch.float64)
    all_items = torch.arange(6)
    ranks = target_ranks(torch.ones(6, 1, dtype=torch.float64) @ counts[:, None].T, all_items)
    # order: item 1 (9), item 3 (9, tie, higher index), item 0 (5), item 5 (3), item 2 (1), item 4 (0)
    assert ranks.tolist() == [2, 0, 4, 1, 5, 3]

    targets = torch.tensor([3, 4, 0])
    ones = torch.ones(len(targets), 1, dtype=torch.float64)
    metrics = rank_in_chunks(ones, counts[:, None], targets, None, [1, 2, 6])
    # ranks 1, 5, 2
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@2"] == pytest.approx(1 / 3)
    assert metrics["recall@6"] == pytest.approx(1.0)
    assert metrics["mrr@6"] == pytest.approx((1 / 2 + 1 / 6 + 1 / 3) / 3)
    assert metrics["ndcg@6"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(7) + 1 / math.log2(4)) / 3)

    # history [1] lifts item 3 to the top; history [3] lifts item 0 to rank 1
    excluded = rank_in_chunks(ones, counts[:, None], targets, [[1], [], [3]], [1, 2])
    assert excluded["recall@1"] == pytest.approx(1 / 3)
    assert excluded["recall@2"] == pytest.approx(2 / 3)
    assert excluded["mrr@2"] == pytest.approx((1 + 1 / 2) / 3)


@pytest.mark.parametrize("user_chunk", [3, 64])
def test_groups_are_the_rankings_of_their_users_alone(user_chunk: int) -> None:
    """rank_sums(groups=) in one pass gives each group exactly what ranking its users alone gives,
    fused, parts and history kept included; a group with no users gets zeros."""
    from train.evaluation.ranking import mean_metrics, rank_sums
    from train.evaluation.evaluate import target_buckets

    generator = torch.Generator().manual_seed(3)
    users, items = torch.randn(11, 4, generator=generator), torch.randn(9, 4, generator=generator)
    targets = torch.randint(0, 9, (11,), generator=generator)
    histories = [torch.randint(0, 9, (int(n),), generator=generator).tolist()
                 for n in torch.randint(0, 4, (11,), generator=generator)]
    train_counts = torch.tensor([0, 0, 3, 7, 30, 1, 2, 0, 5])

    def bonus(begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.arange(end - begin)  # each user's bonus item depends on its global index only
        return rows, (targets[begin:end] + rows + begin) % 9, torch.full((end - begin,), 0.7)

    groups = target_buckets(train_counts, targets, [1, 5, 20, 100])
    assert groups is not None and groups[1] == ["0", "1-4", "5-19", "20-99", "100+"]
    together = mean_metrics(rank_sums(users, items, targets, histories, [2, 5], user_chunk=user_chunk, item_chunk=4,
                                      bonus=bonus, parts=True, groups=groups), len(targets))
    for index, name in enumerate(groups[1]):
        rows = (groups[0] == index).nonzero().flatten().tolist()
        part = together["groups"][name]
        assert part["users"] == len(rows)
        if not rows:
            assert part["ndcg@5"] == 0 and part["encoder"]["with_history"]["ndcg@5"] == 0
            continue

        def alone_bonus(begin: int, end: int, rows: list[int] = rows) -> tuple[torch.Tensor, ...]:
            picked = torch.tensor(rows[begin:end])
            local = torch.arange(len(picked))
            return local, (targets[picked] + picked) % 9, torch.full((len(picked),), 0.7)

        alone = mean_metrics(rank_sums(users[rows], items, targets[rows], [histories[i] for i in rows], [2, 5],
                                       item_chunk=4, bonus=alone_bonus, parts=True), len(rows))
        from train.evaluation.report import flatten_metrics
        assert flatten_metrics({k: v for k, v in part.items() if k != "users"}) == pytest.approx(flatten_metrics(alone))
    assert sum(p["users"] for p in together["groups"].values()) == 11
