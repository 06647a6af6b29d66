"""Recall against state size (MQAR), the field's canonical frontier: each mixer at several widths, several seeds.

    PYTHONPATH=src python benchmarks/bench_recall.py           # the benchmark budget (see --help; ~1-1.5 h)
    PYTHONPATH=src python benchmarks/bench_recall.py --quick          # a smoke run, under a minute

For every mixer and width (d_model), a 2-layer model is trained on MQAR (Zoology's multi-query associative recall:
--pairs key-value pairs in a sequence of --seq-len tokens over a --vocab vocabulary) for --steps AdamW steps with
the lab's recipe (PyTorch init, untied head), then scored on fresh batches: accuracy over every query, with its
Wilson interval, and the bytes of state the model holds after T tokens (`model.state_bytes(T)`: attention's KV
cache, every other mixer's fixed state). Each point is trained with --seeds seeds; the JSON keeps every seed and
the mean and spread. Chance levels: 1/P (a random value from the context) and 2/V (a random value token).
The budget (1,000 steps at learning rate 1e-2) was chosen by a probe at d_model 64, one seed: after 800 steps,
gated_deltanet reached 0.392 at lr 1e-2 and 0.126 at 3e-3 (Mamba 0.129 at 1e-2, chance 0.125), and a run at
400 steps and 3e-3 (recall_small.json) left everything but attention at d 64 near chance.
The literature's reading to compare with (Zoology; Gated DeltaNet, Yang et al. 2024): at equal state size the delta
rule recalls better than Mamba and GLA, and attention, with a KV cache that grows with T, is the ceiling. Saved:
benchmarks/results/recall.json and recall.png; one torch thread; load average and CPU time recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import seqlab  # noqa: E402
from seqlab.config import TrainConfig  # noqa: E402
from seqlab.lab.sections.quality import frontier_point  # noqa: E402
from seqlab.measure import load_average  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", default="attention,mamba,gla,mingru,gated_deltanet,deltanet,mamba2")
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/recall.json")
    p.add_argument("--quick", action="store_true", help="tiny widths and steps, one seed: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.seeds, args.steps, args.eval_batches = "16", 1, 20, 2
        args.out = "/tmp/recall_quick.json"
    torch.set_num_threads(1)
    available = seqlab.available_mixers()
    mixers = [m for m in args.mixers.split(",") if m in available]
    task = {"name": "mqar", "vocab_size": args.vocab, "seq_len": args.seq_len, "num_pairs": args.pairs}
    model = {"init": "torch", "tie_embeddings": False, "n_layers": 2, "attention": {"n_heads": 2}}
    train = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                        log_every=max(1, args.steps // 10))
    start, load_before, cpu0 = time.perf_counter(), load_average(), time.process_time()
    points = []
    for mixer in mixers:
        for width in (int(w) for w in args.widths.split(",")):
            runs = [frontier_point(task, mixer, width, model, train, args.eval_batches, seed)
                    for seed in range(args.seeds)]
            acc = [r["test"]["accuracy"] for r in runs]
            point = {"mixer": mixer, "d_model": width, "params": runs[0]["params"],
                     "state_bytes": runs[0]["state_bytes"], "accuracy_mean": statistics.fmean(acc),
                     "accuracy_spread": [min(acc), max(acc)],
                     "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0, "seeds": runs}
            points.append(point)
            print(f"{mixer:16s} d {width:4d}  params {point['params']:7,d}  state {point['state_bytes']:9,d} B  "
                  f"accuracy {point['accuracy_mean']:.3f} (seeds {', '.join(f'{a:.3f}' for a in acc)})", flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "torch_threads": torch.get_num_threads(), "task": task,
              "model": model, "train": train.to_dict(), "eval_batches": args.eval_batches,
              "queries_per_seed": points[0]["seeds"][0]["queries"] if points else 0,
              "chance_context": 1 / args.pairs, "chance_values": 2 / args.vocab, "points": points,
              "load_before": load_before, "load_after": load_average(), "seconds": time.perf_counter() - start,
              "cpu_seconds": time.process_time() - cpu0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mixer in dict.fromkeys(pt["mixer"] for pt in points):
        pts = sorted((pt for pt in points if pt["mixer"] == mixer), key=lambda pt: pt["state_bytes"])
        mean = [pt["accuracy_mean"] for pt in pts]
        ax.errorbar([pt["state_bytes"] for pt in pts], mean, marker="o", capsize=2, label=mixer,
                    yerr=[[m - pt["accuracy_spread"][0] for m, pt in zip(mean, pts)],
                          [pt["accuracy_spread"][1] - m for m, pt in zip(mean, pts)]])
    ax.axhline(1 / args.pairs, color="gray", ls="--", lw=1, label="chance: 1/P")
    ax.axhline(2 / args.vocab, color="gray", ls=":", lw=1, label="chance: 2/V")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"state bytes after {args.seq_len} tokens (log)")
    ax.set_ylabel(f"MQAR accuracy, mean of {args.seeds} seeds (bars: min-max)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
