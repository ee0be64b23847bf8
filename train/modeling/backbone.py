"""Building the encoder: a transformers backbone (pretrained or random) with peft LoRA adapters."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel

from model import fused_lora, fused_norm
from model.encoder import RecEncoder
from model.unpadded import ATTENTION
from model.user_tower import UserTower
from train.config.schema import ModelConfig
from train.errors import UserError
from train.modeling import weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_of(config: ModelConfig) -> str:
    """The backbone's attention: model.unpadded swaps sdpa for the packed-batch kernel (plain sdpa
    for padded batches, so evaluation and export see the same model)."""
    return ATTENTION if config.unpadded and config.attn_implementation == "sdpa" else config.attn_implementation


def load_backbone(config: ModelConfig, vocab_size: int, pad_token_id: int | None) -> torch.nn.Module:
    """The base model without a head: from `name_or_path`, or random from `architecture`."""
    dtype = DTYPES[config.dtype]
    if config.name_or_path:
        kwargs: dict[str, Any] = {"gguf_file": config.gguf_file} if config.gguf_file else {}
        try:
            return AutoModel.from_pretrained(weights.resolve(config.name_or_path, config.gguf_file), dtype=dtype,
                                             attn_implementation=attention_of(config), **kwargs)
        except OSError as err:
            raise UserError(f"model.name_or_path: cannot load {config.name_or_path!r}: {str(err).splitlines()[0]}") from None
    return random_model(config.architecture, "model.architecture", config, vocab_size, pad_token_id,
                        attention=attention_of(config))


def random_model(architecture: dict[str, Any], key: str, config: ModelConfig, vocab_size: int,
                 pad_token_id: int | None, attention: str = "", **special: Any) -> torch.nn.Module:
    """A randomly initialised transformers base model from a config dict (`key` names it in errors);
    `attention`: its attention implementation, model.attn_implementation by default."""
    arch = {**special, **architecture}
    model_type = arch.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, vocab_size=vocab_size, pad_token_id=pad_token_id, **arch)
    except (ValueError, TypeError) as err:
        raise UserError(f"{key}: {err}") from None
    return AutoModel.from_config(hf_config, dtype=DTYPES[config.dtype],
                                 attn_implementation=attention or config.attn_implementation)


def build_encoder(config: ModelConfig, vocab_size: int, pad_token_id: int | None, seed: int,
                  trained_tokens: list[int] = (), num_items: int = 0) -> RecEncoder:  # type: ignore[assignment]
    """Backbone + LoRA (base weights frozen) + pooling + optional projection.

    `trained_tokens`: token ids whose input embeddings are trained too (the item tokens);
    `num_items`: the catalog's size, for model.id_embeddings."""
    torch.manual_seed(seed)
    try:
        backbone = load_backbone(config, vocab_size, pad_token_id)
    except ImportError as err:  # flash_attention_2 without the flash-attn package, and the like
        raise UserError(f"model.attn_implementation: {str(err).splitlines()[0]}") from None
    if config.fused_norm:
        fused_norm.fuse(backbone)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach LoRA weights although the frozen
        # embeddings' outputs do not require grad.
        getattr(backbone, "gradient_checkpointing_enable")(gradient_checkpointing_kwargs={"use_reentrant": False})
    embeddings: Any = getattr(backbone, "get_input_embeddings")()
    if trained_tokens and embeddings.num_embeddings < vocab_size:
        getattr(backbone, "resize_token_embeddings")(vocab_size)  # a pretrained vocabulary plus the item tokens
    present = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    missing = [m for m in config.lora.target_modules if m not in present]
    if missing:
        raise UserError(f"model.lora.target_modules: {', '.join(missing)} not in the backbone "
                        f"(it has e.g. {', '.join(sorted(n for n in present if 'proj' in n or 'dense' in n)[:8])})")
    layers = int(getattr(backbone.config, "num_hidden_layers"))
    split = None
    if config.trained_layers >= 0:
        if config.trained_layers > layers:
            raise UserError(f"model.trained_layers: {config.trained_layers} is more than the backbone's {layers} layers")
        split = layers - config.trained_layers
    adapted = _with_lora(backbone, config, trained_tokens, split, layers)
    hidden = int(getattr(backbone.config, "hidden_size"))
    tower = None
    if config.user_encoder == "items":
        # Built after the backbone, from the same seed's stream: every rank gets the same tower.
        # It reads embeddings only; one vocabulary row keeps its unused token table negligible.
        tower = UserTower(random_model(config.user_tower, "model.user_tower", config, 1, None,
                                       bos_token_id=None, eos_token_id=None),
                          config.projection_dim or hidden, config.user_tower_dropout)
    try:
        encoder = RecEncoder(adapted, hidden, config.pooling, config.projection_dim, config.user_projection, tower,
                             config.normalize, split, num_items if config.id_embeddings else 0, config.shared_prefix,
                             config.repeat_score)
    except ValueError as err:
        raise UserError(f"model.trained_layers: {err}") from None
    for head in encoder.heads():
        head.to(DTYPES[config.dtype])
    return encoder


def _with_lora(backbone: torch.nn.Module, config: ModelConfig, trained_tokens: list[int], split: int | None,
               layers: int) -> torch.nn.Module:
    """The backbone with LoRA adapters, base weights frozen: on every layer, or on the layers from
    `split` up (model.trained_layers); with none to train, the frozen backbone itself."""
    if split == layers:
        for param in backbone.parameters():
            param.requires_grad_(False)
        return backbone
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules),
                      modules_to_save=list(config.lora.modules_to_save) or None,
                      trainable_token_indices=list(trained_tokens) or None,
                      layers_to_transform=None if split is None else list(range(split, layers)),
                      layers_pattern=None if split is None else "layers")
    adapted = get_peft_model(backbone, lora)
    if config.lora.fused:
        fused_lora.fuse(adapted)
    return adapted
