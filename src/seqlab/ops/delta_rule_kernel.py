"""The (gated) delta rule as a compiled CPU kernel (the optional extra `pip install seqlab[kernels]`, built on numba):
`delta_rule(..., impl="kernel")`, forward and backward. The jit options and the vectorizable fp32 exp are
ops/kernels.py's.

Why a kernel: the chunked form (ops/delta_rule.py) is a triangular solve and small matrix products per chunk in
eager PyTorch; the recurrence itself is two passes over the head's (dk, dv) state per step (read S^T k, then decay
and write), which here run fused with the state in L1 (16 KiB at dk = dv = 64) and the inner loops over dv
contiguous, so LLVM vectorizes them.

Glossary (as ops/delta_rule.py): q, k (B, H, L, dk); v, o (B, H, L, dv); beta, g (B, H, L), one scalar per head and
step (g None: no decay, a_t = 1); S the state (dk, dv) per head, keys along rows; q~ = scale q; K the checkpoint
interval. Per head, over t = 0 .. L-1, with a_t = exp(g_t) and P_t = a_t S_{t-1}:

    w_t = P_t^T k_t,   u_t = beta_t (v_t - w_t),   S_t = P_t + k_t u_t^T,   o_t = S_t^T q~_t

Backward, with lam_t = dLoss/dS_t (the adjoint state, (dk, dv)) and do_t = dLoss/do_t:
    lam_t = q~_t do_t^T + (what flows back from step t + 1; at t = L-1 the final state's gradient)
    du_t = lam_t^T k_t,   dv_t = beta_t du_t,   dbeta_t = du_t . (v_t - w_t),   dw_t = -beta_t du_t
    dP_t = lam_t + k_t dw_t^T,   dk_t = lam_t u_t + P_t dw_t,   dq_t = scale S_t do_t
    dg_t = sum(dP_t * P_t)   (d P_t / d g_t = P_t),   lam_{t-1} = a_t dP_t,   dS_{-1} = lam_{-1}.
dq needs S_t and the rest S_{t-1}, walking backwards. As ops/kernels.py does, forward keeps the state every K steps
and backward recomputes one segment of K + 1 states (and the segment's u_t, w_t) from its checkpoint at a time:
one extra forward pass of arithmetic instead of a (B, H, L, dk, dv) tensor of states.

Precision: the kernels run in the inputs' dtype; fp32 uses ops/kernels.py's polynomial exp, fp64 compiles a second
specialization with libm's (for the tests' rounding-level checks). Every sum is over one step's dk or dv values
(no sum over time or batch), so the compute dtype suffices.
"""

from __future__ import annotations

import numpy as np
import torch

from seqlab.errors import InputError
from seqlab.ops.kernels import _ZERO, _exp, jit


def delta_rule_kernel(q, k, v, beta, g, initial_state, scale, checkpoint):
    """The fused recurrence on checked inputs, all in one compute dtype (fp32 or fp64) on the CPU, q not yet scaled;
    g and initial_state may be None. checkpoint: K, steps between the states kept for backward (delta_rule's
    chunk_size). Returns (o (B, H, L, dv), final state (B, H, dk, dv)), both differentiable (first order)."""
    if q.device.type != "cpu":
        raise InputError(f"delta_rule: impl='kernel' runs on the CPU, got tensors on {q.device}")
    return _KernelDeltaRule.apply(q, k, v, beta, g, initial_state, float(scale), min(checkpoint, q.shape[2]))


def _np(t):
    """A contiguous numpy view of a CPU tensor (no copy when already contiguous)."""
    return t.detach().contiguous().numpy()


class _KernelDeltaRule(torch.autograd.Function):
    """Autograd around the two kernels. Sequences go in as (B * H, L, d) or (B * H, L) (views when contiguous),
    states as (B * H, dk, dv); a missing g goes in as zeros (a_t = exp(0) = 1 exactly) and a missing initial state as
    zeros, so numba compiles one specialization per dtype."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, scale, K):
        Bn, H, L, dk = q.shape
        dv = v.shape[-1]
        q3, k3, v3 = (t.reshape(Bn * H, L, t.shape[-1]) for t in (q, k, v))
        beta2 = beta.reshape(Bn * H, L)
        g2 = g.reshape(Bn * H, L) if g is not None else beta2.new_zeros(Bn * H, L)
        S0_ = S0.reshape(Bn * H, dk, dv) if S0 is not None else q.new_zeros(Bn * H, dk, dv)
        o, SL = q.new_empty(Bn * H, L, dv), q.new_empty(Bn * H, dk, dv)
        ckpt = q.new_empty(Bn * H, -(-L // K), dk, dv)  # the state entering steps 0, K, 2K, ...
        sc = np.array(scale, dtype=_np(q3).dtype)[()]  # in the compute dtype, so the loops stay fp32
        _forward(_np(q3), _np(k3), _np(v3), _np(beta2), _np(g2), sc, _np(S0_), K, o.numpy(), SL.numpy(),
                 ckpt.numpy())
        ctx.save_for_backward(q3, k3, v3, beta2, g2, ckpt)
        ctx.meta = (Bn, H, scale, K, g is not None, S0 is not None)
        return o.view(Bn, H, L, dv), SL.view(Bn, H, dk, dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go, gSL):
        q3, k3, v3, beta2, g2, ckpt = ctx.saved_tensors
        Bn, H, scale, K, has_g, has_S0 = ctx.meta
        BH, L, dk = q3.shape
        dv = v3.shape[-1]
        go = go.reshape(BH, L, dv) if go is not None else q3.new_zeros(BH, L, dv)
        gSL = gSL.to(q3.dtype).reshape(BH, dk, dv) if gSL is not None else q3.new_zeros(BH, dk, dv)
        dq, dk_, dv_ = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
        dbeta, dg, dS0 = torch.empty_like(beta2), torch.empty_like(g2), q3.new_empty(BH, dk, dv)
        sc = np.array(scale, dtype=_np(q3).dtype)[()]
        _backward(_np(q3), _np(k3), _np(v3), _np(beta2), _np(g2), sc, _np(ckpt), K, _np(go), _np(gSL), dq.numpy(),
                  dk_.numpy(), dv_.numpy(), dbeta.numpy(), dg.numpy(), dS0.numpy(),
                  q3.new_empty(K + 1, dk, dv).numpy(), q3.new_empty(2, K, dv).numpy())
        shape_k, shape_v = (Bn, H, L, dk), (Bn, H, L, dv)
        return (dq.view(shape_k), dk_.view(shape_k), dv_.view(shape_v), dbeta.view(Bn, H, L),
                dg.view(Bn, H, L) if has_g else None, dS0.view(Bn, H, dk, dv) if has_S0 else None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# The kernels: loops over scalars that numba compiles. Sequences are [head, step, i] (q, k), [head, step, j] (v, o)
# and [head, step] (beta, g); states [i, j]. Every inner loop runs over j (dv, contiguous), so LLVM vectorizes it.


@jit
def _decays(g, a):
    """a = exp(g) for one head's L log decays, vectorized. Computed ahead of the loop over steps: with the inlined
    fp32 exp inside that loop, LLVM compiled the state passes ~2x slower (measured; libm's exp there did not)."""
    for t in range(a.shape[0]):
        a[t] = _exp(g[t])


@jit
def _write(Sp, Sn, kt, vt, at, bt, w, u):
    """One step from Sp to Sn, two distinct arrays (LLVM vectorizes the loop after checking that they do not
    overlap; on one array passed twice that check fails and the loop runs scalar, ~8x slower): w = a Sp^T k,
    u = beta (v - w), Sn = a Sp + k u^T."""
    w[:] = 0
    for i in range(Sp.shape[0]):
        ki, Si = kt[i], Sp[i]
        for j in range(Si.shape[0]):
            w[j] += ki * Si[j]
    for j in range(w.shape[0]):
        w[j] *= at
        u[j] = bt * (vt[j] - w[j])
    for i in range(Sp.shape[0]):
        ki, Si, Ni = kt[i], Sp[i], Sn[i]
        for j in range(Si.shape[0]):
            Ni[j] = at * Si[j] + ki * u[j]


@jit
def _forward(q, k, v, beta, g, scale, S0, K, o, SL, ckpt):
    """o (BH, L, dv) and the final state SL[h] (dk, dv) from S0; ckpt[h, s] = the state entering step s * K."""
    BH, L, dk = q.shape
    S = np.empty_like(S0[0])  # (dk, dv) the running state
    w, u = np.empty_like(v[0, 0]), np.empty_like(v[0, 0])  # (dv,)
    a = np.empty_like(beta[0])  # (L,) one head's decays
    for h in range(BH):
        S[:] = S0[h]
        _decays(g[h], a)
        for t in range(L):
            if t % K == 0:
                ckpt[h, t // K] = S
            at, bt, kt, vt, ot = a[t], beta[h, t], k[h, t], v[h, t], o[h, t]
            w[:] = 0
            for i in range(dk):  # pass 1: w = S^T k
                ki, Si = kt[i], S[i]
                for j in range(Si.shape[0]):
                    w[j] += ki * Si[j]
            for j in range(w.shape[0]):
                u[j] = bt * (vt[j] - at * w[j])
            ot[:] = 0
            for i in range(dk):  # pass 2: decay, write k u^T, read q~ S
                ki, qi, Si = kt[i], q[h, t, i] * scale, S[i]
                for j in range(Si.shape[0]):
                    x = at * Si[j] + ki * u[j]
                    Si[j] = x
                    ot[j] += qi * x
        SL[h] = S


@jit
def _backward(q, k, v, beta, g, scale, ckpt, K, go, gSL, dq, dk, dv, dbeta, dg, dS0, hs, wu):
    """Gradients of everything from go (BH, L, dv) and gSL (BH, dk, dv), walking each head backwards one checkpoint
    segment at a time: recompute the segment's K + 1 states into hs (hs[j + 1] the state after step t0 + j, hs[0]
    the one entering) and its w_t, u_t into wu[0], wu[1] (K, dv); then run the adjoint lam (dk, dv) over it in
    reverse, two passes over lam per step (du = lam^T k needs all of lam before lam can be updated)."""
    BH, L, ndk = q.shape
    lam = np.empty_like(gSL[0])  # (dk, dv) the adjoint state
    du, dw = np.empty_like(v[0, 0]), np.empty_like(v[0, 0])  # (dv,)
    a = np.empty_like(beta[0])  # (L,) one head's decays
    for h in range(BH):
        lam[:] = gSL[h]
        _decays(g[h], a)
        for s in range((L - 1) // K, -1, -1):
            t0 = s * K
            T = min(K, L - t0)
            hs[0] = ckpt[h, s]
            for j in range(T):  # recompute the segment's states, w and u
                t = t0 + j
                _write(hs[j], hs[j + 1], k[h, t], v[h, t], a[t], beta[h, t], wu[0, j], wu[1, j])
            for j in range(T - 1, -1, -1):
                t = t0 + j
                at, bt = a[t], beta[h, t]
                kt, vt, dot, wt, ut, dkt = k[h, t], v[h, t], go[h, t], wu[0, j], wu[1, j], dk[h, t]
                du[:] = 0
                for i in range(ndk):  # pass 1: lam_t = lam + q~ do^T; du = lam^T k, dq = scale S_t do, lam u
                    ki, qi, li, Sn = kt[i], q[h, t, i] * scale, lam[i], hs[j + 1, i]
                    sq, su = _ZERO, _ZERO
                    for c in range(li.shape[0]):
                        lc = li[c] + qi * dot[c]
                        li[c] = lc
                        du[c] += ki * lc
                        sq += Sn[c] * dot[c]
                        su += lc * ut[c]
                    dq[h, t, i] = sq * scale
                    dkt[i] = su
                sb = _ZERO
                for c in range(du.shape[0]):
                    sb += du[c] * (vt[c] - wt[c])
                    dv[h, t, c] = bt * du[c]
                    dw[c] = -bt * du[c]
                dbeta[h, t] = sb
                sg = _ZERO
                for i in range(ndk):  # pass 2: dP = lam + k dw^T; dk += P dw, dg += dP . P; lam_{t-1} = a dP
                    ki, li, Sp = kt[i], lam[i], hs[j, i]
                    sk, sgi = _ZERO, _ZERO
                    for c in range(li.shape[0]):
                        p = at * Sp[c]
                        dp = li[c] + ki * dw[c]
                        sk += p * dw[c]
                        sgi += dp * p
                        li[c] = at * dp
                    dkt[i] += sk
                    sg += sgi
                dg[h, t] = sg
        dS0[h] = lam
