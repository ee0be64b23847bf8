"""Config validation: schema checks, dotted overrides, YAML recipe errors and the --help texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.cli import main
from train.config.schema import Config
from train.config.io import load_config, parse_override
from train.errors import UserError


def _error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(UserError) as caught:
        load_config(path, overrides)
    return str(caught.value)


# ------------------------------------------------------------------------- defaults

def test_defaults_build_without_a_file() -> None:
    config = load_config(None, [])
    assert isinstance(config, Config)
    assert config.engine == "auto"
    assert config.train.max_steps == 100
    assert config.train.batch_size == 32
    assert config.data.format == "synthetic"
    assert config.eval.k == [10]


def test_overrides_set_typed_values() -> None:
    config = load_config(None, ["train.max_steps=7", "train.lr=0.5", "seed=3", "model.lora.target_modules=[q_proj]",
                                "eval.k=[1, 5]", "loss.mask_false_negatives=false", "output_dir=runs/x"])
    assert config.train.max_steps == 7
    assert config.train.lr == 0.5
    assert config.seed == 3
    assert config.model.lora.target_modules == ["q_proj"]
    assert config.eval.k == [1, 5]
    assert config.loss.mask_false_negatives is False
    assert config.output_dir == "runs/x"


def test_int_is_accepted_for_a_float_and_becomes_a_float() -> None:
    config = load_config(None, ["train.lr=1"])
    assert config.train.lr == 1.0
    assert type(config.train.lr) is float


def test_exponent_notation_without_a_dot_is_a_float() -> None:
    # YAML 1.1 reads `1e-3` as a string; the schema must still take it as the float it means.
    config = load_config(None, ["train.lr=1e-3", "loss.temperature=5E-2"])
    assert config.train.lr == 0.001
    assert config.loss.temperature == 0.05


# ---------------------------------------------------------------------- unknown keys

def test_unknown_top_level_key_is_named() -> None:
    message = _error(["max_step=10"])
    assert message.startswith("max_step: unknown key")
    assert "output_dir" in message  # the known keys are listed


def test_unknown_nested_key_is_named_with_its_section() -> None:
    message = _error(["train.max_step=10"])
    assert message.startswith("train.max_step: unknown key")
    assert "max_steps" in message


def test_unknown_deeply_nested_key_is_named() -> None:
    message = _error(["data.columns.usr=who"])
    assert message.startswith("data.columns.usr: unknown key (known: item, rating, timestamp, user)")


def test_unknown_key_in_yaml_file_is_named(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 5\n  learning_rate: 0.1\n")
    assert _error([], recipe).startswith("train.learning_rate: unknown key")


# ----------------------------------------------------------------------- wrong types

def test_text_for_an_int_is_rejected() -> None:
    assert _error(["train.max_steps=abc"]) == "train.max_steps: expected int, got 'abc'"


def test_bool_for_an_int_is_rejected() -> None:
    assert _error(["train.max_steps=true"]) == "train.max_steps: expected int, got True"


def test_float_for_an_int_is_rejected() -> None:
    assert _error(["train.batch_size=2.5"]) == "train.batch_size: expected int, got 2.5"


def test_text_for_a_float_is_rejected() -> None:
    assert _error(["train.lr=fast"]) == "train.lr: expected float, got 'fast'"


def test_scalar_for_a_list_is_rejected() -> None:
    assert _error(["eval.k=10"]).startswith("eval.k: expected a list of int, got 10")


def test_wrong_type_inside_a_list_names_the_element() -> None:
    assert _error(["eval.k=[5, x]"]) == "eval.k[1]: expected int, got 'x'"


def test_scalar_for_a_section_is_rejected() -> None:
    assert _error(["train=5"]) == "train: expected a mapping, got 5"


def test_override_below_a_scalar_is_rejected() -> None:
    assert _error(["train=5", "train.max_steps=3"]) == "train.max_steps: train is not a section"


# ------------------------------------------------------------------ impossible values

@pytest.mark.parametrize(("override", "prefix"), [
    ("train.batch_size=1", "train.batch_size: must be >= 2"),
    ("train.max_steps=0", "train.max_steps: must be >= 1"),
    ("train.lr=0", "train.lr: must be > 0"),
    ("eval.k=[0]", "eval.k: must be a non-empty list of ints >= 1"),
    ("eval.k=[]", "eval.k: must be a non-empty list of ints >= 1"),
    ("eval.split=train", "eval.split: must be one of valid, test (got 'train')"),
    ("data.format=xml", "data.format: must be one of synthetic, csv, tsv, parquet, jsonl, atomic, hf, movielens, amazon, unisrec (got 'xml')"),
    ("data.unknown_items=keep", "data.unknown_items: must be one of drop, fail (got 'keep')"),
    ("data.max_history=0", "data.max_history: must be >= 1"),
    ("data.shard_size=0", "data.shard_size: must be >= 1"),
    ("data.catalog_columns.text=[]", "data.catalog_columns.text: name at least one text field"),
    ("engine=horovod", "engine: must be one of auto, plain, ddp, accelerate, deepspeed (got 'horovod')"),
    ("train.precision=fp8", "train.precision: must be one of fp32, bf16, fp16 (got 'fp8')"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: must be -1 (from the JSON) or 0-3"),
    ("device=tpu", "device: must be one of auto, cpu, cuda (got 'tpu')"),
    ("model.pooling=max", "model.pooling: must be one of last, mean (got 'max')"),
    ("model.lora.dropout=1.0", "model.lora.dropout: must be in [0, 1)"),
    ("loss.temperature=0", "loss.temperature: must be > 0"),
    ("loss.negatives=all", "loss.negatives: must be one of batch, catalog, batch+catalog (got 'all')"),
    ("loss.catalog_refresh_every=0", "loss.catalog_refresh_every: must be >= 1"),
    ("loss.catalog_table=true", "loss.catalog_table: applies to model.user_encoder=items"),
    (["loss.catalog_table=true", "model.user_encoder=items"], "loss.catalog_table: needs loss.negatives=catalog"),
    ("model.id_dropout=1.0", "model.id_dropout: must be in [0, 1)"),
    ("model.id_dropout=0.2", "model.id_dropout: needs model.id_embeddings"),
    (["model.user_encoder=items", "model.id_embeddings=true", "model.id_dropout=0.2", "loss.negatives=catalog",
      "loss.catalog_table=true"], "model.id_dropout: not with loss.catalog_table"),
    ("loss.history_negatives=-1", "loss.history_negatives: must be >= 0"),
    ("loss.uniformity=-0.5", "loss.uniformity: must be >= 0"),
    ("model.user_projection=true", "model.user_projection: needs model.projection_dim > 0"),
    ("loss.history_negatives=2", "loss.history_negatives: needs loss.mask_history=false"),
    (["loss.history_negatives=2", "loss.mask_history=false", "loss.kind=symmetric"],
     "loss.history_negatives: needs loss.kind=infonce with in-batch negatives"),
    ("eval.best_metric=with_history/ndcg@5", "eval.best_metric: must be [with_history/]recall|ndcg|mrr|hr@K"),
    ("prompt.user_template=no history", "prompt.user_template: must contain {history}"),
    ("data.synthetic.max_length=2", "data.synthetic.max_length: must be >= min_length"),
])
def test_impossible_values_are_rejected_with_the_key(override: str | list[str], prefix: str) -> None:
    assert _error(override if isinstance(override, list) else [override]).startswith(prefix)


def test_file_formats_require_both_input_files() -> None:
    assert _error(["data.format=csv"]) == "data.interactions: required when data.format=csv"
    assert _error(["data.format=csv", "data.interactions=x.csv"]) == "data.catalog: required when data.format=csv"


def test_empty_mapping_keeps_the_default_architecture() -> None:
    config = load_config(None, ["model.architecture={}"])
    assert config.model.architecture["model_type"] == "llama"
    assert config.model.architecture["hidden_size"] == 64


# --------------------------------------------------------------------- mapping merge

def test_mapping_override_updates_the_default_mapping() -> None:
    config = load_config(None, ["model.architecture.hidden_size=32"])
    assert config.model.architecture == {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024}


def test_mapping_in_yaml_updates_the_default_mapping(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  architecture:\n    num_hidden_layers: 1\n")
    architecture = load_config(recipe).model.architecture
    assert architecture["num_hidden_layers"] == 1
    assert architecture["model_type"] == "llama"
    assert architecture["hidden_size"] == 64


def test_mapping_merge_does_not_leak_into_later_configs() -> None:
    load_config(None, ["model.architecture.hidden_size=32"])
    assert load_config(None, []).model.architecture["hidden_size"] == 64


# ------------------------------------------------------------------------ YAML files

def test_yaml_values_and_overrides_combine(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 4\ntrain:\n  max_steps: 5\n  batch_size: 8\n")
    config = load_config(recipe, ["train.max_steps=9"])
    assert (config.seed, config.train.max_steps, config.train.batch_size) == (4, 9, 8)


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing but a comment\n")
    assert load_config(recipe) == load_config(None)


def test_missing_yaml_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert _error([], missing) == f"{missing}: config file not found"


def test_yaml_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- train\n- eval\n")
    assert _error([], recipe) == f"{recipe}: the top level must be a mapping of config keys"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("seed: 1\ntrain:\n  max_steps: 10\n  lr: [0.1, 0.2\nloss:\n  temperature: 0.1\n")
    message = _error([], recipe)
    assert message.startswith(f"{recipe} line 5: not valid YAML")


def test_invalid_yaml_indentation_names_the_line(tmp_path: Path) -> None:
    recipe = tmp_path / "indent.yaml"
    recipe.write_text("train:\n  max_steps: 10\n bad: 1\n")
    assert _error([], recipe).startswith(f"{recipe} line 3: not valid YAML")


# ------------------------------------------------------------------ override parsing

def test_override_value_is_read_as_yaml() -> None:
    assert parse_override("a.b=[1,2]") == ("a.b", [1, 2])
    assert parse_override("a.b=[x, y]") == ("a.b", ["x", "y"])
    assert parse_override("a=3") == ("a", 3)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=hello world") == ("a", "hello world")
    assert parse_override("a={x: 1}") == ("a", {"x": 1})
    assert parse_override("a=b=c") == ("a", "b=c")  # only the first = splits


def test_override_with_empty_value_is_an_empty_string() -> None:
    assert parse_override("data.shards=") == ("data.shards", "")
    assert load_config(None, ["data.shards="]).data.shards == ""


@pytest.mark.parametrize("text", ["train.max_steps", "=5", "train..max_steps=5", ".seed=1", "seed.=1"])
def test_malformed_overrides_are_rejected(text: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_override(text)
    assert str(caught.value) == f"{text!r}: overrides are dotted keys, e.g. train.max_steps=10"


def test_override_with_unreadable_value_names_the_key() -> None:
    message = _error(["train.max_steps=[1, 2"])
    assert message.startswith("train.max_steps: cannot read value '[1, 2'")


# ---------------------------------------------------------------------------- --help

def test_top_level_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rectrain")
    for command in ("prepare", "train", "eval"):
        assert command in out


@pytest.mark.parametrize("command", ["prepare", "train", "eval"])
def test_subcommand_help_lists_every_config_key(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rectrain {command}")
    assert "config keys (default: meaning):" in out
    assert "  train.max_steps = 100\n      optimizer steps" in out
    for key in ("data.format = 'synthetic'", "data.columns.user = 'user_id'", "model.lora.r = 8",
                "eval.k = [10]", "engine = 'auto'"):
        assert f"  {key}\n" in out


def test_missing_command_exits_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "usage: rectrain" in capsys.readouterr().err


def test_cli_reports_a_config_error_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 1\n")
    assert main(["train", str(recipe), "train.batch_size=1"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "rectrain: error: train.batch_size: must be >= 2 (in-batch negatives need a batch)\n"
    assert captured.out == ""


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_recipe_loads_and_says_how_to_run_it(recipe: Path) -> None:
    assert recipe.read_text().startswith("# "), "a recipe starts with a comment giving its launch command"
    config = load_config(recipe, [])
    assert config.output_dir.startswith("runs/")
