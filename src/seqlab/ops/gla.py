"""Gated linear attention (GLA; Yang et al., 2023), multi-head, as pure tensor functions.

Glossary (code name -- paper symbol -- meaning)
    q, k         q_t, k_t   queries and keys: (B, H, L, dk)
    v            v_t        values: (B, H, L, dv)
    g            log alpha_t  log forget gate, <= 0 (a log-sigmoid): (B, H, L, dk); the decay is alpha_t = exp(g_t)
    S, state     S_t        recurrent state, one (dk, dv) matrix per head: (B, H, dk, dv); kept in fp32 (fp64 for
                            fp64 inputs)
    scale                   query scale, dk ** -0.5 by default
    b(s, t]                 log-decay from step s to step t: g_{s+1} + ... + g_t (<= 0)
    T, P                    chunk size, and T rounded up to a power of two

Recurrence, per head:
    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t          (k_t^T v_t is the (dk, dv) outer product)
    o_t = (q_t * scale) S_t

Entry points:
    gla(..., impl="chunked")   the chunkwise-parallel form; for training and prefill
    gla(..., impl="ref")       runs `gla_ref` (ops/naive.py): the plain loop over time, written apart from this file
                               (no shared helper), the twin the tests compare against
    gla(..., impl="kernel")    the fused numba recurrence (ops/gla_kernel.py, the optional `kernels` extra): one pass
                               over the state per step forward, states recomputed in backward from checkpoints
    gla(..., impl="auto")      "kernel" where `resolve_impl` says so (the extra installed, CPU, fp32 compute), else
                               "chunked"
    gla_step(...)              one step from a state; O(1) decoding
    gla_update(...)            the same step without checks or casts (what decoding calls)

Return convention: the scans ALWAYS return a tuple `(o, final_state_or_None)`.

Limits, honestly:
- The chunked form is eager PyTorch (impl="kernel" is the fused one, with the optional numba extra). The decay
  differs per key dimension, so pairs inside a chunk have no plain matmul form; they are split by halving (see
  `_gla_chunked`): log2(chunk) levels of elementwise work the size of q, then small matrix products. That
  elementwise work, not the matmuls, dominates the time on CPU; the kernel does one fused pass over the state per
  step instead.
- The kernel's backward is first-order only; the chunked form and the naive twin (plain autograd) support any
  order.
- g must be <= 0 (a log-sigmoid). Every exponent the chunked form takes is then a sum of g over a range, so <= 0:
  nothing overflows. With g > 0 the recurrence itself grows and that guarantee is gone. Values are not checked
  (that would force a device sync).
- A chunk is rounded up to a power of two internally (neutral steps), so a chunk_size that is not a power of two
  costs up to twice the intra-chunk work. 16 is the CPU optimum measured by benchmarks/bench_scans.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops.checks import check_gla, check_scale
from seqlab.ops.naive import gla_ref
from seqlab.ops.selective_scan import load_kernel, resolve_impl

IMPLS = ("auto", "ref", "chunked", "kernel")


def gla(q, k, v, g, initial_state=None, return_final_state=False, impl="chunked", chunk_size=16, scale=None):
    """Gated linear attention over a whole sequence.

    Args:
        q, k, g: (B, H, L, dk), any L >= 1; g is the log forget gate (<= 0). v: (B, H, L, dv).
        initial_state: (B, H, dk, dv) or None (zeros); differentiable.
        return_final_state: also return the state after the last step (differentiable).
        impl: "chunked" (chunkwise parallel), "ref" (the naive twin `gla_ref`, a loop), "kernel" (fused, compiled
            by numba: needs the `kernels` extra, InputError without it; CPU tensors only) or "auto"
            (`seqlab.ops.selective_scan.resolve_impl`: "kernel" for CPU tensors computed in fp32 when the extra
            imports, else "chunked").
        chunk_size: steps per chunk for impl="chunked" (ignored by "ref"). 16 is fastest on CPU. For
            impl="kernel": the steps between the states kept for backward.
        scale: query scale; None means dk ** -0.5.

    Returns:
        (o, final_state): o (B, H, L, dv) in q's dtype; final_state (B, H, dk, dv) in fp32 (fp64 for fp64 inputs)
        when return_final_state, else None. Always a tuple.
    """
    if impl not in IMPLS:
        raise InputError(f"gla: unknown impl {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    impl = resolve_impl(impl, q.device, q.dtype)
    if impl == "ref":  # the naive twin, which checks its own inputs
        return gla_ref(q, k, v, g, initial_state=initial_state, return_final_state=return_final_state, scale=scale)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"gla: chunk_size must be a positive int, got {chunk_size!r}")
    check_gla("gla", q, k, v, g, initial_state, ("B", "H", "L"))
    cdt = torch.promote_types(q.dtype, torch.float32)
    if impl == "kernel":  # scales q itself: every input goes in as given, in cdt
        o, S = load_kernel("gla", "gla_kernel", "gla_kernel")(
            q.to(cdt), k.to(cdt), v.to(cdt), g.to(cdt), None if initial_state is None else initial_state.to(cdt),
            _scale("gla", scale, q.shape[-1]), chunk_size)
        return o.to(q.dtype), (S if return_final_state else None)
    q_s = q.to(cdt) * _scale("gla", scale, q.shape[-1])
    k, v, g = k.to(cdt), v.to(cdt), g.to(cdt)
    S0 = None if initial_state is None else initial_state.to(cdt)
    o, S = _gla_chunked(q_s, k, v, g, S0, chunk_size)
    return o.to(q.dtype), (S if return_final_state else None)


def gla_step(q, k, v, g, state, scale=None):
    """One recurrent step from `state`, for O(1) decoding. Same math as the scan with L = 1.

    Args:
        q, k, g: (B, H, dk). v: (B, H, dv). state: (B, H, dk, dv), fp32 (another float dtype is cast).

    Returns:
        (o, new_state): o (B, H, dv) in q's dtype, new_state (B, H, dk, dv) in fp32.
    """
    check_gla("gla_step", q, k, v, g, state, ("B", "H"))
    cdt = torch.promote_types(q.dtype, torch.float32)
    S, o = _step(state.to(cdt), q.to(cdt) * _scale("gla_step", scale, q.shape[-1]), k.to(cdt), v.to(cdt),
                 g.to(cdt))
    return o.to(q.dtype), S


def gla_update(state, q, k, v, g):
    """The lean one-token update the decode steps call: no input checks, no dtype casts, q already scaled.
    state (B, H, dk, dv) and every input in the compute dtype: q, k, g (B, H, dk), v (B, H, dv)
    -> (o (B, H, dv), new state). `gla_step` is this with checks, casts and the scale."""
    S, o = _step(state, q, k, v, g)
    return o, S


# ---------------------------------------------------------------------------------------------------------------
# Math shared by the chunked scan, the step and the update (not by the naive twin: it writes its own)


def _scale(where, scale, dk):
    """The query scale: dk ** -0.5 when scale is None."""
    check_scale(where, scale)
    return dk ** -0.5 if scale is None else float(scale)


def _step(S, q, k, v, g):
    """S (B, H, dk, dv), q (already scaled), k, g (B, H, dk), v (B, H, dv) -> (new S, o (B, H, dv))."""
    S = torch.exp(g)[..., None] * S + k[..., :, None] * v[..., None, :]
    return S, (q[..., None, :] @ S).squeeze(-2)


def _gla_chunked(q, k, v, g, S0, chunk_size):
    """Chunkwise-parallel GLA. Write b(s, t] = g_{s+1} + ... + g_t (<= 0) for the log-decay from step s to step t.
    For step t of a chunk that starts with state S_start:

        o_t = (q_t * exp b(start, t]) S_start                                     from earlier chunks: a matmul
            + (q_t . k_t) v_t                                                     the step itself (no decay)
            + sum_{s < t in the chunk} (sum_i q_ti k_si exp b_i(s, t]) v_s       earlier steps of the chunk

    Across chunks the state moves in nc sequential steps: S_end = diag(exp b(start, end]) S_start
    + (k * exp b(s, end])^T v. Inside a chunk (its length rounded up to a power of two P with neutral steps),
    the pairs s < t are split by halving: at level h (h = 1, 2, 4, ..., P/2) the chunk is cut into blocks of 2h
    steps, and every pair with s in the lower half and t in the upper half of a block factors through the
    boundary m between the halves, b(s, t] = b(s, m] + b(m, t], so its scores are one matrix product
        (q_t * exp b(m, t]) (k_s * exp b(s, m])^T       (h x h per block; no mask: every such pair has s < t).
    Each pair s < t is counted at exactly one level (the one whose boundary first separates them): log2(P)
    levels of elementwise work the size of q, instead of a (P, P, dk) tensor of pairwise decays.

    Numerical safety: every exponent is a sum of g over a range, <= 0, so nothing overflows and nothing is ever
    divided by a decay. Precision: each range sum is a cumulative sum over exactly that range (within a half
    block or a chunk), never a difference of two cumulative sums, which would lose ~|cumsum| * 1e-7 in fp32 and
    wreck pairs that sit after a very strong decay.
    """
    Bn, H, L, dk = q.shape
    dv = v.shape[-1]
    T = min(chunk_size, L)
    nc = -(-L // T)
    P = 1 << (T - 1).bit_length()  # T rounded up to a power of two
    if nc * T > L:  # padded steps: g = 0 (no decay) and q = k = v = 0 (no input) carry the state unchanged
        q, k, v, g = (F.pad(t, (0, 0, 0, nc * T - L)) for t in (q, k, v, g))
    q, k, v, g = (t.reshape(Bn, H, nc, T, t.shape[-1]) for t in (q, k, v, g))
    if P > T:  # neutral steps at the end of every chunk
        q, k, v, g = (F.pad(t, (0, 0, 0, P - T)) for t in (q, k, v, g))

    # across chunks: nc sequential steps on (dk, dv) states
    b_in = g.cumsum(-2)  # (B, H, nc, P, dk): b(start of chunk, t]
    dS = (k * torch.exp(_after(g))).transpose(-1, -2) @ v  # (B, H, nc, dk, dv); exponent b(s, end of chunk]
    S = S0 if S0 is not None else q.new_zeros(Bn, H, dk, dv)
    starts = []
    for decay_c, dS_c in zip(torch.exp(b_in[..., -1, :]).unbind(2), dS.unbind(2)):
        starts.append(S)
        S = decay_c[..., None] * S + dS_c
    o = (q * torch.exp(b_in)) @ torch.stack(starts, 2)  # (B, H, nc, P, dv)

    # inside a chunk: the step itself, then the pairs s < t level by level
    o = o + (q * k).sum(-1, keepdim=True) * v
    h = 1
    while h < P:
        blocks = (Bn, H, nc, P // (2 * h), 2, h)  # (..., block, half, step in half)
        q_up = q.view(*blocks, dk)[..., 1, :, :]
        g_lo, g_up = g.view(*blocks, dk).unbind(-3)
        k_lo, v_lo = k.view(*blocks, dk)[..., 0, :, :], v.view(*blocks, dv)[..., 0, :, :]
        q_up = q_up * torch.exp(g_up.cumsum(-2))  # exponent b(m, t]
        k_lo = k_lo * torch.exp(_after(g_lo))  # exponent b(s, m]
        if h <= 2:  # tiny blocks: elementwise beats a batch of tiny matrix products
            scores = (q_up[..., :, None, :] * k_lo[..., None, :, :]).sum(-1)  # (..., block, h, h)
            o_up = (scores[..., None] * v_lo[..., None, :, :]).sum(-2)
        else:
            o_up = (q_up @ k_lo.transpose(-1, -2)) @ v_lo  # (..., block, h, dv)
        o.view(*blocks, dv)[..., 1, :, :] += o_up  # in place: no zero-padded copy per level
        h *= 2
    return o[..., :T, :].reshape(Bn, H, nc * T, dv)[:, :, :L], S


def _after(g):
    """b(s, end] = g_{s+1} + ... + g_end along dim -2, accumulated from the end: every range summed exactly (no
    difference of cumulative sums) and no flipped copies."""
    parts, acc = [], torch.zeros_like(g[..., -1, :])
    for g_r in reversed(g.unbind(-2)):
        parts.append(acc)
        acc = acc + g_r
    return torch.stack(parts[::-1], -2)
