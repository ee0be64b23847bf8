"""The tokenizer: the backbone's own, or one trained on the catalog for a random backbone."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from train.config.schema import ModelConfig
from train.modeling import weights

log = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer fitted to `texts` (catalog text and the instruction)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def load_or_build(config: ModelConfig, run_tokenizer_dir: Path, corpus: Iterable[str] | None = None,
                  item_tokens: list[str] = ()) -> PreTrainedTokenizerBase:  # type: ignore[assignment]
    """The tokenizer of this run.

    A pretrained backbone brings its own. A random backbone gets one trained on `corpus` the
    first time and saved under the run directory, so resume and eval tokenize identically.
    `item_tokens` (one per catalog item) are added as whole tokens, after the existing ones.
    """
    if config.name_or_path:
        kwargs = {"gguf_file": config.gguf_file} if config.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(weights.resolve(config.name_or_path, config.gguf_file), **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.add_tokens(list(item_tokens), special_tokens=True)
        return tokenizer
    if (run_tokenizer_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(run_tokenizer_dir))
    if corpus is None:
        raise FileNotFoundError(f"{run_tokenizer_dir}: no tokenizer saved in this run directory")
    tokenizer = train_tokenizer(corpus, config.tokenizer_vocab_size)
    tokenizer.add_tokens(list(item_tokens), special_tokens=True)
    tmp = run_tokenizer_dir.with_name(run_tokenizer_dir.name + ".tmp")
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(run_tokenizer_dir)
    log.info("trained a %d-token BPE tokenizer on the catalog -> %s", len(tokenizer), run_tokenizer_dir)
    return tokenizer
