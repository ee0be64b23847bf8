"""What an evaluation reports: the metric tree flattened for logs, its numbers as one vector (to
add up over processes) and back, popularity's part of it, the text table, and metrics.json
written atomically."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def numbers(tree: dict[str, Any]) -> list[float]:
    """Every number of a nested metrics dict, in its key order."""
    return [x for value in tree.values() for x in (numbers(value) if isinstance(value, dict) else [float(value)])]


def refill(tree: dict[str, Any], values: Iterator[float]) -> dict[str, Any]:
    """`tree` with its numbers replaced, in `numbers` order, by `values`."""
    return {key: refill(value, values) if isinstance(value, dict) else next(values) for key, value in tree.items()}


def baseline_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """Popularity's metrics out of `evaluate`'s, in the shape its `baseline` argument takes."""
    return {**metrics["popularity"], "with_history": metrics["with_history"]["popularity"]}


# The parts a ranking reports beside itself: the model's own scores (beside the transitions
# prior), its inner products without its repeat score, the prior alone.
PARTS = ("encoder", "embeddings", "transitions")


def format_table(metrics: dict[str, Any], ks: list[int]) -> str:
    """A small text table: rectrain beside popularity (and its parts, when the ranking is fused),
    history excluded and kept."""
    keys = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr")]
    header = f"{metrics['split']} ({metrics['users']} users)"
    lines = [f"{header:<36}" + "".join(f"{k:>12}" for k in keys)]
    parts = [(name, metrics[name]) for name in PARTS if name in metrics]
    rows = [("rectrain", metrics), *((f"  {name} alone", part) for name, part in parts),
            ("popularity", metrics["popularity"]), ("rectrain, history kept", metrics["with_history"]),
            *((f"  {name} alone, history kept", part["with_history"]) for name, part in parts),
            ("popularity, history kept", metrics["with_history"]["popularity"])]
    for label, source in rows:
        lines.append(f"{label:<36}" + "".join(f"{source[k]:>12.4f}" for k in keys))
    for bucket, part in metrics.get("by_target_count", {}).items():
        lines.append(f"target seen {bucket}x in training, {part['users']} users")
        for label, source in (("  rectrain", part), ("  rectrain, history kept", part["with_history"]),
                              *((f"  {name} alone, history kept", part[name]["with_history"]) for name, _ in parts)):
            lines.append(f"{label:<36}" + "".join(f"{source[k]:>12.4f}" for k in keys))
    return "\n".join(lines)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`with_history/ndcg@10`-style keys for the nested metric blocks (popularity and the split name left out)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            if key != "popularity":
                flat.update(flatten_metrics(value, f"{prefix}{key}/"))
        elif key != "split":
            flat[f"{prefix}{key}"] = value
    return flat


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """`payload` as JSON at `path`, written beside it first and renamed: never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
