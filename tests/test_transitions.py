"""The transition prior (train/evaluation/transitions.py) against naive loops, and its fused ranking."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
import torch

from train.config.io import load_config
from train.errors import UserError
from train.evaluation.ranking import Bonus, metric_sums, rank_catalog, rank_in_chunks, target_ranks
from train.evaluation.transitions import Transitions, count_transitions, user_prior


def naive_counts(sequences: list[list[int]], window: int) -> dict[tuple[int, int], float]:
    counts: dict[tuple[int, int], float] = defaultdict(float)
    for sequence in sequences:
        for i, a in enumerate(sequence):
            for gap in range(1, window + 1):
                if i + gap < len(sequence):
                    counts[a, sequence[i + gap]] += 1.0 / gap
    return counts


def table(transitions: Transitions) -> dict[tuple[int, int], float]:
    out = {}
    for a in range(transitions.num_items):
        for slot in range(transitions.indptr[a], transitions.indptr[a + 1]):
            out[a, int(transitions.successors[slot])] = float(transitions.weights[slot])
    return out


def random_sequences(seed: int, users: int = 30, items: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(items) for _ in range(rng.randrange(0, 9))] for _ in range(users)]


def test_counts_by_hand() -> None:
    # b follows a by g steps: 1/g. [0, 1, 2]: (0,1) 1, (1,2) 1, (0,2) 1/2; [1, 2]: (1,2) 1 more.
    # The sequences never join: 2 -> 1 across them is not a transition.
    counted = table(count_transitions([[0, 1, 2], [1, 2]], num_items=3, window=2, max_successors=5))
    assert counted == {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 2.0}
    assert table(count_transitions([[0, 1, 2], [1, 2]], 3, window=1, max_successors=5)) == {(0, 1): 1.0, (1, 2): 2.0}


@pytest.mark.parametrize("window", [1, 2, 4])
def test_counts_equal_a_naive_loop(window: int) -> None:
    sequences = random_sequences(window)
    counted = table(count_transitions(sequences, 12, window, max_successors=100))
    expected = naive_counts(sequences, window)
    assert counted.keys() == expected.keys()
    for pair, weight in expected.items():
        assert counted[pair] == pytest.approx(weight, rel=1e-6)


def test_each_item_keeps_its_most_frequent_successors() -> None:
    sequences = random_sequences(7, users=60)
    whole = naive_counts(sequences, 3)
    kept = count_transitions(sequences, 12, 3, max_successors=2)
    for a in range(12):
        slots = range(kept.indptr[a], kept.indptr[a + 1])
        got = [(int(kept.successors[s]), float(kept.weights[s])) for s in slots]
        # highest weight first, ties by the lower item id
        expected = sorted(((b, w) for (s, b), w in whole.items() if s == a), key=lambda bw: (-bw[1], bw[0]))[:2]
        assert [b for b, _ in got] == [b for b, _ in expected], a
        assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-6)


def test_no_sequences_count_nothing() -> None:
    empty = count_transitions([[], [4]], num_items=5, window=3, max_successors=10)
    assert empty.indptr.tolist() == [0] * 6 and len(empty.successors) == 0


def dense_prior(transitions: Transitions, histories: list[list[int]], counts: torch.Tensor, weight: float,
                recent: int, decay: float, power: float) -> torch.Tensor:
    """weight * log(1 + sum_k decay**k C[h_k, i] / (count_i + 1)**power), by loops over a dense C."""
    c = torch.zeros(transitions.num_items, transitions.num_items, dtype=torch.float64)
    for (a, b), w in table(transitions).items():
        c[a, b] = w
    out = torch.zeros(len(histories), transitions.num_items, dtype=torch.float64)
    for row, history in enumerate(histories):
        for k, item in enumerate(reversed(history[-recent:])):
            out[row] += decay ** k * c[item]
    return weight * torch.log1p(out / (counts.double() + 1) ** power)


@pytest.mark.parametrize("recent, decay, power", [(1, 1.0, 0.0), (3, 0.7, 0.3), (10, 0.5, 1.0)])
def test_user_prior_equals_the_dense_formula(recent: int, decay: float, power: float) -> None:
    transitions = count_transitions(random_sequences(1), 12, 3, max_successors=4)
    histories = random_sequences(2, users=9) + [[]]
    counts = torch.arange(12.0) * 3
    rows, items, values = user_prior(transitions, histories, counts, 0.4, recent, decay, power)
    dense = torch.zeros(len(histories), 12, dtype=torch.float64)
    dense[rows, items] = values.double()
    assert len(set(zip(rows.tolist(), items.tolist()))) == len(rows)  # one entry per (user, item)
    assert torch.allclose(dense, dense_prior(transitions, histories, counts, 0.4, recent, decay, power), atol=1e-6)
    assert bool((values > 0).all())  # only non-zero priors are listed


def sparse(rows: torch.Tensor, items: torch.Tensor, values: torch.Tensor) -> Bonus:
    """A whole sparse matrix served a user chunk at a time, as rank_in_chunks asks for it."""
    def chunk(begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inside = (rows >= begin) & (rows < end)
        return rows[inside] - begin, items[inside], values[inside]
    return chunk


SCORES = torch.tensor([[0.1, 0.9, 0.3, 0.9, 0.5, 0.2],
                       [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])


def test_bonus_lifts_an_item_by_hand() -> None:
    # User 0's target 4 (0.5) is behind items 1 and 3 (0.9): rank 2. A bonus of 0.5 on it makes
    # 1.0, the top; a bonus on item 2 (0.3 + 0.7 = 1.0) then ties with it and wins by lower index.
    # User 1 has no bonus: its target 1 stays behind item 0.
    targets = torch.tensor([4, 1])
    items = torch.eye(6)
    plain = rank_in_chunks(SCORES, items, targets, None, [1, 3])
    assert plain["recall@1"] == 0.0 and plain["recall@3"] == pytest.approx(1.0)
    lifted = sparse(torch.tensor([0]), torch.tensor([4]), torch.tensor([0.5]))
    assert rank_in_chunks(SCORES, items, targets, None, [1], bonus=lifted)["recall@1"] == pytest.approx(0.5)
    rival = sparse(torch.tensor([0, 0]), torch.tensor([2, 4]), torch.tensor([0.7, 0.5]))
    tied = rank_in_chunks(SCORES, items, targets, None, [1, 2], bonus=rival)
    assert tied["recall@1"] == 0.0 and tied["mrr@2"] == pytest.approx(0.5)  # both users at rank 1


@pytest.mark.parametrize("exclude", [None, [[1, 4], [0, 2], [], [5, 3]]])
@pytest.mark.parametrize("chunk, item_chunk", [(1, 1), (2, 4), (4, 6), (3, 2)])
def test_fused_ranking_equals_the_dense_sum(chunk: int, item_chunk: int, exclude: list[list[int]] | None) -> None:
    generator = torch.Generator().manual_seed(0)
    users, items = torch.randn(4, 3, generator=generator), torch.randn(6, 3, generator=generator)
    targets = torch.tensor([4, 1, 0, 3])
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    cols = torch.tensor([4, 5, 0, 0, 1, 5, 3])
    values = torch.rand(7, generator=generator) * 2
    got = rank_in_chunks(users, items, targets, exclude, [1, 2, 5], user_chunk=chunk, item_chunk=item_chunk,
                         bonus=sparse(rows, cols, values))
    dense = users @ items.T
    dense[rows, cols] += values
    expected = {k: v / 4 for k, v in metric_sums(target_ranks(dense, targets, exclude), [1, 2, 5]).items()}
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    assert got != rank_in_chunks(users, items, targets, exclude, [1, 2, 5])  # the bonus changed some rank


def assert_each_ranks_as_dense(dense: dict[str, torch.Tensor], reported: dict[str, dict], targets: torch.Tensor,
                               histories: list[list[int]]) -> None:
    """Each reported ranking's means (history excluded, and kept under with_history) are those of
    ranking its dense scores [users, items] directly (target_ranks, ks 1, 2, 5)."""
    for name, scores in dense.items():
        for view, exclude in (("excluded", histories), ("kept", None)):
            expected = metric_sums(target_ranks(scores, targets, exclude), [1, 2, 5])
            block = reported[name] if view == "excluded" else reported[name]["with_history"]
            for key, total in expected.items():
                assert block[key] == pytest.approx(total / len(targets), abs=1e-12), (name, view, key)


@pytest.mark.parametrize("chunk, item_chunk", [(1, 1), (2, 4), (5, 7), (3, 2)])
def test_one_pass_ranks_every_part_as_the_dense_scores_do(chunk: int, item_chunk: int) -> None:
    # rank_catalog(parts=True) ranks the fused scores, the encoder's and the prior's, each with
    # history excluded and kept, from one product per block; each must equal its own dense
    # ranking. Histories repeat an item (subtracted once) and hold their own target (kept).
    generator = torch.Generator().manual_seed(3)
    users, items = torch.randn(5, 3, generator=generator), torch.randn(7, 3, generator=generator)
    targets = torch.tensor([4, 1, 0, 3, 6])
    histories = [[1, 5, 1], [0, 2], [], [3, 2, 6], [6, 0, 0, 5]]
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    cols = torch.tensor([4, 5, 0, 0, 1, 5, 3, 2, 6])
    values = torch.rand(9, generator=generator) * 2
    got = rank_catalog(users, items, targets, histories, [1, 2, 5], user_chunk=chunk, item_chunk=item_chunk,
                       bonus=sparse(rows, cols, values), parts=True)
    prior = torch.zeros(5, 7)
    prior[rows, cols] = values
    dense = {"fused": users @ items.T + prior, "encoder": users @ items.T, "transitions": prior}
    reported = {"fused": got, "encoder": got["encoder"], "transitions": got["transitions"]}
    assert_each_ranks_as_dense(dense, reported, targets, histories)
    assert got["encoder"]["ndcg@5"] != got["transitions"]["ndcg@5"] != got["ndcg@5"]  # three different rankings
    assert got["ndcg@5"] != got["with_history"]["ndcg@5"]  # the exclusion mattered


@pytest.mark.parametrize("bonus, parts", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("chunk, item_chunk", [(1, 1), (2, 4), (3, 2)])
def test_the_repeat_score_is_the_model_s_own_and_its_inner_products_rank_beside(bonus: bool, parts: bool, chunk: int,
                                                                                 item_chunk: int) -> None:
    # model.repeat_score: the value on each distinct item of a user's last max_history (2 here)
    # belongs to the model's scores ("encoder" beside the prior, else the ranking itself); the
    # inner products alone are "embeddings". Each must equal its own dense ranking.
    from train.evaluation.evaluate import repeat_bonus
    from train.evaluation.ranking import mean_metrics, rank_sums

    generator = torch.Generator().manual_seed(5)
    users, items = torch.randn(5, 3, generator=generator), torch.randn(7, 3, generator=generator)
    targets = torch.tensor([4, 1, 0, 3, 6])
    histories = [[1, 5, 1], [0, 2], [], [6, 3, 2], [6, 5, 5]]  # 3: an old item left out; 1, 5: twice in a window
    repeat = repeat_bonus(histories, 2, 2.5)  # positive: a domain where people take items again
    rows, cols = torch.tensor([0, 1, 2, 3, 4, 4]), torch.tensor([5, 0, 1, 3, 2, 6])
    values = torch.rand(6, generator=generator) * 2
    got = mean_metrics(rank_sums(users, items, targets, histories, [1, 2, 5], user_chunk=chunk, item_chunk=item_chunk,
                                 bonus=sparse(rows, cols, values) if bonus else None, parts=parts, repeat=repeat), 5)
    windows = torch.zeros(5, 7)
    for user, history in enumerate(histories):
        windows[user, history[-2:]] = 2.5
    prior = torch.zeros(5, 7)
    if bonus:
        prior[rows, cols] = values
    dense = {"ranked": users @ items.T + windows + prior, "embeddings": users @ items.T}
    reported = {"ranked": got, "embeddings": got["embeddings"]}
    if parts:
        dense.update(encoder=users @ items.T + windows, transitions=prior)
        reported.update(encoder=got["encoder"], transitions=got["transitions"])
    assert set(got) - set(reported) == {key for key in got if "@" in key} | {"with_history"}  # nothing else reported
    assert_each_ranks_as_dense(dense, reported, targets, histories)
    assert got["with_history"] != got["embeddings"]["with_history"]  # the repeat score moved some rank


def test_parts_need_a_bonus() -> None:
    with pytest.raises(ValueError, match="parts needs a bonus"):
        rank_catalog(SCORES, torch.eye(6), torch.tensor([4, 1]), None, [1], parts=True)


@pytest.mark.parametrize("key, value", [("weight", "-0.1"), ("window", "0"), ("recent", "0"), ("decay", "0"),
                                        ("decay", "1.5"), ("popularity_power", "-1"), ("max_successors", "0")])
def test_bad_settings_name_their_key(key: str, value: str) -> None:
    with pytest.raises(UserError, match=rf"^eval\.transitions\.{key}: "):
        load_config(None, [f"eval.transitions.{key}={value}"])


def test_the_default_is_off() -> None:
    assert load_config(None, []).eval.transitions.weight == 0.0
    assert math.isclose(load_config(None, ["eval.transitions.weight=0.1"]).eval.transitions.weight, 0.1)
