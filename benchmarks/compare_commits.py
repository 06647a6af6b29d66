"""A/B the seqlab-vs-transformers decode ratios of two commits, alternating runs on one machine.

    PYTHONPATH=src python benchmarks/compare_commits.py BASE [NEW] --rounds 3

Checks out BASE (and NEW, default: the working tree) into temporary git worktrees, then runs
`benchmarks/bench_profile.py --skip profile,interleaved` (seqlab.generate against transformers' generate on the same
weights, GPT-2-like and Mamba, alternating inside each run) for BASE and NEW in turn, --rounds times each, one torch
thread. Each run's ratio is measured inside one process against the same transformers baseline, so the machine's
load hits both of its sides alike; alternating BASE and NEW spreads the remaining drift over both. Prints and saves
the median ratios per commit and their quotient (NEW / BASE). Written for "the decode ratio must not drop by more
than 5%" (issue 14): a refactor is measured against the code it replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), rev], check=True)
    return where


def run_bench(tree: Path, out: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(tree / "benchmarks" / "bench_profile.py"), "--skip", "profile,interleaved",
           "--out", str(out), "--hf-repeats", str(repeats)]
    subprocess.run(cmd, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    hf = json.loads(out.read_text())["hf"]
    return {name: {"generate_ratio": m["generate_ratio"], "generate_cpu_ratio": m["generate_cpu_ratio"]}
            for name, m in hf["models"].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="the commit to compare against")
    p.add_argument("new", nargs="?", default=None, help="the other commit (default: the working tree as it is)")
    p.add_argument("--rounds", type=int, default=3, help="runs per commit, alternating")
    p.add_argument("--hf-repeats", type=int, default=15, help="alternating generate rounds inside each run")
    p.add_argument("--out", default="benchmarks/results/compare_commits.json")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="seqlab-ab-"))
    trees = {"base": worktree(args.base, tmp / "base"),
             "new": worktree(args.new, tmp / "new") if args.new else ROOT}
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    start, load_before = time.perf_counter(), os.getloadavg()
    try:
        for r in range(args.rounds):
            for side in ("base", "new") if r % 2 == 0 else ("new", "base"):
                runs[side].append(run_bench(trees[side], tmp / f"{side}-{r}.json", args.hf_repeats))
                print(f"round {r} {side}: " + ", ".join(f"{m} {v['generate_ratio']:.2f}x"
                                                          for m, v in runs[side][-1].items()), flush=True)
    finally:
        for side in ("base", "new"):
            if trees[side] != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[side])])
    summary = {}
    for model in runs["base"][0]:
        med = {side: statistics.median(run[model]["generate_ratio"] for run in runs[side]) for side in runs}
        summary[model] = {"base_median": med["base"], "new_median": med["new"], "new_over_base": med["new"] /
                          med["base"], "base_runs": [r[model] for r in runs["base"]],
                          "new_runs": [r[model] for r in runs["new"]]}
        print(f"{model}: seqlab/transformers decode, median of {args.rounds}: base {med['base']:.2f}x, new "
              f"{med['new']:.2f}x -> new/base {med['new'] / med['base']:.3f}")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result = {"command": " ".join(["python", *sys.argv]), "base": args.base,
              "new": args.new or f"working tree at {head.stdout.strip()}",
              "load_before": load_before, "load_after": os.getloadavg(), "seconds": time.perf_counter() - start,
              "models": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
