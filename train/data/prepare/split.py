"""Leave-one-out over whole partitions: users' time-ordered sequences, their training samples
and their held-out valid and test targets, with no Python work per user or per sample."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def user_sequences(interactions: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Sort by (user, time, file row); return user ids, their run starts and the item column."""
    ordered = interactions.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("row", "ascending")])
    users = ordered.column("user_id").combine_chunks()
    codes = users.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
    items = ordered.column("item").to_numpy().astype(np.int64)
    return users.take(pa.array(starts)), np.r_[starts, len(codes)], items


def training_part(bounds: np.ndarray, items: np.ndarray, cold: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's training sequence: (the interaction rows it keeps, its users, its lengths).

    A user with 3 or more interactions holds out their last two (valid, test); `cold` (a mask
    over item indices, data.cold_items) also drops the held-out-of-training items from it, so
    they are never a target nor in a training history."""
    lengths = np.diff(bounds)
    n_train = np.where(lengths >= 3, lengths - 2, lengths)
    user_of = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(items)) - np.repeat(bounds[:-1], lengths)
    kept = position < n_train[user_of]
    if cold is not None:
        kept &= ~cold[items]
    rows = np.flatnonzero(kept)
    return rows, user_of[rows], np.bincount(user_of[rows], minlength=len(lengths))


def leave_one_out(user_ids: pa.Array, bounds: np.ndarray, items: np.ndarray, n_items: int, first_user: int = 0,
                  cold: np.ndarray | None = None, last_only: bool = False
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, pa.Table], np.ndarray]:
    """Leave-one-out over all users at once, with no Python work per user or per sample.

    Users are numbered from `first_user` in the order of `user_ids`.
    Returns the training samples as arrays (`users`, `starts`: where the user's training
    sequence begins in the returned training items, `ts`: the target's position in it), in the
    order of user then t; each item's count in training sequences and as a training target; the
    valid and test split tables; and the training items (users' training sequences end to end,
    `cold` items left out of them; the splits keep every item). `last_only` (data.samples=last):
    one sample per user, their last training target.
    """
    lengths = np.diff(bounds)
    user_starts = bounds[:-1]
    held_out = lengths >= 3  # these users hold out their last two items; the others only train
    user_of = np.repeat(np.arange(len(lengths)), lengths)  # per interaction, as are the masks below
    position = np.arange(len(items)) - np.repeat(user_starts, lengths)
    train_rows, train_users, train_lengths = training_part(bounds, items, cold)
    train_items = items[train_rows]
    train_starts = np.r_[0, np.cumsum(train_lengths)[:-1]].astype(np.int64)
    train_position = np.arange(len(train_items)) - train_starts[train_users]
    is_target = train_position >= 1  # every training position t >= 1 is a sample
    train_counts = np.bincount(train_items, minlength=n_items)
    target_counts = np.bincount(train_items[is_target], minlength=n_items)
    sample_at = np.flatnonzero(is_target & (train_position == train_lengths[train_users] - 1) if last_only
                               else is_target)
    samples = {"users": first_user + train_users[sample_at], "starts": train_starts[train_users[sample_at]],
               "ts": train_position[sample_at]}
    split_users = np.flatnonzero(held_out)
    splits = {}
    for split, from_end in (("valid", 2), ("test", 1)):
        # The history is everything before the target, whatever data.max_history is.
        history_lengths = lengths[split_users] - from_end
        in_history = held_out[user_of] & (position < (lengths - from_end)[user_of])
        splits[split] = pa.table({
            "user_index": pa.array(first_user + split_users, pa.int64()),
            "user_id": pc.cast(user_ids.take(pa.array(split_users)), pa.string()),
            "history": pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(history_lengths)], pa.int32()),
                                                pa.array(items[in_history], pa.int64())),
            "target": pa.array(items[user_starts[split_users] + history_lengths], pa.int64())})
    return samples, train_counts, target_counts, splits, train_items
