"""The reference twins: each scan as a plain loop over time, written from its equation alone.

    selective_scan_ref   Mamba-1's selective scan (the twin of `selective_scan` in ops/selective_scan.py)
    gla_ref              gated linear attention (the twin of `gla` in ops/gla.py)
    delta_rule_ref       the (gated) delta rule (the twin of `delta_rule` in ops/delta_rule.py)
    minrnn_scan_ref      minGRU / minLSTM's linear recurrence (the twin of `minrnn_scan` in ops/minrnn.py)
    ssd_ref              Mamba-2's state-space duality scan (the twin of `ssd` in ops/ssd.py)

Nothing here is imported from the fast files, and the fast files' math imports nothing from here: the
discretization, the gating, the skip connection and the step are written a second time, on purpose, so that a bug
in one form shows up as a difference the tests can see. Only the input checks (ops/checks.py) are shared.

Each twin has its fast op's signature (`impl` and `chunk_size` are accepted and unused), returns
`(output, final_state_or_None)`, computes in fp32 (fp64 for fp64 inputs) and keeps the state in that dtype.
Both are differentiable in every input, initial state included, to any order (plain autograd), and traceable by
`torch.jit.trace` (a Python loop over the known length, no branch on tensor values): ONNX export unrolls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops.checks import check_delta_rule, check_gla, check_minrnn, check_scale, check_selective_scan, check_ssd


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                       return_final_state=False, impl="ref", chunk_size=None):
    """Mamba-1's selective scan, one time step at a time. For every channel d and state index n:

        delta_l = softplus(delta_l + delta_bias)         (bias and softplus each optional)
        x_l     = exp(delta_l A) * x_{l-1} + delta_l B_l u_l
        y_l     = <x_l, C_l> + D u_l,   then   y_l *= silu(z_l)

    Args (as `selective_scan`): u, delta, z (batch, d_inner, L); A (d_inner, N); B, C (batch, N, L);
        D, delta_bias (d_inner,); initial_state (batch, d_inner, N) or None (zeros).

    Returns:
        (y, final_state): y (batch, d_inner, L) in u's dtype; final_state (batch, d_inner, N) in fp32 (fp64 for fp64
        inputs) when return_final_state, else None.
    """
    if impl != "ref":
        raise InputError(f"selective_scan_ref always runs impl='ref', got impl={impl!r}; "
                         "call selective_scan(..., impl=...) to choose")
    check_selective_scan("selective_scan_ref", u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype = torch.promote_types(u.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    u_c, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]  # one bias per channel
    if delta_softplus:
        delta = F.softplus(delta)

    batch, d_inner, _ = u.shape
    if initial_state is None:
        x = torch.zeros(batch, d_inner, A.shape[1], dtype=dtype, device=u.device)
    else:
        x = initial_state.to(dtype)
    ys = []
    # unbind, not indexing: the backward of t[..., l] allocates a zero tensor of t's size per step (O(L^2) in all)
    for u_l, delta_l, B_l, C_l in zip(u_c.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(delta_l[:, :, None] * A[None])  # (batch, d_inner, N): exp(delta_l A)
        drive = (delta_l * u_l)[:, :, None] * B_l[:, None, :]  # (batch, d_inner, N): delta_l B_l u_l
        x = decay * x + drive
        ys.append((x * C_l[:, None, :]).sum(-1))  # (batch, d_inner): <x_l, C_l>
    y = torch.stack(ys, dim=-1)  # (batch, d_inner, L)

    if D is not None:
        y = y + D.to(dtype)[:, None] * u_c  # the skip connection
    if z is not None:
        y = y * F.silu(z.to(dtype))  # the gate
    return y.to(u.dtype), (x if return_final_state else None)


def gla_ref(q, k, v, g, initial_state=None, return_final_state=False, impl="ref", chunk_size=16, scale=None):
    """Gated linear attention, one time step at a time. Per head, with S_t a (dk, dv) matrix:

        S_t = diag(exp g_t) S_{t-1} + k_t^T v_t          (k_t^T v_t: the outer product)
        o_t = (q_t * scale) S_t

    Args (as `gla`): q, k, g (B, H, L, dk), g the log forget gate (<= 0); v (B, H, L, dv);
        initial_state (B, H, dk, dv) or None (zeros); scale None means dk ** -0.5.

    Returns:
        (o, final_state): o (B, H, L, dv) in q's dtype; final_state (B, H, dk, dv) in fp32 (fp64 for fp64 inputs)
        when return_final_state, else None.
    """
    if impl != "ref":
        raise InputError(f"gla_ref always runs impl='ref', got impl={impl!r}; call gla(..., impl=...) to choose")
    check_gla("gla_ref", q, k, v, g, initial_state, ("B", "H", "L"))
    check_scale("gla_ref", scale)
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    q_c, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    Bn, H, _, dk = q.shape
    q_c = q_c * (dk ** -0.5 if scale is None else float(scale))

    if initial_state is None:
        S = torch.zeros(Bn, H, dk, v.shape[-1], dtype=dtype, device=q.device)
    else:
        S = initial_state.to(dtype)
    outs = []
    for q_t, k_t, v_t, g_t in zip(q_c.unbind(2), k.unbind(2), v.unbind(2), g.unbind(2)):
        # decay row i of S by exp(g_t[i]), then add the outer product k_t^T v_t
        S = torch.exp(g_t)[..., :, None] * S + k_t[..., :, None] * v_t[..., None, :]  # (B, H, dk, dv)
        outs.append((q_t[..., :, None] * S).sum(-2))  # (B, H, dv): the row vector q_t S_t
    return torch.stack(outs, dim=2).to(q.dtype), (S if return_final_state else None)


def minrnn_scan_ref(log_a, log_b, initial_state=None, return_final_state=False, impl="ref", chunk_size=64):
    """The minimal RNNs' recurrence (minGRU, minLSTM), one time step at a time, in linear space:

        h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)          (elementwise over D; h_0 = initial_state or 0)

    Args (as `minrnn_scan`): log_a, log_b (B, T, D); initial_state (B, D) or None.

    Returns:
        (h, final_state): h (B, T, D) in log_b's dtype; final_state (B, D) in fp32 (fp64 for fp64 inputs) when
        return_final_state, else None.
    """
    if impl != "ref":
        raise InputError(f"minrnn_scan_ref always runs impl='ref', got impl={impl!r}; "
                         "call minrnn_scan(..., impl=...) to choose")
    check_minrnn("minrnn_scan_ref", log_a, log_b, initial_state)
    cdt = torch.promote_types(log_b.dtype, torch.float32)
    B, T, D = log_b.shape
    h = log_b.new_zeros(B, D, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    outs = []
    for a_t, b_t in zip(log_a.to(cdt).unbind(1), log_b.to(cdt).unbind(1)):
        h = torch.exp(a_t) * h + torch.exp(b_t)
        outs.append(h)
    return torch.stack(outs, 1).to(log_b.dtype), (h if return_final_state else None)


def delta_rule_ref(q, k, v, beta, g=None, initial_state=None, return_final_state=False, impl="ref", chunk_size=64,
                   scale=None):
    """The (gated) delta rule, one time step at a time. Per head, with S_t a (dk, dv) matrix (keys along rows; the
    paper's (dv, dk) state transposed), a_t = exp(g_t) (1 when g is None) and I the (dk, dk) identity:

        S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t = S_t^T (q_t * scale)

    Args (as `delta_rule`): q, k (B, H, L, dk); v (B, H, L, dv); beta (B, H, L); g (B, H, L) log decay or None;
        initial_state (B, H, dk, dv) or None (zeros); scale None means dk ** -0.5.

    Returns:
        (o, final_state): o (B, H, L, dv) in q's dtype; final_state (B, H, dk, dv) in fp32 (fp64 for fp64 inputs)
        when return_final_state, else None.
    """
    if impl != "ref":
        raise InputError(f"delta_rule_ref always runs impl='ref', got impl={impl!r}; "
                         "call delta_rule(..., impl=...) to choose")
    check_delta_rule("delta_rule_ref", q, k, v, beta, g, initial_state, ("B", "H", "L"))
    check_scale("delta_rule_ref", scale)
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    q_c, k, v, beta = (t.to(dtype) for t in (q, k, v, beta))
    Bn, H, L, dk = q.shape
    q_c = q_c * (dk ** -0.5 if scale is None else float(scale))
    a = torch.ones(Bn, H, L, dtype=dtype, device=q.device) if g is None else torch.exp(g.to(dtype))
    eye = torch.eye(dk, dtype=dtype, device=q.device)

    if initial_state is None:
        S = torch.zeros(Bn, H, dk, v.shape[-1], dtype=dtype, device=q.device)
    else:
        S = initial_state.to(dtype)
    outs = []
    for q_t, k_t, v_t, b_t, a_t in zip(q_c.unbind(2), k.unbind(2), v.unbind(2), beta.unbind(2), a.unbind(2)):
        b_t = b_t[..., None, None]
        erase = eye - b_t * (k_t[..., :, None] @ k_t[..., None, :])  # (B, H, dk, dk): I - beta_t k_t k_t^T
        S = a_t[..., None, None] * (erase @ S) + b_t * (k_t[..., :, None] @ v_t[..., None, :])  # (B, H, dk, dv)
        outs.append((q_t[..., None, :] @ S)[..., 0, :])  # (B, H, dv): the row vector q_t^T S_t
    return torch.stack(outs, dim=2).to(q.dtype), (S if return_final_state else None)


def ssd_ref(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None, return_final_state=False,
            impl="ref", chunk_size=64):
    """Mamba-2's scan (state-space duality), one time step at a time. Per head h, with group g = h // (H / G) and
    h_t a (P, N) matrix:

        dt_t = softplus(dt_t + dt_bias)                  (bias and softplus each optional)
        h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T      (x_t B_t^T: the head's x times its group's B, outer)
        y_t  = h_t C_t + D x_t

    Args (as `ssd`): x (B, L, H, P); dt (B, L, H); A, D, dt_bias (H,); B, C (B, L, G, N) with G dividing H;
        initial_state (B, H, P, N) or None (zeros).

    Returns:
        (y, final_state): y (B, L, H, P) in x's dtype; final_state (B, H, P, N) in fp32 (fp64 for fp64 inputs)
        when return_final_state, else None.
    """
    if impl != "ref":
        raise InputError(f"ssd_ref always runs impl='ref', got impl={impl!r}; call ssd(..., impl=...) to choose")
    check_ssd("ssd_ref", x, dt, A, B, C, D, dt_bias, initial_state)
    dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    x_c, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)  # one bias per head
    if dt_softplus:
        dt = F.softplus(dt)
    Bn, L, H, P = x.shape
    heads_per_group = H // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)  # (B, L, H, N): head h reads group h // heads_per_group
    C = C.repeat_interleave(heads_per_group, dim=2)

    if initial_state is None:
        h = torch.zeros(Bn, H, P, B.shape[-1], dtype=dtype, device=x.device)
    else:
        h = initial_state.to(dtype)
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x_c.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        decay = torch.exp(dt_t * A)[:, :, None, None]  # (B, H, 1, 1): exp(dt_t A), one scalar per head
        h = decay * h + (dt_t[:, :, None] * x_t)[..., :, None] * B_t[:, :, None, :]  # (B, H, P, N)
        ys.append((h * C_t[:, :, None, :]).sum(-1))  # (B, H, P): h_t C_t
    y = torch.stack(ys, dim=1)  # (B, L, H, P)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x_c  # the skip connection
    return y.to(x.dtype), (h if return_final_state else None)
