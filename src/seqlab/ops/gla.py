"""Gated linear attention (GLA; Yang et al., 2023), multi-head, as pure tensor functions.

Glossary (code name -- paper symbol -- meaning)
    q, k         q_t, k_t   queries and keys: (B, H, L, dk)
    v            v_t        values: (B, H, L, dv)
    g            log alpha_t  log forget gate, <= 0 (a log-sigmoid): (B, H, L, dk); the decay is alpha_t = exp(g_t)
    S, state     S_t        recurrent state, one (dk, dv) matrix per head: (B, H, dk, dv); kept in fp32 (fp64 for
                            fp64 inputs)
    scale                   query scale, dk ** -0.5 by default
    b(s, t]                 log-decay from step s to step t: g_{s+1} + ... + g_t (<= 0)
    T, c                    chunk size and secondary (sub-)chunk size

Recurrence, per head:
    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t          (k_t^T v_t is the (dk, dv) outer product)
    o_t = (q_t * scale) S_t

Three entry points:
    gla(..., impl="chunked")   the chunkwise-parallel form; for training and prefill
    gla_ref(...)               the plain sequential loop; the twin the tests compare against
    gla_step(...)              one step from a state; O(1) decoding

Return convention: the scans ALWAYS return a tuple `(o, final_state_or_None)`.

Limits, honestly:
- Eager PyTorch, no fused kernel. The diagonal sub-blocks need a (c, c, dk) tensor per sub-chunk (the decay differs
  per key dimension, so no matmul form exists there); that, not the matmuls, dominates the time on CPU.
- g must be <= 0 (a log-sigmoid). Every exponent the chunked form takes is then a difference b_t - b_s with s <= t,
  so <= 0: nothing overflows. With g > 0 the recurrence itself grows and that guarantee is gone. Values are not
  checked (that would force a device sync).
- Memory and time of the chunked form grow with the sub-chunk size c (the (c, c, dk) tensor) and with the number of
  sub-chunks per chunk (the (T/c, T/c, c, dk) middle-factor tensor); chunk_size 16 with c = 8 is the CPU optimum
  measured by benchmarks/bench_scans.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqlab.errors import InputError

IMPLS = ("ref", "chunked")
SUB_CHUNK = 8  # secondary chunk size c (c = gcd(T, SUB_CHUNK)); the (c, c, dk) diagonal blocks grow with it


def gla(q, k, v, g, initial_state=None, return_final_state=False, impl="chunked", chunk_size=64, scale=None):
    """Gated linear attention over a whole sequence.

    Args:
        q, k, g: (B, H, L, dk), any L >= 1; g is the log forget gate (<= 0). v: (B, H, L, dv).
        initial_state: (B, H, dk, dv) or None (zeros); differentiable.
        return_final_state: also return the state after the last step (differentiable).
        impl: "chunked" (chunkwise parallel) or "ref" (sequential loop).
        chunk_size: steps per chunk for impl="chunked" (ignored by "ref"). 16 is fastest on CPU.
        scale: query scale; None means dk ** -0.5.

    Returns:
        (o, final_state): o (B, H, L, dv) in q's dtype; final_state (B, H, dk, dv) in fp32 (fp64 for fp64 inputs)
        when return_final_state, else None. Always a tuple.
    """
    if impl not in IMPLS:
        raise InputError(f"gla: unknown impl {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    if impl == "chunked" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"gla: chunk_size must be a positive int, got {chunk_size!r}")
    _check_shapes("gla", q, k, v, g, initial_state, ("B", "H", "L"))
    cdt = torch.promote_types(q.dtype, torch.float32)
    q_s = q.to(cdt) * _scale(scale, q.shape[-1])
    k, v, g = k.to(cdt), v.to(cdt), g.to(cdt)
    S0 = None if initial_state is None else initial_state.to(cdt)
    if impl == "ref":
        o, S = _gla_loop(q_s, k, v, g, S0)
    else:
        o, S = _gla_chunked(q_s, k, v, g, S0, chunk_size)
    return o.to(q.dtype), (S if return_final_state else None)


def gla_ref(q, k, v, g, initial_state=None, return_final_state=False, impl="ref", chunk_size=64, scale=None):
    """The reference twin of `gla`: same signature, impl fixed to "ref" (chunk_size is unused).

    A plain loop over time, one `gla_step` per step, state in fp32:
        S_t = diag(exp g_t) S_{t-1} + k_t^T v_t
        o_t = (q_t * scale) S_t
    """
    if impl != "ref":
        raise InputError(f"gla_ref always runs impl='ref', got impl={impl!r}; call gla(..., impl=...) to choose")
    return gla(q, k, v, g, initial_state=initial_state, return_final_state=return_final_state, impl="ref",
               scale=scale)


def gla_step(q, k, v, g, state, scale=None):
    """One recurrent step from `state`, for O(1) decoding. Same math as the scan with L = 1.

    Args:
        q, k, g: (B, H, dk). v: (B, H, dv). state: (B, H, dk, dv), fp32 (another float dtype is cast).

    Returns:
        (o, new_state): o (B, H, dv) in q's dtype, new_state (B, H, dk, dv) in fp32.
    """
    _check_shapes("gla_step", q, k, v, g, state, ("B", "H"))
    cdt = torch.promote_types(q.dtype, torch.float32)
    S, o = _step(state.to(cdt), q.to(cdt) * _scale(scale, q.shape[-1]), k.to(cdt), v.to(cdt), g.to(cdt))
    return o.to(q.dtype), S


# ---------------------------------------------------------------------------------------------------------------


def _scale(scale, dk):
    if scale is None:
        return dk ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"gla: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _step(S, q, k, v, g):
    """S (B, H, dk, dv), q (already scaled), k, g (B, H, dk), v (B, H, dv) -> (new S, o (B, H, dv))."""
    S = torch.exp(g)[..., None] * S + k[..., :, None] * v[..., None, :]
    return S, (q[..., None, :] @ S).squeeze(-2)


def _gla_loop(q, k, v, g, S0):
    """The sequential loop: L calls of `_step` (unbind, not indexing, keeps backward linear in L)."""
    B, H, L, dk = q.shape
    S = S0 if S0 is not None else q.new_zeros(B, H, dk, v.shape[-1])
    os = []
    for q_t, k_t, v_t, g_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), g.unbind(2)):
        S, o_t = _step(S, q_t, k_t, v_t, g_t)
        os.append(o_t)
    return torch.stack(os, 2), S  # (B, H, L, dv), (B, H, dk, dv)


def _gla_chunked(q, k, v, g, S0, chunk_size):
    """Chunkwise-parallel GLA (the paper's two-level form). Write b(s, t] = g_{s+1} + ... + g_t (<= 0) for the
    log-decay from step s to step t. Then, for step t of a chunk that starts with state S_start:

        o_t = (q_t * exp b(start, t]) S_start                                       from earlier chunks: matmul
            + sum_{s <= t in the chunk} (sum_i q_ti k_si exp b_i(s, t]) v_s             inside the chunk

    Across chunks the state moves in nc sequential steps: S_end = diag(exp b(start, end]) S_start
    + (k * exp b(s, end])^T v. Inside a chunk of T steps, cut into sub-chunks of c: a pair (t, s) in different
    sub-chunks i > j factors through the sub-chunk boundaries,
        b(s, t] = b(s, end of j] + b(end of j, start of i] + b(start of i, t],
    so those blocks are matmuls of (q * exp(.)) and (k * exp(.)) with a per-pair middle factor; pairs inside one
    sub-chunk use a (c, c, dk) tensor of b(s, t] directly.

    Numerical safety: every exponent is b(s, t] with s <= t, i.e. <= 0, so nothing overflows, and masked pairs
    (s > t) are set to -inf BEFORE exp: exact zeros with zero gradient (no inf * 0). Precision: every b(s, t] is
    summed over exactly its range (0/1 matmuls), never taken as a difference of two cumulative sums, which would
    lose ~|cumsum| * 1e-7 in fp32 and wreck pairs that sit after a very strong decay.
    """
    Bn, H, L, dk = q.shape
    dv = v.shape[-1]
    T = min(chunk_size, L)
    c = math.gcd(T, SUB_CHUNK)
    nc, ns = -(-L // T), T // c
    pad = nc * T - L
    if pad:  # padded steps: g = 0 (no decay) and k = v = 0 (no input) carry the state unchanged
        q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    q, k, g = (t.reshape(Bn, H, nc, ns, c, dk) for t in (q, k, g))
    v = v.reshape(Bn, H, nc, ns, c, dv)
    m = _range_masks(c, ns, g.dtype, g.device)

    # log-decays as range sums, all <= 0
    b_in = m["upto"] @ g  # (B, H, nc, ns, c, dk): b(start of sub-chunk, t]
    b_out = m["after"] @ g  # b(s, end of sub-chunk]
    tot = g.sum(-2)  # (B, H, nc, ns, dk): b over each whole sub-chunk
    b_chunk_in = b_in + (m["before_i"] @ tot)[..., None, :]  # b(start of chunk, t]
    b_chunk_out = b_out + (m["after_i"] @ tot)[..., None, :]  # b(s, end of chunk]

    # across chunks: nc sequential steps on (dk, dv) states
    kv = (k * torch.exp(b_chunk_out)).reshape(Bn, H, nc, T, dk)
    dS = kv.transpose(-1, -2) @ v.reshape(Bn, H, nc, T, dv)  # (B, H, nc, dk, dv)
    S = S0 if S0 is not None else q.new_zeros(Bn, H, dk, dv)
    starts = []
    for decay_c, dS_c in zip(torch.exp(tot.sum(-2)).unbind(2), dS.unbind(2)):
        starts.append(S)
        S = decay_c[..., None] * S + dS_c
    o = (q * torch.exp(b_chunk_in)).reshape(Bn, H, nc, T, dk) @ torch.stack(starts, 2)  # (B, H, nc, T, dv)

    # inside a chunk, same sub-chunk: (c, c, dk) log-decays b(s, t], -inf above the diagonal
    e = (m["seg"] @ g).view(Bn, H, nc, ns, c, c, dk).masked_fill(~m["lower"][..., None], float("-inf"))
    A = torch.linalg.vecdot(q[..., :, None, :] * torch.exp(e), k[..., None, :, :])  # (B, H, nc, ns, c, c)
    if ns == 1:
        o_in = A @ v  # (B, H, nc, 1, c, dv)
    else:  # earlier sub-chunks j < i, through the boundaries: middle factor b(end of j, start of i], -inf if j >= i
        mid = (m["between"] @ tot).view(Bn, H, nc, ns, ns, dk).masked_fill(~m["earlier"][..., None], float("-inf"))
        qi = (q * torch.exp(b_in))[..., :, None, :, :] * torch.exp(mid)[..., None, :]  # (.., ns_i, ns_j, c, dk)
        kj = (k * torch.exp(b_out))[..., None, :, :, :]  # (.., 1, ns_j, c, dk)
        A = qi @ kj.transpose(-1, -2) + A[..., :, None, :, :] * m["eye"]  # (.., ns_i, ns_j, c_t, c_s)
        A = A.transpose(-3, -2).reshape(Bn, H, nc, T, T)  # rows (i, t), columns (j, s)
        o_in = A @ v.reshape(Bn, H, nc, T, dv)
    o = o + o_in.reshape(Bn, H, nc, T, dv)
    return o.reshape(Bn, H, nc * T, dv)[:, :, :L], S


def _range_masks(c, ns, dtype, device):
    """0/1 matrices that sum g over index ranges by matmul (a sum of terms <= 0: no cancellation), and masks."""
    i = torch.arange(c, device=device)
    t, s = i[:, None], i[None, :]
    j = torch.arange(ns, device=device)
    ii, jj = j[:, None], j[None, :]
    seg = (i[None, None, :] > s[..., None]) & (i[None, None, :] <= t[..., None])  # [t, s, r]: s < r <= t
    mid = (j[None, None, :] > jj[..., None]) & (j[None, None, :] < ii[..., None])  # [i, j, m]: j < m < i
    f = {"upto": t >= s, "after": s > t, "before_i": jj < ii, "after_i": jj > ii,
         "seg": seg.reshape(c * c, c), "between": mid.reshape(ns * ns, ns)}
    out = {name: mask.to(dtype) for name, mask in f.items()}
    out.update(lower=t >= s, earlier=jj < ii, eye=torch.eye(ns, dtype=dtype, device=device)[:, :, None, None])
    return out


def _expect(where, name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where}: {name} must be a tensor of shape {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{where}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if len(shape) != t.dim() or any(isinstance(s, int) and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join(str(s) for s in shape) + ")"
        raise InputError(f"{where}: {name} must have shape {want}, got {tuple(t.shape)}")


def _check_shapes(where, q, k, v, g, state, lead):
    """lead names the leading dims: ("B", "H", "L") for the scan, ("B", "H") for the step."""
    _expect(where, "q", q, (*lead, "dk"))
    if len(lead) == 3 and q.shape[2] < 1:
        raise InputError(f"{where}: q must have length L >= 1, got shape {tuple(q.shape)}")
    dims, dk = tuple(q.shape[:-1]), q.shape[-1]
    _expect(where, "k", k, (*dims, dk))
    _expect(where, "g", g, (*dims, dk))
    _expect(where, "v", v, (*dims, "dv"))
    if state is not None or len(lead) == 2:
        _expect(where, "initial_state" if len(lead) == 3 else "state", state, (*dims[:2], dk, v.shape[-1]))
