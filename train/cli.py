"""`rectrain <prepare|train|eval> CONFIG [key.sub=value ...]` and `rectrain <export|recommend|serve>
DIR [options]` — the thin entry point: parse, load the config, read the distributed state, hand
over to the command's recipe."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time

import torch.distributed

from train.config.schema import Config
from train.config.io import describe_keys, load_config
from train.distributed import DistState, from_environment
from train.errors import UserError, first_line, printable
from train.serve.commands import SERVING, add_serving_commands, run_serving

DESCRIPTION = """\
rectrain fine-tunes a decoder LLM with LoRA so that a user's history, rendered as text, lands
next to the item they choose next (in-batch InfoNCE), then ranks the whole catalog per user.

Quick start (synthetic data, tiny random Llama, CPU, about a minute):
  rectrain train configs/debug.yaml

Several processes, GPUs or nodes: launch/torchrun.sh, launch/deepspeed.sh, launch/accelerate.sh,
launch/slurm/train.sbatch (each explains itself with --help; the engine follows the launcher).

Every command reads a YAML config; any key can be overridden after it with dotted keys:
  rectrain train configs/debug.yaml train.max_steps=50 output_dir=runs/try
Run `rectrain <command> --help` for what each command does and every config key.

After training: `rectrain export RUN_DIR` (PEFT, transformers, sentence-transformers, item index),
`rectrain recommend EXPORT_DIR --history ID,ID`, `rectrain serve EXPORT_DIR` (HTTP).
"""

COMMANDS = {
    "prepare": ("turn an interaction log and a catalog into training shards",
                "Reads data.interactions and data.catalog (data.format: movielens, amazon, unisrec, atomic\n"
                "(RecBole), csv, tsv, parquet, jsonl; or synthetic, which generates them), optionally keeps\n"
                "ratings >= data.min_rating and a data.k_core, orders each user's interactions by time, holds out the\n"
                "last item (test) and the one before it (valid), and writes data.dir: shards/*.tar\n"
                "(WebDataset, ids only), catalog.parquet, splits/{valid,test}.parquet, manifest.json."),
    "train": ("train an encoder, then evaluate it (prepares the data first if needed)",
              "Prepares data.dir if it is missing or was prepared from other settings, trains LoRA\n"
              "adapters with in-batch InfoNCE for train.max_steps, checkpoints to output_dir, then ranks\n"
              "the full catalog for the held-out users and writes output_dir/metrics.json.\n"
              "resume=auto continues from the newest checkpoint in output_dir."),
    "eval": ("re-evaluate a trained run directory",
             "Loads the newest checkpoint of output_dir (or the one `resume` names), ranks the full\n"
             "catalog for eval.split, writes output_dir/metrics.json and prints the table. Under a\n"
             "launcher (torchrun --no-python rectrain eval ..., srun) each process encodes and ranks its\n"
             "share of the catalog and users; rank 0 prints and writes the summed figures once."),
}


def _key_reference() -> str:
    lines = ["config keys (default: meaning):"]
    for key, default, help_text in describe_keys(Config):
        default = default if len(default) <= 40 else default[:37] + "..."
        lines.append(f"  {key} = {default}")
        lines.extend(textwrap.wrap(help_text, 88, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rectrain", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (summary, details) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=f"{summary}.\n\n{details}",
                                 epilog=_key_reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("config", help="YAML config file (see configs/)")
        command.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    add_serving_commands(sub)
    return parser


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="rectrain: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "faiss", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare(config: Config, dist_state: DistState) -> None:
    from train.data.prepare.run import prepare as prepare_data

    started = time.perf_counter()
    manifest = prepare_data(config, show_progress=dist_state.is_main)
    counts = manifest["counts"]
    print(f"prepared {config.data.dir}: {counts['users']} users, {counts['items']} items, "
          f"{counts['train_samples']} training samples in {len(manifest['shards'])} shards, "
          f"{counts['test_users']} test users ({time.perf_counter() - started:.1f}s)")


def train(config: Config, dist_state: DistState) -> None:
    from train.loop.recipe import Trainer

    trainer = Trainer(config, dist_state)
    try:
        trainer.setup()
        if trainer.train() is None and dist_state.is_main:
            print(f"stopped early at step {trainer.step}; checkpoint saved; the same command resumes (resume=auto)")
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()


def evaluate(config: Config, dist_state: DistState) -> None:
    from train.evaluation.recipe import evaluate_run

    evaluate_run(config, dist_state)


RECIPES = {"prepare": prepare, "train": train, "eval": evaluate}


def run(command: str, config: Config, dist_state: DistState) -> int:
    started = time.perf_counter()
    RECIPES[command](config, dist_state)
    if dist_state.is_main and command != "prepare":
        print(f"{command} finished in {time.perf_counter() - started:.1f}s; run directory: {config.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist_state: DistState | None = None
    try:
        if args.command in SERVING:
            _setup_logging(True)
            return run_serving(args)
        config = load_config(args.config, args.overrides)
        dist_state = from_environment(config.device)
        _setup_logging(dist_state.is_main)
        return run(args.command, config, dist_state)
    except UserError as err:
        print(f"rectrain: error: {printable(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rectrain: interrupted", file=sys.stderr)
        return 130
    except torch.distributed.DistError as err:
        # A peer died or hung: say so in one line instead of a wall of C++ frames; the launcher
        # (torchrun, srun --kill-on-bad-exit) reports which rank failed first.
        first = first_line(err)
        rank = dist_state.rank if dist_state is not None else "?"
        print(f"rectrain: error: rank {rank}: a collective failed, another rank died or hung: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
