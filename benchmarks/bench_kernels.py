"""The numba kernels (the `kernels` extra) against the chunked forms and the sequential loop: Mamba-1's selective scan
and (--gla, --delta-rule) the GLA and delta-rule recurrences, forward + backward, one thread.

    PYTHONPATH=src python benchmarks/bench_kernels.py            # the full run, ~3 minutes on a quiet machine
    PYTHONPATH=src python benchmarks/bench_kernels.py --quick    # small shapes, seconds (plus ~15 s of compiling)
    PYTHONPATH=src python benchmarks/bench_kernels.py --shapes 1x256 --repeats 3 --out /tmp/k.json   # one shape
    PYTHONPATH=src python benchmarks/bench_kernels.py --small    # the sizes of the tests and the quick lab, ~1 min
    PYTHONPATH=src python benchmarks/bench_kernels.py --gla      # GLA: training shapes, ~10 s (plus compiling)
    PYTHONPATH=src python benchmarks/bench_kernels.py --gla --small   # GLA at the tests' and quick lab's sizes, ~15 s
    PYTHONPATH=src python benchmarks/bench_kernels.py --delta-rule [--plain] [--small]   # the (gated) delta rule

1. Compile time (`compile`): numba compiles the kernels on their first call and caches the machine code
   (`cache=True`). Two fresh interpreters share an empty NUMBA_CACHE_DIR: the first call of the first pays the
   compile, the first call of the second only loads the cache; each is reported beside a second, warm call.
2. Scan (`scan`): selective_scan with D, z, delta_bias and softplus, as a Mamba block calls it, all inputs
   requiring grad; each timing is one forward + backward of a fixed random projection of the output and the final
   state. Full run: L = 2048, (batch, d_inner) in (1, 256), (4, 256), (1, 512), (4, 512), N = 16. The three
   implementations are timed alternately, one run each per round (kernel, chunked, loop), after one untimed warm-up
   round; medians over --repeats rounds of wall time and of this process's CPU time (on a shared machine other
   processes stretch wall time, not CPU time). Load averages before and after go into the JSON.
3. Small sizes (`small`, with --small instead of `scan`): kernel against chunked where `mamba.impl="auto"` would
   pick the kernel on the test suite's and the quick lab's models: (batch, d_inner) in SMALL_SHAPES, L in
   SMALL_LENGTHS, N = 16; forward + backward as in `scan`, and a forward under no_grad (prefill); alternating,
   medians over --repeats rounds of --inner calls each, in seconds per call.
4. GLA (`gla`, with --gla instead of the sections above): gla(impl="kernel") against gla(impl="chunked"), both
   with --chunk-size (default 16, the chunked form's CPU optimum; the kernel's steps between checkpoints; a GLA
   model's gla.chunk_size defaults to 64), q, k, v, g and the
   initial state requiring grad, g a log-sigmoid with decays near 1 (as GLA's init gives); forward + backward of a
   fixed random projection of the output and the final state, and a no_grad forward, alternating as in `small`.
   (batch, heads, dk, dv, L): GLA_SHAPES (training shapes, those of bench_recurrence_kernels.py), or with --small
   GLA_SMALL_SHAPES x SMALL_LENGTHS (the tests' tiny model: batch 2, 2 heads, dk 8, dv 16; the quick lab's
   quality models: batch 16, 4 heads, dk 4-8, dv 8-16; its training section: batch 4).
5. Delta rule (`delta_rule`, with --delta-rule): delta_rule(impl="kernel") against impl="chunked" as in 4, keys
   L2-normalized, beta a sigmoid, g a log-sigmoid with decays near 1 (Gated DeltaNet), or no g with --plain
   (DeltaNet); --chunk-size defaults to 32 here (deltanet.chunk_size's default, the chunked form's CPU optimum).
   Training shapes GLA_SHAPES; with --small DELTA_SMALL_SHAPES x SMALL_LENGTHS (the tests' tiny model: batch 2,
   2 heads, dk 12, dv 24; the quick lab's: batch 16, 4 heads, dk 6-12, dv 12-24; batch 4, dk 16, dv 32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab.measure import load_average
from seqlab.ops import delta_rule, gla, selective_scan

IMPLS = ("kernel", "chunked", "ref")  # ref: the sequential loop (the naive twin), the "loop"
SMALL_SHAPES = ((1, 32), (2, 64), (16, 64), (4, 128))  # (batch, d_inner): tests (2, 64), the quick lab's models
SMALL_LENGTHS = (1, 8, 32, 128, 512)
GLA_SHAPES = ((1, 4, 64, 64, 2048), (2, 4, 64, 64, 1024), (4, 2, 32, 32, 512), (1, 2, 32, 32, 2048))
GLA_SMALL_SHAPES = ((2, 2, 8, 16), (16, 4, 4, 8), (16, 4, 8, 16), (4, 4, 16, 32))  # (batch, heads, dk, dv)
DELTA_SMALL_SHAPES = ((2, 2, 12, 24), (16, 4, 6, 12), (16, 4, 12, 24), (4, 4, 16, 32))

COMPILE_PROBE = """
import json, sys, time, torch
from seqlab.ops import selective_scan
torch.set_num_threads(1)
t0 = time.perf_counter()
import seqlab.ops.kernels  # imports numba
imported = time.perf_counter() - t0
x = {k: torch.randn(*s, requires_grad=True) for k, s in dict(u=(1, 8, 32), delta=(1, 8, 32), A=(8, 4), B=(1, 4, 32),
     C=(1, 4, 32), D=(8,), z=(1, 8, 32), delta_bias=(8,)).items()}
def call():
    t = time.perf_counter()
    y, s = selective_scan(**x, delta_softplus=True, return_final_state=True, impl="kernel")
    (y.sum() + s.sum()).backward()
    return time.perf_counter() - t
print(json.dumps(dict(import_s=imported, first_call_s=call(), second_call_s=call())))
"""


def compile_section():
    """First-call seconds of a cold cache (compiles) and of a warm one (loads), each in a fresh interpreter."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, OMP_NUM_THREADS="1")
        for name in ("cold_cache", "warm_cache"):
            proc = subprocess.run([sys.executable, "-c", COMPILE_PROBE], env=env, capture_output=True, text=True,
                                  check=True)
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["compile_s"] = out["cold_cache"]["first_call_s"] - out["cold_cache"]["second_call_s"]
    out["cache_load_s"] = out["warm_cache"]["first_call_s"] - out["warm_cache"]["second_call_s"]
    print(f"compile (fp32 forward + backward, first call with an empty cache): {out['compile_s']:.1f} s; "
          f"loading the cached code: {out['cache_load_s']:.2f} s; import numba + kernels: "
          f"{out['cold_cache']['import_s']:.2f} s")
    return out


def scan_case(L, batch, d_inner, N, seed=0):
    """run(impl): one forward + backward of the scan on fixed inputs, as a Mamba block calls it."""
    gen = torch.Generator().manual_seed(seed)
    x = dict(u=torch.randn(batch, d_inner, L, generator=gen),
             delta=torch.randn(batch, d_inner, L, generator=gen) * 0.5,
             A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(d_inner, 1),  # S4D-real init, as in Mamba
             B=torch.randn(batch, N, L, generator=gen), C=torch.randn(batch, N, L, generator=gen),
             D=torch.ones(d_inner), z=torch.randn(batch, d_inner, L, generator=gen),
             delta_bias=torch.log(torch.expm1(torch.full((d_inner,), 0.01))))  # softplus(bias) = 0.01
    x = {k: t.requires_grad_() for k, t in x.items()}
    gy = torch.randn(batch, d_inner, L, generator=gen)

    def run(impl):
        for t in x.values():
            t.grad = None
        y, s = selective_scan(**x, delta_softplus=True, return_final_state=True, impl=impl)
        ((y * gy).sum() + s.sum()).backward()

    @torch.no_grad()
    def forward(impl):
        selective_scan(**x, delta_softplus=True, return_final_state=True, impl=impl)
    return run, forward


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def scan_section(shapes, L, N, repeats, impls):
    rows = []
    print(f"{'batch':>5s} {'d_inner':>7s} {'L':>5s} " + " ".join(f"{i + ' s':>10s}" for i in impls)
          + f" {'kernel vs chunked':>17s} {'kernel vs loop':>14s}")
    for batch, d_inner in shapes:
        run, _ = scan_case(L, batch, d_inner, N)
        for impl in impls:  # warm-up round: first-call costs (allocator, numba dispatch) out of the figures
            run(impl)
        times = {impl: [] for impl in impls}
        for _ in range(repeats):
            for impl in impls:  # alternating: machine load hits every implementation alike
                times[impl].append(timed(lambda impl=impl, run=run: run(impl)))
        row = dict(batch=batch, d_inner=d_inner, L=L, N=N, repeats=repeats)
        for impl in impls:
            row[f"{impl}_s"] = statistics.median(w for w, _ in times[impl])
            row[f"{impl}_cpu_s"] = statistics.median(c for _, c in times[impl])
        if "chunked" in impls:
            row["kernel_vs_chunked"] = row["chunked_s"] / row["kernel_s"]
        if "ref" in impls:
            row["kernel_vs_loop"] = row["ref_s"] / row["kernel_s"]
        rows.append(row)
        vs = [f"{row[k]:.1f}x" if k in row else "-" for k in ("kernel_vs_chunked", "kernel_vs_loop")]
        print(f"{batch:5d} {d_inner:7d} {L:5d} " + " ".join(f"{row[f'{i}_s']:10.3f}" for i in impls)
              + f" {vs[0]:>17s} {vs[1]:>14s}", flush=True)
    return rows


def small_section(repeats, inner):
    """Kernel vs chunked, forward + backward and no_grad forward, at every small (batch, d_inner) x L."""
    cases = [(dict(batch=batch, d_inner=d_inner, L=L, N=16), scan_case(L, batch, d_inner, 16))
             for batch, d_inner in SMALL_SHAPES for L in SMALL_LENGTHS]
    return compare(cases, repeats, inner)


def recurrence_case(op, batch, heads, dk, dv, L, chunk_size, gated=True, seed=0):
    """run(impl), forward(impl): one forward + backward, and one no_grad forward, of `op` ("gla" or "delta_rule";
    gated=False: the delta rule without g) on fixed inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = {n: torch.randn(batch, heads, L, d, generator=gen) for n, d in (("q", dk), ("k", dk), ("v", dv))}
    if op == "gla":
        fn = gla
        x["g"] = F.logsigmoid(torch.randn(batch, heads, L, dk, generator=gen) + 3)  # decays near 1
    else:
        fn = delta_rule
        x["k"] = F.normalize(x["k"], dim=-1)  # as the mixers make them
        x["beta"] = torch.sigmoid(torch.randn(batch, heads, L, generator=gen))
        if gated:
            x["g"] = F.logsigmoid(torch.randn(batch, heads, L, generator=gen) + 3)
    x["initial_state"] = torch.randn(batch, heads, dk, dv, generator=gen)
    x = {k: t.requires_grad_() for k, t in x.items()}
    go, gs = torch.randn(batch, heads, L, dv, generator=gen), torch.randn(batch, heads, dk, dv, generator=gen)

    def run(impl):
        for t in x.values():
            t.grad = None
        o, s = fn(**x, return_final_state=True, impl=impl, chunk_size=chunk_size)
        ((o * go).sum() + (s * gs).sum()).backward()

    @torch.no_grad()
    def forward(impl):
        fn(**x, return_final_state=True, impl=impl, chunk_size=chunk_size)
    return run, forward


def recurrence_section(op, shapes, repeats, inner, chunk_size, gated=True):
    """`op`'s kernel vs chunked, forward + backward and no_grad forward, at every (batch, heads, dk, dv, L)."""
    cases = [(dict(batch=b, heads=h, dk=dk, dv=dv, L=L, chunk_size=chunk_size),
              recurrence_case(op, b, h, dk, dv, L, chunk_size, gated)) for b, h, dk, dv, L in shapes]
    return compare(cases, repeats, inner)


def compare(cases, repeats, inner):
    """For each (shape dict, (run, forward)): kernel vs chunked, forward + backward and no_grad forward, alternating,
    medians over `repeats` rounds of `inner` calls, wall and CPU seconds per call."""
    rows = []
    print(" ".join(f"{k:>7s}" for k in cases[0][0]) + f" {'kernel fb ms':>12s} {'chunked fb ms':>13s} {'ratio':>6s} "
          f"{'kernel fwd ms':>13s} {'chunked fwd ms':>14s} {'ratio':>6s}   (CPU time)")
    for shape, case in cases:
        fns = dict(zip(("fwd_bwd", "fwd"), case))
        row = dict(shape, repeats=repeats, inner=inner)
        for mode, fn in fns.items():
            times = {impl: [] for impl in ("kernel", "chunked")}
            for impl in times:
                fn(impl)  # warm-up
            for _ in range(repeats):
                for impl in times:  # alternating
                    w, c = timed(lambda impl=impl, fn=fn: [fn(impl) for _ in range(inner)])
                    times[impl].append((w / inner, c / inner))
            for impl in times:
                row[f"{mode}_{impl}_s"] = statistics.median(w for w, _ in times[impl])
                row[f"{mode}_{impl}_cpu_s"] = statistics.median(c for _, c in times[impl])
            row[f"{mode}_kernel_vs_chunked"] = row[f"{mode}_chunked_s"] / row[f"{mode}_kernel_s"]
            row[f"{mode}_kernel_vs_chunked_cpu"] = row[f"{mode}_chunked_cpu_s"] / row[f"{mode}_kernel_cpu_s"]
        rows.append(row)
        print(" ".join(f"{v:7d}" for v in shape.values()) + " " + " ".join(
            f"{row[f'{m}_kernel_cpu_s'] * 1e3:12.3f} {row[f'{m}_chunked_cpu_s'] * 1e3:13.3f} "
            f"{row[f'{m}_kernel_vs_chunked_cpu']:5.1f}x" for m in fns), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/kernels[_quick].json)")
    p.add_argument("--quick", action="store_true", help="small shapes, 2 rounds: a smoke run")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per shape (medians reported)")
    p.add_argument("--no-loop", action="store_true", help="time the kernel and the chunked form only")
    p.add_argument("--shapes", default=None, help="batch x d_inner pairs, e.g. 1x256,4x512 (default: the full set)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default 2048; --quick 256)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: compile, scan")
    p.add_argument("--small", action="store_true",
                   help="the small sizes of the tests and the quick lab instead of the L = 2048 scan section")
    p.add_argument("--inner", type=int, default=5, help="calls per timed round in the --small section")
    p.add_argument("--gla", action="store_true", help="GLA's kernel vs its chunked form instead of the selective "
                   "scan (training shapes; with --small the small sizes; with --quick one small shape)")
    p.add_argument("--delta-rule", action="store_true", help="the gated delta rule's kernel vs its chunked form "
                   "(with --plain: without g), as --gla")
    p.add_argument("--plain", action="store_true", help="--delta-rule: no gate (DeltaNet)")
    p.add_argument("--chunk-size", type=int, default=None, help="chunk_size of both implementations (--gla: 16, "
                   "the op's default and the chunked form's CPU optimum; a GLA model's is 64; --delta-rule: 32)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        shapes, L, N, args.repeats = [(1, 64)], 256, 16, 2
    else:
        shapes, L, N = [(1, 256), (4, 256), (1, 512), (4, 512)], 2048, 16
    if args.shapes:
        shapes = [tuple(int(v) for v in pair.split("x")) for pair in args.shapes.split(",")]
    L = args.length or L
    impls = IMPLS[:2] if args.no_loop else IMPLS
    import numba  # optional dependency: the `kernels` extra; without it this benchmark has nothing to measure

    load_before = load_average()
    print(f"torch {torch.__version__}, numba {numba.__version__}, {torch.get_num_threads()} thread, "
          f"load average {load_before}")
    op = "gla" if args.gla else "delta_rule" if args.delta_rule else None
    default_chunk = {"gla": 16, "delta_rule": 32}.get(op)
    if op is not None:
        small_shapes = GLA_SMALL_SHAPES if op == "gla" else DELTA_SMALL_SHAPES
        shapes = ([(1, 2, 32, 32, 256)] if args.quick else
                  [(*s, L) for s in small_shapes for L in SMALL_LENGTHS] if args.small else GLA_SHAPES)
        chunk = args.chunk_size or default_chunk
        parts = {op: recurrence_section(op, shapes, args.repeats, args.inner if args.small else 1, chunk,
                                        not args.plain), "gated": op == "gla" or not args.plain}
    else:
        compiled = None if "compile" in skip else compile_section()
        rows = [] if "scan" in skip or args.small else scan_section(shapes, L, N, args.repeats, impls)
        parts = dict(compile=compiled, scan=rows, small=small_section(args.repeats, args.inner) if args.small else None)
    result = dict(torch=torch.__version__, numba=numba.__version__, threads=torch.get_num_threads(),
                  cpus=os.cpu_count(), machine=platform.machine(), python=sys.version.split()[0],
                  load_before=load_before, load_after=load_average(), quick=args.quick,
                  command=" ".join(sys.argv), **parts)
    name = ("kernels" + (f"_{op}" if op else "") + ("_plain" if op == "delta_rule" and args.plain else "")
            + (f"_chunk{args.chunk_size}" if args.chunk_size not in (None, default_chunk) else "")
            + ("_small" if args.small else "") + ("_quick" if args.quick and not args.small else ""))
    out = Path(args.out or f"benchmarks/results/{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
