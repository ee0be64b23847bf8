"""One optimizer step: embed -> loss on the embeddings -> backward -> optimizer step.

The step is shaped so that gradient caching can replace `embed` with chunked, graph-free
encoding and a replay, without touching the loss or the engine. Which embeddings a batch gets
and which loss reads them follow from the config (`model.user_encoder`, the loss's terms),
never from which keys a batch happens to hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.layer_cache import StateCache
from model.loss import candidate_columns, distinct_items, next_item_positions, table_candidates
from model.rec_model import RecModel
from model.unpadded import shared_prefix
from model.user_tower import seen_so_far, sequence_inputs
from train.config.schema import Config
from train.data.collate import PromptCollator
from train.data.layout import cold_items
from train.distributed import anywhere, even_share
from train.evaluation.encode import encode_sharded, eval_mode
from train.loop.engines import Engine

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TextEmbeddings:
    """Users as prompts (model.user_encoder=text): one row per user and per item of the batch."""

    query: torch.Tensor  # [B, D] users
    item: torch.Tensor  # [B (+ history negatives), D] items, positives first
    states: torch.Tensor | None = None  # [B, T, D] every user token's embedding (loss.history_positions)
    views: tuple[torch.Tensor, torch.Tensor] | None = None  # two augmented views of each user (loss.user_cl_weight)


@dataclass(frozen=True)
class SequenceEmbeddings:
    """Users as sequences of items (model.user_encoder=items): the user tower's state at every
    known position, and the global batch's distinct items as candidates."""

    states: torch.Tensor  # [P, D] the tower's state at each position whose next item is known
    next_columns: torch.Tensor  # [P] each position's next item, as a column of `candidates`
    candidates: torch.Tensor  # [C, D] every rank's distinct items, gathered with gradients (or the table)
    first: torch.Tensor  # [C] whether a row is its id's first (the one that counts)
    seen: tuple[torch.Tensor, torch.Tensor] | None = None  # (position, column) pairs a user has (model.repeat_score)


@dataclass(frozen=True)
class StepResult:
    """What a step did: this rank's loss (detached) and the global batch's size."""

    loss: torch.Tensor
    samples: int  # users in the global batch
    tokens: int  # real (unpadded) tokens the global batch fed the backbone
    skipped: bool = False  # a loss or gradient was not finite: no update on any rank
    padded_tokens: int = 0  # positions the backbone computed, padding included (tokens / this: padding waste)
    token_squares: int = 0  # the sum of each backbone sequence's squared length (attention's work)
    stop: bool = False  # a rank was asked to stop (SIGTERM / SIGUSR1): every rank stops after this step


class TrainStep:
    """The step of one run; keeps the catalog's embeddings when the loss needs them."""

    def __init__(self, config: Config, model: RecModel, engine: Engine, collator: PromptCollator,
                 token_items: torch.Tensor, device: torch.device, world_size: int,
                 catalog_tokens: Callable[[], list[list[int]]], state_cache: StateCache | None = None) -> None:
        self.config = config
        self.model = model
        self.engine = engine
        self.collator = collator
        self.token_items = token_items
        self.device = device
        self.world_size = world_size
        self.catalog_tokens = catalog_tokens
        self.state_cache = state_cache  # model.trained_layers: the items' frozen lower-layer states
        self.items_mode = config.model.user_encoder == "items"
        # data.cold_items are held out of training entirely, catalog negatives included: a softmax
        # that pushed them down at every step would teach the model to rank their text low.
        cold = cold_items(len(collator.catalog), config.data.cold_items, config.seed)
        self.held_out = None if cold is None else torch.from_numpy(cold).to(device)
        # loss.negatives=catalog with items: this rank's share of the catalog, encoded at every step,
        # unless the catalog is read from the table (loss.catalog_table).
        self.catalog_table = self.items_mode and config.loss.catalog_table
        self.catalog_share: torch.Tensor | None = None
        if self.items_mode and config.loss.negatives == "catalog" and not self.catalog_table:
            candidates = torch.arange(len(collator.catalog)) if cold is None else torch.from_numpy(np.flatnonzero(~cold))
            self.catalog_share = candidates[even_share(len(candidates))].to(device)
        # Every item's embedding (no grad) for catalog negatives and history positions, or the
        # table of loss.catalog_table.
        self.catalog_embeddings: torch.Tensor | None = None
        # model.id_dropout: the items whose id vectors this step leaves out (`drop_ids`).
        self.dropped_ids: torch.Tensor | None = None
        self.skipped = False  # this step's update is left out (a non-finite loss or gradient)
        # Whether this rank was asked to stop (the loop's StopGuard): decided with the step's
        # finite check, in the same all-reduce.
        self.stop_signal: Callable[[], bool] = lambda: False
        self.stop = False

    def __call__(self, batch: Batch, step: int) -> StepResult:
        """Step `step` (counted from 0) on this rank's part of the global batch."""
        samples = len(batch["item_ids"]) * self.world_size
        masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
        lengths = [mask.sum(dim=1) for mask in masks]
        tokens = (sum(int(length.sum()) for length in lengths) - self.shared_tokens(batch)) * self.world_size
        squares = sum(int(length.square().sum()) for length in lengths) * self.world_size
        padded = sum(mask.numel() for mask in masks) * self.world_size
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.refresh_catalog(step)
        self.dropped_ids = self.drop_ids(step)
        self.skipped = False
        loss = self.forward_backward(batch)
        if self.skipped:
            self.engine.skip()
        else:
            self.skipped = not self.engine.step()
        return StepResult(loss.detach(), samples, tokens, self.skipped, padded, squares, self.stop)

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """This rank's loss, its gradient left in the parameters (reduced across ranks); no
        backward when a rank's loss is not finite (`skipped`)."""
        loss = self.loss(self.embed(batch), batch)
        if not self.nonfinite_anywhere(loss):
            self.engine.backward(loss)
        return loss

    def nonfinite_anywhere(self, loss: torch.Tensor) -> bool:
        """Whether any rank's loss is NaN or infinite: then every rank skips this step's backward
        and update together (one rank's NaN would reach all through the gradients' reduction).
        Whether any rank was asked to stop is settled in the same all-reduce (`stop`)."""
        nonfinite = not bool(torch.isfinite(loss.detach()).all())
        self.skipped, self.stop = anywhere([nonfinite, self.stop_signal()], self.device)
        return self.skipped

    def embed(self, batch: Batch) -> TextEmbeddings | SequenceEmbeddings:
        """User and item embeddings of a batch, with their autograd graphs."""
        if self.items_mode:
            return self.embed_item_sequences(batch)
        objective = self.model.objective
        states = None
        if objective.history_positions > 0:
            query, states = self.engine.forward(batch["user_input_ids"], batch["user_attention_mask"],
                                                every_position=True, user=True)
        else:
            query = self.engine.forward(batch["user_input_ids"], batch["user_attention_mask"], user=True)
        item = self.engine.forward(batch["item_input_ids"], batch["item_attention_mask"])
        views = None
        if objective.user_cl_weight > 0:
            views = (self.engine.forward(batch["view_a_input_ids"], batch["view_a_attention_mask"], user=True),
                     self.engine.forward(batch["view_b_input_ids"], batch["view_b_attention_mask"], user=True))
        return TextEmbeddings(query, item, states, views)

    def embed_item_sequences(self, batch: Batch) -> SequenceEmbeddings:
        """model.user_encoder=items: each distinct item of the batch embedded once, gathered from
        every rank; users are the user tower over their items' rows of that gathered matrix, so a
        history item's gradient reaches its one encoding wherever it was encoded. With
        loss.negatives=catalog the candidates are every catalog item instead, each rank encoding
        its share of the catalog live (SASRec's full softmax, no stale rows), or with
        loss.catalog_table the candidates from the table (`candidates`)."""
        ids = self.local_item_ids(batch)
        read, candidates, candidate_ids, first = self.candidates(*distinct_items(self.encode_items(batch, ids), ids))
        sequence, mask, next_ids = sequence_inputs(batch["history_ids"], batch["item_ids"])
        columns = candidate_columns(sequence, candidate_ids, first)
        _, states = self.engine.forward(None, mask, every_position=True, user=True, item_sequence=read[columns])
        known = next_ids >= 0
        return SequenceEmbeddings(states[known], candidate_columns(next_ids[known], candidate_ids, first),
                                  candidates, first, self.seen(columns, mask, known))

    def candidates(self, items: torch.Tensor, ids: torch.Tensor, first: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the user tower reads and the step's candidates, from the items every rank encoded
        (`distinct_items`' triple): those items for both, or with loss.catalog_table the live
        items for the tower and the table for the candidates (model.loss.table_candidates)."""
        if not self.catalog_table:
            return items, items, ids, first
        assert self.catalog_embeddings is not None, "refresh_catalog fills the table before the first step"
        return table_candidates(self.catalog_embeddings, items, ids, first, self.held_out)

    def seen(self, columns: torch.Tensor, mask: torch.Tensor, known: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """model.repeat_score: each known position's pairs with the candidates its user already has."""
        return None if self.model.encoder.repeat_score is None else seen_so_far(columns, mask, known)

    def local_item_ids(self, batch: Batch) -> torch.Tensor:
        """The items this rank encodes (user_encoder=items): its rows' distinct items, or its
        share of the catalog with loss.negatives=catalog."""
        return batch["batch_item_ids"] if self.catalog_share is None else self.catalog_share

    def drop_ids(self, step: int) -> torch.Tensor | None:
        """model.id_dropout: a mask of the catalog items whose id vectors step `step` leaves out,
        drawn from the run's seed and the step alone, so that every rank (and a resumed run)
        leaves out the same items and the loss stays the one-process loss."""
        share = self.config.model.id_dropout
        if share == 0:
            return None
        draw = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return (torch.rand(len(self.collator.catalog), generator=draw) < share).to(self.device)

    def encode_items(self, batch: Batch, ids: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """`ids[rows]` (local_item_ids) through the encoder's trained part: from their cached
        lower-layer states (model.trained_layers), the batch's item tokens, or the catalog's."""
        chosen = ids[rows]
        # The encoder reads a negative index as "no id vector" (model.id_dropout).
        id_rows = chosen if self.dropped_ids is None else torch.where(self.dropped_ids[chosen], -1, chosen)
        if self.state_cache is not None:  # only the trained top layers run
            states, mask = self.state_cache.batch(chosen.cpu(), self.collator.padding_side, self.device)
            return self.engine.forward(None, mask, lower_states=states, item_ids=id_rows)
        if self.catalog_share is None:
            tokens, mask = batch["item_input_ids"][rows], batch["item_attention_mask"][rows]
        else:
            catalog = self.catalog_tokens()
            tokens, mask = (t.to(self.device) for t in self.collator.pad([catalog[i] for i in chosen.tolist()]))
        return self.engine.forward(tokens, mask, item_ids=id_rows)

    def loss(self, embeddings: TextEmbeddings | SequenceEmbeddings, batch: Batch) -> torch.Tensor:
        """This rank's share of the global batch's loss (model/loss.py's contract)."""
        objective = self.model.objective
        if isinstance(embeddings, SequenceEmbeddings):
            repeat = self.model.encoder.repeat_score
            return objective.next_item(embeddings.states, embeddings.next_columns, embeddings.candidates,
                                       embeddings.first, seen=embeddings.seen,
                                       repeat=None if repeat is None else repeat())
        positions = None
        if embeddings.states is not None:
            positions = (embeddings.states, *next_item_positions(batch["user_input_ids"], batch["user_attention_mask"],
                                                                 self.token_items, batch["item_ids"]))
        negatives = None
        if self.config.loss.history_negatives > 0:
            negatives = (batch["negative_ids"], batch["negative_logq"])
        return objective(embeddings.query, embeddings.item, batch["item_ids"], history_ids=batch["history_ids"],
                         logq=batch["logq"], views=embeddings.views, catalog=self.catalog_embeddings,
                         positions=positions, negatives=negatives, held_out=self.held_out)

    def shared_tokens(self, batch: Batch) -> int:
        """Prompt tokens the backbone does not compute: each text batch's common leading tokens
        are computed once (model.shared_prefix), not once per row."""
        if not (self.model.encoder.unpadded and self.model.encoder.share_prefix) or self.items_mode:
            return 0
        return sum((len(batch[key]) - 1) * shared_prefix(batch[key], batch[key.replace("input_ids", "attention_mask")])
                   for key in batch if key.endswith("input_ids"))

    def refresh_catalog(self, step: int) -> None:
        """Re-encode every item (no grad, sharded over ranks) for a softmax over the whole catalog.

        Between refreshes the catalog is up to catalog_refresh_every steps stale (model/loss.py's
        catalog_loss says why the positive is stale too)."""
        stale = self.catalog_embeddings is None or step % self.config.loss.catalog_refresh_every == 0
        # The hierarchical step encodes its candidates itself (live, the whole catalog with
        # loss.negatives=catalog) unless it reads them from the table; a stale copy would go unread.
        needed = self.catalog_table if self.items_mode else self.model.objective.needs_catalog
        if not needed or not stale:
            return
        encoder = self.model.encoder
        # Through the engine's forward, as the step's live rows (its precision; ZeRO-3 gathers the
        # weights there), from the cached lower-layer states with model.trained_layers.
        with eval_mode(encoder):
            self.catalog_embeddings = encode_sharded(encoder, self.collator, self.catalog_tokens(),
                                                     self.config.eval.batch_size, self.device, "encode catalog",
                                                     False, cache=self.state_cache,
                                                     forward=self.engine.forward).to(self.device)
