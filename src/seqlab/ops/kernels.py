"""Compiled CPU kernels (the optional extra `pip install seqlab[kernels]`, built on numba): one fused pass where eager
PyTorch makes many.

    selective_scan_kernel(...)   Mamba-1's selective scan, forward and backward; `selective_scan(..., impl="kernel")`,
                                 and what impl="auto" (mamba.impl's default) runs for CPU fp32 tensors
    (GLA's and the delta rule's kernels live in ops/gla_kernel.py and ops/delta_rule_kernel.py, built on this
    file's jit options and fp32 exp.)

Why a kernel: Mamba-1's decay exp(delta A) differs per (channel, state) pair, so every algorithm does
O(batch * d_inner * L * N) elementwise work. Eager PyTorch runs that work as ~10 separate passes over memory per
step (the chunked form) or per token (the loop); here one time step at a time, the discretization, the state
update, the C contraction, the D skip and the z gate run back to back on every channel's (N, d_inner) state, which
stays in cache. The inner loops run over channels (contiguous, d_inner long), so LLVM vectorizes them; a loop over
the N = 16 states of one channel measured ~1.5x slower forward + backward (too short for the vector loop's setup).

Glossary (as ops/selective_scan.py): u x_t, delta Delta_t, A, B_t, C_t, D, z the gate, h the state h_t (x there),
K the checkpoint interval. For every batch b and channel d, over l = 0 .. L-1 and n = 0 .. N-1:

    dt_l = softplus(delta_l + delta_bias)                (bias and softplus each optional)
    h_l[n] = exp(dt_l A[n]) h_{l-1}[n] + dt_l B_l[n] u_l
    y_l = (sum_n h_l[n] C_l[n] + D u_l) * silu(z_l)      (D and z optional)

Backward, with lam_l = dLoss/dh_l (the adjoint state) and gp_l = dLoss/d(y_l before the gate):
    lam_l = gp_l C_l + exp(dt_{l+1} A) lam_{l+1}     (lam_{L-1} also gets the final state's gradient)
    gC_l += gp_l h_l,   gB_l += lam_l dt_l u_l,   gu_l = gp_l D + dt_l sum_n lam_l B_l,
    gdt_l = sum_n lam_l (A exp(dt_l A) h_{l-1} + B_l u_l),   gA += lam_l dt_l exp(dt_l A) h_{l-1},
    gdelta_l = gdt_l * sigmoid(delta_l + delta_bias) (softplus' derivative),   gh_{-1} = exp(dt_0 A) lam_0.
The backward needs h_{l-1} at every step, walking backwards. Storing all of them is a (batch, d_inner, L, N)
tensor (1 GiB at batch 4, d_inner 512, N 16, L 8192); instead forward keeps the state every K steps
((batch, ceil(L / K), N, d_inner)) and backward recomputes one segment of K states (and their decays) at a time
from its checkpoint into (K + 1, N, d_inner) buffers: one extra forward pass of arithmetic, K times less memory.

Precision: the kernels run in the inputs' dtype. fp32 uses its own vectorizable exp and softplus (below, about
1 ulp; outputs and gradients measured within 3e-7 of the fp64 twin, relative to their largest value); fp64 inputs
compile a second specialization with libm's, which the tests use to check the algebra to rounding. Sums over the
batch, channels and time (gA, gB, gC, gD, gdelta_bias) accumulate in fp64.
numba compiles on first call (seconds) and caches the machine code next to this file (`cache=True`), so later
processes load it instead. One thread (`parallel=False`): batches and channels would parallelize, but this
project measures on one thread and shares its cores.
"""

from __future__ import annotations

import math

import numba  # the optional `kernels` extra: imported only for impl="kernel" (and "auto" where numba is installed)
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from seqlab.errors import InputError

_BLOCK = 8  # channels moved together by _load / _store: 8 rows of a sequence, 8 ways of an L1 set at most
CHECKPOINT = 64  # default K, steps between stored states: memory / K, one recomputed segment of K states in L1
# What lets LLVM vectorize the loops: reassoc, the sums over n (no assumption about inf or nan is made); numpy's
# error model, divisions without a ZeroDivisionError branch. And each loop over n writes one or two arrays: LLVM
# vectorizes a loop only after run-time checks that its arrays do not overlap, and gives up past 8 of them.
JIT_OPTIONS = dict(parallel=False, cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")
jit = numba.njit(**JIT_OPTIONS)


def selective_scan_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, checkpoint):
    """The fused scan on checked inputs, all in one compute dtype (fp32 or fp64) on the CPU; D, z, delta_bias,
    initial_state may be None. checkpoint: K, steps between the states kept for backward (None: CHECKPOINT).
    Returns (y (b, d, L), final state (b, d, N)), both differentiable (first order)."""
    if u.device.type != "cpu":
        raise InputError(f"selective_scan: impl='kernel' runs on the CPU, got tensors on {u.device}")
    K = CHECKPOINT if checkpoint is None else checkpoint
    return _KernelScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                             min(K, u.shape[-1]))


def _np(t):
    """A contiguous numpy view of a CPU tensor (no copy when already contiguous)."""
    return t.detach().contiguous().numpy()


class _KernelScan(torch.autograd.Function):
    """Autograd around the two kernels. u, delta, z, y and their gradients stay (b, d, L): the kernels move one
    segment of steps at a time between that layout and a time-major (steps, d) buffer, so no (b, d, L) tensor is
    copied here and the gradients come back in the inputs' own layout (a transposed one would be copied once more
    when autograd accumulates it). B and C (small: no d) go in as (b, L, N), A as (N, d), states as (b, N, d).
    Missing optional inputs go in as zeros (D, delta_bias, initial state) or a flag (z), so numba compiles one
    specialization per dtype, not one per combination of Nones."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, x0, softplus, K):
        b, d, L = u.shape
        N = A.shape[1]
        At, Bt, Ct = A.detach().t().contiguous(), _rows(B), _rows(C)  # (N, d), (b, L, N), (b, L, N)
        zv = z if z is not None else u  # unread when has_z is False
        Dv = D if D is not None else u.new_zeros(d)
        bias = delta_bias if delta_bias is not None else u.new_zeros(d)
        h0 = x0.detach().transpose(1, 2).contiguous() if x0 is not None else u.new_zeros(b, N, d)
        y, hL = u.new_empty(b, d, L), u.new_empty(b, N, d)
        ckpt = u.new_empty(b, -(-L // K), N, d)  # the state entering steps 0, K, 2K, ...
        _scan_forward(_np(u), _np(delta), _np(bias), softplus, _np(At), _np(Bt), _np(Ct), _np(Dv), _np(zv),
                      z is not None, _np(h0), K, y.numpy(), hL.numpy(), ckpt.numpy())
        ctx.save_for_backward(u, delta, bias, At, Bt, Ct, Dv, zv, ckpt)
        ctx.flags = (softplus, z is not None, D is not None, delta_bias is not None, x0 is not None, K)
        return y, hL.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghL):
        u, delta, bias, At, Bt, Ct, Dv, zv, ckpt = ctx.saved_tensors
        softplus, has_z, has_D, has_bias, has_x0, K = ctx.flags
        b, d, L = u.shape
        N = At.shape[0]
        gy = gy if gy is not None else u.new_zeros(b, d, L)
        ghL = ghL.to(u.dtype).transpose(1, 2).contiguous() if ghL is not None else u.new_zeros(b, N, d)
        gu, gdelta, gz, gh0 = u.new_empty(b, d, L), u.new_empty(b, d, L), u.new_empty(b, d, L), u.new_empty(b, N, d)
        f64 = dict(dtype=torch.float64)
        gA, gB, gC = torch.zeros(N, d, **f64), torch.zeros(b, L, N, **f64), torch.zeros(b, L, N, **f64)
        gD, gbias = torch.zeros(d, **f64), torch.zeros(d, **f64)
        _scan_backward(_np(u), _np(delta), _np(bias), softplus, _np(At), _np(Bt), _np(Ct), _np(Dv), _np(zv), has_z,
                       _np(ckpt), K, _np(gy), _np(ghL), gu.numpy(), gdelta.numpy(), gA.numpy(), gB.numpy(),
                       gC.numpy(), gD.numpy(), gz.numpy(), gbias.numpy(), gh0.numpy(),
                       u.new_empty(K + 1, N, d).numpy())
        dt = u.dtype
        return (gu, gdelta, gA.to(dt).t(), gB.to(dt).transpose(1, 2), gC.to(dt).transpose(1, 2),
                gD.to(dt) if has_D else None, gz if has_z else None, gbias.to(dt) if has_bias else None,
                gh0.transpose(1, 2) if has_x0 else None, None, None)


def _rows(t):
    """(b, X, L) -> (b, L, X) contiguous: one time step's values side by side."""
    return t.detach().transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# exp that LLVM can vectorize. numba calls libm's scalar exp (no vector math library in the PyPI wheels), and the
# N decays exp(dt A[n]) of a step are most of the work. In fp32 this is Cephes' expf instead: Cody-Waite range
# reduction x = k ln2 + r, a degree-7 polynomial for exp(r) (about 1 ulp), 2^k written as float bits; arguments are
# clamped to [-87.3, 88.3], the normal fp32 range (a decay below e^-87.3 = 1.2e-38 stays 1.2e-38, not 0). In fp64
# it is libm's exp, exact to the last bit: the fp64 specialization exists for tests, not for speed.

_F = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
_LO, _HI, _ZERO, _HALF, _ONE, _TWO = _F(-87.33654), _F(88.37626), _F(0), _F(0.5), _F(1), _F(2)
_A3, _A5, _A7, _A9, _A11, _A13, _A15, _A17 = (_F(1 / k) for k in range(3, 18, 2))  # atanh's series: s^k / k
_P = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                           5.0000001201e-1))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits` (an LLVM bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


def _exp(x):
    """exp(x) (the jitted kernels get `_exp_impl`'s version)."""
    return math.exp(x)


@overload(_exp, inline="always")
def _exp_impl(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp32(x):
        x = min(max(x, _LO), _HI)
        k = math.floor(x * _LOG2E + _HALF)
        r = x - k * _LN2_HI - k * _LN2_LO
        p = _P[0]
        p = p * r + _P[1]
        p = p * r + _P[2]
        p = p * r + _P[3]
        p = p * r + _P[4]
        p = p * r + _P[5]
        return (p * r * r + r + _ONE) * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
    return exp32


def _softplus(x):
    """log(1 + exp(x)), as torch computes it: x itself above 20 (the jitted kernels get `_softplus_impl`'s)."""
    return x if x > 20.0 else math.log1p(math.exp(x))


@overload(_softplus, inline="always")
def _softplus_impl(x):
    """fp64: torch's formula with libm. fp32, vectorizable: max(x, 0) + log1p(v), v = exp(-|x|) in (0, 1], and
    log1p(v) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = v / (2 + v) in (0, 1/3]: nine terms reach 2^-26."""
    if x != types.float32:
        return lambda x: x if x > 20.0 else math.log1p(math.exp(x))

    def softplus32(x):
        v = _exp(min(x, -x))  # exp(-|x|)
        s = v / (_TWO + v)
        s2 = s * s
        p = (((((((_A17 * s2 + _A15) * s2 + _A13) * s2 + _A11) * s2 + _A9) * s2 + _A7) * s2 + _A5) * s2 + _A3) * s2
        return max(x, _ZERO) + _TWO * (s + s * p)
    return softplus32


@numba.njit(inline="always", **JIT_OPTIONS)
def _sigmoid(x):
    """1 / (1 + exp(-x)), vectorizable in fp32 through `_exp`."""
    return _ONE / (_ONE + _exp(-x))  # fp32 constants: a literal 1.0 would promote fp32 to fp64


# ---------------------------------------------------------------------------------------------------------------
# The kernels: loops over scalars that numba compiles. Sequences u, delta, z, y and their gradients are
# [batch, channel, step] and move through time-major segment buffers [step, channel] (`_load`, `_store`); B, C are
# [batch, step, n]; states [n, channel]. Every loop over channels is contiguous, so LLVM vectorizes it.


@jit
def _load(x, ib, t0, T, buf):
    """buf[j, c] = x[ib, c, t0 + j] for j < T: one segment of every channel, time-major. Each channel's T steps are
    read as one contiguous run; reading one step of every channel instead (a stride of L) was measured 2-3x slower
    in all, its cache lines evicting each other."""
    nc = x.shape[1]
    for c0 in range(0, nc, _BLOCK):
        for j in range(T):
            for c in range(c0, min(c0 + _BLOCK, nc)):
                buf[j, c] = x[ib, c, t0 + j]


@jit
def _store(buf, ib, t0, T, x):
    """x[ib, c, t0 + j] = buf[j, c] for j < T: the inverse of `_load`."""
    nc = x.shape[1]
    for c0 in range(0, nc, _BLOCK):
        for j in range(T):
            for c in range(c0, min(c0 + _BLOCK, nc)):
                x[ib, c, t0 + j] = buf[j, c]


@jit
def _row_prep(delta, bias, u, softplus, dt, dtu):
    """One step of all channels: dt = softplus(delta + bias) (or without softplus) and dt * u, vectorized."""
    for c in range(dt.shape[0]):
        raw = delta[c] + bias[c]
        dt[c] = _softplus(raw) if softplus else raw
        dtu[c] = dt[c] * u[c]


@jit
def _scan_forward(u, delta, bias, softplus, At, B, C, D, z, has_z, h0, K, y, hL, ckpt):
    """y (b, d, L) and the final state hL[b] (N, d) from h0; ckpt[b, s] = the state entering step s * K. One
    segment of K steps at a time: its u, delta, z loaded time-major, its y stored back."""
    nb, nc, L = u.shape
    N = At.shape[0]
    h = np.empty_like(At)  # (N, d) the running state
    dt, dtu, yv, e = np.empty_like(bias), np.empty_like(bias), np.empty_like(bias), np.empty_like(bias)  # (d,)
    ub, db, zb = np.empty((K, nc), At.dtype), np.empty((K, nc), At.dtype), np.empty((K, nc), At.dtype)
    for ib in range(nb):
        h[:] = h0[ib]
        for s in range(ckpt.shape[1]):
            t0 = s * K
            T = min(K, L - t0)
            ckpt[ib, s] = h
            _load(u, ib, t0, T, ub)
            _load(delta, ib, t0, T, db)
            if has_z:
                _load(z, ib, t0, T, zb)
            for j in range(T):
                t = t0 + j
                _row_prep(db[j], bias, ub[j], softplus, dt, dtu)
                for c in range(nc):
                    yv[c] = D[c] * ub[j, c]
                for n in range(N):
                    bn, cn = B[ib, t, n], C[ib, t, n]
                    hn, an = h[n], At[n]
                    for c in range(nc):
                        e[c] = _exp(dt[c] * an[c])
                    for c in range(nc):
                        hn[c] = e[c] * hn[c] + dtu[c] * bn
                    for c in range(nc):
                        yv[c] += hn[c] * cn
                out = db[j]  # delta's row is used up: it takes y's
                if has_z:
                    for c in range(nc):
                        out[c] = yv[c] * zb[j, c] * _sigmoid(zb[j, c])  # times silu(z)
                else:
                    out[:] = yv
            _store(db, ib, t0, T, y)
        hL[ib] = h


@jit
def _scan_backward(u, delta, bias, softplus, At, B, C, D, z, has_z, ckpt, K, gy, ghL,
                   gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0, hs):
    """Gradients of everything from gy (b, d, L) and ghL (b, N, d), walking each sequence backwards one checkpoint
    segment at a time: load the segment's u, delta, z, gy time-major; recompute its K + 1 states from its
    checkpoint into hs (K + 1, N, d) and its decays into es (K, N, d) (one exp per value instead of two; measured
    ~15% faster than recomputing them); run the adjoint lam (N, d) over it; store its gu, gdelta, gz. gh0 is
    written; gA (N, d), gB, gC, gD, gbias (fp64) are accumulated into (gA per segment in the compute dtype first)."""
    nb, nc, L = u.shape
    N = At.shape[0]
    lam, gA_seg = np.empty_like(At), np.empty_like(At)  # (N, d) the adjoint state, one segment's share of gA
    es = np.empty_like(hs[1:])  # (K, N, d) the segment's decays exp(dt A), computed once for both passes
    row = np.empty_like(bias)
    dt, dtu, g, w, acc_dt, acc_u = row.copy(), row.copy(), row.copy(), row.copy(), row.copy(), row.copy()
    ub, db, zb, gb = (np.empty((K, nc), At.dtype), np.empty((K, nc), At.dtype), np.empty((K, nc), At.dtype),
                      np.empty((K, nc), At.dtype))  # the segment, time-major; gb, db, zb then take gu, gdelta, gz
    for ib in range(nb):
        lam[:] = ghL[ib]
        for s in range((L - 1) // K, -1, -1):
            t0 = s * K
            T = min(K, L - t0)
            _load(u, ib, t0, T, ub)
            _load(delta, ib, t0, T, db)
            _load(gy, ib, t0, T, gb)
            if has_z:
                _load(z, ib, t0, T, zb)
            # recompute: hs[j + 1] is the state after step t0 + j, hs[0] the one entering the segment
            hs[0] = ckpt[ib, s]
            gA_seg[:] = 0
            for j in range(T):
                t = t0 + j
                _row_prep(db[j], bias, ub[j], softplus, dt, dtu)
                for n in range(N):
                    bn, an, en, hp, hn = B[ib, t, n], At[n], es[j, n], hs[j, n], hs[j + 1, n]
                    for c in range(nc):
                        en[c] = _exp(dt[c] * an[c])
                    for c in range(nc):
                        hn[c] = en[c] * hp[c] + dtu[c] * bn
            for j in range(T - 1, -1, -1):
                t = t0 + j
                uj, dj, zj, gj = ub[j], db[j], zb[j], gb[j]
                _row_prep(dj, bias, uj, softplus, dt, dtu)
                g[:] = gj
                if has_z:  # the gate: y = p * silu(z), p = <h, C> + D u; g becomes dLoss/dp
                    for c in range(nc):
                        w[c] = D[c] * uj[c]
                    for n in range(N):
                        cn, hn = C[ib, t, n], hs[j + 1, n]
                        for c in range(nc):
                            w[c] += hn[c] * cn
                    for c in range(nc):
                        zc = zj[c]
                        sg = _sigmoid(zc)
                        zj[c] = g[c] * w[c] * sg * (1 + zc * (1 - sg))  # z's row is used up: it takes gz's
                        g[c] *= zc * sg
                for c in range(nc):
                    gD[c] += g[c] * uj[c]
                    acc_dt[c] = 0
                    acc_u[c] = 0
                for n in range(N):
                    bn, cn = B[ib, t, n], C[ib, t, n]
                    ln, an, hp, hn, ga, en = lam[n], At[n], hs[j, n], hs[j + 1, n], gA_seg[n], es[j, n]
                    for c in range(nc):  # lam_t = C_t g + (what flowed back from t + 1)
                        ln[c] += g[c] * cn
                    sc, sb = 0.0, 0.0  # gC and gB at (t, n): sums over channels
                    for c in range(nc):
                        sc += g[c] * hn[c]
                    for c in range(nc):
                        sb += ln[c] * dtu[c]
                    gC[ib, t, n] += sc
                    gB[ib, t, n] += sb
                    for c in range(nc):
                        acc_u[c] += ln[c] * bn
                    for c in range(nc):  # lam e, e = exp(dt A): lam's share of lam_{t-1}
                        ln[c] *= en[c]
                    for c in range(nc):  # dLoss / d(dt A) = lam e h_{t-1}
                        w[c] = ln[c] * hp[c]
                    for c in range(nc):
                        ga[c] += w[c] * dt[c]
                    for c in range(nc):
                        acc_dt[c] += w[c] * an[c]
                for c in range(nc):
                    # d dt / d raw: softplus' derivative is the sigmoid (1 above torch's threshold 20)
                    raw = dj[c] + bias[c]
                    ddt = _sigmoid(raw) if softplus and raw <= 20 else raw - raw + 1
                    graw = (acc_dt[c] + uj[c] * acc_u[c]) * ddt
                    gbias[c] += graw
                    dj[c] = graw  # delta's row is used up: it takes gdelta's
                    gj[c] = g[c] * D[c] + dt[c] * acc_u[c]  # gy's row takes gu's
            gA += gA_seg  # a segment's sum in the compute dtype, the total in fp64
            _store(gb, ib, t0, T, gu)
            _store(db, ib, t0, T, gdelta)
            if has_z:
                _store(zb, ib, t0, T, gz)
        gh0[ib] = lam
