"""Compiled CPU kernels (the optional extra `pip install seqlab[kernels]`, built on numba): one fused pass where eager
PyTorch makes many.

    selective_scan_kernel(...)   Mamba-1's selective scan, forward and backward; `selective_scan(..., impl="kernel")`

Why a kernel: Mamba-1's decay exp(delta A) differs per (channel, state) pair, so every algorithm does
O(batch * d_inner * L * N) elementwise work. Eager PyTorch runs that work as ~10 separate passes over memory per
step (the chunked form) or per token (the loop); here each (batch, channel) pair runs its whole sequence with its N
states in registers/L1, discretization, scan, C contraction, D skip and z gate in one loop.

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
((batch, d_inner, ceil(L / K), N)) and backward recomputes one segment of K states at a time from its checkpoint
into a (K + 1, N) buffer: one extra forward pass of arithmetic, K times less memory.

Precision: the kernels run in the inputs' dtype. fp32 uses its own vectorizable exp and softplus (below, about
1 ulp; outputs and gradients measured within 3e-7 of the fp64 twin, relative to their largest value); fp64 inputs
compile a second specialization with libm's, which the tests use to check the algebra to rounding. Sums over the
batch, channels and time (gA, gB, gC, gD, gdelta_bias) accumulate in fp64.
numba compiles on first call (seconds) and caches the machine code next to this file (`cache=True`), so later
processes load it instead. One thread (`parallel=False`): the (batch, channel) pairs would parallelize, but this
project measures on one thread and shares its cores.
"""

from __future__ import annotations

import math

import numba  # the optional `kernels` extra: ops/selective_scan.py imports this module only for impl="kernel"
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from seqlab.errors import InputError

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
    """Autograd around the two kernels. B and C go in as (b, L, N) so one step's N values are contiguous; missing
    optional inputs go in as zeros (D, delta_bias, initial state) or a flag (z), so numba compiles one
    specialization per dtype instead of one per combination of Nones."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, x0, softplus, K):
        b, d, L = u.shape
        N = A.shape[1]
        Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, L, N)
        Dv = D if D is not None else u.new_zeros(d)
        bias = delta_bias if delta_bias is not None else u.new_zeros(d)
        zv = z if z is not None else u  # unread when has_z is False
        h0 = x0 if x0 is not None else u.new_zeros(b, d, N)
        y, hL = u.new_empty(b, d, L), u.new_empty(b, d, N)
        ckpt = u.new_empty(b, d, -(-L // K), N)  # the state entering steps 0, K, 2K, ...
        _scan_forward(_np(u), _np(delta), _np(bias), softplus, _np(A), _np(Bt), _np(Ct), _np(Dv), _np(zv),
                      z is not None, _np(h0), K, y.numpy(), hL.numpy(), ckpt.numpy(), u.new_empty(N).numpy())
        ctx.save_for_backward(u, delta, bias, A, Bt, Ct, Dv, zv, ckpt)
        ctx.flags = (softplus, z is not None, D is not None, delta_bias is not None, x0 is not None, K)
        return y, hL

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghL):
        u, delta, bias, A, Bt, Ct, Dv, zv, ckpt = ctx.saved_tensors
        softplus, has_z, has_D, has_bias, has_x0, K = ctx.flags
        b, d, L = u.shape
        N = A.shape[1]
        gy = gy if gy is not None else u.new_zeros(b, d, L)
        ghL = ghL.to(u.dtype) if ghL is not None else u.new_zeros(b, d, N)
        gu, gdelta, gz, gh0 = u.new_empty(b, d, L), u.new_empty(b, d, L), u.new_empty(b, d, L), u.new_empty(b, d, N)
        f64 = dict(dtype=torch.float64)
        gA, gB, gC = torch.zeros(d, N, **f64), torch.zeros(b, L, N, **f64), torch.zeros(b, L, N, **f64)
        gD, gbias = torch.zeros(d, **f64), torch.zeros(d, **f64)
        _scan_backward(_np(u), _np(delta), _np(bias), softplus, _np(A), _np(Bt), _np(Ct), _np(Dv), _np(zv), has_z,
                       _np(ckpt), K, _np(gy), _np(ghL), gu.numpy(), gdelta.numpy(), gA.numpy(), gB.numpy(),
                       gC.numpy(), gD.numpy(), gz.numpy(), gbias.numpy(), gh0.numpy(),
                       u.new_empty(K + 1, N).numpy(), u.new_empty(N).numpy())
        dt = u.dtype
        return (gu, gdelta, gA.to(dt), gB.to(dt).transpose(1, 2), gC.to(dt).transpose(1, 2),
                gD.to(dt) if has_D else None, gz if has_z else None, gbias.to(dt) if has_bias else None,
                gh0 if has_x0 else None, None, None)


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
# The kernels: loops over scalars that numba compiles. Every array is contiguous, indexed [batch, channel, step] or
# [batch, step, n].


@jit
def _step_sizes(delta, bias, softplus, dts):
    """dts[t] = softplus(delta[t] + bias) (or without softplus) for one (batch, channel) row: a loop over t that
    LLVM vectorizes, apart from the scan's loop over n."""
    for t in range(dts.shape[0]):
        raw = delta[t] + bias
        dts[t] = _softplus(raw) if softplus else raw


@jit
def _scan_forward(u, delta, bias, softplus, A, B, C, D, z, has_z, h0, K, y, hL, ckpt, h):
    """y[b, c, l] and the final state hL[b, c, :] from h0; ckpt[b, c, s] = the state entering step s * K.
    h: an (N,) buffer, the running state of one (batch, channel) pair."""
    nb, nc, L = u.shape
    N = A.shape[1]
    dts, gate = np.empty_like(u[0, 0]), np.empty_like(u[0, 0])  # (L,): one row's step sizes and silu(z)
    for ib in range(nb):
        for ic in range(nc):
            _step_sizes(delta[ib, ic], bias[ic], softplus, dts)
            if has_z:
                for t in range(L):
                    gate[t] = z[ib, ic, t] * _sigmoid(z[ib, ic, t])
            h[:] = h0[ib, ic]
            for t in range(L):
                if t % K == 0:
                    ckpt[ib, ic, t // K] = h
                dt, ut = dts[t], u[ib, ic, t]
                dtu = dt * ut
                for n in range(N):
                    h[n] = _exp(dt * A[ic, n]) * h[n] + dtu * B[ib, t, n]
                out = D[ic] * ut
                for n in range(N):
                    out += h[n] * C[ib, t, n]
                y[ib, ic, t] = out * gate[t] if has_z else out
            hL[ib, ic] = h


@jit
def _scan_backward(u, delta, bias, softplus, A, B, C, D, z, has_z, ckpt, K, gy, ghL,
                   gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0, hs, lam):
    """Gradients of everything from gy (b, c, L) and ghL (b, c, N), walking each sequence backwards one checkpoint
    segment at a time: recompute the segment's K + 1 states from its checkpoint into hs (K + 1, N), then run the
    adjoint lam (N,) over it. gu, gdelta, gz, gh0 are written; gA, gB, gC, gD, gbias (fp64) are accumulated into."""
    nb, nc, L = u.shape
    N = A.shape[1]
    es = np.empty_like(hs[1:])  # (K, N) the segment's decays exp(dt A), computed once for both passes
    dts, ddt, sig = np.empty_like(u[0, 0]), np.empty_like(u[0, 0]), np.empty_like(u[0, 0])  # (L,) per row
    for ib in range(nb):
        for ic in range(nc):
            _step_sizes(delta[ib, ic], bias[ic], softplus, dts)
            for t in range(L):  # d dt / d raw: softplus' derivative is the sigmoid (1 above torch's threshold 20)
                raw = delta[ib, ic, t] + bias[ic]
                ddt[t] = _sigmoid(raw) if softplus and raw <= 20 else raw - raw + 1
            if has_z:
                for t in range(L):
                    sig[t] = _sigmoid(z[ib, ic, t])
            lam[:] = ghL[ib, ic]
            for s in range((L - 1) // K, -1, -1):
                t0 = s * K
                T = min(K, L - t0)
                # recompute: hs[j + 1] is the state after step t0 + j, hs[0] the one entering the segment
                hs[0] = ckpt[ib, ic, s]
                for j in range(T):
                    t = t0 + j
                    dt = dts[t]
                    dtu = dt * u[ib, ic, t]
                    for n in range(N):
                        es[j, n] = _exp(dt * A[ic, n])
                    for n in range(N):
                        hs[j + 1, n] = es[j, n] * hs[j, n] + dtu * B[ib, t, n]
                for j in range(T - 1, -1, -1):
                    t = t0 + j
                    ut = u[ib, ic, t]
                    g = gy[ib, ic, t]
                    if has_z:  # the gate: y = p * silu(z), p = <h, C> + D u
                        p = D[ic] * ut
                        for n in range(N):
                            p += hs[j + 1, n] * C[ib, t, n]
                        zt, sg = z[ib, ic, t], sig[t]
                        gz[ib, ic, t] = g * p * sg * (1 + zt * (1 - sg))
                        g *= zt * sg
                    gD[ic] += g * ut
                    dt = dts[t]
                    for n in range(N):  # lam_t = C_t g + (what flowed back from t + 1)
                        lam[n] += g * C[ib, t, n]
                    lb, ga = lam[0] - lam[0], lam[0] - lam[0]  # sum_n lam B, sum_n lam e h_{t-1} A (zeros in dtype)
                    for n in range(N):
                        lb += lam[n] * B[ib, t, n]
                        ga += lam[n] * es[j, n] * hs[j, n] * A[ic, n]
                    for n in range(N):  # dLoss / d(dt A) = lam e h_{t-1}
                        gA[ic, n] += lam[n] * es[j, n] * hs[j, n] * dt
                    for n in range(N):
                        gC[ib, t, n] += g * hs[j + 1, n]
                    dtu = dt * ut
                    for n in range(N):
                        gB[ib, t, n] += lam[n] * dtu
                    for n in range(N):  # lam's share of lam_{t-1}
                        lam[n] *= es[j, n]
                    gu[ib, ic, t] = g * D[ic] + dt * lb
                    graw = (ga + ut * lb) * ddt[t]
                    gdelta[ib, ic, t] = graw
                    gbias[ic] += graw
            gh0[ib, ic] = lam
