"""Length extrapolation of the recurrent-depth model on prefix parity, over seeds, with a fixed-depth control.

For each seed: the bench_thinking parity model (conv blocks: prelude 1, core 2, coda 1; r drawn around
`--mean-steps` in training) is trained at `--train-len` bits, then scored (exact per-sequence accuracy on
`--sequences` held-out sequences, the same ones for every r) at each of `--test-lens` for every r of the grid up
to `--max-r` (overthinking shows as accuracy falling at large r). Beside it, the control: a plain fixed-depth stack
(`--control-*`) trained with the same optimizer and batches for `--control-steps`; it must fit the training length
(>= 0.95, the `fits_train_len` flag says whether it did) for its failure at longer lengths to say anything. By
default it is 4 conv blocks at d_model 32 with kernel 11 (47,008 parameters against the parity model's 48,384): the
same blocks as the parity model's, unshared and run once, with a receptive field (4 x 10 + 1 = 41 positions) that
covers the 32 training bits. A 4-block attention stack of the same size did not fit 32 bits (a probe: 0.74 sequence
accuracy after 8,000 steps at lr 3e-3, seed 0; `bench_thinking.py --only stack --steps 8000 --lr 3e-3 --out F`
trains that stack), so it cannot serve. The conv control
cannot see more than 41 positions back at all, so its failure at longer lengths is structural: what it rules out is
that the parity model's blocks would extrapolate without iteration, not that some other fixed-depth model would.
Reported per length and r: the mean, standard deviation, min and max over seeds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_extrapolation.py          # 3 seeds, 32/128/512 bits,
        # r up to 1024, 256 sequences: ~18 min per seed on a quiet core (the 512-bit sweep ~11), ~1 h in all
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_extrapolation.py --quick  # a smoke run, ~1 min
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_extrapolation.py --control-only \
        --out benchmarks/results/extrapolation_control.json                          # the control alone, ~8 min
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_thinking import parity_config, stack_config, train_model

import seqlab
from seqlab.analysis.stats import spread
from seqlab.data import Metrics, make_task
from seqlab.measure import load_average

RESULTS = Path(__file__).resolve().parent / "results" / "extrapolation.json"


@torch.no_grad()
def seq_accuracy(model: torch.nn.Module, length: int, sequences: int, batch_size: int, steps: int | None) -> float:
    """Exact per-sequence accuracy on `sequences` held-out parity sequences (generator seed 1234)."""
    task, gen, metrics = make_task("prefix_parity", seq_len=length), torch.Generator().manual_seed(1234), Metrics()
    for start in range(0, sequences, batch_size):
        batch = task.batch(min(batch_size, sequences - start), gen)
        logits = model(batch.inputs, steps=steps)[0] if steps is not None else model(batch.inputs)[0]
        metrics.update(logits, batch)
    return metrics.compute()["seq_accuracy"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 40 steps, short lengths, small r")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-len", type=int, default=32)
    p.add_argument("--test-lens", default="32,128,512")
    p.add_argument("--sequences", type=int, default=256, help="held-out sequences per length")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--max-r", type=int, default=1024)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of each parity model")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=4)
    p.add_argument("--sampler", default="progressive")
    p.add_argument("--mean-steps", type=float, default=12.0)
    p.add_argument("--backprop-steps", type=int, default=4)
    p.add_argument("--control-mixer", dest="stack_mixer", default="conv")
    p.add_argument("--control-d-model", dest="stack_d_model", type=int, default=32)
    p.add_argument("--control-layers", dest="stack_layers", type=int, default=4)
    p.add_argument("--control-heads", dest="stack_heads", type=int, default=4)
    p.add_argument("--control-position", dest="stack_position", default="rope", choices=["rope", "learned"])
    p.add_argument("--control-kernel-size", type=int, default=11, help="the conv control's kernel")
    p.add_argument("--control-steps", type=int, default=12000,
                   help="the control's optimizer steps (it must fit; at 6,000 one seed of three reached 0.949)")
    p.add_argument("--control-only", action="store_true",
                   help="train and score only the control (e.g. with more --control-steps); nothing of the parity "
                        "model in the JSON")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.test_lens, args.sequences, args.max_r, args.steps, args.control_steps = "0", "32,64", 32, 32, \
            40, 40
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    lens = [int(n) for n in args.test_lens.split(",")]
    grid = sorted({2**i for i in range(0, 11) if 2**i <= args.max_r} | {int(args.mean_steps), args.max_r})
    start = time.perf_counter()
    per_seed = []
    for seed in seeds:
        model = seqlab.build_model(parity_config(args), seed=seed)
        info, scores = None, {}
        if not args.control_only:
            info = train_model(model, make_task("prefix_parity", seq_len=args.train_len), args.steps,
                               args.batch_size, args.lr, seed, f"recurrent_depth seed {seed}")
        for n in [] if args.control_only else lens:
            scores[n] = {}
            for r in grid:
                scores[n][r] = seq_accuracy(model, n, args.sequences, args.eval_batch_size, r)
            print(f"  seed {seed} length {n}: " + " ".join(f"r={r}:{a:.3f}" for r, a in scores[n].items()), flush=True)
        control = seqlab.build_model(stack_config(argparse.Namespace(**{**vars(args), "kernel_size":
                                                                         args.control_kernel_size})), seed=seed)
        cinfo = train_model(control, make_task("prefix_parity", seq_len=args.train_len), args.control_steps,
                            args.batch_size, args.lr, seed, f"control seed {seed}")
        cscores = {n: seq_accuracy(control, n, args.sequences, args.eval_batch_size, None) for n in lens}
        print(f"  control seed {seed}: " + " ".join(f"len {n}: {a:.3f}" for n, a in cscores.items()), flush=True)
        per_seed.append({"seed": seed, "params": model.num_parameters(), "train": info, "seq_accuracy": scores,
                         "control": {"params": control.num_parameters(), "train": cinfo, "seq_accuracy": cscores,
                                     "fits_train_len": cscores.get(args.train_len, 0.0) >= 0.95}})
    summary = {n: {r: spread([s["seq_accuracy"][n][r] for s in per_seed]) for r in grid} for n in lens
               if not args.control_only}
    control = {n: spread([s["control"]["seq_accuracy"][n] for s in per_seed]) for n in lens}
    result = {"command": " ".join(["python", *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                          "load_average": load_average()},
              "grid": grid, "lengths": lens, "sequences": args.sequences, "seeds": per_seed,
              "summary": {str(n): {str(r): v for r, v in rows.items()} for n, rows in summary.items()},
              "control_summary": {str(n): v for n, v in control.items()},
              "control_fits_train_len_every_seed": all(s["control"]["fits_train_len"] for s in per_seed),
              "seconds": time.perf_counter() - start}
    for n in summary:
        best = max(grid, key=lambda r: summary[n][r]["mean"])
        print(f"length {n}: best r {best}: {summary[n][best]['mean']:.3f} +- {summary[n][best]['std']:.3f} over "
              f"{len(seeds)} seeds; at r = {args.max_r}: {summary[n][args.max_r]['mean']:.3f}; control "
              f"{control[n]['mean']:.3f} +- {control[n]['std']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"saved {args.out} ({result['seconds']:.0f} s)")
    for n in lens:
        print(f"control at length {n}: {control[n]['mean']:.3f} +- {control[n]['std']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
