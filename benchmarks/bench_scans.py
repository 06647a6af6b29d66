"""Forward+backward time of the scan ops: chunked vs the sequential reference, as the sequence grows.

    PYTHONPATH=src python benchmarks/bench_scans.py                 # L = 512, 2048, 8192; ~10 minutes on 2 cores
    PYTHONPATH=src python benchmarks/bench_scans.py --quick         # small shapes, seconds
    PYTHONPATH=src python benchmarks/bench_scans.py --chunk-sizes 32,64,128 --lengths 2048   # tune chunk_size
    PYTHONPATH=src python benchmarks/bench_scans.py --memory        # peak memory of the largest chunked case

Shapes (full run): selective_scan batch 2, d_inner 512, N 16 (with D, z, delta_bias, softplus, as a Mamba block
calls it); gla batch 2, 4 heads, dk = dv = 64. Each timing is forward + backward of a fixed random projection of
the output and the final state, all inputs requiring grad. Timings are medians over --repeats runs, chunked and ref
measured in the same process, one after the other; the ref at L >= 8192 is measured --long-ref-repeats times (1 by
default) because one run takes tens of seconds. Wall time is the figure; CPU time (all threads of this process) is
recorded too, since on a shared machine other processes stretch wall time. The load average before and after is
saved so a reader can tell a quiet run from a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab.ops import gla, selective_scan


def scan_inputs(L, batch, d_inner, N, gen):
    u = torch.randn(batch, d_inner, L, generator=gen)
    delta = torch.randn(batch, d_inner, L, generator=gen) * 0.5
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d_inner, 1)  # S4D-real init, as in Mamba
    B = torch.randn(batch, N, L, generator=gen)
    C = torch.randn(batch, N, L, generator=gen)
    D = torch.ones(d_inner)
    z = torch.randn(batch, d_inner, L, generator=gen)
    delta_bias = torch.log(torch.expm1(torch.full((d_inner,), 0.01)))  # softplus(bias) = dt = 0.01
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    return {k: t.requires_grad_() for k, t in tensors.items()}


def gla_inputs(L, batch, heads, dk, dv, gen):
    q = torch.randn(batch, heads, L, dk, generator=gen)
    k = torch.randn(batch, heads, L, dk, generator=gen)
    v = torch.randn(batch, heads, L, dv, generator=gen)
    g = F.logsigmoid(torch.randn(batch, heads, L, dk, generator=gen) + 2) / 16  # GLA's gate normalizer
    return {n: t.requires_grad_() for n, t in dict(q=q, k=k, v=v, g=g).items()}


def make_case(op, L, shape, gen):
    """Returns run(impl, chunk_size): one forward + backward."""
    if op == "selective_scan":
        x = scan_inputs(L, *shape, gen)
        gy = torch.randn(x["u"].shape, generator=gen)

        def run(impl, chunk_size):
            y, s = selective_scan(**x, delta_softplus=True, return_final_state=True, impl=impl,
                                  chunk_size=chunk_size)
            ((y * gy).sum() + s.sum()).backward()
    else:
        x = gla_inputs(L, *shape, gen)
        go = torch.randn(x["v"].shape, generator=gen)

        def run(impl, chunk_size):
            o, s = gla(**x, return_final_state=True, impl=impl, chunk_size=chunk_size)
            ((o * go).sum() + s.sum()).backward()
    return run


def time_it(fn, repeats):
    """Median wall and CPU seconds over `repeats` calls, after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def peak_memory(op, L, shape, chunk_size):
    """Peak resident memory added by one chunked forward+backward, measured in a forked child (Linux)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        gen = torch.Generator().manual_seed(0)
        run = make_case(op, L, shape, gen)
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        run("chunked", chunk_size)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        os.write(w, str(peak - base).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    return int(out) if out else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/scans.json", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="small shapes and lengths, one repeat: a smoke run")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 512,2048,8192)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--long-ref-repeats", type=int, default=1, help="timed runs of the ref at L >= 8192")
    p.add_argument("--chunk-sizes", default=None, help="comma-separated chunk sizes to time (chunked only)")
    p.add_argument("--ops", default="selective_scan,gla", help="which ops to time")
    p.add_argument("--no-ref", action="store_true", help="time the chunked form only")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of the longest chunked case")
    args = p.parse_args(argv)

    if args.quick:
        shapes = {"selective_scan": (1, 64, 16), "gla": (1, 2, 32, 32)}
        lengths = [128, 512]
        args.repeats = 1
    else:
        shapes = {"selective_scan": (2, 512, 16), "gla": (2, 4, 64, 64)}
        lengths = [512, 2048, 8192]
    if args.lengths:
        lengths = [int(s) for s in args.lengths.split(",")]
    default_chunk = {"selective_scan": 64, "gla": 16}
    chunk_sizes = {op: [int(s) for s in args.chunk_sizes.split(",")] if args.chunk_sizes else [c]
                   for op, c in default_chunk.items()}
    ops = args.ops.split(",")

    load_before = os.getloadavg()
    rows = []
    header = f"{'op':15s} {'L':>6s} {'chunk':>5s} {'chunked s':>10s} {'ref s':>9s} {'chunked/ref':>11s} {'speedup':>8s}" \
             f" {'cpu chunked':>11s} {'cpu ref':>8s}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before}")
    print(header)
    for op in ops:
        for L in lengths:
            gen = torch.Generator().manual_seed(0)
            run = make_case(op, L, shapes[op], gen)
            ref = None
            if not args.no_ref:
                n_ref = args.long_ref_repeats if L >= 8192 else args.repeats
                ref = time_it(lambda: run("ref", None), n_ref) + (n_ref,)
            for cs in chunk_sizes[op]:
                wall, cpu = time_it(lambda cs=cs: run("chunked", cs), args.repeats)
                row = dict(op=op, L=L, shape=shapes[op], chunk_size=cs, chunked_s=wall, chunked_cpu_s=cpu,
                           repeats=args.repeats)
                if ref is not None:
                    row.update(ref_s=ref[0], ref_cpu_s=ref[1], ref_repeats=ref[2], ratio=wall / ref[0],
                               speedup=ref[0] / wall)
                rows.append(row)
                r = row.get
                ref_txt = f"{r('ref_s'):9.3f} {r('ratio'):11.3f} {r('speedup'):7.1f}x" if ref else f"{'-':>9s}"
                cpu_ref = f"{r('ref_cpu_s'):8.3f}" if ref else ""
                print(f"{op:15s} {L:6d} {cs:5d} {wall:10.3f} {ref_txt} {cpu:11.3f} {cpu_ref}", flush=True)

    # linear growth: time per step of the chunked form at each length (flat means linear)
    growth = {}
    for op in ops:
        pts = [(r["L"], r["chunked_s"]) for r in rows if r["op"] == op and r["chunk_size"] == chunk_sizes[op][0]]
        if len(pts) > 1:
            growth[op] = {str(L): t / L * 1e6 for L, t in pts}
            print(f"{op}: chunked microseconds per step: "
                  + ", ".join(f"L={L}: {v:.1f}" for L, v in growth[op].items()))

    memory = {}
    if args.memory:
        for op in ops:
            L = max(lengths)
            shape = (4, 512, 16) if op == "selective_scan" and not args.quick else shapes[op]
            mem = peak_memory(op, L, shape, chunk_sizes[op][0])
            memory[op] = dict(L=L, shape=shape, peak_extra_bytes=mem)
            print(f"{op}: peak extra memory for chunked forward+backward at L={L}, shape {shape}: "
                  f"{mem / 2**30:.2f} GiB")

    result = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  machine=platform.machine(), python=sys.version.split()[0], load_before=load_before,
                  load_after=os.getloadavg(), quick=args.quick, rows=rows, us_per_step=growth, memory=memory)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
