"""`seqlab lab`: the side-by-side comparison, seqlab's main job."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from seqlab.commands import emit


def register(sub: argparse._SubParsersAction) -> None:
    from seqlab.lab.presets import PRESETS

    p = sub.add_parser(
        "lab", help="train and measure every architecture side by side; write a report",
        description="Train every mixer at a matched parameter count on the same task, evaluate it, and write "
                    "results.json, report.md and plots/ into the output folder.",
    )
    p.add_argument("--preset", choices=PRESETS, default="quick",
                   help="built-in config (default: quick, a few minutes on a 2-core CPU)")
    p.add_argument("--config", type=Path, help="a lab config JSON file (copy a preset and edit it); "
                                               "overrides --preset")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<date>-<preset>)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout when done")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from seqlab.lab import LabConfig, load_preset, run_lab

    cfg = LabConfig.load(args.config) if args.config else load_preset(args.preset)
    out = args.out or Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{cfg.name}"
    results = run_lab(cfg, out, progress=not args.no_progress)
    rows = []
    for c in results["quality"]["cells"]:
        if "error" in c:
            rows.append(f"  {c['mixer']:<22} failed: {c['error']}")
        else:
            rows.append(f"  {c['mixer']:<22} params {c['params']:>8,}  accuracy {c['eval']['accuracy']:.3f}  "
                        f"train {c['train_tokens_per_s']:>8,.0f} tok/s  state {c['state_bytes']:>10,} B")
    emit(results, args.json, "\n".join([f"lab '{cfg.name}' done in {results['meta']['seconds']:.0f} s", *rows,
                                        f"report: {out / 'report.md'}"]))
    return 0
