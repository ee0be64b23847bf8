"""What gathering negatives across ranks costs: the same per-rank batch at 1 and 2 ranks.

    python benchmarks/gather_overhead.py [--batch 32] [--steps 20]

launches itself under torchrun with 1 and then 2 processes (gloo on CPU) and prints, per world
size, the median time of the loss step (gather + InfoNCE + backward into the embeddings) and
of the whole training step (encode users and items with the tiny LoRA Llama of
configs/debug.yaml, loss, backward, gradient all-reduce, AdamW), and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(batch: int, steps: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from model.loss import contrastive_loss
    from train.modeling.backbone import build_encoder
    from train.config.io import load_config
    from train.distributed import from_environment

    state = from_environment("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // state.world_size))
    dist.init_process_group("gloo")
    config = load_config(ROOT / "configs" / "debug.yaml")
    vocab = 512
    encoder = build_encoder(config.model, vocab, 0, seed=0)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(state.rank)
    users = torch.randint(3, vocab, (batch, 64), generator=generator)
    items = torch.randint(3, vocab, (batch, 10), generator=generator)
    item_ids = torch.randint(0, 400, (batch,), generator=generator)
    history = torch.randint(0, 400, (batch, 10), generator=generator)
    mask_u, mask_i = torch.ones_like(users), torch.ones_like(items)

    def loss_step() -> float:
        query = torch.randn(batch, 64, generator=generator, requires_grad=True)
        item = torch.randn(batch, 64, generator=generator, requires_grad=True)
        dist.barrier()
        start = time.perf_counter()
        loss = contrastive_loss(query, item, item_ids, temperature=0.05, history_ids=history)
        loss.backward()
        return time.perf_counter() - start

    def train_step() -> float:
        dist.barrier()
        start = time.perf_counter()
        loss = contrastive_loss(encoder(users, mask_u), encoder(items, mask_i), item_ids, temperature=0.05,
                                history_ids=history)
        loss.backward()
        for p in params:  # the engine's gradient averaging
            dist.all_reduce(p.grad)
            p.grad /= state.world_size
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    for _ in range(3):
        loss_step(), train_step()
    result = {"loss_step_ms": statistics.median(loss_step() for _ in range(steps)) * 1e3,
              "train_step_ms": statistics.median(train_step() for _ in range(steps)) * 1e3}
    dist.destroy_process_group()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args.batch, args.steps)
        if int(os.environ["RANK"]) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    rows = {}
    for world in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                   str(29500 + world), __file__, "--worker", "--batch", str(args.batch), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"torchrun with {world} processes failed:\n{done.stderr[-2000:]}")
        rows[world] = json.loads(line[7:])
    print(f"command: python benchmarks/gather_overhead.py --batch {args.batch} --steps {args.steps}")
    print(f"per-rank batch {args.batch}; global batch = world size x {args.batch}; median of {args.steps} steps")
    print(f"{'ranks':>5} {'loss step ms':>14} {'train step ms':>15}")
    for world, row in rows.items():
        print(f"{world:>5} {row['loss_step_ms']:>14.2f} {row['train_step_ms']:>15.1f}")
    print(f"ratio 2/1: loss step {rows[2]['loss_step_ms'] / rows[1]['loss_step_ms']:.2f}x, "
          f"train step {rows[2]['train_step_ms'] / rows[1]['train_step_ms']:.2f}x")


if __name__ == "__main__":
    main()
