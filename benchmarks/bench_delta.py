"""The delta rule: the chunked (WY / UT) form against its sequential twin as the sequence grows, forward + backward.

    PYTHONPATH=src python benchmarks/bench_delta.py            # the full run (see the report for its runtime)
    PYTHONPATH=src python benchmarks/bench_delta.py --quick    # small shapes, seconds (delta_quick.json)

Shapes (full run), (batch, heads, dk, dv) = (1, 4, 64, 128) and (4, 4, 64, 128) (Gated DeltaNet's dv = 2 dk), at
L = 512, 2048, 8192, with the gate g (gated_deltanet; --plain adds g = None, DeltaNet). Inputs as the mixers make
them: L2-normalized keys, beta = sigmoid, g = -A softplus(.). Each timing is forward + backward of a fixed random
projection of the output plus the final state, every input (initial state included) requiring grad. The chunked
and the ref runs alternate inside one process (chunked, ref, chunked, ref, ...), so machine load hits both alike;
medians over --repeats, and the ref at L >= 4096 over --long-ref-repeats (one run there takes many seconds). The
ref is skipped (recorded as null) where its autograd graph would exceed --ref-max-gib (8 GiB by default: batch 4
at L = 8192 would hold ~22 GiB); the chunked form's linearity is measured at every length regardless.
One torch thread (--threads). Wall time is the figure; this process's CPU time and the load average before and
after are saved beside it, so a reader can tell a quiet run from a busy one.

Targets (issue 15): chunked >= 10x faster than ref at L = 2048, and chunked time linear in L (time per token
roughly flat from 512 to 8192; `per_token_ratio` = (t(L_max) / L_max) / (t(L_min) / L_min)).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab.measure import alternate, load_average
from seqlab.ops import delta_rule


def inputs(L, batch, heads, dk, dv, gated, gen):
    q = torch.randn(batch, heads, L, dk, generator=gen)
    k = F.normalize(torch.randn(batch, heads, L, dk, generator=gen), dim=-1)
    v = torch.randn(batch, heads, L, dv, generator=gen)
    beta = torch.sigmoid(torch.randn(batch, heads, L, generator=gen))
    x = dict(q=q, k=k, v=v, beta=beta, initial_state=torch.randn(batch, heads, dk, dv, generator=gen))
    if gated:  # A ~ U(0, 16) per head, dt ~ 0.01: the published init's range
        A = torch.rand(heads, generator=gen)[:, None] * 16
        x["g"] = -A * F.softplus(torch.randn(batch, heads, L, generator=gen) - 4.6)
    return {n: t.requires_grad_() for n, t in x.items()}


def make_run(L, shape, gated, chunk_size, gen):
    x = inputs(L, *shape, gated, gen)
    go = torch.randn(x["v"].shape, generator=gen)

    def run(impl):
        for t in x.values():
            t.grad = None
        o, s = delta_rule(**x, return_final_state=True, impl=impl, chunk_size=chunk_size)
        ((o * go).sum() + s.sum()).backward()
    return run


def ref_memory(L, batch, heads, dk, dv):
    """Bytes the ref's autograd graph holds for one forward + backward: per step and head the (dk, dk) erase matrix
    and about four (dk, dv) matrices, fp32, times 1.2 (measured 1.37 GiB at batch 4, L = 512, 4 x 64 x 128)."""
    return int(batch * L * heads * (dk * dk + 4 * dk * dv) * 4 * 1.2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes and lengths: a smoke run of seconds")
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--shapes", default="1x4x64x128,4x4x64x128", help="batch x heads x dk x dv, comma-separated")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-ref-repeats", type=int, default=1, help="ref repeats at L >= 4096")
    p.add_argument("--ref-max-gib", type=float, default=8.0, help="skip the ref where its autograd graph would "
                   "hold more than this (it keeps a (dk, dk) and a few (dk, dv) matrices per step and head)")
    p.add_argument("--plain", action="store_true", help="also time g = None (DeltaNet)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/delta.json, delta_quick.json "
                   "with --quick, so a smoke run never overwrites a full one)")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.shapes, args.repeats, args.chunk_size = "128,256,512", "1x2x16x32", 3, 32
    args.out = args.out or f"benchmarks/results/delta{'_quick' if args.quick else ''}.json"
    torch.set_num_threads(args.threads)
    lengths = [int(s) for s in args.lengths.split(",")]
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(0)
    load_before, t_start = load_average(), time.perf_counter()
    cases = []
    for gated in (True, False) if args.plain else (True,):
        for shape in shapes:
            per_token = {}
            for L in lengths:
                long, ref_gib = L >= 4096, ref_memory(L, *shape) / 2**30
                ref_repeats = 0 if ref_gib > args.ref_max_gib else args.long_ref_repeats if long else args.repeats
                # the ref warms up only at short L: one ref run at long L takes many seconds and warms nothing
                res = alternate(make_run(L, shape, gated, args.chunk_size, gen),
                                {"chunked": args.repeats, "ref": min(ref_repeats, args.repeats)},
                                warmup=("chunked", "ref") if ref_repeats and not long else ("chunked",))
                (cw, cc), (rw, rc) = res["chunked"], res.get("ref", (None, None))
                per_token[L] = cw / L
                case = dict(gated=gated, batch=shape[0], heads=shape[1], dk=shape[2], dv=shape[3], L=L,
                            chunked_wall_s=cw, chunked_cpu_s=cc, ref_wall_s=rw, ref_cpu_s=rc,
                            speedup=rw / cw if rw else None, repeats=args.repeats, ref_repeats=ref_repeats,
                            ref_memory_gib_estimate=ref_gib)
                cases.append(case)
                ref = (f"ref {rw * 1e3:10.1f} ms (cpu {rc * 1e3:10.1f}), {rw / cw:6.1f}x" if rw else
                       f"ref skipped: it would hold ~{ref_gib:.0f} GiB (--ref-max-gib {args.ref_max_gib})")
                print(f"{'gated' if gated else 'plain'} {'x'.join(map(str, shape))} L={L:5d}: chunked "
                      f"{cw * 1e3:9.1f} ms (cpu {cc * 1e3:9.1f}), {ref}", flush=True)
            ratio = per_token[max(lengths)] / per_token[min(lengths)]
            for case in cases[-len(lengths):]:
                case["per_token_ratio"] = ratio
            print(f"  chunked time per token, L={max(lengths)} vs L={min(lengths)}: {ratio:.2f}x", flush=True)
    at_2048 = [c["speedup"] for c in cases if c["L"] == 2048 and c["speedup"]]
    result = dict(what="delta_rule forward+backward, chunked vs ref", quick=args.quick, chunk_size=args.chunk_size,
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
