"""GLA's recurrence as a compiled CPU kernel (the optional extra `pip install seqlab[kernels]`, built on numba):
`gla(..., impl="kernel")`, forward and backward. The jit options and the vectorizable fp32 exp are ops/kernels.py's.

Why a kernel: GLA's decay differs per key dimension, so the chunked form (ops/gla.py) splits the pairs inside a
chunk by halving: log2(chunk) levels of elementwise work the size of q plus small matrix products, each a separate
pass over memory in eager PyTorch. The recurrence itself is O(dk * dv) per step and head; here each step is one
fused pass over the head's (dk, dv) state, which stays in L1 (16 KiB at dk = dv = 64), with the inner loop over dv
contiguous so LLVM vectorizes it.

Glossary (as ops/gla.py): q, k, g (log forget gate, <= 0) (B, H, L, dk); v, o (B, H, L, dv); S the state (dk, dv)
per head; a_t = exp(g_t) the decay; q~ = scale q; K the checkpoint interval. Per head, over t = 0 .. L-1:

    S_t = diag(a_t) S_{t-1} + k_t v_t^T,       o_t = S_t^T q~_t

Backward, with lam_t = dLoss/dS_t (the adjoint state, (dk, dv)) and do_t = dLoss/do_t:
    lam_t = q~_t do_t^T + diag(a_{t+1}) lam_{t+1}      (lam_{L-1} also gets the final state's gradient)
    dq_t = scale S_t do_t,   dk_t = lam_t v_t,   dv_t = lam_t^T k_t,
    dg_t = a_t * rowsum(lam_t * S_{t-1})   (d a_t / d g_t = a_t),   dS_{-1} = diag(a_0) lam_0.
dg needs S_{t-1} and dq needs S_t at every step, walking backwards. Storing them all is a (B, H, L, dk, dv) tensor
(L times the state); instead forward keeps the state every K steps and backward recomputes one segment of K + 1
states from its checkpoint into a (K + 1, dk, dv) buffer (at dk = dv = 64, 260 KiB for K = 16, gla's default
chunk_size, and 1 MiB for K = 64, a GLA model's; K = 64 measured ~15% faster forward + backward, its fewer
checkpoint writes outweighing the larger buffer): one extra forward pass of arithmetic, K times less memory.

Precision: the kernels run in the inputs' dtype; fp32 uses ops/kernels.py's polynomial exp (about 1 ulp), fp64
compiles a second specialization with libm's (for the tests' rounding-level checks). Every sum is over one step's
dk or dv values (no sum over time or batch), so the compute dtype suffices.
numba compiles on first call and caches the machine code next to this file; one thread, as ops/kernels.py.
"""

from __future__ import annotations

import numpy as np
import torch

from seqlab.errors import InputError
from seqlab.ops.kernels import _ZERO, _exp, jit


def gla_kernel(q, k, v, g, initial_state, scale, checkpoint):
    """The fused recurrence on checked inputs, all in one compute dtype (fp32 or fp64) on the CPU, q not yet scaled;
    initial_state may be None. checkpoint: K, steps between the states kept for backward (gla's chunk_size).
    Returns (o (B, H, L, dv), final state (B, H, dk, dv)), both differentiable (first order)."""
    if q.device.type != "cpu":
        raise InputError(f"gla: impl='kernel' runs on the CPU, got tensors on {q.device}")
    return _KernelGLA.apply(q, k, v, g, initial_state, float(scale), min(checkpoint, q.shape[2]))


def _np(t):
    """A contiguous numpy view of a CPU tensor (no copy when already contiguous)."""
    return t.detach().contiguous().numpy()


class _KernelGLA(torch.autograd.Function):
    """Autograd around the two kernels. Sequences go in as (B * H, L, d) (a view when contiguous), states as
    (B * H, dk, dv); a missing initial state goes in as zeros, so numba compiles one specialization per dtype."""

    @staticmethod
    def forward(ctx, q, k, v, g, S0, scale, K):
        Bn, H, L, dk = q.shape
        dv = v.shape[-1]
        q3, k3, v3, g3 = (t.reshape(Bn * H, L, t.shape[-1]) for t in (q, k, v, g))
        S0_ = S0.reshape(Bn * H, dk, dv) if S0 is not None else q.new_zeros(Bn * H, dk, dv)
        o, SL = q.new_empty(Bn * H, L, dv), q.new_empty(Bn * H, dk, dv)
        ckpt = q.new_empty(Bn * H, -(-L // K), dk, dv)  # the state entering steps 0, K, 2K, ...
        sc = np.array(scale, dtype=_np(q3).dtype)[()]  # in the compute dtype, so the loops stay fp32
        _gla_forward(_np(q3), _np(k3), _np(v3), _np(g3), sc, _np(S0_), K, o.numpy(), SL.numpy(), ckpt.numpy())
        ctx.save_for_backward(q3, k3, v3, g3, ckpt)
        ctx.meta = (Bn, H, scale, K, S0 is not None)
        return o.view(Bn, H, L, dv), SL.view(Bn, H, dk, dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go, gSL):
        q3, k3, v3, g3, ckpt = ctx.saved_tensors
        Bn, H, scale, K, has_S0 = ctx.meta
        BH, L, dk = q3.shape
        dv = v3.shape[-1]
        go = go.reshape(BH, L, dv) if go is not None else q3.new_zeros(BH, L, dv)
        gSL = gSL.to(q3.dtype).reshape(BH, dk, dv) if gSL is not None else q3.new_zeros(BH, dk, dv)
        dq, dk_, dg = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(g3)
        dv_, dS0 = torch.empty_like(v3), q3.new_empty(BH, dk, dv)
        sc = np.array(scale, dtype=_np(q3).dtype)[()]
        _gla_backward(_np(q3), _np(k3), _np(v3), _np(g3), sc, _np(ckpt), K, _np(go), _np(gSL), dq.numpy(),
                      dk_.numpy(), dv_.numpy(), dg.numpy(), dS0.numpy(), q3.new_empty(K + 1, dk, dv).numpy())
        shape_k, shape_v = (Bn, H, L, dk), (Bn, H, L, dv)
        return (dq.view(shape_k), dk_.view(shape_k), dv_.view(shape_v), dg.view(shape_k),
                dS0.view(Bn, H, dk, dv) if has_S0 else None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# The kernels: loops over scalars that numba compiles. Sequences are [head, step, i] (q, k, g) and [head, step, j]
# (v, o); states [i, j]. Every inner loop runs over j (dv, contiguous), so LLVM vectorizes it.


@jit
def _decays(g, a):
    """a = exp(g) for one step's dk log gates, vectorized."""
    for i in range(a.shape[0]):
        a[i] = _exp(g[i])


@jit
def _gla_forward(q, k, v, g, scale, S0, K, o, SL, ckpt):
    """o (BH, L, dv) and the final state SL[h] (dk, dv) from S0; ckpt[h, s] = the state entering step s * K. Per
    step one pass over S: decay, write k v^T, read q~ S."""
    BH, L, dk = q.shape
    S = np.empty_like(S0[0])  # (dk, dv) the running state
    a = np.empty_like(q[0, 0])  # (dk,) one step's decays
    for h in range(BH):
        S[:] = S0[h]
        for t in range(L):
            if t % K == 0:
                ckpt[h, t // K] = S
            _decays(g[h, t], a)
            vt, ot = v[h, t], o[h, t]
            ot[:] = 0
            for i in range(dk):
                ai, ki, qi = a[i], k[h, t, i], q[h, t, i] * scale
                Si = S[i]
                for j in range(Si.shape[0]):
                    s = ai * Si[j] + ki * vt[j]
                    Si[j] = s
                    ot[j] += qi * s
        SL[h] = S


@jit
def _gla_backward(q, k, v, g, scale, ckpt, K, go, gSL, dq, dk, dv, dg, dS0, hs):
    """Gradients of everything from go (BH, L, dv) and gSL (BH, dk, dv), walking each head backwards one checkpoint
    segment at a time: recompute the segment's K + 1 states from its checkpoint into hs (hs[j + 1] the state after
    step t0 + j, hs[0] the one entering), then run the adjoint lam (dk, dv) over it in reverse. Per step one pass
    over lam: add q~ do^T, read dk (lam v), dv (lam^T k), dg (lam . S_{t-1}) and dq (S_t do), decay by a_t."""
    BH, L, ndk = q.shape
    lam = np.empty_like(gSL[0])  # (dk, dv) the adjoint state
    a = np.empty_like(q[0, 0])  # (dk,)
    for h in range(BH):
        lam[:] = gSL[h]
        for s in range((L - 1) // K, -1, -1):
            t0 = s * K
            T = min(K, L - t0)
            hs[0] = ckpt[h, s]
            for j in range(T):  # recompute the segment's states
                t = t0 + j
                _decays(g[h, t], a)
                vt = v[h, t]
                for i in range(ndk):
                    ai, ki, Sp, Sn = a[i], k[h, t, i], hs[j, i], hs[j + 1, i]
                    for c in range(Sp.shape[0]):
                        Sn[c] = ai * Sp[c] + ki * vt[c]
            for j in range(T - 1, -1, -1):
                t = t0 + j
                _decays(g[h, t], a)
                vt, dot, dvt = v[h, t], go[h, t], dv[h, t]
                dvt[:] = 0
                for i in range(ndk):
                    ai, ki, qi = a[i], k[h, t, i], q[h, t, i] * scale
                    li, Sp, Sn = lam[i], hs[j, i], hs[j + 1, i]
                    sq, sk, sg = _ZERO, _ZERO, _ZERO  # sums over dv: S_t do, lam v, lam . S_{t-1}
                    for c in range(li.shape[0]):
                        lc = li[c] + qi * dot[c]  # lam_t
                        sq += Sn[c] * dot[c]
                        sk += lc * vt[c]
                        sg += lc * Sp[c]
                        dvt[c] += ki * lc
                        li[c] = ai * lc  # lam's share of lam_{t-1}
                    dq[h, t, i] = sq * scale
                    dk[h, t, i] = sk
                    dg[h, t, i] = sg * ai
        dS0[h] = lam
