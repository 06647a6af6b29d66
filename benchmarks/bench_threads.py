"""How many torch threads the lab should use: a lab-sized training step and decode step at 1 and 2 threads (or
`--threads`), on the machine as it is and with `--load` busy processes beside it.

The lab's quality and training cells train ~100k-parameter models on batches of 32 x 64 tokens, and its inference
cells decode one token at a time; the question is whether a second torch thread speeds that work up on a small
machine, or slows it down when other work shares the cores (torch's OpenMP threads wait for each other at every
op, so one descheduled thread stalls the rest). For each condition, the thread counts alternate round by round in
one process (`seqlab.measure.alternate`, `torch.set_num_threads` between them) and the median wall and CPU time of
each piece of work is saved with the load average. Conditions: "as is" (nothing started by this script; the load
average says what else ran), then "loaded": `--load` pure-Python busy loops started beside the measurement (by
default one per core), the situation of a lab run beside a test run or a second lab.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/bench_threads.py          # ~2 min; results/threads.json
    PYTHONPATH=src python benchmarks/bench_threads.py --quick                    # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import torch

import seqlab
from seqlab.measure import alternate, load_average
from seqlab.models import matched_width

RESULTS = Path(__file__).resolve().parent / "results" / "threads.json"


def busy(stop: mp.Event) -> None:
    """A pure-Python busy loop until `stop` is set: one core's worth of other work."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def work(mixer: str, params: int, batch: int, seq_len: int, context: int):
    """The two pieces of lab work for `mixer`: one training step (forward, backward, AdamW) at (batch, seq_len),
    and 8 greedy decode steps from a state after `context` tokens; returns {name: callable}."""
    cfg = matched_width({"mixer": mixer, "vocab_size": 64, "n_layers": 2, "attention": {"n_heads": 4}}, params, 8,
                        exclude_embeddings=True, name=mixer)
    model = seqlab.build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (batch, seq_len + 1), generator=gen)
    prompt = torch.randint(0, 64, (1, context), generator=gen)

    def train() -> None:
        logits, _ = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def decode() -> None:
        logits, state = model(prompt)
        tok = logits[:, -1:].argmax(-1)
        for _ in range(8):
            logits, state = model(tok, state)
            tok = logits[:, -1:].argmax(-1)

    return {"train": train, "decode": decode}


def measure(jobs: dict, threads: list[int], rounds: int) -> dict:
    """Median wall and CPU seconds of every job at every thread count, alternating (thread count, job) pairs."""
    def run(name: str) -> None:
        job, _, n = name.rpartition("@")
        torch.set_num_threads(int(n))
        jobs[job]()

    names = [f"{job}@{n}" for job in jobs for n in threads]
    timed = alternate(run, {name: rounds for name in names}, warmup=tuple(names))
    out: dict = {}
    for name, (wall, cpu) in timed.items():
        job, _, n = name.rpartition("@")
        out.setdefault(job, {})[n] = {"wall_s": wall, "cpu_s": cpu}
    for row in out.values():
        base = row[str(threads[0])]["wall_s"]
        for cell in row.values():
            cell["speedup_vs_first"] = base / cell["wall_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", default="attention,gru,mamba")
    p.add_argument("--threads", default="1,2", help="thread counts compared (the first is the baseline)")
    p.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes in the loaded condition")
    p.add_argument("--params", type=int, default=100_000, help="non-embedding parameters (the standard preset's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--context", type=int, default=1024, help="decode from a state after this many tokens")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny models, 2 rounds")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.batch, args.seq_len, args.context, args.rounds = 4000, 4, 16, 32, 2
    threads = [int(n) for n in args.threads.split(",")]
    mixers = [m for m in args.mixers.split(",") if m in seqlab.available_mixers()]
    result: dict = {"command": " ".join(["python", *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                "cpu_count": os.cpu_count()}, "conditions": {}}
    start = time.perf_counter()
    for condition in ("as_is", "loaded"):
        stop, procs = mp.Event(), []
        if condition == "loaded":
            procs = [mp.Process(target=busy, args=(stop,), daemon=True) for _ in range(args.load)]
            for proc in procs:
                proc.start()
            time.sleep(1.0)
        try:
            rows = {"load_average_before": load_average(), "busy_processes": len(procs)}
            for mixer in mixers:
                rows[mixer] = measure(work(mixer, args.params, args.batch, args.seq_len, args.context), threads,
                                      args.rounds)
                for job, row in rows[mixer].items():
                    print(f"{condition:7s} {mixer:10s} {job:6s} " + "  ".join(
                        f"{n} thr {c['wall_s'] * 1e3:8.1f} ms wall {c['cpu_s'] * 1e3:8.1f} ms CPU "
                        f"({c['speedup_vs_first']:.2f}x)" for n, c in row.items()), flush=True)
            rows["load_average_after"] = load_average()
        finally:
            stop.set()
            for proc in procs:
                proc.join(timeout=5)
        result["conditions"][condition] = rows
    result["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
