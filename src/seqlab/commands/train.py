"""`seqlab train`: train one model on one task; resumable; `torchrun -m seqlab train ...` for data parallel."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seqlab.commands import deep_update, emit, parse_sets
from seqlab.config import RunConfig, read_json
from seqlab.errors import InputError
from seqlab.train import TrainingDiverged, train
from seqlab.train.distributed import launched_world


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on a task and save a checkpoint",
        description="Train the model a JSON config describes ({'model': ..., 'task': ..., 'train': ...}) and "
                    "write the resolved config, metrics.jsonl, result.json and checkpoint/ into --out. "
                    "Under torchrun (torchrun --nproc_per_node N -m seqlab train ...) it trains with DDP.",
    )
    p.add_argument("--config", type=Path, help="JSON run config; omitted: the defaults (see seqlab.config)")
    p.add_argument("--task", help="task name, overriding the config's task.name (e.g. mqar, copy, corpus)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-3 --set model.mixer=gru")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same config), exactly where it stopped")
    p.add_argument("--allow-large", action="store_true",
                   help="skip the check that the model, optimizer and activations fit in the memory seqlab sees")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def load_run_config(path: Path | None, sets: list[str]) -> RunConfig:
    """The defaults, or the JSON file at `path`, with `--set section.key=value` overrides applied. Only what was
    given is passed on (not every default written out), so the conveniences of `ModelConfig.from_dict` hold: e.g.
    `--set model.arch=recurrent_depth` takes its n_layers from the depth section."""
    base: dict = {"task": dict(RunConfig().task)}
    if path is not None:
        base = read_json(path)
        if not isinstance(base, dict):
            kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(base), "number")
            raise InputError(f"config file '{path}' holds a JSON {kind}; expected an object "
                             '{"model": ..., "task": ..., "train": ...}')
    return RunConfig.from_dict(deep_update(base, parse_sets(sets)))


def run(args: argparse.Namespace) -> int:
    config = load_run_config(args.config, args.set)
    try:
        result = train(config, args.task, args.out, progress=not args.no_progress, resume=args.resume,
                       allow_large=args.allow_large)
    except TrainingDiverged as e:
        print(f"seqlab: training stopped: {e}", file=sys.stderr)
        return 1
    if not launched_world().is_main:  # under torchrun every rank returns the result; one prints it
        return 0
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items())
    skipped = f"; {result['skipped_steps']} non-finite steps skipped" if result["skipped_steps"] else ""
    emit(result, args.json, f"trained {result['steps']} steps in {result['seconds']:.1f}s "
                            f"({result['tokens_per_s']:.0f} tokens/s{skipped}); eval: {metrics}; "
                            f"checkpoint: {args.out / 'checkpoint'}")
    return 0
