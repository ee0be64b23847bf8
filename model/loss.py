"""Losses over the global batch (the contract in DESIGN.md).

Every loss scores the local users against the items of *all* ranks (gathered in rank order,
gradients routed back to the owner) and returns the mean over local rows.

Why no world-size factor anywhere: each rank's loss is the mean over its B rows, so the mean
of the ranks' losses is the one-process mean over the global batch. The gather's backward sums
the gradients every rank computed for a row into the rank that owns it, and the engine's
gradient averaging then divides that sum by the world size exactly once: every parameter ends
with the one-process gradient. (Multiplying the loss by the world size, as some trainers do,
is only right when the gather drops the gradients other ranks computed.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.gather import gather_no_grad, gather_padded, gather_with_grad, world

LOSS_KINDS = ("infonce", "symmetric", "triplet", "pairwise")


def false_negative_mask(item_ids: torch.Tensor, candidate_ids: torch.Tensor, positive_column: torch.Tensor,
                        history_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, C] True where candidate j must leave row i's softmax.

    A candidate is a false negative of row i when it is not row i's own positive column but
    its id equals row i's positive (two users with the same next item in the batch) or is in
    row i's history (an item the user already has).
    """
    same = candidate_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    if history_ids is not None and history_ids.numel():
        in_histories(candidate_ids, history_ids, into=same)
    same[torch.arange(len(positive_column), device=same.device), positive_column] = False  # in place: [B, C] is big
    return same


def in_histories(ids: torch.Tensor, history_ids: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C] True where ids[j] is in row i's history ([B, H], padded with -1; ids are >= 0),
    or'ed into `into` when given.

    One history column at a time: comparing all of them at once takes a [B, C, H] tensor, which
    at a global batch of thousands outweighs the rest of the loss (and, with gradient caching,
    the whole encoder)."""
    found = into if into is not None else torch.zeros(history_ids.shape[0], ids.shape[0], dtype=torch.bool,
                                                      device=ids.device)
    for column in history_ids.T:
        found |= ids.unsqueeze(0) == column.unsqueeze(1)
    return found


def _own(like: torch.Tensor, positive_column: torch.Tensor) -> torch.Tensor:
    own = torch.zeros_like(like, dtype=torch.bool)
    own[torch.arange(len(positive_column), device=own.device), positive_column] = True
    return own


def gathered_candidates(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *,
                        history_ids: torch.Tensor | None = None, mask_false_negatives: bool = True,
                        group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(every rank's items [C, D], each local user's positive column [B], removed [B, C]).

    `item` holds the B rows' positives, then optionally extra negatives (the same number on every
    rank, e.g. items from the users' histories); `item_ids` matches it row for row."""
    rank, _ = world(group)
    rows = query.shape[0]
    candidates = gather_with_grad(item, group)
    candidate_ids = gather_no_grad(item_ids, group)
    positive_column = rank * item.shape[0] + torch.arange(rows, device=query.device)
    if mask_false_negatives:
        removed = false_negative_mask(item_ids[:rows], candidate_ids, positive_column, history_ids)
    else:
        removed = torch.zeros(rows, candidates.shape[0], dtype=torch.bool, device=query.device)
    return candidates, positive_column, removed


def candidate_scores(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *,
                     history_ids: torch.Tensor | None = None, mask_false_negatives: bool = True,
                     group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(similarities [B, C], positive column [B], removed [B, C]) of local users against the
    global batch (gathered_candidates)."""
    candidates, positive_column, removed = gathered_candidates(query, item, item_ids, history_ids=history_ids,
                                                               mask_false_negatives=mask_false_negatives, group=group)
    return query @ candidates.T, positive_column, removed


def _masked(logits: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(removed, torch.finfo(logits.dtype).min)


# Past this many [B, C] logits, InfoNCE runs in row blocks (_BlockSoftmax): each block's [rows, C] logits hold at most this many floats.
BLOCK_ELEMENTS = 2**20


def contrastive_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *, temperature: float | torch.Tensor,
                     history_ids: torch.Tensor | None = None, logq: torch.Tensor | None = None,
                     mask_false_negatives: bool = True, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """InfoNCE of each local user against every item of the global batch (mean over local rows).

    `item`, `item_ids` and `logq` may carry extra negatives after the B positives (see
    candidate_scores)."""
    candidates, positive_column, removed = gathered_candidates(query, item, item_ids, history_ids=history_ids,
                                                               mask_false_negatives=mask_false_negatives, group=group)
    # Popular items are over-represented as in-batch negatives; subtracting log q_j turns the
    # sampled softmax into an estimate of the full-catalog softmax.
    shift = None if logq is None else gather_no_grad(logq.to(query.dtype), group)
    if query.shape[0] * candidates.shape[0] <= BLOCK_ELEMENTS:
        # One block's worth: autograd's own cross-entropy, whose gradient is bit-for-bit the one
        # earlier releases computed (the blocked backward rounds differently, and Adam magnifies
        # rounding in near-zero gradients into different weights: a resumed run would drift).
        logits = query @ candidates.T / temperature
        if shift is not None:
            logits = logits - shift.unsqueeze(0)
        return F.cross_entropy(_masked(logits, removed), positive_column)
    tau = torch.as_tensor(temperature, dtype=query.dtype, device=query.device)
    return _BlockSoftmax.apply(query, candidates, tau, shift, removed, positive_column)


class _BlockSoftmax(torch.autograd.Function):
    """Mean over rows of the cross-entropy of (query @ candidates.T / tau - shift), `removed`
    masked out, computed a block of rows at a time and recomputed in backward: no [B, C] float
    matrix outlives its block (only the bool mask is kept). At a global batch of thousands the
    loss's matrices, not the encoder, set the step's peak memory once gradient caching bounds the
    encoder's; this keeps the loss near one block's worth. The same as F.cross_entropy on the
    whole matrix, up to float rounding."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor,  # type: ignore[override]
                shift: torch.Tensor | None, removed: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        block = max(1, BLOCK_ELEMENTS // max(1, candidates.shape[0]))
        total = query.new_zeros(())
        norms = []
        for start in range(0, query.shape[0], block):
            logits = _block_logits(query[start:start + block], candidates, tau, shift, removed[start:start + block])
            norm = torch.logsumexp(logits, dim=1)
            own = logits.gather(1, positive[start:start + block].unsqueeze(1)).squeeze(1)
            total = total + (norm - own).sum()
            norms.append(norm)
        ctx.block = block
        ctx.save_for_backward(query, candidates, tau, shift, removed, positive, torch.cat(norms))
        return total / max(1, query.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        query, candidates, tau, shift, removed, positive, norms = ctx.saved_tensors
        scale = grad / max(1, query.shape[0])
        query_grad = torch.empty_like(query)
        candidates_grad = torch.zeros_like(candidates)
        tau_grad = query.new_zeros(())
        for start in range(0, query.shape[0], ctx.block):
            block = query[start:start + ctx.block]
            logits = _block_logits(block, candidates, tau, shift, removed[start:start + ctx.block])
            # d loss / d logits = softmax - one-hot at the positive (masked entries: exactly 0)
            weights = (logits - norms[start:start + ctx.block].unsqueeze(1)).exp_()
            rows = torch.arange(block.shape[0], device=block.device)
            weights[rows, positive[start:start + ctx.block]] -= 1
            weights *= scale
            query_grad[start:start + ctx.block] = weights @ candidates / tau
            candidates_grad += weights.T @ block / tau
            if ctx.needs_input_grad[2]:  # logits = scores / tau: d/d tau = -scores / tau^2
                tau_grad = tau_grad - (weights * (block @ candidates.T)).sum() / tau**2
        return query_grad, candidates_grad, tau_grad if ctx.needs_input_grad[2] else None, None, None, None


def _block_logits(query: torch.Tensor, candidates: torch.Tensor, tau: torch.Tensor, shift: torch.Tensor | None,
                  removed: torch.Tensor) -> torch.Tensor:
    logits = query @ candidates.T / tau
    if shift is not None:
        logits -= shift.unsqueeze(0)
    return logits.masked_fill_(removed, torch.finfo(logits.dtype).min)


def symmetric_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *, temperature: float | torch.Tensor,
                   history_ids: torch.Tensor | None = None, logq: torch.Tensor | None = None,
                   mask_false_negatives: bool = True, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Half user->item InfoNCE, half item->user InfoNCE (each local item against all users).

    In the item->user direction, user u is a false negative of item j when u's positive is
    also j, or j is in u's history: u chose j too.
    """
    forward = contrastive_loss(query, item, item_ids, temperature=temperature, history_ids=history_ids, logq=logq,
                               mask_false_negatives=mask_false_negatives, group=group)
    rank, _ = world(group)
    rows = item.shape[0]
    users = gather_with_grad(query, group)
    own_user = rank * rows + torch.arange(rows, device=item.device)
    logits = item @ users.T / temperature
    if mask_false_negatives:
        user_positive = gather_no_grad(item_ids, group)
        chose = user_positive.unsqueeze(0) == item_ids.unsqueeze(1)
        if history_ids is not None and history_ids.numel():
            chose |= in_histories(item_ids, gather_padded(history_ids, group, pad=-1)).T
        logits = _masked(logits, chose & ~_own(chose, own_user))
    backward = F.cross_entropy(logits, own_user)
    return (forward + backward) / 2


def _valid_negatives(removed: torch.Tensor, positive_column: torch.Tensor) -> torch.Tensor:
    return ~removed & ~_own(removed, positive_column)


def triplet_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *, margin: float = 0.2,
                 negative: str = "hardest", seed: int = 0, history_ids: torch.Tensor | None = None,
                 mask_false_negatives: bool = True, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """max(0, margin - s(u, i+) + s(u, i-)) on cosine similarities, one in-batch negative per user.

    `negative`: "hardest" (the most similar unmasked item) or "random" (uniform among the
    unmasked). The random draw is made for the whole global batch from `seed` on every rank
    and each rank takes its own rows, so it is the draw one process would make.
    """
    scores, positive_column, removed = candidate_scores(query, item, item_ids, history_ids=history_ids,
                                                        mask_false_negatives=mask_false_negatives, group=group)
    valid = _valid_negatives(removed, positive_column)
    if negative == "hardest":
        choice = _masked(scores.detach(), ~valid).argmax(dim=1)
    elif negative == "random":
        rank, size = world(group)
        rows = query.shape[0]
        generator = torch.Generator().manual_seed(seed)
        draws = torch.rand(size * rows, scores.shape[1], generator=generator)[rank * rows:(rank + 1) * rows]
        choice = draws.to(scores.device).masked_fill(~valid, -1.0).argmax(dim=1)
    else:
        raise ValueError(f"triplet negative must be hardest or random, not {negative!r}")
    rows_index = torch.arange(len(choice), device=scores.device)
    positive = scores[rows_index, positive_column]
    hinge = F.relu(margin - positive + scores[rows_index, choice])
    return torch.where(valid.any(dim=1), hinge, torch.zeros_like(hinge)).mean()


def pairwise_softmax_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *,
                          temperature: float | torch.Tensor, history_ids: torch.Tensor | None = None,
                          mask_false_negatives: bool = True, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """-log(e^{s+} / (e^{s+} + e^{s-})) = softplus(s- - s+), averaged over every unmasked
    in-batch negative of a user, then over users (s = similarity / temperature)."""
    scores, positive_column, removed = candidate_scores(query, item, item_ids, history_ids=history_ids,
                                                        mask_false_negatives=mask_false_negatives, group=group)
    logits = scores / temperature
    valid = _valid_negatives(removed, positive_column)
    positive = logits[torch.arange(len(positive_column), device=logits.device), positive_column]
    pair = F.softplus(logits - positive.unsqueeze(1)) * valid
    per_user = pair.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_user.mean()


def user_contrastive_loss(view_a: torch.Tensor, view_b: torch.Tensor, *, temperature: float | torch.Tensor,
                          group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """CL4SRec's user-user term: two augmented views of one history attract, other users' views
    (from every rank) repel. Symmetric, mean over local rows."""
    rank, _ = world(group)
    rows = view_a.shape[0]
    target = rank * rows + torch.arange(rows, device=view_a.device)
    a_to_b = F.cross_entropy(view_a @ gather_with_grad(view_b, group).T / temperature, target)
    b_to_a = F.cross_entropy(view_b @ gather_with_grad(view_a, group).T / temperature, target)
    return (a_to_b + b_to_a) / 2


def uniformity_loss(item: torch.Tensor, item_ids: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """DirectAU's uniformity over the global batch's items: log of the mean of exp(-2 |v_i - v_j|^2)
    over pairs of different ids. Low when the items spread over the sphere instead of crowding
    into a cone, where no user can be near an item without being near its neighbours too.

    Every rank computes the same global value; the gather's backward sums the ranks' (equal)
    gradients for each item and the engine's average divides by the world size once: the
    one-process gradient.
    """
    items = gather_with_grad(item, group)
    ids = gather_no_grad(item_ids, group)
    pairs = torch.triu(ids.unsqueeze(0) != ids.unsqueeze(1), diagonal=1)
    squared = (2 - 2 * items @ items.T).clamp(min=0)  # unit vectors: |a - b|^2 = 2 - 2 a.b
    return torch.logsumexp(-2 * squared[pairs], dim=0) - torch.log(pairs.sum().clamp(min=1).to(items.dtype))


def catalog_loss(query: torch.Tensor, item_ids: torch.Tensor, catalog: torch.Tensor, *,
                 temperature: float | torch.Tensor, held_out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of each local user over the whole catalog: SASRec's cross-entropy, for text items.

    `catalog` [N, D] holds every item's embedding from a recent no-grad pass (the same on every
    rank); `item_ids` are catalog indices. Nothing is masked: the items already in a user's
    history are negatives too, which teaches the model not to recommend what the user has.
    The gradient reaches the user side only. The positive comes from the same pass as the
    negatives on purpose: a fresh positive among stale negatives lets the model win by telling
    fresh from stale (moving the whole item space between refreshes), and it collapses.
    Every term is local, so the mean over local rows averages over ranks to the one-process loss.
    `held_out` [N] (data.cold_items) marks items that are no candidate at all.
    """
    logits = query @ catalog.to(query.dtype).T
    if held_out is not None:
        logits = _masked(logits, held_out.unsqueeze(0))
    return F.cross_entropy(logits / temperature, item_ids)


def next_item_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_items: torch.Tensor,
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns, next items) of every history item token in user prompts.

    `token_items` maps a token id to its catalog index (-1: not an item token). The state at a
    history item's token has read the history up to that item, so it predicts the next history
    item, and the last one predicts the row's target: SASRec's signal at every position.
    """
    items = torch.where(attention_mask.bool(), token_items[input_ids], -1)
    rows, columns = (items >= 0).nonzero(as_tuple=True)  # row-major: each row's items in prompt order
    current = items[rows, columns]
    same_row = rows[1:] == rows[:-1]
    following = torch.where(same_row, current[1:], targets[rows[:-1]])
    return rows, columns, torch.cat([following, targets[rows[-1:]]])


def position_loss(states: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, next_items: torch.Tensor,
                  catalog: torch.Tensor, *, temperature: float | torch.Tensor,
                  group: dist.ProcessGroup | None = None, held_out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the catalog at every (row, column) of `states` [B, T, D], mean over the
    positions of the *global* batch.

    Ranks hold different numbers of positions, so each rank divides its sum by the global count
    over the world size: the mean of the ranks' losses is then the one-process mean. `held_out`
    as in catalog_loss.
    """
    logits = states[rows, columns] @ catalog.to(states.dtype).T / temperature
    if held_out is not None:
        logits = _masked(logits, held_out.unsqueeze(0))
    return global_mean(F.cross_entropy(logits, next_items, reduction="sum"), len(rows), group)


def global_mean(total: torch.Tensor, count: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's `total` over `count` terms, divided by the global count over the world size:
    when ranks hold different numbers of terms, the mean of the ranks' results is then the
    one-process mean."""
    _, size = world(group)
    counts = torch.tensor([float(count)], device=total.device)
    if size > 1:
        dist.all_reduce(counts, group=group)
    return total * size / counts.clamp(min=1).squeeze(0)


class Temperature(nn.Module):
    """A softmax temperature, fixed or learned.

    Learned, it is parametrised by its logarithm (positive, scale-free steps) and clamped to
    [minimum, maximum] in the forward pass, so a runaway value cannot blow up the logits.
    """

    def __init__(self, initial: float, learnable: bool = False, minimum: float = 0.01, maximum: float = 1.0) -> None:
        super().__init__()
        self.minimum, self.maximum = minimum, maximum
        # Shape [1], not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors.
        self.log_value = nn.Parameter(torch.tensor([float(initial)]).log(), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_value.exp().clamp(self.minimum, self.maximum).squeeze(0)


def distinct_items(item: torch.Tensor, item_ids: torch.Tensor,
                   group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch's items for the hierarchical objective: (embeddings [C, D], ids [C], first [C]).

    Each rank brings the distinct items of its own rows ([U, D], U differing by rank); they are
    padded to the largest U (ids -1) and gathered with their gradients in rank order. An item two
    ranks both hold appears twice: `first` marks one row per id (its first), the only one that
    is a candidate, so the softmax is the one a single process would take over the distinct
    items of the whole batch."""
    _, size = world(group)
    if size > 1:
        rows = torch.tensor([item.shape[0]], device=item.device)
        dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
        missing = int(rows) - item.shape[0]
        item = F.pad(item, (0, 0, 0, missing))
        item_ids = F.pad(item_ids, (0, missing), value=-1)
    candidates, candidate_ids = gather_with_grad(item, group), gather_no_grad(item_ids, group)
    sorted_ids, order = torch.sort(candidate_ids, stable=True)
    first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_sorted[1:] = sorted_ids[1:] != sorted_ids[:-1]
    first = torch.zeros_like(first_sorted)
    first[order] = first_sorted
    return candidates, candidate_ids, first & (candidate_ids >= 0)


def candidate_columns(ids: torch.Tensor, candidate_ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Column of each of `ids` (any shape) among `distinct_items`' rows: its first row. Ids not
    among the candidates (padding, -1) get column 0; callers leave those positions out."""
    columns = first.nonzero().squeeze(1)
    keys, order = candidate_ids[columns].sort()
    found = torch.searchsorted(keys, ids.reshape(-1)).clamp(max=len(keys) - 1)
    return columns[order[found]].view(ids.shape)


def table_candidates(table: torch.Tensor, live: torch.Tensor, live_ids: torch.Tensor, first: torch.Tensor,
                     held_out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole catalog from a table (loss.catalog_table), for the hierarchical objective:
    (what the user tower reads [N, D], the candidates [N, D], ids [N], first [N]), the last
    three in `distinct_items`' form.

    `table` [N, D] is every item's embedding from the last refresh (the same on every rank);
    `live` the global batch's items encoded now, with their graphs (`distinct_items`). The user
    tower reads the live rows, so the backbone's gradient comes through the items of the users'
    histories, and each step sees what the previous ones changed there. The candidates are the
    table alone, without gradient, as `catalog_loss` scores text users: every candidate from the
    same pass, so no row can win by being fresher than the others, and no gradient pushes up the
    batch's items (positives among them) without the rest of the catalog's pushing it down, which
    through the shared backbone would lift every item. When the table was refreshed with the
    current weights this is the live catalog's loss, and its gradient through the users' side.
    `held_out` [N] (data.cold_items): no candidate."""
    rows = first.nonzero().squeeze(1)
    table = table.to(device=live.device, dtype=live.dtype)
    read = table.index_copy(0, live_ids[rows], live[rows])
    ids = torch.arange(len(table), device=live.device)
    keep = torch.ones_like(ids, dtype=torch.bool) if held_out is None else ~held_out.to(live.device)
    return read, table, ids, keep


def next_item_loss(states: torch.Tensor, next_columns: torch.Tensor, candidates: torch.Tensor, first: torch.Tensor, *,
                   temperature: float | torch.Tensor, group: dist.ProcessGroup | None = None,
                   seen: tuple[torch.Tensor, torch.Tensor] | None = None,
                   repeat: torch.Tensor | None = None) -> torch.Tensor:
    """SASRec's objective over the global batch: each user state [P, D] (one per history
    position) against every distinct item of the batch, the next item its positive; the mean over
    the positions of the *global* batch.

    Nothing else is masked: the items a user already has are negatives like any other, which is
    how the model learns not to recommend them again. With `seen` (positions, columns: each pair
    a candidate the position's user already has, once; model.user_tower.seen_so_far) those scores
    get `repeat` added (model.repeat_score), before the temperature, as ranking adds it. Ranks
    hold different numbers of positions, so the mean is taken by global_mean."""
    scores = states @ candidates.T
    if seen is not None:
        assert repeat is not None, "seen items need the repeat score"
        scores.index_put_(seen, repeat.to(scores.dtype).expand(len(seen[0])), accumulate=True)  # the product is not saved
    logits = _masked(scores / temperature, ~first.unsqueeze(0))
    return global_mean(F.cross_entropy(logits, next_columns, reduction="sum"), len(next_columns), group)
