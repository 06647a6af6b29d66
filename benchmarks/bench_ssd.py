"""Mamba-2's SSD scan: the chunked form against its sequential twin as the sequence grows, forward + backward.

    PYTHONPATH=src python benchmarks/bench_ssd.py            # the full run (see the report for its runtime)
    PYTHONPATH=src python benchmarks/bench_ssd.py --quick    # small shapes, seconds

Shapes (full run), (batch, heads, head_dim, groups, d_state) = (1, 8, 64, 1, 128) and (4, 4, 64, 1, 128): the heads
of a d_model 256 and a d_model 128 Mamba-2 block (d_inner = 8 and 4 heads of 64) with the published d_state 128, at
L = 512, 2048, 8192. Inputs as the mixer makes them:
raw dt with dt_bias and softplus (the published init's dt in [0.001, 0.1]), A = -U(1, 16), D. Each timing is
forward + backward of a fixed random projection of the output plus the final state, every input (initial state
included) requiring grad. The chunked and the ref runs alternate inside one process (chunked, ref, chunked, ref,
...), so machine load hits both alike; medians over --repeats, and the ref at L >= 4096 over --long-ref-repeats (one
run there takes seconds). The ref's autograd graph keeps about four (P, N) states per head and step (measured: 1.0 MiB
per token at both full shapes, so ~8 GiB at L = 8192); where that estimate exceeds --ref-max-gib (6 by default) the
ref is skipped and recorded as null, and the chunked form is still timed (its linearity needs no ref). One torch
thread (--threads). Wall time is the figure; this process's CPU time and the load average before and after are saved
beside it, so a reader can tell a quiet run from a busy one.

Targets (issue 15): chunked >= 10x faster than ref at L = 2048, and chunked time linear in L (time per token
roughly flat from 512 to 8192; `per_token_ratio` = (t(L_max) / L_max) / (t(L_min) / L_min)).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from seqlab.measure import alternate, load_average
from seqlab.ops import ssd


def inputs(L, batch, heads, head_dim, groups, d_state, gen):
    dt = torch.exp(torch.rand(heads, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    x = dict(x=torch.randn(batch, L, heads, head_dim, generator=gen),
             dt=torch.randn(batch, L, heads, generator=gen) * 0.5,
             A=-(1 + 15 * torch.rand(heads, generator=gen)),
             B=torch.randn(batch, L, groups, d_state, generator=gen),
             C=torch.randn(batch, L, groups, d_state, generator=gen),
             D=torch.ones(heads), dt_bias=dt + torch.log(-torch.expm1(-dt)),
             initial_state=torch.randn(batch, heads, head_dim, d_state, generator=gen))
    return {n: t.requires_grad_() for n, t in x.items()}


def make_run(L, shape, chunk_size, gen):
    x = inputs(L, *shape, gen)
    gy = torch.randn(x["x"].shape, generator=gen)

    def run(impl):
        for t in x.values():
            t.grad = None
        y, h = ssd(**x, dt_softplus=True, return_final_state=True, impl=impl, chunk_size=chunk_size)
        ((y * gy).sum() + h.sum()).backward()
    return run


def ref_gib(L, batch, heads, head_dim, groups, d_state):
    """The ref's autograd memory, estimated: four fp32 (P, N) states per head and step (measured at L = 512)."""
    return 4 * 4 * L * batch * heads * head_dim * d_state / 2**30


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes and lengths: a smoke run of seconds")
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--shapes", default="1x8x64x1x128,4x4x64x1x128",
                   help="batch x heads x head_dim x groups x d_state, comma-separated")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-ref-repeats", type=int, default=1, help="ref repeats at L >= 4096")
    p.add_argument("--ref-max-gib", type=float, default=6.0, help="skip the ref where its graph would exceed this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/ssd.json")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.shapes, args.repeats, args.chunk_size = "128,256,512", "1x4x16x2x16", 3, 32
        if args.out == p.get_default("out"):  # a smoke run never overwrites the full run's figures
            args.out = "benchmarks/results/ssd_quick.json"
    torch.set_num_threads(args.threads)
    lengths = [int(s) for s in args.lengths.split(",")]
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(0)
    load_before, t_start = load_average(), time.perf_counter()
    cases = []
    for shape in shapes:
        per_token = {}
        for L in lengths:
            long = L >= 4096
            ref_repeats = args.long_ref_repeats if long else args.repeats
            if ref_gib(L, *shape) > args.ref_max_gib:
                ref_repeats = 0
            # the ref warms up only at short L: one ref run at long L takes seconds and warms nothing
            res = alternate(make_run(L, shape, args.chunk_size, gen),
                            {"chunked": args.repeats, "ref": min(ref_repeats, args.repeats)},
                            warmup=("chunked", "ref") if ref_repeats and not long else ("chunked",))
            (cw, cc), (rw, rc) = res["chunked"], res.get("ref", (None, None))
            per_token[L] = cw / L
            case = dict(batch=shape[0], heads=shape[1], head_dim=shape[2], groups=shape[3], d_state=shape[4], L=L,
                        chunked_wall_s=cw, chunked_cpu_s=cc, ref_wall_s=rw, ref_cpu_s=rc,
                        speedup=None if rw is None else rw / cw, repeats=args.repeats, ref_repeats=ref_repeats,
                        ref_gib_estimate=ref_gib(L, *shape))
            cases.append(case)
            ref = (f"ref {rw * 1e3:10.1f} ms (cpu {rc * 1e3:10.1f}), {rw / cw:6.1f}x" if rw is not None else
                   f"ref skipped (~{ref_gib(L, *shape):.1f} GiB > --ref-max-gib {args.ref_max_gib})")
            print(f"{'x'.join(map(str, shape))} L={L:5d}: chunked {cw * 1e3:9.1f} ms (cpu {cc * 1e3:9.1f}), {ref}",
                  flush=True)
        ratio = per_token[max(lengths)] / per_token[min(lengths)]
        for case in cases[-len(lengths):]:
            case["per_token_ratio"] = ratio
        print(f"  chunked time per token, L={max(lengths)} vs L={min(lengths)}: {ratio:.2f}x", flush=True)
    at_2048 = [c["speedup"] for c in cases if c["L"] == 2048 and c["speedup"] is not None]
    result = dict(what="ssd forward+backward, chunked vs ref", quick=args.quick, chunk_size=args.chunk_size,
                  torch_threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
                  python=sys.version.split()[0], load_before=load_before, load_after=load_average(),
                  total_s=time.perf_counter() - t_start, cases=cases,
                  median_speedup_at_2048=statistics.median(at_2048) if at_2048 else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
