"""The (gated) delta rule (DeltaNet: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"; Gated DeltaNet: Yang, Kautz & Hatamizadeh 2024), multi-head, as pure tensor functions.

Glossary (code name -- paper symbol -- meaning)
    q, k         q_t, k_t   queries and keys: (B, H, L, dk) (the mixers L2-normalize them; the op does not)
    v            v_t        values: (B, H, L, dv)
    beta         beta_t     the writing strength (learning rate) of step t, in (0, 1) when a sigmoid: (B, H, L)
    g            log a_t    log decay of step t, <= 0: (B, H, L), one scalar per head; None means a_t = 1 (DeltaNet)
    S, state     S_t        recurrent state, one (dk, dv) matrix per head: (B, H, dk, dv), keys along rows (the
                            transpose of the paper's (dv, dk) S); kept in fp32 (fp64 for fp64 inputs)
    u            u_t        the "new value" written at step t: beta_t (v_t - a_t S_{t-1}^T k_t)
    scale                   query scale, dk ** -0.5 by default
    seg(t, s)               log-decay from step s to step t: g_{s+1} + ... + g_t (<= 0; 0 when s == t)
    C                       the chunk size

Recurrence, per head, in this layout (the paper's S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,
transposed):
    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        = a_t S_{t-1} + k_t u_t^T,        u_t = beta_t (v_t - a_t S_{t-1}^T k_t)
    o_t = S_t^T (scale q_t)               (the row vector (scale q_t)^T S_t)

Entry points:
    delta_rule(..., impl="chunked")   the chunkwise-parallel (WY / UT) form; for training and prefill
    delta_rule(..., impl="ref")       runs `delta_rule_ref` (ops/naive.py): the plain loop, written apart from this
                                      file (no shared helper), the twin the tests compare against
    delta_rule(..., impl="kernel")    the fused numba recurrence (ops/delta_rule_kernel.py, the optional `kernels`
                                      extra): two passes over the state per step forward, states recomputed in
                                      backward from checkpoints; first order only
    delta_rule(..., impl="auto")      "kernel" where `resolve_impl` says so (the extra installed, CPU, fp32
                                      compute), else "chunked"
    delta_rule_step(...)              one step from a state, with checks and casts
    delta_rule_update(...)            the same step without checks or casts (what decoding calls)

Return convention: the scan ALWAYS returns a tuple `(o, final_state_or_None)`.

Numerical safety: every exponent is a range sum of g inside one chunk (<= 0), masked to -inf above the diagonal
BEFORE the exp: nothing overflows, no decay is ever divided by, and g = -1e4 (decays that underflow to exactly 0)
gives zeros, not NaN. Each range sum is accumulated over exactly its range (a cumulative sum that starts at the
range's first step), never a difference of two cumulative sums, which would lose |cumsum| * eps when a chunk holds
a very strong decay. g > 0 makes the recurrence itself grow; values are not checked (that would force a sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops.checks import check_delta_rule, check_scale
from seqlab.ops.naive import delta_rule_ref
from seqlab.ops.selective_scan import load_kernel, resolve_impl

IMPLS = ("auto", "ref", "chunked", "kernel")


def delta_rule(q, k, v, beta, g=None, initial_state=None, return_final_state=False, impl="chunked", chunk_size=64,
               scale=None):
    """The (gated) delta rule over a whole sequence.

    Args:
        q, k: (B, H, L, dk), any L >= 1. v: (B, H, L, dv). beta: (B, H, L).
        g: (B, H, L) log decay (<= 0), or None for no decay (plain DeltaNet).
        initial_state: (B, H, dk, dv) or None (zeros); differentiable.
        return_final_state: also return the state after the last step (differentiable).
        impl: "chunked" (chunkwise parallel), "ref" (the naive twin `delta_rule_ref`, a loop), "kernel" (fused,
            compiled by numba: needs the `kernels` extra, InputError without it; CPU tensors only) or "auto"
            (`seqlab.ops.selective_scan.resolve_impl`: "kernel" for CPU tensors computed in fp32 when the extra
            imports, else "chunked").
        chunk_size: steps per chunk for impl="chunked" (ignored by "ref"); for impl="kernel" the steps between the
            states kept for backward.
        scale: query scale; None means dk ** -0.5.

    Returns:
        (o, final_state): o (B, H, L, dv) in q's dtype; final_state (B, H, dk, dv) in fp32 (fp64 for fp64 inputs)
        when return_final_state, else None. Always a tuple.
    """
    if impl not in IMPLS:
        raise InputError(f"delta_rule: unknown impl {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    impl = resolve_impl(impl, q.device, q.dtype)
    if impl == "ref":  # the naive twin, which checks its own inputs
        return delta_rule_ref(q, k, v, beta, g, initial_state=initial_state, return_final_state=return_final_state,
                              scale=scale)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"delta_rule: chunk_size must be a positive int, got {chunk_size!r}")
    check_delta_rule("delta_rule", q, k, v, beta, g, initial_state, ("B", "H", "L"))
    cdt = torch.promote_types(q.dtype, torch.float32)
    if impl == "kernel":  # scales q itself: every input goes in as given, in cdt
        o, S = load_kernel("delta_rule", "delta_rule_kernel", "delta_rule_kernel")(
            q.to(cdt), k.to(cdt), v.to(cdt), beta.to(cdt), None if g is None else g.to(cdt),
            None if initial_state is None else initial_state.to(cdt), _scale("delta_rule", scale, q.shape[-1]),
            chunk_size)
        return o.to(q.dtype), (S if return_final_state else None)
    q_s = q.to(cdt) * _scale("delta_rule", scale, q.shape[-1])
    k, v, beta = k.to(cdt), v.to(cdt), beta.to(cdt)
    g = None if g is None else g.to(cdt)
    S0 = None if initial_state is None else initial_state.to(cdt)
    o, S = _chunked(q_s, k, v, beta, g, S0, chunk_size)
    return o.to(q.dtype), (S if return_final_state else None)


def delta_rule_step(q, k, v, beta, g, state, scale=None):
    """One recurrent step from `state`, for O(1) decoding. Same math as the scan with L = 1.

    Args:
        q, k: (B, H, dk). v: (B, H, dv). beta: (B, H). g: (B, H) or None. state: (B, H, dk, dv), fp32 (another
        float dtype is cast).

    Returns:
        (o, new_state): o (B, H, dv) in q's dtype, new_state (B, H, dk, dv) in fp32 (fp64 for fp64 inputs).
    """
    check_delta_rule("delta_rule_step", q, k, v, beta, g, state, ("B", "H"))
    cdt = torch.promote_types(q.dtype, torch.float32)
    q_s = q.to(cdt) * _scale("delta_rule_step", scale, q.shape[-1])
    o, S = delta_rule_update(state.to(cdt), q_s, k.to(cdt), v.to(cdt), beta.to(cdt),
                             None if g is None else g.to(cdt))
    return o.to(q.dtype), S


def delta_rule_update(state, q, k, v, beta, g=None):
    """The lean one-token update the decode steps call: no input checks, no dtype casts, q already scaled.
    state (B, H, dk, dv), q, k (B, H, dk), v (B, H, dv), beta and g (B, H) (g None: no decay), all in the compute
    dtype -> (o (B, H, dv), new state). Plain tensor ops only (the ONNX export traces it)."""
    if g is not None:
        state = torch.exp(g)[..., None, None] * state  # a_t S_{t-1}
    kS = (k[..., :, None] * state).sum(-2)  # (B, H, dv): (a_t S_{t-1})^T k_t
    u = beta[..., None] * (v - kS)  # (B, H, dv): the new value u_t
    state = state + k[..., :, None] * u[..., None, :]
    return (q[..., :, None] * state).sum(-2), state


# ---------------------------------------------------------------------------------------------------------------
# The chunked form (not shared with the naive twin: it writes its own)


def _scale(where, scale, dk):
    """The query scale: dk ** -0.5 when scale is None."""
    check_scale(where, scale)
    return dk ** -0.5 if scale is None else float(scale)


def _chunked(q, k, v, beta, g, S0, chunk_size):
    """Chunkwise-parallel delta rule with the UT transform. Inside a chunk that starts from state S0, unrolling
    S_t = a_t S_{t-1} + k_t u_t^T gives S_t = exp(seg(t, -1)) S0 + sum_{s <= t} exp(seg(t, s)) k_s u_s^T, and the
    definition of u_t becomes a unit lower-triangular system over the chunk:

        (I + A) U = beta V - (beta exp(seg(., -1)) K) S0,    A[t, s] = beta_t exp(seg(t, s)) k_t . k_s  (s < t)

    so U = Ub - W S0 with Ub = T (beta V), W = T (beta exp(seg(., -1)) K), T = (I + A)^-1: one triangular solve per
    chunk, independent of S0, so done for all chunks at once. Then, per chunk,

        O     = (Q exp(seg(., -1))) S0 + ((Q K^T) * exp(seg) masked to s <= t) U
        S_end = exp(seg(C-1, -1)) S0 + (K exp(seg(C-1, .)))^T U

    and only the short pass over chunk states (U = Ub - W S0, then S_end) is sequential: two small matrix products
    per chunk. seg(t, -1) is the log-decay from the chunk's start state to step t (g of step 0 included).
    """
    Bn, H, L, dk = q.shape
    dv = v.shape[-1]
    C = min(chunk_size, L)
    nc = -(-L // C)
    if nc * C > L:  # padded steps: beta = 0, k = 0 (no write), g = 0 (no decay): the state passes unchanged
        pad = nc * C - L
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))
    q, k, v = (t.reshape(Bn, H, nc, C, t.shape[-1]) for t in (q, k, v))  # (B, H, nc, C, d)
    beta = beta.reshape(Bn, H, nc, C)

    # the masks as (C, C) factors and terms: a broadcast multiply or add is several times faster than masked_fill
    ones = torch.ones(C, C, dtype=q.dtype, device=q.device)
    strict = ones.tril(-1)  # 1 where s < t
    above = torch.zeros_like(ones).masked_fill(ones.triu(1) > 0, float("-inf"))  # -inf where s > t, else 0
    if g is None:  # DeltaNet: every decay is 1
        decay = ones.tril()  # (C, C): exp(seg(t, s)) masked to s <= t
        q_in, k_out, chunk_decay = q, k, None
    else:
        g = g.reshape(Bn, H, nc, C)
        # seg(t, s) = g_{s+1} + ... + g_t for s <= t, each a cumulative sum starting at s + 1 (exact range sums)
        steps = g[..., :, None] * strict  # (B, H, nc, C, C): [t, s] = g_t where t > s, else 0
        seg = steps.cumsum(-2) + above  # -inf above the diagonal, before the exp
        decay = torch.exp(seg)
        from_start = g.cumsum(-1)  # (B, H, nc, C): seg(t, -1) = g_0 + ... + g_t
        q_in = q * torch.exp(from_start)[..., None]
        k_out = k * decay[..., -1, :, None]  # (B, H, nc, C, dk): k_s exp(seg(C-1, s))
        chunk_decay = torch.exp(from_start[..., -1])  # (B, H, nc): exp(seg(C-1, -1))

    kb = k * beta[..., None]  # (B, H, nc, C, dk)
    A = (kb @ k.transpose(-1, -2)) * decay  # (B, H, nc, C, C), zero above the diagonal
    rhs = torch.cat([v * beta[..., None], kb if g is None else kb * torch.exp(from_start)[..., None]], -1)
    # (I + A) X = rhs: unitriangular, so the solver takes the diagonal as ones and reads only A's strictly lower
    # part (and its backward gives A a strictly lower gradient): no mask needed for the diagonal
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    Ub, W = sol.split([dv, dk], -1)  # (B, H, nc, C, dv), (B, H, nc, C, dk)

    # across chunks: nc sequential steps on (dk, dv) states, each two fused products (baddbmm) on 3-D tensors laid
    # out chunk-major, so that every chunk's slice is contiguous
    S = (S0 if S0 is not None else q.new_zeros(Bn, H, dk, dv)).reshape(Bn * H, dk, dv)
    decays = [None] * nc if chunk_decay is None else _by_chunk(chunk_decay[..., None, None])
    starts, us = [], []
    for Ub_c, W_c, k_c, decay_c in zip(_by_chunk(Ub), _by_chunk(W), _by_chunk(k_out.transpose(-1, -2)), decays):
        starts.append(S)
        u = torch.baddbmm(Ub_c, W_c, S, alpha=-1)  # (B H, C, dv): Ub - W S
        us.append(u)
        S = torch.baddbmm(S if decay_c is None else decay_c * S, k_c, u)  # decay S + k_out^T u
    o = q_in @ _by_head(starts, Bn) + ((q @ k.transpose(-1, -2)) * decay) @ _by_head(us, Bn)  # (B, H, nc, C, dv)
    return o.reshape(Bn, H, nc * C, dv)[:, :, :L], S.view(Bn, H, dk, dv)


def _by_chunk(t):
    """(B, H, nc, x, y) -> nc contiguous tensors (B * H, x, y). Unbound, not indexed: the backward of t[c] would
    allocate a zero tensor of t's size per chunk, O(L^2) in all."""
    Bn, H, nc = t.shape[:3]
    return t.movedim(2, 0).reshape(nc, Bn * H, *t.shape[-2:]).unbind(0)


def _by_head(ts, Bn):
    """nc tensors (B * H, x, y) -> (B, H, nc, x, y)."""
    t = torch.stack(ts, 0)
    return t.view(len(ts), Bn, -1, *t.shape[-2:]).movedim(0, 2)
