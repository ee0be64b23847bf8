"""The export's model folder as a sentence-transformers model: `SentenceTransformer(folder)
.encode(item_text)` gives rectrain's item embedding of that text (the text part: an id vector,
model.id_embeddings, belongs to a catalog item, not to a text; items.parquet has those).

rectrain tokenises an item as its text without special tokens, cut to max_item_tokens - 1, then
EOS; sentence-transformers calls the tokenizer with special tokens on. So the folder's tokenizer
gets a post-processor that appends EOS and nothing else, and max_seq_length = max_item_tokens
(the tokenizer's truncation keeps room for that EOS): the same token ids. It pads on the right,
where the positions of the real tokens are 0..n-1 as rectrain's own position ids make them."""

from __future__ import annotations

import json
from pathlib import Path

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from tokenizers import processors
from torch import nn
from transformers import AutoTokenizer

from model.encoder import RecEncoder
from train.config.schema import Config

POOLING_MODES = {"last": "lasttoken", "mean": "mean"}


def write_sentence_transformers(folder: Path, encoder: RecEncoder, config: Config) -> None:
    """Turn `folder` (a merged transformers model and its tokenizer) into a sentence-transformers one too."""
    _tokenizer_with_eos(folder, config.prompt.append_eos)
    transformer = Transformer(str(folder), max_seq_length=config.prompt.max_item_tokens)
    hidden = transformer.get_embedding_dimension()
    modules: list[nn.Module] = [transformer, Pooling(hidden, POOLING_MODES[config.model.pooling])]
    if encoder.projection is not None:
        dense = Dense(hidden, encoder.projection.out_features, bias=False, activation_function=nn.Identity())
        dense.linear.weight.data.copy_(encoder.projection.weight.detach().float().cpu())
        modules.append(dense)
    if config.model.normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))


def _tokenizer_with_eos(folder: Path, append_eos: bool) -> None:
    """The folder's tokenizer, loaded as a plain fast tokenizer from tokenizer.json, with a
    post-processor that adds EOS (when prompts end with it) and no BOS: rectrain's item tokens."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    eos = tokenizer.eos_token
    if append_eos and eos is not None:
        post = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                             special_tokens=[(eos, tokenizer.convert_tokens_to_ids(eos))])
    else:
        post = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tokenizer.backend_tokenizer.post_processor = post
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(str(folder))
    # A model-specific class may rebuild the post-processor from its own flags on load (Llama's
    # add_bos_token); the generic fast class reads tokenizer.json as it is.
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings["padding_side"] = "right"
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
