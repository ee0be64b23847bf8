"""Gradient caching (train.grad_cache_chunk; GradCache, Gao et al. 2021): the negatives of a huge
global batch at the memory of one chunk.

The step embeds its users and items in chunks of `grad_cache_chunk` rows without building a
graph, gathers them across ranks as usual, and takes the loss and its gradient with respect to
those embeddings once, over the whole global batch. Then it encodes each chunk again, with its
graph, and pushes that chunk's part of the gradient through it. The parameters get the sum over
rows the one-graph step computes; only one chunk's activations are alive at a time.

- Dropout replays identically: each chunk's RNG state is saved before its graph-free pass and
  restored for its replay. Dropout masks depend on how rows are split into calls, so with
  dropout on a cached step equals the one-graph step over the same chunks; with it off, the
  unchunked step.
- The ranks reduce gradients once per step, not once per chunk: every replay but the last keeps
  its gradients local (`Engine.deferred`: DDP's and Accelerate's no_sync, DeepSpeed stage 0's),
  and DeepSpeed ZeRO 1-3 coalesce all of them into one reduction (`Engine.accumulating`).
- No rank waits on another: the gathers' backward runs once, in the loss's gradient (and, for
  the item-sequence encoder, once more between the tower's and the items' replays, on every
  rank), and every rank runs the same number of chunks, because ZeRO-3 gathers parameters at
  each forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from model.gather import world
from model.loss import candidate_columns, distinct_items
from model.user_tower import sequence_inputs
from train.loop.engines import Engine
from train.loop.step import Batch, SequenceEmbeddings, TextEmbeddings, TrainStep

RngState = tuple[torch.Tensor, torch.Tensor | None]


def rng_state(device: torch.device) -> RngState:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Chunked:
    """One encoder call over a batch's rows, run a chunk at a time: first without a graph, then
    replayed with one. `encode(rows)` gives a tensor (or a tuple of tensors) per row of `rows`."""

    def __init__(self, encode: Callable[[slice], torch.Tensor | tuple[torch.Tensor, ...]], rows: int, chunk: int,
                 device: torch.device, chunks: int = 0) -> None:
        count = chunks or math.ceil(rows / chunk)
        size = math.ceil(rows / count)
        self.slices = [slice(min(k * size, rows), min((k + 1) * size, rows)) for k in range(count)]
        self.encode = encode
        self.device = device
        self.states: list[RngState] = []

    def run(self, rows: slice) -> tuple[torch.Tensor, ...]:
        """`encode(rows)`, cut to the rows' count. A rank with fewer rows than the agreed number of
        chunks encodes its first row in the empty ones, so its forwards (and the collectives in
        them) match its peers'."""
        out = self.encode(rows if rows.stop > rows.start else slice(0, 1))
        return tuple(o[:rows.stop - rows.start] for o in (out if isinstance(out, tuple) else (out,)))

    def without_graph(self) -> tuple[torch.Tensor, ...]:
        """Every row's outputs, as leaves that collect the loss's gradient."""
        parts = []
        for rows in self.slices:
            self.states.append(rng_state(self.device))
            with torch.no_grad():
                parts.append(self.run(rows))
        return tuple(torch.cat(outputs).requires_grad_() for outputs in zip(*parts))

    def replay(self, grads: Sequence[torch.Tensor | None], engine: Engine, final: bool,
               extra: Callable[[], torch.Tensor] | None = None) -> None:
        """Each chunk again with its graph (and its RNG state), backward with its rows of `grads`
        (one per output; None: no gradient). `final`: this call's last chunk is the step's last
        backward, the one that synchronises (and adds `extra()`, the loss's own parameters)."""
        after = rng_state(self.device)
        for index, rows in enumerate(self.slices):
            last = final and index == len(self.slices) - 1
            set_rng_state(self.states[index], self.device)
            with engine.deferred(last):
                outputs = self.run(rows)
                surrogate = outputs[0].sum() * 0  # keeps the graph when no output has a gradient
                for output, grad in zip(outputs, grads):
                    if grad is not None:
                        surrogate = surrogate + (output * grad[rows]).sum()
                if last and extra is not None:
                    surrogate = surrogate + extra()
                engine.backward(surrogate)
        set_rng_state(after, self.device)


class CachedStep(TrainStep):
    """TrainStep with gradient caching: the same loss and gradients, one chunk's memory."""

    @property
    def chunk(self) -> int:
        return self.config.train.grad_cache_chunk

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        if self.items_mode:
            return self.item_sequences(batch)
        return self.text(batch)

    def text(self, batch: Batch) -> torch.Tensor:
        """model.user_encoder=text: users, items (and CL4SRec's views) chunk by chunk."""
        objective = self.model.objective
        every_position = objective.history_positions > 0

        def prompts(prefix: str, user: bool, every: bool = False) -> Chunked:
            ids, mask = batch[f"{prefix}_input_ids"], batch[f"{prefix}_attention_mask"]
            return Chunked(lambda rows: self.engine.forward(ids[rows], mask[rows], every_position=every, user=user),
                           len(ids), self.chunk, self.device)

        calls = [prompts("user", True, every_position), prompts("item", False)]
        if objective.user_cl_weight > 0:
            calls += [prompts("view_a", True), prompts("view_b", True)]
        outputs = [call.without_graph() for call in calls]
        (query, *states), (item,) = outputs[:2]
        views = (outputs[2][0], outputs[3][0]) if len(outputs) > 2 else None
        loss = self.loss(TextEmbeddings(query, item, states[0] if states else None, views), batch)
        if self.nonfinite_anywhere(loss):
            return loss
        grads, extra = self.loss_gradients(loss, [t for out in outputs for t in out])
        with self.engine.accumulating():
            for index, (call, out) in enumerate(zip(calls, outputs)):
                mine, grads = grads[:len(out)], grads[len(out):]
                call.replay(mine, self.engine, final=index == len(calls) - 1, extra=extra)
        return loss

    def item_sequences(self, batch: Batch) -> torch.Tensor:
        """model.user_encoder=items: the items, then the user tower over them, chunk by chunk.

        The tower reads a detached copy of the gathered candidates, so its replays collect their
        gradient there; it then goes back through the gather once, to the rank that encoded
        each item, and the items' replays take it from there."""
        ids = self.local_item_ids(batch)
        items = Chunked(lambda rows: self.encode_items(batch, ids, rows), len(ids), self.chunk, self.device,
                        self.agreed_chunks(len(ids)))
        (local,) = items.without_graph()
        read, candidates, candidate_ids, first = self.candidates(*distinct_items(local, ids))
        tower_inputs = read.detach().requires_grad_()
        sequence, mask, next_ids = sequence_inputs(batch["history_ids"], batch["item_ids"])
        columns = candidate_columns(sequence, candidate_ids, first)
        users = Chunked(lambda rows: self.engine.forward(None, mask[rows], every_position=True, user=True,
                                                         item_sequence=tower_inputs[columns[rows]])[1],
                        len(sequence), self.chunk, self.device)
        (states,) = users.without_graph()
        known = next_ids >= 0
        # The candidates are what the tower reads (their gradient joins the tower's below), or
        # the table, which takes none (loss.catalog_table).
        embeddings = SequenceEmbeddings(states[known], candidate_columns(next_ids[known], candidate_ids, first),
                                        candidates if self.catalog_table else tower_inputs, first,
                                        self.seen(columns, mask, known))
        loss = self.loss(embeddings, batch)
        if self.nonfinite_anywhere(loss):
            return loss
        (states_grad, candidates_grad), extra = self.loss_gradients(loss, [states, tower_inputs])
        with self.engine.accumulating():
            users.replay([states_grad], self.engine, final=False)
            assert tower_inputs.grad is not None
            if candidates_grad is not None:
                tower_inputs.grad += candidates_grad
            (local_grad,) = torch.autograd.grad(read, local, tower_inputs.grad)
            items.replay([local_grad], self.engine, final=True, extra=extra)
        return loss

    def loss_gradients(self, loss: torch.Tensor, leaves: list[torch.Tensor]
                       ) -> tuple[list[torch.Tensor | None], Callable[[], torch.Tensor]]:
        """The loss's gradient with respect to the embeddings (`leaves`), and `extra`: the term
        the last backward adds for the loss's own parameters (a learned temperature, the repeat
        score), whose gradient is computed here too. DDP's reducer also waits for every trainable
        parameter in that backward, so there it touches each of them (with a zero)."""
        repeat = self.model.encoder.repeat_score
        own = [*self.model.objective.parameters(), *(() if repeat is None else repeat.parameters())]
        params = [p for p in own if p.requires_grad]
        grads = torch.autograd.grad(loss, [*leaves, *params], allow_unused=True)
        leaf_grads: list[torch.Tensor | None] = list(grads[:len(leaves)])
        param_grads = grads[len(leaves):]

        def extra() -> torch.Tensor:
            total = loss.new_zeros(())
            for param, grad in zip(params, param_grads):
                if grad is not None:
                    total = total + (param * grad).sum()
            if self.engine.last_backward_reaches_all:
                for param in self.engine.trainable(self.model):
                    total = total + (param * 0).sum()
            return total

        return leaf_grads, extra

    def agreed_chunks(self, rows: int) -> int:
        """The number of chunks every rank runs for `rows` local rows (ranks hold different
        numbers of distinct items): the most any rank needs."""
        count = torch.tensor([math.ceil(rows / self.chunk)], device=self.device)
        if world(None)[1] > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count)
