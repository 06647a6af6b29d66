"""`seqlab profile`: state bytes, peak memory, prefill throughput and decode latency against context, per mixer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from seqlab.commands import emit, parse_sets
from seqlab.errors import InputError
from seqlab.infer.profile import CELL_FIELDS, CROSSOVER_FIELDS, TOP_FIELDS, ProfileConfig, format_table, run_profile


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t.replace("_", "")) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 256,1024; got {text!r}") from None


def _names(text: str | None) -> tuple[str, ...]:
    """--mixers: comma-separated names, none empty (so `--mixers ""` is an error, not "every mixer")."""
    if text is None:
        return ()
    names = tuple(t.strip() for t in text.split(","))
    if not all(names):
        raise InputError(f"--mixers {text!r}: expected comma-separated mixer names, e.g. gru,attention")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    fields = "\n".join(f"  {k:<27} {v}" for k, v in TOP_FIELDS.items())
    cell = "\n".join(f"  {k:<27} {v}" for k, v in CELL_FIELDS.items())
    cross = "\n".join(f"  {k:<27} {v}" for k, v in CROSSOVER_FIELDS.items())
    p = sub.add_parser(
        "profile", help="measure state memory and decode latency against context for every mixer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For each mixer at a matched parameter count and each context: state bytes (measured and by "
                    "formula), peak memory in a fresh process per cell, prefill tokens/s (chunked, carrying the "
                    "state) and median per-token decode latency; then where each mixer starts to decode faster "
                    "than attention.",
        epilog=f"JSON fields (--json, --out):\n{fields}\ncells[]:\n{cell}\ncrossover[]:\n{cross}",
    )
    p.add_argument("--mixers", default=None,
                   help="comma-separated mixers, hybrids as a+b (default: every available mixer)")
    p.add_argument("--contexts", type=_ints, default=(256, 1024, 4096, 16384, 65536),
                   help="comma-separated context lengths (default 256,1024,4096,16384,65536)")
    p.add_argument("--d-model", type=int, default=128, help="width of the attention model whose parameter count "
                                                           "every mixer matches (default 128)")
    p.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    p.add_argument("--vocab-size", type=int, default=256, help="vocabulary size (default 256)")
    p.add_argument("--params", type=int, default=None, help="target parameter count instead of attention's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other model config field, e.g. attention.window=1024 (repeatable)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens (default 512)")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per cell (default 64)")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps first (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="prefill runs per cell, median reported (default 3; "
                                                         "1 once a run takes over 5 s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure every cell in this process (faster; peak memory then is not per cell)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per cell before it is given up")
    p.add_argument("--seed", type=int, default=0, help="weights and token seed (default 0)")
    p.add_argument("--out", type=Path, help="write the JSON results to this file")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write log-log plots (PNG) into this folder")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of a table")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = parse_sets(args.set)
    for key in ("d_model", "n_layers", "vocab_size"):
        if key in model:
            raise InputError(f"--set {key}=...: use --{key.replace('_', '-').replace('n-layers', 'layers')} instead")
    cfg = ProfileConfig(
        mixers=_names(args.mixers), contexts=args.contexts, d_model=args.d_model, n_layers=args.layers,
        vocab_size=args.vocab_size, params=args.params, model=model, batch=args.batch, chunk=args.chunk,
        decode_steps=args.decode_steps, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
        device=args.device, isolate=not args.no_isolate, timeout_s=args.timeout, seed=args.seed,
    )
    results = run_profile(cfg, plot_dir=args.plot, progress=not args.no_progress)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    emit(results, args.json, format_table(results))
    return 1 if any("error" in c for c in results["cells"]) else 0
