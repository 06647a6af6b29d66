"""`seqlab eval`: a checkpoint's metrics on a task."""

from __future__ import annotations

import argparse

from seqlab.checkpoint import load
from seqlab.commands import emit, parse_sets
from seqlab.data import make_task
from seqlab.data.tokenizer import tokenizer_of
from seqlab.errors import InputError
from seqlab.train import evaluate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a task",
                       description="Print a checkpoint's loss, accuracy and sequence accuracy (bits per byte on "
                                   "the corpus, per UTF-8 byte of the same text whether the checkpoint reads bytes "
                                   "or BPE tokens) on held-out batches of a task.")
    p.add_argument("checkpoint", help="checkpoint folder (written by seqlab train or seqlab.save)")
    p.add_argument("--task", required=True, help="task name, e.g. mqar, induction, corpus")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --set seq_len=256 --set num_pairs=16 (corpus: --set split=test)")
    p.add_argument("--batches", type=int, default=8,
                   help="number of batches (default 8; with --stateful, 0 means the whole split)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation batches (default 1234)")
    p.add_argument("--stateful", action="store_true",
                   help="corpus: read consecutive segments, carrying the state (as train.stream trains)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("batches", "batch_size"):
        if getattr(args, name) < (0 if name == "batches" and args.stateful else 1):
            raise InputError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be positive")
    model = load(args.checkpoint)
    task = make_task(args.task, **parse_sets(args.set))
    if hasattr(task, "with_tokenizer"):  # text (the corpus): read through the checkpoint's tokenizer
        task = task.with_tokenizer(tokenizer_of(model))
    if model.config.vocab_size < task.vocab_size:
        raise InputError(f"task '{task.name}' needs vocab_size {task.vocab_size}; checkpoint "
                         f"'{args.checkpoint}' has vocab_size {model.config.vocab_size}")
    metrics = evaluate(model, task, args.batches, args.batch_size, args.seed, stateful=args.stateful)
    emit(metrics, args.json, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
