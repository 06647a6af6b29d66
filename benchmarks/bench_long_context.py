"""Long-context decoding: CPU time per decoded token for attention against recurrent mixers, out to 2^21 tokens.

For every context n (powers of two) and mixer (matched to `--params` parameters, embedding excluded), the state after
n tokens is built, then `--steps` tokens are decoded one at a time through the decode plan (`seqlab.generate`'s
per-token path); the median CPU and wall seconds per token are recorded, the mixers alternating within each context.

How the state after n tokens is built: up to `--prefill-cap` tokens (default 2^16) are really prefilled. Beyond it,
a state that grows with the context (a KV cache: its `time_axis`) is filled with random keys and values up to n
entries and its position set to n: attention's decode cost depends on how many entries it reads, not on their
values, so the timing is that of a real cache of n tokens (the logits are not). A fixed-size state (recurrent
mixers) is the state after the prefilled tokens with its position set to n; its cost does not depend on n. The
JSON says which points were filled (`filled: true`).

Memory: the state's bytes, and the derived tables that grow with the position (RoPE's cos/sin tables, built up to
the largest position seen and grown by doubling), counted separately and in the total.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_long_context.py    # to 2^21, ~5 min quiet, <= ~8 GB
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_long_context.py --quick   # to 2^14, ~1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
from pathlib import Path

import torch

import seqlab
from seqlab.infer import reserve
from seqlab.infer.plan import time_decode
from seqlab.measure import load_average
from seqlab.models import matched_width
from seqlab.models.state import ModelState

RESULTS = Path(__file__).resolve().parent / "results" / "long_context.json"


def model_for(mixer: str, params: int, n_layers: int, seed: int) -> torch.nn.Module:
    fields = {"mixer": mixer, "vocab_size": 256, "n_layers": n_layers, "attention": {"n_heads": 4}}
    cfg = matched_width(fields, params, 8, exclude_embeddings=True, name=mixer)
    return seqlab.build_model(cfg, seed=seed).eval()


def fill(layer: object, n: int, prefilled: int, gen: torch.Generator) -> object:
    """A growing state (time_axis) that holds all `prefilled` tokens, extended with random entries to n tokens and
    its position set to n; any other state as it is, its position (if it keeps one) set to n."""
    if layer is None:
        return None
    axis = type(layer).time_axis
    changes: dict = {}
    tensors = layer.tensors()
    if axis is not None and tensors and all(t.shape[axis] == prefilled for t in tensors.values()):
        for name, t in tensors.items():
            shape = list(t.shape)
            shape[axis] = n - prefilled
            extra = torch.randn(shape, generator=gen, dtype=t.dtype) * t.std()
            changes[name] = torch.cat([t, extra], dim=axis)
    if "pos" in {f.name for f in dataclasses.fields(layer)}:
        changes["pos"] = n
    fields = {f.name for f in dataclasses.fields(layer)}
    for transient in ("buffer", "start"):  # a plain cache: `reserve` gives it room afterwards
        if transient in fields:
            changes[transient] = None if transient == "buffer" else 0
    return dataclasses.replace(layer, **changes)


def table_bytes(model: torch.nn.Module) -> int:
    """Bytes of the derived tables that grow with the position (RoPE cos/sin): buffers named *_table."""
    return sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name.endswith("_table"))


@torch.inference_mode()
def measure(model: torch.nn.Module, n: int, cap: int, chunk: int, steps: int, warmup: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prefilled = min(n, cap)
    logits, state = None, None
    for start in range(0, prefilled, chunk):
        tokens = torch.randint(0, 256, (1, min(chunk, prefilled - start)), generator=gen)
        logits, state = model(tokens, state)
    filled = n > prefilled
    if filled:
        state = ModelState(tuple(fill(s, n, prefilled, gen) for s in state.layers), n)
    state = reserve(model, state, steps + warmup)
    timer, logits, state = time_decode(model, logits, state, steps, warmup)
    tables = table_bytes(model)
    return {"context": n, "prefilled": prefilled, "filled": filled, "decode_cpu_s": timer.median_cpu,
            "decode_wall_s": timer.median_wall, "state_bytes": state.nbytes, "table_bytes": tables,
            "memory_bytes": state.nbytes + tables, "load_average": load_average()}


def crossing(points: list[tuple[int, float]], level: float) -> float | None:
    """The context where a speed-up curve first reaches `level`, interpolated in log-log between two points."""
    for (n0, s0), (n1, s1) in zip(points, points[1:]):
        if s0 < level <= s1:
            t = (math.log(level) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: contexts up to 2^14, few steps")
    p.add_argument("--mixers", default="attention,gru,mamba,gla")
    p.add_argument("--params", type=int, default=100_000, help="parameters per model, embedding excluded")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--min-log2", type=int, default=10)
    p.add_argument("--max-log2", type=int, default=21)
    p.add_argument("--prefill-cap", type=int, default=2**16, help="tokens really prefilled; beyond: a filled cache")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per point (median)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.max_log2, args.steps, args.warmup, args.prefill_cap = 14, 8, 2, 2**12
    torch.set_num_threads(1)
    mixers = args.mixers.split(",")
    models = {m: model_for(m, args.params, args.n_layers, args.seed) for m in mixers}
    points = []
    for k in range(args.min_log2, args.max_log2 + 1):
        n = 2**k
        for m in mixers:  # alternate the mixers within each context
            row = {"mixer": m, "params": models[m].num_parameters(exclude_embeddings=True),
                   **measure(models[m], n, args.prefill_cap, args.chunk, args.steps, args.warmup, args.seed)}
            points.append(row)
            print(f"  n=2^{k:<2d} {m:10s} cpu {row['decode_cpu_s'] * 1e3:9.3f} ms/token  wall "
                  f"{row['decode_wall_s'] * 1e3:9.3f}  state {row['state_bytes'] / 2**20:9.2f} MiB  tables "
                  f"{row['table_bytes'] / 2**20:7.2f} MiB{'  (filled)' if row['filled'] else ''}", flush=True)
    base = {r["context"]: r for r in points if r["mixer"] == "attention"}
    speedup = {}
    for m in mixers:
        if m == "attention" or not base:
            continue
        curve = [(r["context"], base[r["context"]]["decode_cpu_s"] / r["decode_cpu_s"]) for r in points
                 if r["mixer"] == m and r["context"] in base]
        speedup[m] = {"curve": curve, "reaches_10x_at": crossing(curve, 10), "reaches_100x_at": crossing(curve, 100)}
        at100 = speedup[m]["reaches_100x_at"]
        print(f"  {m}: CPU-time speed-up over attention at 2^{args.max_log2}: {curve[-1][1]:.1f}x; 100x "
              + (f"from ~{at100:,.0f} tokens" if at100 else "not reached"))
    result = {"command": " ".join(["python", *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
              "points": points, "speedup_cpu_vs_attention": speedup}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
