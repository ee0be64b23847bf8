"""The hierarchical encoder (model.user_encoder=items): sequences for the user tower, the batch's
distinct items, the batch the collator builds, a train step, and the config's checks.
(Its loss at 1, 2 and 4 ranks is proven in test_loss_distributed.py, engines in test_engines.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.loss import candidate_columns, distinct_items, next_item_loss
from model.user_tower import seen_so_far, sequence_inputs
from train.config.io import load_config
from train.errors import UserError


def test_sequence_inputs_left_pad_and_shift_to_the_next_item() -> None:
    history = torch.tensor([[4, 7, 9], [5, -1, -1], [8, 2, -1]])
    ids, mask, next_ids = sequence_inputs(history, torch.tensor([1, 6, 3]))
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert (ids * mask).tolist() == [[4, 7, 9], [0, 0, 5], [0, 8, 2]]
    # after each item, the next; after the newest, the target; padding predicts nothing
    assert next_ids.tolist() == [[7, 9, 1], [-1, -1, 6], [-1, 2, 3]]


def test_distinct_items_mark_one_row_per_id_and_columns_find_it() -> None:
    ids = torch.tensor([9, 3, 3, -1, 7, 9])
    embeddings = torch.randn(6, 4, requires_grad=True)
    candidates, candidate_ids, first = distinct_items(embeddings, ids)
    assert first.tolist() == [True, True, False, False, True, False]
    columns = candidate_columns(torch.tensor([[7, 3], [9, 9]]), candidate_ids, first)
    assert columns.tolist() == [[4, 1], [0, 0]]
    # a duplicate row takes no part in the softmax: its embedding gets no gradient
    states = torch.randn(3, 4)
    next_item_loss(states, torch.tensor([1, 4, 0]), candidates, first, temperature=0.5).backward()
    assert embeddings.grad is not None
    assert embeddings.grad[[2, 3, 5]].abs().sum() == 0 and embeddings.grad[[0, 1, 4]].abs().sum() > 0


def test_next_item_loss_is_cross_entropy_over_the_distinct_items() -> None:
    candidates = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    first = torch.tensor([True, True, False, True, True])  # row 2 repeats row 1
    states = torch.nn.functional.normalize(torch.randn(2, 3), dim=-1)
    loss = next_item_loss(states, torch.tensor([3, 1]), candidates, first, temperature=0.1)
    expected = 0.0
    for state, positive in zip(states, (3, 1)):
        logits = torch.stack([state @ candidates[j] / 0.1 for j in (0, 1, 3, 4)])
        expected += float(torch.logsumexp(logits, 0) - state @ candidates[positive] / 0.1)
    assert float(loss) == pytest.approx(expected / 2, abs=1e-5)


def test_seen_so_far_pairs_each_known_position_with_what_it_has_read() -> None:
    history = torch.tensor([[4, 7, 4], [5, -1, -1], [8, 0, -1]])  # item 4 twice; item 0 is a real item
    ids, mask, next_ids = sequence_inputs(history, torch.tensor([1, 6, 3]))
    known = next_ids >= 0
    positions, columns = seen_so_far(ids, mask, known)  # candidate columns are the ids themselves here
    pairs = sorted(zip(positions.tolist(), columns.tolist()))
    assert len(pairs) == len(set(pairs))  # item 4, read twice, is paired once with each position
    expected = []
    for index, (row, position) in enumerate(known.nonzero().tolist()):
        read = {int(ids[row, t]) for t in range(position + 1) if mask[row, t]}
        expected += [(index, item) for item in read]
    assert pairs == sorted(expected)
    # row 1 is left-padded with id 0 at mask 0: its padding pairs with nothing (item 0 unseen there)
    row_1 = known[:1].sum()  # row 1's one known position follows row 0's
    assert (int(row_1), 0) not in pairs and (int(row_1), 5) in pairs


def test_the_repeat_score_is_added_to_the_seen_candidates_and_learns_from_them() -> None:
    candidates = torch.randn(5, 3)
    first = torch.ones(5, dtype=torch.bool)
    states = torch.randn(2, 3)
    seen = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    repeat = torch.tensor(-0.7, requires_grad=True)
    loss = next_item_loss(states, torch.tensor([3, 4]), candidates, first, temperature=0.5,
                          seen=seen.nonzero(as_tuple=True), repeat=repeat)
    logits = (states @ candidates.T + -0.7 * seen) / 0.5
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor([3, 4]))), abs=1e-6)
    loss.backward()
    # d loss / d repeat = mean over rows of (softmax mass on the seen - 1 if the positive is seen) / tau
    probabilities = logits.softmax(dim=1)
    expected = ((probabilities * seen).sum(dim=1) - torch.tensor([0.0, 1.0])).mean() / 0.5
    assert repeat.grad is not None and float(repeat.grad) == pytest.approx(float(expected), abs=1e-6)


def tiny_items(tmp: Path, layers: int = 1) -> list[str]:
    """A tiny hierarchical-encoder run on 40 synthetic users (`layers` backbone layers)."""
    return [
        f"output_dir={tmp}/run", f"data.dir={tmp}/data", "device=cpu", "resume=never", "data.num_workers=0",
        "data.synthetic={num_users: 40, num_items: 30, num_categories: 3, num_brands: 3, min_length: 4, max_length: 7}",
        "model.tokenizer_vocab_size=200", "model.projection_dim=8", "model.user_encoder=items",
        "model.user_tower={model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 2}",
        f"model.architecture={{hidden_size: 16, intermediate_size: 32, num_hidden_layers: {layers}, "
        "num_attention_heads: 2, num_key_value_heads: 2}", "prompt.max_item_tokens=8", "train.batch_size=6",
        "train.max_steps=2", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    tmp = tmp_path_factory.mktemp("tower")
    config = load_config(None, tiny_items(tmp))
    trainer = Trainer(config, from_environment("cpu"))
    trainer.setup()
    yield trainer
    trainer.close()


def test_the_batch_holds_each_distinct_item_once_and_a_step_trains_the_tower(trainer) -> None:  # type: ignore[no-untyped-def]
    from train.data.stream import read_shard

    shard = Path(trainer.config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
    samples = list(read_shard(str(shard)))[:6]
    batch = trainer.collator(samples)
    assert "user_input_ids" not in batch  # users are never rendered as text here
    expected = sorted({s["item"] for s in samples} | {i for s in samples for i in s["history"]})
    assert batch["batch_item_ids"].tolist() == expected
    assert batch["item_input_ids"].shape[0] == len(expected)
    one = trainer.collator.item_tokens([expected[2]])[0]
    row = batch["item_input_ids"][2][batch["item_attention_mask"][2].bool()]
    assert row.tolist() == one
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    loss = float(trainer.train_step(batch).loss)
    assert loss == loss and loss > 0
    changed = {n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.user_tower.") for n in changed)
    assert any("lora_B" in n for n in changed)  # the items' encoder learns through the tower's loss
    assert not trainer.encoder.user_tower.backbone.get_input_embeddings().weight.requires_grad


def test_evaluation_ranks_users_from_the_tower(trainer) -> None:  # type: ignore[no-untyped-def]
    metrics = trainer.evaluate("valid", show_progress=False)
    assert metrics["users"] == 40 and 0.0 <= metrics["ndcg@10"] <= 1.0
    assert metrics["with_history"]["ndcg@10"] <= metrics["ndcg@10"] + 1e-9


@pytest.mark.parametrize("override, key", [
    ("loss.logq=true", "loss.logq"),
    ("loss.kind=symmetric", "loss.kind"),
    ("loss.history_positions=1", "loss.history_positions"),
    ("model.user_tower.model_type=", "model.user_tower.model_type"),
    ("model.user_tower_dropout=1.5", "model.user_tower_dropout"),
    ("model.user_encoder=graph", "model.user_encoder"),
])
def test_options_of_the_text_encoder_are_refused_with_items(override: str, key: str) -> None:
    with pytest.raises(UserError, match=f"^{key}"):
        load_config(None, ["model.user_encoder=items", "model.item_tokens=true", override])


def test_raw_inner_products_keep_the_lengths() -> None:
    from train.modeling.backbone import build_encoder

    ids, mask = torch.randint(3, 60, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    lengths = {}
    for normalize in (True, False):
        config = load_config(None, ["model.architecture={model_type: llama, hidden_size: 16, intermediate_size: 32, "
                                    "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
                                    "model.projection_dim=8", "model.user_encoder=items", f"model.normalize={normalize}"])
        encoder = build_encoder(config.model, 64, 0, seed=0).eval()
        items = encoder(ids, mask)
        users = encoder(None, mask[:, :3], item_sequence=items[:3].unsqueeze(0).expand(4, 3, 8))
        lengths[normalize] = torch.cat([items, users]).norm(dim=-1)
    assert torch.allclose(lengths[True], torch.ones(8))
    assert not torch.allclose(lengths[False], torch.ones(8), atol=0.05)


def test_id_embeddings_start_at_the_text_and_train_only_the_items_seen(tmp_path: Path) -> None:
    """model.id_embeddings: at first an item is its text embedding exactly; a step moves the id
    vectors of the batch's items and leaves every other item's at zero (a cold item keeps its text)."""
    from train.data.stream import read_shard
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    overrides = [*tiny_items(tmp_path, layers=2), "model.trained_layers=1", "train.batch_size=3"]
    with_ids = Trainer(load_config(None, [*overrides, "model.id_embeddings=true"]), from_environment("cpu"))
    without = Trainer(load_config(None, [*overrides, f"output_dir={tmp_path}/run-without"]), from_environment("cpu"))
    try:
        with_ids.setup()
        without.setup()
        table = with_ids.encoder.id_embeddings
        assert table is not None and without.encoder.id_embeddings is None and table.weight.shape == (30, 8)
        metrics, reference = (t.evaluate("valid", show_progress=False) for t in (with_ids, without))
        assert metrics["ndcg@10"] == reference["ndcg@10"] and metrics["mrr@10"] == reference["mrr@10"]
        shard = Path(with_ids.config.data.dir) / with_ids.inputs.manifest["shards"][0]["name"]
        batch = with_ids.collator(list(read_shard(str(shard)))[:3])
        with_ids.train_step(batch)
        moved = set(table.weight.detach().abs().sum(dim=1).nonzero().flatten().tolist())
        assert moved == set(batch["batch_item_ids"].tolist())
    finally:
        with_ids.close()
        without.close()


def test_id_dropout_leaves_out_the_same_items_everywhere_in_a_step(tmp_path: Path) -> None:
    """model.id_dropout: a step leaves out the id vectors of a seeded share of the catalog, drawn
    anew each step: those items get no id gradient, and the step's loss is exactly the loss of the
    same model with their id rows at zero (histories and candidates alike: a cold item's view)."""
    from train.data.stream import read_shard
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    overrides = [*tiny_items(tmp_path, layers=2), "model.trained_layers=0", "model.id_embeddings=true",
                 "model.user_tower_dropout=0", "loss.negatives=catalog", "train.lr=0.1",
                 "model.user_tower={model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
                 "num_attention_heads: 2, num_key_value_heads: 2, attention_dropout: 0.0}"]
    dropping = Trainer(load_config(None, [*overrides, "model.id_dropout=0.5"]), from_environment("cpu"))
    plain = Trainer(load_config(None, [*overrides, f"output_dir={tmp_path}/run-plain"]), from_environment("cpu"))
    try:
        dropping.setup()
        plain.setup()
        stepper = dropping.stepper
        first, second = stepper.drop_ids(0), stepper.drop_ids(1)
        assert first is not None and torch.equal(first, stepper.drop_ids(0)) and not torch.equal(first, second)
        assert 5 < int(first.sum()) < 25  # about half of the 30 items
        shard = Path(dropping.config.data.dir) / dropping.inputs.manifest["shards"][0]["name"]
        samples = list(read_shard(str(shard)))
        batch = dropping.collator(samples[:6])
        dropping.train_step(batch)
        table = dropping.encoder.id_embeddings
        assert table is not None
        # Every item is a candidate (loss.negatives=catalog): all but those left out moved.
        moved = set(table.weight.detach().abs().sum(dim=1).nonzero().flatten().tolist())
        assert moved == set(range(30)) - set(first.nonzero().flatten().tolist())
        # Step 1, with its own draw, against the plain model (every id vector) at the same weights
        # with that draw's rows zeroed.
        plain.model.load_state_dict(dropping.model.state_dict())
        plain_table = plain.encoder.id_embeddings
        assert plain_table is not None
        batch = dropping.collator(samples[6:12])

        def plain_loss() -> float:
            with torch.no_grad():
                return float(plain.stepper.loss(plain.stepper.embed(batch), batch))

        every_id = plain_loss()
        with torch.no_grad():
            plain_table.weight[second] = 0
        assert float(dropping.train_step(batch).loss) == pytest.approx(plain_loss(), abs=1e-6)
        assert every_id != pytest.approx(plain_loss(), abs=1e-4)  # the rows left out mattered
    finally:
        dropping.close()
        plain.close()


def test_catalog_candidates_leave_out_the_cold_items(trainer) -> None:  # type: ignore[no-untyped-def]
    """data.cold_items are held out of training entirely: with loss.negatives=catalog every
    other item is a candidate, none of the held-out ones, and each column still names its item."""
    from train.data.layout import cold_items
    from train.data.stream import read_shard
    from train.loop.step import TrainStep

    config = trainer.config
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, negatives="catalog"),
                                 data=dataclasses.replace(config.data, cold_items=0.2))
    cold = cold_items(len(trainer.collator.catalog), 0.2, config.seed)
    assert cold is not None
    warm = [int(i) for i in (~cold).nonzero()[0]]
    shard = Path(config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
    samples = [s for s in read_shard(str(shard)) if not cold[[s["item"], *s["history"]]].any()][:6]
    batch = trainer.collator(samples)
    stepper = TrainStep(config, trainer.model, trainer.engine, trainer.collator, trainer.inputs.token_items,
                        torch.device("cpu"), 1, trainer.evaluator.catalog_tokens)
    embedded = stepper.embed(batch)
    assert stepper.local_item_ids(batch).tolist() == warm and embedded.candidates.shape[0] == len(warm)
    _, _, next_ids = sequence_inputs(batch["history_ids"], batch["item_ids"])
    assert [warm[column] for column in embedded.next_columns.tolist()] == next_ids[next_ids >= 0].tolist()


def test_catalog_candidates_are_every_item_encoded_live(trainer) -> None:  # type: ignore[no-untyped-def]
    """loss.negatives=catalog with items: the step's candidates are the whole catalog, each
    position's column the row of its next item, and the rows carry gradients (encoded live)."""
    from train.data.stream import read_shard

    shard = Path(trainer.config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
    batch = trainer.collator(list(read_shard(str(shard)))[:6])
    from train.loop.step import TrainStep

    config = trainer.config
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, negatives="catalog"))
    stepper = TrainStep(config, trainer.model, trainer.engine, trainer.collator, trainer.inputs.token_items,
                        torch.device("cpu"), 1, trainer.evaluator.catalog_tokens)
    embedded = stepper.embed(batch)
    assert embedded.candidates.shape[0] == len(trainer.collator.catalog) and bool(embedded.first.all())
    assert embedded.candidates.requires_grad
    _, _, next_ids = sequence_inputs(batch["history_ids"], batch["item_ids"])
    # the candidates' rows are the catalog in order, so a column is its item's id
    assert embedded.next_columns.tolist() == next_ids[next_ids >= 0].tolist()


def test_the_catalog_table_is_the_live_catalog_with_the_gradient_through_the_users(trainer) -> None:  # type: ignore[no-untyped-def]
    """loss.catalog_table: refreshed with the current weights, the table gives the live catalog's
    loss, and the gradient the live catalog gives through the users' side alone (the candidates
    detached, what the tower reads live); between refreshes (every catalog_refresh_every steps)
    the tower reads the batch's items fresh and the candidates are as the last refresh left them."""
    from train.data.stream import read_shard
    from train.evaluation.encode import eval_mode
    from train.loop.step import TrainStep

    shard = Path(trainer.config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
    batch = trainer.collator(list(read_shard(str(shard)))[:6])
    catalog = dataclasses.replace(trainer.config.loss, negatives="catalog", catalog_refresh_every=3)
    live, table = (TrainStep(dataclasses.replace(trainer.config, loss=dataclasses.replace(catalog, catalog_table=flag)),
                             trainer.model, trainer.engine, trainer.collator, trainer.inputs.token_items,
                             torch.device("cpu"), 1, trainer.evaluator.catalog_tokens) for flag in (False, True))
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def loss_and_gradients(stepper: TrainStep, candidates_detached: bool) -> tuple[float, list[torch.Tensor]]:
        embedded = stepper.embed(batch)
        if candidates_detached:
            embedded = dataclasses.replace(embedded, candidates=embedded.candidates.detach())
        loss = stepper.loss(embedded, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss.detach()), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    with eval_mode(trainer.model):  # no dropout: the table is encoded without it
        table.refresh_catalog(0)
        assert table.local_item_ids(batch).tolist() == batch["batch_item_ids"].tolist()  # encodes the batch only
        got, got_grads = loss_and_gradients(table, False)
        whole, whole_grads = loss_and_gradients(live, False)
        ref, ref_grads = loss_and_gradients(live, True)
    assert got == pytest.approx(ref, abs=1e-5) and ref == whole
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(ref_grads, whole_grads)), \
        "the candidates must carry some gradient in the live catalog"
    assert any(float(g.abs().max()) > 1e-4 for g in got_grads)
    for param, grad, expected in zip(params, got_grads, ref_grads):
        assert torch.allclose(grad, expected, atol=1e-5), (param.shape, float((grad - expected).abs().max()))
    # Stale between refreshes: steps 1 and 2 score against the table of step 0, the tower reads
    # the batch's items as they are now; step 3 re-encodes the table.
    first = table.catalog_embeddings
    assert first is not None
    for step in (1, 2):
        table(batch, step)
        assert table.catalog_embeddings is first
    with eval_mode(trainer.model), torch.no_grad():
        ids = batch["batch_item_ids"]
        read, candidates, _, _ = table.candidates(table.encode_items(batch, ids), ids, torch.ones_like(ids, dtype=torch.bool))
        fresh = live.embed(batch).candidates
    assert torch.equal(candidates, first) and not torch.allclose(fresh[ids], first[ids])
    assert torch.allclose(read[ids], fresh[ids], atol=1e-6)
    table(batch, 3)
    assert table.catalog_embeddings is not None and not torch.allclose(table.catalog_embeddings, first)


def test_the_repeat_score_trains_is_checkpointed_and_ranked(tmp_path: Path) -> None:
    """model.repeat_score: a step moves it (from 0); a checkpoint keeps it; evaluation ranks with
    it and reports the inner products alone beside ("embeddings"), which it does not touch."""
    from train.data.stream import read_shard
    from train.distributed import from_environment
    from train.loop.recipe import Trainer
    from train.modeling import checkpoint

    overrides = [*tiny_items(tmp_path), "train.lr=0.05", "model.repeat_score=true"]
    trainer = Trainer(load_config(None, overrides), from_environment("cpu"))
    plain = Trainer(load_config(None, [*overrides, f"output_dir={tmp_path}/plain", "model.repeat_score=false"]),
                    from_environment("cpu"))
    try:
        trainer.setup()
        plain.setup()
        score = trainer.encoder.repeat_score
        assert score is not None and float(score()) == 0.0 and plain.encoder.repeat_score is None
        shard = Path(trainer.config.data.dir) / trainer.inputs.manifest["shards"][0]["name"]
        trainer.train_step(trainer.collator(list(read_shard(str(shard)))[:6]))
        trained = float(score())
        assert trained != 0.0
        checkpoint.write(tmp_path, trainer.encoder, {})
        with torch.no_grad():
            score.weight.fill_(-3.0)
        checkpoint.load_weights(tmp_path, trainer.encoder)
        assert float(score()) == trained
        with torch.no_grad():
            score.weight.fill_(-100.0)  # past every inner product: the window's items rank last
        metrics = trainer.evaluate("valid", show_progress=False)
        plain.encoder.load_state_dict(trainer.encoder.state_dict(), strict=False)  # the same embeddings
        reference = plain.evaluate("valid", show_progress=False)
        def figures(block: dict) -> dict:
            return {key: value for key, value in block.items() if "@" in key}
        assert figures(metrics["embeddings"]["with_history"]) == figures(reference["with_history"])
        assert figures(metrics["with_history"]) != figures(reference["with_history"])
        assert figures(metrics["embeddings"]) == figures(metrics)  # history excluded, the window's score is moot
    finally:
        trainer.close()
        plain.close()


def test_the_repeat_score_needs_the_user_tower() -> None:
    with pytest.raises(UserError, match="^model.repeat_score: needs model.user_encoder=items"):
        load_config(None, ["model.repeat_score=true"])
