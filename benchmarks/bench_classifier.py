"""The trajectory classifier on synthetic trajectories: a confusion table over noise levels and lengths.

For every true kind (seqlab.analysis.latents.synthetic: contraction to a fixed point, drift (slider), rotation of
period 2 .. 16 (orbit)), noise level (independent Gaussian noise, its norm a share of the state's norm) and number
of steps, the share of trajectories given each label (fixed_point, orbit, slider, other, undecided) by the default
`Rules`. Printed, and saved to benchmarks/results/classifier.json. Cheap: seconds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_classifier.py            # ~10 s
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_classifier.py --quick    # fewer trajectories
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from seqlab.analysis.latents import KINDS, LABELS, Rules, classify, synthetic
from seqlab.measure import Timer, load_average

RESULTS = Path(__file__).resolve().parent / "results" / "classifier.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 32 trajectories per cell")
    p.add_argument("--n", type=int, default=256, help="trajectories per (kind, noise, length) cell")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--noise", type=lambda t: [float(x) for x in t.split(",")], default=[0.0, 0.003, 0.01, 0.03])
    p.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], default=[16, 32, 64, 128, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.n = 32
    torch.set_num_threads(1)
    rules = Rules()
    timer, cells = Timer(), []
    with timer:
        for noise in args.noise:
            for steps in args.lengths:
                for k, kind in enumerate(KINDS):
                    c = classify(synthetic(kind, steps, n=args.n, d=args.d_model, noise=noise,
                                           seed=args.seed + 1000 * k + steps), rules)
                    cells.append({"kind": kind, "noise": noise, "steps": steps, "n": args.n, "shares": c.shares(),
                                  "correct": c.shares()[kind]})
    print(f"share of each label (true kind per row block; noise = share of the state's norm; n = {args.n} each)")
    print(f"{'kind':12s} {'noise':>6s} {'steps':>5s}  " + "  ".join(f"{label:>11s}" for label in LABELS))
    for cell in cells:
        print(f"{cell['kind']:12s} {cell['noise']:6.3f} {cell['steps']:5d}  "
              + "  ".join(f"{cell['shares'][label]:11.2f}" for label in LABELS))
    result = {"command": " ".join(["python", *sys.argv]), "rules": asdict(rules), "labels": list(LABELS),
              "kinds": list(KINDS), "cells": cells,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load_average": load_average()},
              "wall_s": timer.last_wall, "cpu_s": timer.cpu[-1]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out} ({timer.last_wall:.1f} s wall, {timer.cpu[-1]:.1f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
