"""Could a numba kernel beat the chunked matmul form of GLA and of the delta rule? A forward-only prototype of each
recurrence, timed against `seqlab.ops.gla` / `seqlab.ops.delta_rule` (impl="chunked") at training shapes, one thread.

    PYTHONPATH=src python benchmarks/bench_recurrence_kernels.py           # the full run, ~15 s (plus compiling)
    PYTHONPATH=src python benchmarks/bench_recurrence_kernels.py --quick   # one small shape, seconds (plus compiling)

Issue 20 asks for numba kernels of "the GLA and delta-rule recurrences where the kernel beats the chunked matmul
form". A training kernel has to run forward and backward; its backward walks the recurrence again in reverse (with
the states recomputed) and does at least the forward's work, as the selective-scan kernel's does. So its forward
+ backward costs at least twice its forward. The prototypes below are the forward recurrence alone, one fused pass
over the (dk, dv) state per step (two for the delta rule, which first reads S^T k), written for LLVM to vectorize
over dv (fastmath reassoc/contract, contiguous rows). The decision per shape, from CPU-time medians:
    bound = chunked forward + backward time / (2 x prototype forward time)
bound < 1: even a backward as cheap as the forward would leave the kernel slower than the chunked form, so the
kernel cannot pay; bound > 1 says only that it might. `estimate` assumes a backward of twice the forward (the
reverse walk reads and writes the state gradient and recomputes the states), chunked fwd+bwd / (3 x prototype fwd):
the speedup a kernel of that cost would give.

GLA:        S_t = diag(exp g_t) S_{t-1} + k_t v_t^T,                    o_t = S_t^T (scale q_t)
delta rule: S_t = a_t S_{t-1} + k_t u_t^T, u_t = beta_t (v_t - a_t S_{t-1}^T k_t),  o_t = S_t^T (scale q_t)
(the equations of seqlab/ops/gla.py and seqlab/ops/delta_rule.py; the prototypes' outputs are checked against the
chunked form before timing: max |difference| <= 1e-3 on outputs of order 1, or the run stops.)

Timed, alternating per round (seqlab.measure.alternate), medians over --repeats rounds of wall and CPU time:
`kernel_fwd` (the prototype, inputs already numpy), `chunked_fwd` (no_grad), `chunked_fwd_bwd` (forward, then
backward of a fixed random projection of the output into q, k, v, g / beta). Saved:
benchmarks/results/recurrence_kernels[_quick].json with the shapes, load averages, numba's version and the bounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from seqlab.measure import alternate, load_average
from seqlab.ops import delta_rule, gla

SHAPES = ((1, 4, 64, 2048), (2, 4, 64, 1024), (4, 2, 32, 512), (1, 2, 32, 2048))  # (batch, heads, head dim, L)
QUICK_SHAPES = ((1, 2, 32, 256),)
TOL = 1e-3
jit = numba.njit(cache=False, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")


@jit
def gla_forward(q, k, v, g, scale, o):  # q, k, g (BH, L, dk); v, o (BH, L, dv); fp32
    BH, L, dk = q.shape
    dv = v.shape[2]
    S = np.zeros((dk, dv), dtype=np.float32)
    for bh in range(BH):
        S[:] = 0
        for t in range(L):
            ot = o[bh, t]
            ot[:] = 0
            vt = v[bh, t]
            for i in range(dk):  # one pass over S: decay, write, read
                a = math.exp(g[bh, t, i])
                ki = k[bh, t, i]
                qi = q[bh, t, i] * scale
                Si = S[i]
                for j in range(dv):
                    s = a * Si[j] + ki * vt[j]
                    Si[j] = s
                    ot[j] += qi * s


@jit
def delta_forward(q, k, v, beta, g, scale, o):  # q, k (BH, L, dk); v, o (BH, L, dv); beta, g (BH, L); fp32
    BH, L, dk = q.shape
    dv = v.shape[2]
    S = np.zeros((dk, dv), dtype=np.float32)
    w = np.zeros(dv, dtype=np.float32)
    for bh in range(BH):
        S[:] = 0
        for t in range(L):
            a = math.exp(g[bh, t])
            b = beta[bh, t]
            vt = v[bh, t]
            ot = o[bh, t]
            w[:] = 0
            for i in range(dk):  # pass 1: w = S^T k
                ki = k[bh, t, i]
                Si = S[i]
                for j in range(dv):
                    w[j] += ki * Si[j]
            for j in range(dv):  # u_t, kept in w
                w[j] = b * (vt[j] - a * w[j])
            ot[:] = 0
            for i in range(dk):  # pass 2: decay, rank-1 write, read
                ki = k[bh, t, i]
                qi = q[bh, t, i] * scale
                Si = S[i]
                for j in range(dv):
                    s = a * Si[j] + ki * w[j]
                    Si[j] = s
                    ot[j] += qi * s


def inputs(op, B, H, d, L, seed=0):
    """The op's inputs as the mixers make them: L2-normalized keys for the delta rule, log-sigmoid gates."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, d, generator=gen) for _ in range(3))
    if op == "gla":
        g = F.logsigmoid(torch.randn(B, H, L, d, generator=gen) + 3)  # decays near 1, as GLA's init gives
        return dict(q=q, k=k, v=v, g=g)
    k = F.normalize(k, dim=-1)
    beta = torch.sigmoid(torch.randn(B, H, L, generator=gen))
    g = F.logsigmoid(torch.randn(B, H, L, generator=gen) + 3)
    return dict(q=q, k=k, v=v, beta=beta, g=g)


def case(op, B, H, d, L):
    """{variant: callable} and the prototype's max |difference| from the chunked form."""
    x = inputs(op, B, H, d, L)
    scale = np.float32(d ** -0.5)  # fp32, so the inner loops stay fp32
    fn = gla if op == "gla" else delta_rule
    flat = {n: t.reshape(B * H, L, -1).squeeze(-1).contiguous().numpy() for n, t in x.items()}
    out = np.zeros((B * H, L, d), dtype=np.float32)
    if op == "gla":
        def kernel_fwd():
            gla_forward(flat["q"], flat["k"], flat["v"], flat["g"], scale, out)
    else:
        def kernel_fwd():
            delta_forward(flat["q"], flat["k"], flat["v"], flat["beta"], flat["g"], scale, out)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    proj = torch.randn(B, H, L, d, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def chunked_fwd():
        return fn(**x, impl="chunked")[0]

    def chunked_fwd_bwd():
        for t in leaves.values():
            t.grad = None
        (fn(**leaves, impl="chunked")[0] * proj).sum().backward()

    kernel_fwd()
    diff = (torch.from_numpy(out).reshape(B, H, L, d) - chunked_fwd()).abs().max().item()
    return dict(kernel_fwd=kernel_fwd, chunked_fwd=chunked_fwd, chunked_fwd_bwd=chunked_fwd_bwd), diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small shape, 2 rounds: a smoke run")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per shape (medians reported)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/recurrence_kernels[_quick].json)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shapes, repeats = (QUICK_SHAPES, 2) if args.quick else (SHAPES, args.repeats)
    start, load_before = time.perf_counter(), load_average()
    print(f"torch {torch.__version__}, numba {numba.__version__}, {torch.get_num_threads()} thread, "
          f"load average {load_before}")
    rows = []
    for op in ("gla", "delta_rule"):
        for B, H, d, L in shapes:
            fns, diff = case(op, B, H, d, L)
            if diff > TOL:
                raise SystemExit(f"{op} prototype differs from the chunked form by {diff:.2e} at {(B, H, d, L)}")
            times = alternate(lambda name, fns=fns: fns[name](), {name: repeats for name in fns}, warmup=tuple(fns))
            row = dict(op=op, batch=B, heads=H, head_dim=d, L=L, repeats=repeats, max_abs_diff=diff)
            for name, (w, c) in times.items():
                row[f"{name}_s"], row[f"{name}_cpu_s"] = w, c
            row["kernel_fwd_vs_chunked_fwd"] = row["chunked_fwd_cpu_s"] / row["kernel_fwd_cpu_s"]
            row["bound"] = row["chunked_fwd_bwd_cpu_s"] / (2 * row["kernel_fwd_cpu_s"])
            row["estimate"] = row["chunked_fwd_bwd_cpu_s"] / (3 * row["kernel_fwd_cpu_s"])
            rows.append(row)
            ms = {name: row[f"{name}_cpu_s"] * 1e3 for name in fns}
            print(f"{op:10s} B {B} H {H} d {d:3d} L {L:5d}: CPU ms kernel fwd {ms['kernel_fwd']:7.2f}, "
                  f"chunked fwd {ms['chunked_fwd']:7.2f}, fwd+bwd {ms['chunked_fwd_bwd']:7.2f}"
                  f"; kernel fwd {row['kernel_fwd_vs_chunked_fwd']:.2f}x chunked fwd; bound {row['bound']:.1f}, "
                  f"estimate {row['estimate']:.1f} "
                  f"(max |diff| {diff:.1e})", flush=True)
    result = dict(torch=torch.__version__, numba=numba.__version__, threads=torch.get_num_threads(),
                  cpus=os.cpu_count(), machine=platform.machine(), python=sys.version.split()[0],
                  load_before=load_before, load_after=load_average(), quick=args.quick,
                  command=" ".join(["python", *sys.argv]), tol=TOL, rows=rows, seconds=time.perf_counter() - start)
    out = Path(args.out or f"benchmarks/results/recurrence_kernels{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
