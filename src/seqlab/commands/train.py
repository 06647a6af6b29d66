"""`seqlab train`: train one model on one task and save a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seqlab.commands import deep_update, emit, parse_sets
from seqlab.config import RunConfig
from seqlab.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on a task and save a checkpoint",
        description="Train the model a JSON config describes ({'model': ..., 'task': ..., 'train': ...}) and "
                    "write the resolved config, metrics.jsonl and checkpoint/ into --out.",
    )
    p.add_argument("--config", type=Path, help="JSON run config; omitted: the defaults (see seqlab.config)")
    p.add_argument("--task", help="task name, overriding the config's task.name (e.g. mqar, copy, corpus)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-3 --set model.mixer=gru")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seqlab.train import train

    base = RunConfig().to_dict()
    if args.config is not None:
        if not args.config.is_file():
            raise InputError(f"config file '{args.config}' does not exist")
        try:
            base = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"config file '{args.config}' is not valid JSON: {e}") from None
    config = RunConfig.from_dict(deep_update(base, parse_sets(args.set)))
    result = train(config, args.task, args.out, progress=not args.no_progress)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items())
    emit(result, args.json, f"trained {config.train.steps} steps in {result['seconds']:.1f}s "
                            f"({result['tokens_per_s']:.0f} tokens/s); eval: {metrics}; "
                            f"checkpoint: {args.out / 'checkpoint'}")
    return 0
