"""Mamba-2's state-space duality (SSD; Dao & Gu 2024, "Transformers are SSMs"), multi-head, as pure tensor functions.

Glossary (code name -- paper symbol -- meaning)
    x            x_t        inputs: (B, L, H, P), H heads of head_dim P
    dt           Delta_t    step size per head: (B, L, H); with dt_softplus, softplus(dt + dt_bias) is the step
    A            A          scalar decay rate per head, < 0: (H,); the per-step log decay is a_t = dt_t * A (<= 0)
    B, C         B_t, C_t   input and output vectors, shared by the H / G heads of a group: (B, L, G, N), G | H
                            (head h reads group h // (H / G), as Mamba-2 lays them out)
    D            D          skip connection per head: (H,)
    h, state     h_t        the state, one (P, N) matrix per head: (B, H, P, N); kept in fp32 (fp64 for fp64 inputs)
    seg(s, t]               a_{s+1} + ... + a_t, the log decay from step s to step t (<= 0; 0 when s == t)
    Q                       chunk size

Recurrence, per head (B_t, C_t those of the head's group):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          (x_t B_t^T is the (P, N) outer product)
    y_t = h_t C_t + D x_t

Its dual, the form trained here: within a chunk y = (L o C B^T) (dt x) with the decay mask L[t, s] = exp seg(s, t]
for s <= t (0 above the diagonal), a masked attention-like matmul; across chunks the (P, N) states are passed on.

Entry points:
    ssd(..., impl="chunked")   the chunked SSD form; for training and prefill
    ssd(..., impl="ref")       runs `ssd_ref` (ops/naive.py): the plain loop over time, written apart from this file
                               (no shared helper), the twin the tests compare against
    ssd_step(...)              one step from a state, with checks and casts; O(1) decoding
    ssd_update(...)            the same step without checks or casts (what the mixer's step calls)

Return convention: the scan ALWAYS returns a tuple `(y, final_state_or_None)`.

dt: as in Mamba-2's reference kernels, `dt` is the raw step unless `dt_bias` / `dt_softplus` are given, in which
case the step is softplus(dt + dt_bias) (each part optional), computed in fp32. The mixer passes its raw projection
with dt_bias and dt_softplus=True, so the discretization happens once, in the compute dtype.

Limits, honestly:
- Eager PyTorch, no fused kernel; autograd through the chunked form (no hand-written backward).
- A * dt must be <= 0 (A < 0, dt >= 0) for the no-overflow guarantee below; values are not checked (that would
  force a device sync).
- Across chunks the states move in a sequential pass, L / Q small steps: linear in L, but one Python step per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops.checks import check_ssd, check_ssd_step
from seqlab.ops.naive import ssd_ref

IMPLS = ("ref", "chunked")


def ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None, return_final_state=False,
        impl="chunked", chunk_size=64):
    """Mamba-2's SSD scan over a whole sequence.

    Args:
        x: (B, L, H, P), any L >= 1. dt: (B, L, H). A: (H,), negative. B, C: (B, L, G, N), G divides H.
        D: (H,) or None. dt_bias: (H,) or None, added to dt before the optional softplus.
        dt_softplus: apply softplus to dt (after dt_bias).
        initial_state: (B, H, P, N) or None (zeros); differentiable.
        return_final_state: also return the state after the last step (differentiable).
        impl: "chunked" (the SSD matmul form) or "ref" (the naive twin `ssd_ref`, a loop).
        chunk_size: steps per chunk for impl="chunked" (ignored by "ref").

    Returns:
        (y, final_state): y (B, L, H, P) in x's dtype; final_state (B, H, P, N) in fp32 (fp64 for fp64 inputs) when
        return_final_state, else None. Always a tuple.
    """
    if impl not in IMPLS:
        raise InputError(f"ssd: unknown impl {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    if impl == "ref":  # the naive twin, which checks its own inputs
        return ssd_ref(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
                       return_final_state=return_final_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    check_ssd("ssd", x, dt, A, B, C, D, dt_bias, initial_state)
    cdt = torch.promote_types(x.dtype, torch.float32)
    dt = _discretize(dt.to(cdt), dt_bias, dt_softplus)
    h0 = None if initial_state is None else initial_state.to(cdt)
    y, h = _ssd_chunked(x.to(cdt), dt, A.to(cdt), B.to(cdt), C.to(cdt), h0, chunk_size)
    if D is not None:
        y = y + D.to(cdt)[:, None] * x.to(cdt)
    return y.to(x.dtype), (h if return_final_state else None)


def ssd_step(x, dt, A, B, C, state, D=None, dt_bias=None, dt_softplus=False):
    """One recurrent step from `state`, for O(1) decoding. Same math as the scan with L = 1.

    Args:
        x: (B, H, P). dt: (B, H). A: (H,). B, C: (B, G, N). state: (B, H, P, N), fp32 (another float dtype is cast).
        D, dt_bias: (H,) or None. dt_softplus as in `ssd`.

    Returns:
        (y, new_state): y (B, H, P) in x's dtype, new_state (B, H, P, N) in fp32 (fp64 for fp64 inputs).
    """
    check_ssd_step("ssd_step", x, dt, A, B, C, state, D, dt_bias)
    cdt = torch.promote_types(x.dtype, torch.float32)
    dt = _discretize(dt.to(cdt), dt_bias, dt_softplus)
    y, h = ssd_update(state.to(cdt), x.to(cdt), dt, A.to(cdt), B.to(cdt), C.to(cdt),
                      None if D is None else D.to(cdt))
    return y.to(x.dtype), h


def ssd_update(state, x, dt, A, B, C, D=None):
    """The lean one-token update the mixer's step calls: no input checks, no dtype casts, dt already discretized.
    state (b, H, P, N) and every input in the compute dtype: x (b, H, P), dt (b, H), A (H,), B, C (b, G, N),
    D (H,) or None -> (y (b, H, P), new state). `ssd_step` is this with checks, casts and the discretization.
    Plain ops only (expand + reshape for the groups), so the ONNX exporter traces it."""
    H, G, N = x.shape[1], B.shape[1], B.shape[2]
    # each head its group's B and C; -1 for the batch, so a traced graph keeps the batch axis dynamic
    Bh = B[:, :, None, :].expand(-1, G, H // G, N).reshape(-1, H, 1, N)
    Ch = C[:, :, None, :].expand(-1, G, H // G, N).reshape(-1, H, N, 1)
    decay = torch.exp(dt * A)[..., None, None]  # (b, H, 1, 1): exp(dt A)
    h = torch.addcmul(decay * state, (dt[..., None] * x)[..., None], Bh)  # (b, H, P, N)
    y = (h @ Ch).squeeze(-1)  # (b, H, P): h C
    if D is not None:
        y = y + D[:, None] * x
    return y, h


# ---------------------------------------------------------------------------------------------------------------
# Math shared by the chunked scan and the step (not by the naive twin: it writes its own)


def _discretize(dt, dt_bias, dt_softplus):
    """dt (..., H) -> softplus(dt + dt_bias) (each part optional), in dt's dtype."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def _segsum_exp(a):
    """a (..., Q) -> exp(seg) (..., Q, Q) with seg[t, s] = a_{s+1} + ... + a_t for s <= t, and 1 above the diagonal
    (an empty sum: the caller's causal mask zeroes those entries).

    Each seg is a cumulative sum over exactly its range (the masked copy of a summed down the columns), never the
    difference cumsum_t - cumsum_s: that difference loses ~|cumsum| * eps, which after a strong decay swamps the
    short ranges. Masked before the exp: every exponent is a range sum <= 0 (or an empty 0), none is positive."""
    Q = a.shape[-1]
    strict = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    rows = a[..., :, None].expand(*a.shape, Q).masked_fill(~strict, 0)  # rows[k, s] = a_k for k > s, else 0
    return torch.exp(rows.cumsum(-2))


def _ssd_chunked(x, dt, A, B, C, h0, chunk_size):
    """The chunked SSD form. x (b, L, H, P), dt (b, L, H) discretized, A (H,), B, C (b, L, G, N), h0 (b, H, P, N)
    or None -> (y without the D skip (b, L, H, P), final state (b, H, P, N)). Within each chunk of Q steps, for
    step t with chunk-start state h_start (seg over the chunk's own steps):

        y_t = exp seg(start, t] (h_start C_t)                          from earlier chunks
            + sum_{s <= t} (C_t . B_s) exp seg(s, t] dt_s x_s          the chunk itself: a masked matmul
        h_end = exp seg(start, end] h_start + sum_s exp seg(s, end] dt_s x_s B_s^T

    The heads of a group share B and C, so C B^T is computed once per group, and the two state products take all
    R = H / G heads of a group at once: (N, Q) @ (Q, R P) and (Q, N) @ (N, R P), a few wide matrix products rather
    than many 64 x 64 ones; the states are kept transposed, (N, R P) per group, for that. Padded steps at the end
    (dt = 0, x = 0) neither decay nor feed the state. Every exponent is a range sum of a = dt A <= 0, each summed
    over exactly its range, so nothing overflows and strong decays lose no precision."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    Q = min(chunk_size, L)
    nc = -(-L // Q)
    pad = nc * Q - L
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    xdt = (x * dt[..., None]).reshape(b, nc, Q, G, R, P).transpose(2, 3)  # (b, nc, G, Q, R, P): dt_s x_s
    a = (dt * A).reshape(b, nc, Q, G, R).permute(0, 1, 3, 4, 2)  # (b, nc, G, R, Q): log decay per step
    B = B.reshape(b, nc, Q, G, N).transpose(2, 3)  # (b, nc, G, Q, N)
    C = C.reshape(b, nc, Q, G, N).transpose(2, 3)

    # inside the chunk: the masked "attention" matmul, C B^T and the causal mask once per group, the decay per head
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    CB = (C @ B.transpose(-1, -2)).masked_fill(~causal, 0)  # (b, nc, G, Q, Q)
    y = (CB.unsqueeze(3) * _segsum_exp(a)) @ xdt.transpose(3, 4)  # (b, nc, G, R, Q, P)

    # each chunk's own contribution to the state at its end, exponent seg(s, end] = the sum over k > s, taken from
    # a cumulative sum from the end (shifted by one), so again each range summed exactly
    after = F.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # (b, nc, G, R, Q)
    xw = (xdt * torch.exp(after).transpose(-1, -2)[..., None]).reshape(b, nc, G, Q, R * P)
    dhT = B.transpose(-1, -2) @ xw  # (b, nc, G, N, R P): the transposed state increment of every head

    # across chunks: nc sequential steps on the transposed states (b, G, N, R, P)
    decay_in = a.cumsum(-1)  # (b, nc, G, R, Q): seg(start, t], a range sum from the chunk start
    hT = x.new_zeros(b, G, N, R, P) if h0 is None else h0.reshape(b, G, R, P, N).permute(0, 1, 4, 2, 3)
    starts = []
    for decay_c, dh_c in zip(torch.exp(decay_in[..., -1]).unbind(1), dhT.unbind(1)):
        starts.append(hT)
        hT = decay_c[:, :, None, :, None] * hT + dh_c.view(b, G, N, R, P)
    starts = torch.stack(starts, 1).reshape(b, nc, G, N, R * P)
    y_off = (C @ starts).view(b, nc, G, Q, R, P) * torch.exp(decay_in).transpose(-1, -2)[..., None]  # earlier chunks

    y = (y.transpose(3, 4) + y_off).transpose(2, 3).reshape(b, nc * Q, H, P)[:, :L]
    return y, hT.permute(0, 1, 3, 4, 2).reshape(b, H, P, N)
