"""The serving commands of the CLI: `export`, `recommend`, `serve`. They take a folder, not a
config: a run directory (export) or an export folder (recommend, serve). What they need
(faiss, fastapi, uvicorn, sentence-transformers) is imported when they run: `pip install
rectrain[serve]`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.errors import UserError

EXPORT_HELP = """\
Writes OUT (default RUN_DIR/export): the merged model in transformers format (model/, which is a
sentence-transformers folder too), the LoRA adapter as a PEFT folder (adapter/; base/ holds a
random backbone's weights), the user tower (model.user_encoder=items), every catalog item's
embedding (items.parquet) and a faiss index (items.faiss: exact up to --exact-limit items, HNSW
past it). The checkpoint is the best validated one (checkpoints/best.json), else the newest.
Needs the run's prepared data (data.dir of its config.yaml)."""

RECOMMEND_HELP = """\
Prints the top-K items for one user, none from their history, each with the history items it
comes from ("because"). The user is a list of catalog ids (--history), texts of items the catalog
lacks (--history-text, repeatable), or both (texts count as the newest)."""

SERVE_HELP = """\
Serves recommendations over HTTP: POST /recommend, /embed, /items (new items, searchable at
once), GET /health, and the OpenAPI page at /docs. Concurrent requests are batched into one
forward pass (--max-batch, --batch-wait-ms; --no-batching answers each alone).

  rectrain serve runs/debug/export --port 8000
  curl -s 127.0.0.1:8000/recommend -H 'Content-Type: application/json' -d '{"history": ["i3", "i17"], "k": 5}'
  curl -s 127.0.0.1:8000/items -H 'Content-Type: application/json' -d '{"items": [{"item_id": "new1", "title": "..."}]}'"""


def add_serving_commands(sub: Any) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    export = sub.add_parser("export", help="export a trained run: PEFT, transformers, sentence-transformers, index",
                            description=EXPORT_HELP, formatter_class=formatter)
    export.add_argument("run_dir", type=Path, help="a run directory (output_dir of rectrain train)")
    export.add_argument("--out", type=Path, help="export folder (default: RUN_DIR/export)")
    export.add_argument("--checkpoint", help="step-N (or a path) instead of the best / newest checkpoint")
    export.add_argument("--exact-limit", type=int, default=200_000,
                        help="largest catalog indexed exactly; past it HNSW (default 200000)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    recommend = sub.add_parser("recommend", help="top-K items for one user, with reasons",
                               description=RECOMMEND_HELP, formatter_class=formatter)
    recommend.add_argument("export_dir", type=Path, help="a folder written by rectrain export")
    recommend.add_argument("--history", default="", help="catalog item ids, comma-separated, oldest first")
    recommend.add_argument("--history-text", action="append", default=[],
                           help="the text of an item outside the catalog (repeatable)")
    recommend.add_argument("--exclude", default="", help="item ids never to recommend, comma-separated")
    recommend.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of a table")

    serve = sub.add_parser("serve", help="serve recommendations over HTTP", description=SERVE_HELP,
                           formatter_class=formatter)
    serve.add_argument("export_dir", type=Path, help="a folder written by rectrain export")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch", type=int, default=32, help="most requests answered in one forward pass")
    serve.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="how long a request waits for others to share its forward pass")
    serve.add_argument("--no-batching", action="store_true", help="answer each request alone")


def export(args: argparse.Namespace) -> int:
    from train.serve.export import export_run

    out = args.out or args.run_dir / "export"
    manifest = export_run(args.run_dir, out, args.checkpoint, args.exact_limit, args.overwrite)
    print(f"exported {manifest['checkpoint']} of {args.run_dir}: {manifest['items']} items x {manifest['dim']} "
          f"({manifest['index']} index) -> {out}")
    return 0


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def recommend(args: argparse.Namespace) -> int:
    from train.serve.recommender import Query, Recommender

    if not 1 <= args.k <= 1000:
        raise UserError(f"-k: {args.k} is out of range (1..1000)")
    recommender = Recommender(args.export_dir)
    query = Query(_ids(args.history), list(args.history_text), _ids(args.exclude), args.k)
    (answer,) = recommender.recommend([query])
    if args.json:
        print(json.dumps({"items": answer}, indent=1))
        return 0
    print(f"{'#':>3}  {'item_id':<20}{'score':>9}  because")
    for rank, item in enumerate(answer, 1):
        reasons = ", ".join(f"{r['item_id']} ({r['similarity']:.2f})" for r in item["because"])
        print(f"{rank:>3}  {item['item_id']:<20}{item['score']:>9.4f}  {reasons}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from train.serve.recommender import Recommender
    from train.serve.service import serve as run_service

    run_service(Recommender(args.export_dir), args.host, args.port, not args.no_batching, args.max_batch,
                args.batch_wait_ms)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"export": export, "recommend": recommend, "serve": serve}


def run_serving(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except ModuleNotFoundError as err:
        raise UserError(f"rectrain {args.command} needs the {err.name} package: pip install 'rectrain[serve]'") from None


SERVING = set(COMMANDS)
