"""The `rectrain eval` recipe: re-evaluate a run directory's checkpoint on eval.split.

Under a multi-process launcher every process joins the process group as training does, encodes
its share of the catalog and users, ranks its share of the users, and gets the summed metrics;
the main process alone writes metrics.json and prints the table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from train.config.schema import Config
from train.distributed import DistState, close_process_group, init_process_group
from train.errors import UserError
from train.evaluation.evaluate import evaluate
from train.evaluation.report import format_table, write_json_atomic
from train.modeling import checkpoint
from train.modeling.build import build_model, load_inputs

log = logging.getLogger(__name__)


def evaluate_run(config: Config, dist_state: DistState) -> dict[str, Any]:
    """Metrics of the checkpoint `resume` names (the newest when it says never or auto)."""
    run_dir = Path(config.output_dir)
    path = checkpoint.resolve(config.resume if config.resume != "never" else "auto", run_dir)
    if path is None:
        raise UserError(f"output_dir: {config.output_dir} holds no checkpoint; run rectrain train first")
    init_process_group(dist_state, config.train.collective_timeout)
    try:
        inputs = load_inputs(config, dist_state)
        model = build_model(config, inputs, dist_state.device)
        checkpoint.load_weights(path, model.encoder)
        log.info("evaluating %s on %s, %d process(es)", path, config.eval.split, dist_state.world_size)
        # One evaluation, nothing to keep for a next one: a frozen-layer cache would cost host memory
        # and a copy, and give the same figures as encoding from tokens.
        metrics = evaluate(model.encoder, inputs.collator, config, dist_state.device,
                           show_progress=dist_state.is_main)
        metrics["checkpoint"] = str(path)
        if dist_state.is_main:
            write_json_atomic(run_dir / "metrics.json", metrics)
            print(format_table(metrics, config.eval.k), flush=True)
    except BaseException:
        close_process_group(meet=False)
        raise
    close_process_group()
    return metrics
