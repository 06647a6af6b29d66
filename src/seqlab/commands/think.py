"""`seqlab think`: test-time compute of a recurrent-depth checkpoint: quality against the number of core steps."""

from __future__ import annotations

import argparse

from seqlab.analysis import parse_exit, parse_steps, plot_scaling, scaling_curve
from seqlab.checkpoint import load
from seqlab.commands import emit, parse_sets
from seqlab.data import make_task
from seqlab.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "think", help="accuracy of a recurrent-depth checkpoint against test-time steps r",
        description="Evaluate a recurrent-depth checkpoint with r = each of --steps core iterations: loss, accuracy, "
                    "sequence accuracy and effective depth per r; with --exit, also per-token adaptive exit (at most "
                    "r steps) and the mean steps the tokens used. Every r reads the same held-out batches.")
    p.add_argument("checkpoint", help="checkpoint folder of an arch=recurrent_depth model")
    p.add_argument("--task", required=True, help="task name, e.g. prefix_parity, mqar, corpus")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --set seq_len=128 (test longer than trained)")
    p.add_argument("--steps", default="1,2,4,8,16,32,64", help="comma-separated r values (default 1,2,4,...,64)")
    p.add_argument("--exit", default=None, metavar="CRITERION[:THRESHOLD]",
                   help="adaptive exit too: kl (KL between successive output distributions) or latent (relative "
                        "latent change), e.g. latent:3e-4 (default thresholds: kl 1e-9, latent 3e-4, chosen by "
                        "measurement; see seqlab.analysis.thinking.DEFAULT_THRESHOLDS)")
    p.add_argument("--batches", type=int, default=4, help="held-out batches per r (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the batches and of any s_0 noise (default 1234)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a plot of accuracy against r")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    steps, exit = parse_steps(args.steps), parse_exit(args.exit)
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    task = make_task(args.task, **parse_sets(args.set))
    model = load(args.checkpoint)
    result = scaling_curve(model, task, steps, exit, args.batches, args.batch_size, args.seed,
                           progress=not args.no_progress)
    if args.plot:
        result["plot"] = str(plot_scaling(result, args.plot))
    lines = [f"{'r':>5} {'depth':>7} {'loss':>8} {'accuracy':>9} {'seq_acc':>8}"]
    for row in result["fixed"]:
        lines.append(f"{row['steps']:>5} {row['effective_depth']:>7.0f} {row['loss']:>8.4f} {row['accuracy']:>9.4f} "
                     f"{row['seq_accuracy']:>8.4f}")
    if exit is not None:
        lines.append(f"adaptive exit {exit[0]} < {exit[1]:g}:")
        lines.append(f"{'max r':>5} {'mean r':>7} {'loss':>8} {'accuracy':>9} {'seq_acc':>8}")
        for row in result["adaptive"]:
            lines.append(f"{row['steps']:>5} {row['mean_steps_used']:>7.2f} {row['loss']:>8.4f} "
                         f"{row['accuracy']:>9.4f} {row['seq_accuracy']:>8.4f}")
    if args.plot:
        lines.append(f"plot: {result['plot']}")
    emit(result, args.json, "\n".join(lines))
    return 0
