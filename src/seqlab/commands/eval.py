"""`seqlab eval`: a checkpoint's metrics on a task (by default the task it was trained on, with its parameters)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from seqlab.checkpoint import load, read_json
from seqlab.commands import emit, parse_sets
from seqlab.config import RunConfig
from seqlab.data import make_task
from seqlab.data.tokenizer import tokenizer_of
from seqlab.errors import InputError
from seqlab.models import check_fits
from seqlab.train import evaluate
from seqlab.train.trainer import eval_task_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a task",
                       description="Print a checkpoint's loss, accuracy and sequence accuracy (bits per byte on "
                                   "the corpus, per UTF-8 byte of the same text whether the checkpoint reads bytes "
                                   "or BPE tokens) on held-out batches of a task. A checkpoint written by seqlab train "
                                   "is evaluated on its own task's evaluation parameters unless --task names "
                                   "another task; --set changes single parameters.")
    p.add_argument("checkpoint", help="checkpoint folder (written by seqlab train or seqlab.save)")
    p.add_argument("--task", help="task name, e.g. mqar, induction, corpus (default: the task the checkpoint was "
                                  "trained on, with its parameters)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --set seq_len=256 --set num_pairs=16 (corpus: --set split=test)")
    p.add_argument("--batches", type=int, default=8,
                   help="number of batches (default 8; with --stateful, 0 means the whole split)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation batches (default 1234)")
    p.add_argument("--stateful", action="store_true",
                   help="corpus: read consecutive segments, carrying the state (as train.stream trains)")
    p.add_argument("--allow-large", action="store_true",
                   help="skip the check that the model and a batch fit in the memory seqlab sees")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def trained_task(checkpoint: str | Path) -> dict[str, Any] | None:
    """The evaluation task parameters of the run that wrote `checkpoint` (its trainer.json), or None when it was
    not written by seqlab train."""
    if not (Path(checkpoint) / "trainer.json").is_file():
        return None
    run_config = read_json(checkpoint, "trainer.json").get("run_config")
    if not isinstance(run_config, dict):
        return None
    try:
        return eval_task_params(RunConfig.from_dict(run_config))
    except InputError as e:
        raise InputError(f"checkpoint '{checkpoint}': trainer.json: run_config: {e}") from None


def task_params(checkpoint: str | Path, name: str | None, sets: list[str]) -> tuple[dict[str, Any], str]:
    """The task to evaluate on ({"name": ..., params}) and a note saying where its parameters came from."""
    trained = trained_task(checkpoint)
    changes = parse_sets(sets)
    if name is None and trained is None:
        raise InputError(f"checkpoint '{checkpoint}' was not written by seqlab train (no trainer.json): name the "
                         "task with --task")
    if trained is not None and name in (None, trained["name"]):
        params = {**trained, **changes}
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if k != "name")
        return params, f"task {params['name']} with the checkpoint's own parameters ({shown})"
    return {**changes, "name": name}, f"task {name} with its default parameters, changed by --set: {changes or 'none'}"


def run(args: argparse.Namespace) -> int:
    for name in ("batches", "batch_size"):
        if getattr(args, name) < (0 if name == "batches" and args.stateful else 1):
            raise InputError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be positive")
    params, note = task_params(args.checkpoint, args.task, args.set)
    task = make_task(params["name"], **{k: v for k, v in params.items() if k != "name"})
    model = load(args.checkpoint, allow_large=args.allow_large)
    if hasattr(task, "with_tokenizer"):  # text (the corpus): read through the checkpoint's tokenizer
        task = task.with_tokenizer(tokenizer_of(model))
    if model.config.vocab_size < task.vocab_size:
        raise InputError(f"task '{task.name}' needs vocab_size {task.vocab_size}; checkpoint "
                         f"'{args.checkpoint}' has vocab_size {model.config.vocab_size}")
    check_fits(model.config, f"evaluating batches of {args.batch_size} rows", batch=args.batch_size,
               tokens=task.seq_len, built=True, allow_large=args.allow_large)
    print(f"seqlab eval: {note}", file=sys.stderr)
    metrics = evaluate(model, task, args.batches, args.batch_size, args.seed, stateful=args.stateful)
    emit(metrics, args.json, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
