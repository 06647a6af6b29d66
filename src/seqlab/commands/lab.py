"""`seqlab lab`: the side-by-side comparison, seqlab's main job."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from seqlab.commands import emit
from seqlab.errors import InputError
from seqlab.lab import LabConfig, load_preset, run_lab
from seqlab.lab.presets import PRESETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lab", help="train and measure every architecture side by side; write a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Run the lab's sections and write results.json, report.html (self-contained: plots embedded, tables sortable),
report.md, plots/ and cells/ (every cell's config, metrics and checkpoint) into the output folder.

Sections:
  quality    every mixer (attention, sliding attention, LSTM, GRU, conv, Mamba, GLA, a hybrid, recurrent depth) at
             matched parameter counts on MQAR, induction (tested longer than trained), copy and the byte corpus
  training   training tokens/s and peak memory per mixer at growing sequence lengths
  inference  state bytes, peak memory and decode latency against context; where each mixer overtakes attention
  thinking   a recurrent-depth model's accuracy against test-time steps r; adaptive exit's steps vs accuracy
  latents    PCA of its latent trajectories and the share of fixed points, orbits and sliders
  distill    attention teacher vs distilled recurrent student vs the student from scratch; the inference gain

Presets: quick (default; a smoke run of all of it in ~4-6 minutes on a 2-core CPU), standard (~66 minutes on a 2-core
CPU, sized so that the models learn their tasks), full (for a GPU: larger models, longer contexts, more steps). Quick
and standard use one torch thread (the config's "threads"). To edit one: seqlab lab --preset quick --show-config >
my.json, change it, then seqlab lab --config my.json. An interrupted run continues with --resume --out DIR, skipping
finished cells; a failing cell is recorded with its error and the rest goes on. seqlab report DIR rebuilds the
report from results.json.""",
    )
    p.add_argument("--preset", choices=PRESETS, default="quick",
                   help="built-in config (default: quick, about 4-6 minutes on a 2-core CPU)")
    p.add_argument("--show-config", action="store_true", help="print the resolved lab config as JSON and exit")
    p.add_argument("--config", type=Path, help="a lab config JSON file (copy a preset and edit it); "
                                               "overrides --preset")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<date>-<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out, skipping finished cells (uses the config saved there)")
    p.add_argument("--only", action="append", metavar="SECTION", help="run only this section (repeatable)")
    p.add_argument("--skip", action="append", metavar="SECTION", help="skip this section (repeatable)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout when done")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = LabConfig.load(args.config) if args.config else load_preset(args.preset)
    if args.show_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.resume and args.out is None:
        raise InputError("--resume needs --out, the folder of the run to continue")
    out = args.out or Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{cfg.name}"
    results = run_lab(cfg, out, resume=args.resume, only=args.only, skip=args.skip, progress=not args.no_progress)
    lines = [f"lab '{results['meta']['preset']}' done in {results['meta']['seconds']:.0f} s"]
    for name, section in results["sections"].items():
        failed = [c for c in section["cells"] if "error" in c]
        lines.append(f"  {name}: {len(section['cells']) - len(failed)} cells done"
                     + (f", {len(failed)} failed: " + "; ".join(f"{c['cell']}: {c['error']}" for c in failed)
                        if failed else ""))
    lines.append(f"report: {out / 'report.html'} (and report.md)")
    emit(results, args.json, "\n".join(lines))
    return 0
