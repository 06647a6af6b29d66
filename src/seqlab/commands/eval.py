"""`seqlab eval`: evaluate a checkpoint on a task."""

from __future__ import annotations

import argparse

from seqlab.commands import emit, parse_sets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a task",
                       description="Print a checkpoint's loss and accuracy on fresh batches of a task.")
    p.add_argument("checkpoint", help="checkpoint folder (written by seqlab train or seqlab.save)")
    p.add_argument("--task", required=True, help="task name, e.g. mqar")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --set seq_len=256 --set num_pairs=16")
    p.add_argument("--batches", type=int, default=8, help="number of batches (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation batches (default 1234)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seqlab.checkpoint import load
    from seqlab.data import make_task
    from seqlab.train import evaluate

    model = load(args.checkpoint)
    task = make_task(args.task, **parse_sets(args.set))
    metrics = evaluate(model, task, args.batches, args.batch_size, args.seed)
    emit(metrics, args.json, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
