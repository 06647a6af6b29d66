"""`seqlab report`: rebuild a lab run's report from its results.json alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from seqlab.lab import rebuild


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild a lab run's report.html and report.md from results.json",
                       description="Every number in the report comes from results.json; this rebuilds "
                                   "report.html, report.md and plots/ from it alone.")
    p.add_argument("run_dir", type=Path, help="a folder written by seqlab lab")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    md, page = rebuild(args.run_dir)
    print(f"wrote {page} and {md}")
    return 0
