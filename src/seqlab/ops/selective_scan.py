"""Selective scan: the recurrence inside a Mamba block (Gu & Dao, 2023), as pure tensor functions.

Glossary (code name -- paper symbol -- meaning)
    u            x_t       input, one scalar per channel and step: (batch, d_inner, L)
    delta        Delta_t   input-dependent step size, per channel and step: (batch, d_inner, L)
    A            A         diagonal state matrix, one row of N negative reals per channel: (d_inner, N)
    B, C         B_t, C_t  input-dependent input / output projections, shared by all channels: (batch, N, L)
    D            D         skip connection, per channel: (d_inner,)
    z            z         gate branch: y is multiplied by silu(z): (batch, d_inner, L)
    dA           A-bar_t   exp(Delta_t A), the discrete decay, in (0, 1] when A < 0
    dBu          B-bar_t x_t  Delta_t B_t u_t (the simplified discretization of the paper's reference code)
    x, state     h_t       recurrent state: (batch, d_inner, N); kept in fp32 (fp64 for fp64 inputs)
    N, d_inner   N, D      state size per channel, number of channels

Recurrence, for every channel d and state index n:
    x_l = exp(Delta_l A) * x_{l-1} + Delta_l B_l u_l          (state, elementwise over (d, n))
    y_l = <x_l, C_l> + D u_l,   then   y_l *= silu(z_l)        (output, summed over n)

Three entry points share one discretization and one step:
    selective_scan(..., impl="chunked")  parallel over chunks; for training and prefill
    selective_scan_ref(...)              the plain sequential loop; the twin the tests compare against
    selective_scan_step(...)             one step from a state; O(1) decoding

Return convention: the scans ALWAYS return a tuple `(y, final_state_or_None)`, so the return type never depends on
`return_final_state`.

Limits, honestly:
- This is eager PyTorch: no fused kernel. Mamba-1's decay differs per (channel, state) pair, so the work is
  O(batch * d_inner * L * N) elementwise in every algorithm (the CUDA kernel keeps that in registers; here it goes
  through memory). The chunked form wins by removing the per-step Python/autograd overhead, not by doing less work;
  on CPU expect a few times, not orders of magnitude, over the loop (benchmarks/bench_scans.py measures it).
- Memory for forward+backward: autograd keeps three (batch, d_inner, L, N) fp32 tensors (the decays and two state
  sweeps), e.g. 3 x 1 GiB for batch 4, d_inner 512, N 16, L 8192.
- A must be negative (Mamba parametrizes A = -exp(A_log)). With A > 0 the recurrence itself grows without bound,
  and overflow is then a property of the input, not of the algorithm. Values are not checked (that would force a
  device sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError

IMPLS = ("ref", "chunked")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   return_final_state=False, impl="chunked", chunk_size=64):
    """Run the selective scan over a whole sequence.

    Args:
        u, delta: (batch, d_inner, L), any L >= 1. z: (batch, d_inner, L) or None.
        A: (d_inner, N), negative. B, C: (batch, N, L). D, delta_bias: (d_inner,) or None.
        delta_softplus: apply softplus to delta (after adding delta_bias).
        initial_state: (batch, d_inner, N) or None (zeros); differentiable.
        return_final_state: also return the state after the last step (differentiable).
        impl: "chunked" (parallel over chunks) or "ref" (sequential loop).
        chunk_size: steps per chunk for impl="chunked" (ignored by "ref"). 64-128 is fastest on CPU.

    Returns:
        (y, final_state): y (batch, d_inner, L) in u's dtype; final_state (batch, d_inner, N) in fp32 (fp64 for
        fp64 inputs) when return_final_state, else None. Always a tuple.
    """
    if impl not in IMPLS:
        raise InputError(f"selective_scan: unknown impl {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    if impl == "chunked" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cdt = _compute_dtype(u)
    delta = _discretize_delta(delta.to(cdt), delta_bias, delta_softplus)
    u_c, A, B, C = u.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt)
    x0 = None if initial_state is None else initial_state.to(cdt)
    if impl == "ref":
        y, x = _scan_loop(u_c, delta, A, B, C, x0)
    else:
        y, x = _scan_chunked(u_c, delta, A, B, C, x0, chunk_size)
    y = _skip_and_gate(y, u_c, D, z)
    return y.to(u.dtype), (x if return_final_state else None)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                       return_final_state=False, impl="ref", chunk_size=64):
    """The reference twin of `selective_scan`: same signature, impl fixed to "ref" (chunk_size is unused).

    A plain fp32 loop over time, one `selective_scan_step` per step:
        x_l = exp(delta_l * A) * x_{l-1} + delta_l * B_l * u_l
        y_l = <x_l, C_l> + D * u_l;   y_l *= silu(z_l) if z is given
    with delta_l = softplus(delta_l + delta_bias) when delta_softplus (else without the softplus).
    """
    if impl != "ref":
        raise InputError(f"selective_scan_ref always runs impl='ref', got impl={impl!r}; "
                         "call selective_scan(..., impl=...) to choose")
    return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          initial_state=initial_state, return_final_state=return_final_state, impl="ref")


def selective_scan_step(u, delta, A, B, C, state, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One recurrent step from `state`, for O(1) decoding. Same math as the scan with L = 1.

    Args:
        u, delta: (batch, d_inner); z: (batch, d_inner) or None. A: (d_inner, N). B, C: (batch, N).
        state: (batch, d_inner, N), fp32 (another float dtype is cast). D, delta_bias: (d_inner,) or None.

    Returns:
        (y, new_state): y (batch, d_inner) in u's dtype, new_state (batch, d_inner, N) in fp32.
    """
    _check_step_shapes(u, delta, A, B, C, state, D, z, delta_bias)
    cdt = _compute_dtype(u)
    delta = _discretize_delta(delta.to(cdt), delta_bias, delta_softplus)
    u_c = u.to(cdt)
    x, y = _step(state.to(cdt), u_c, delta, A.to(cdt), B.to(cdt), C.to(cdt))
    y = _skip_and_gate(y, u_c, D, z)
    return y.to(u.dtype), x


# ---------------------------------------------------------------------------------------------------------------
# Shared math


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 inputs; fp64 stays fp64 (so tests can compare in double precision)."""
    return torch.promote_types(u.dtype, torch.float32)


def _discretize_delta(delta, delta_bias, delta_softplus):
    """delta (b, d, L) or (b, d) -> softplus(delta + delta_bias) (each part optional)."""
    if delta_bias is not None:
        bias = delta_bias.to(delta.dtype)
        delta = delta + (bias[:, None] if delta.dim() == 3 else bias)
    return F.softplus(delta) if delta_softplus else delta


def _step(x, u, delta, A, B, C):
    """x (b, d, N), u and delta (b, d), A (d, N), B and C (b, N) -> (new x, y (b, d))."""
    x = torch.exp(delta[..., None] * A) * x + (delta * u)[..., None] * B[:, None, :]
    return x, (x * C[:, None, :]).sum(-1)


def _skip_and_gate(y, u, D, z):
    """y, u, z (b, d, L) or (b, d); D (d,): y + D u, then times silu(z) (each part optional)."""
    if D is not None:
        Dc = D.to(y.dtype)
        y = y + (Dc[:, None] if y.dim() == 3 else Dc) * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _scan_loop(u, delta, A, B, C, x0):
    """The sequential loop: L calls of `_step`. unbind (not indexing) keeps backward linear in L: the backward of
    `t[..., l]` allocates a zero tensor of t's full size per step, which makes an indexed loop O(L^2)."""
    b, d, L = u.shape
    x = x0 if x0 is not None else u.new_zeros(b, d, A.shape[1])
    ys = []
    for u_l, d_l, B_l, C_l in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        x, y_l = _step(x, u_l, d_l, A, B_l, C_l)
        ys.append(y_l)
    return torch.stack(ys, -1), x  # (b, d, L), (b, d, N)


def _scan_chunked(u, delta, A, B, C, x0, chunk_size):
    """Parallel over chunks. The sequence is cut into nc chunks of T steps, then:

    1. all chunks at once, T steps: each chunk's state from a zero start, h_t = dA_t * h_{t-1} + dBu_t;
    2. nc steps over chunks: the true state entering each chunk, X_c = P_c * X_{c-1} + h_T(c), where the chunk decay
       P_c = exp(A * sum of delta over the chunk) is the chunk's cumulative log-decay exponentiated (<= 0, safe);
    3. all chunks at once, T steps: the same recurrence again from the true entering states, reading y_t = <x_t, C_t>.

    Sequential depth 2T + nc instead of L; each step works on (N, batch, nc, d_inner) tensors.
    Why a short loop inside a chunk and not the quadratic "attention" form of a chunk (cumsum of log-decays,
    then exp of pairwise differences and einsums): here the decay differs per (channel, state) pair, so that form
    materializes (batch, d_inner, T, T, N) and computes T times more exponentials than the recurrence; measured
    4-9x slower on CPU for T = 4-8, and its memory grows with T. The state form needs no exponent of a cumulative
    sum at all: every factor is a single-step decay exp(delta * A) <= 1, so nothing can overflow and no masked
    entry exists (no inf * 0).
    """
    b, d, L = u.shape
    N = A.shape[1]
    T = min(chunk_size, L)
    nc = -(-L // T)
    w = delta * u  # (b, d, L): delta_l u_l
    pad = nc * T - L
    if pad:  # padded steps have delta = 0: decay exp(0) = 1 and no input, so they carry the state unchanged
        delta, w, B, C = F.pad(delta, (0, pad)), F.pad(w, (0, pad)), F.pad(B, (0, pad)), F.pad(C, (0, pad))
    # Layout: step-in-chunk first (each step is one contiguous slice), then the state index n (sums over n add
    # whole slabs, which vectorizes far better than reducing a last dimension of 16), channels last.
    dl = delta.view(b, d, nc, T).permute(3, 0, 2, 1).contiguous()  # (T, b, nc, d)
    wl = w.view(b, d, nc, T).permute(3, 0, 2, 1).contiguous()  # (T, b, nc, d)
    Bl = B.view(b, N, nc, T).permute(3, 1, 0, 2).contiguous().unsqueeze(-1)  # (T, N, b, nc, 1)
    Cl = C.view(b, N, nc, T).permute(3, 1, 0, 2).contiguous().unsqueeze(-1)  # (T, N, b, nc, 1)
    At = A.t().reshape(N, 1, 1, d)  # (N, 1, 1, d)

    # 1. states of every chunk from a zero start (only the last one is used, but autograd needs the path)
    dAs, h = [], None
    for dl_t, wl_t, B_t in zip(dl.unbind(0), wl.unbind(0), Bl.unbind(0)):
        dA_t = torch.exp(dl_t * At)  # (N, b, nc, d)
        dAs.append(dA_t)
        h = wl_t * B_t if h is None else dA_t * h + wl_t * B_t  # dBu is recomputed in 3: cheaper than storing it

    # 2. across chunks: X_c = P_c * X_{c-1} + h_T(c)
    P = torch.exp(dl.sum(0) * At)  # (N, b, nc, d)
    x = x0.permute(2, 0, 1) if x0 is not None else u.new_zeros(N, b, d)  # (N, b, d)
    starts = []
    for P_c, h_c in zip(P.unbind(2), h.unbind(2)):
        starts.append(x)
        x = P_c * x + h_c

    # 3. every chunk again from its true entering state, now reading the output
    h = torch.stack(starts, 2)  # (N, b, nc, d)
    ys = []
    for dA_t, wl_t, B_t, C_t in zip(dAs, wl.unbind(0), Bl.unbind(0), Cl.unbind(0)):
        h = dA_t * h + wl_t * B_t
        ys.append((h * C_t).sum(0))  # (b, nc, d)
    y = torch.stack(ys, -1).permute(0, 2, 1, 3).reshape(b, d, nc * T)[..., :L]  # (b, d, L)
    return y, x.permute(1, 2, 0)  # final state (b, d, N)


# ---------------------------------------------------------------------------------------------------------------
# Input checks: one clear InputError naming the tensor, the expected shape and the one given


def _expect(name, t, shape, where):
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where}: {name} must be a tensor of shape {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{where}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if len(shape) != t.dim() or any(isinstance(s, int) and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join(str(s) for s in shape) + ")"
        raise InputError(f"{where}: {name} must have shape {want}, got {tuple(t.shape)}")


def _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    w = "selective_scan"
    _expect("u", u, ("batch", "d_inner", "L"), w)
    b, d, L = u.shape
    if L < 1:
        raise InputError(f"{w}: u must have length L >= 1, got shape {tuple(u.shape)}")
    _expect("A", A, (d, "N"), w)
    N = A.shape[1]
    _expect("delta", delta, (b, d, L), w)
    _expect("B", B, (b, N, L), w)
    _expect("C", C, (b, N, L), w)
    for name, t, shape in (("D", D, (d,)), ("z", z, (b, d, L)), ("delta_bias", delta_bias, (d,)),
                           ("initial_state", initial_state, (b, d, N))):
        if t is not None:
            _expect(name, t, shape, w)


def _check_step_shapes(u, delta, A, B, C, state, D, z, delta_bias):
    w = "selective_scan_step"
    _expect("u", u, ("batch", "d_inner"), w)
    b, d = u.shape
    _expect("A", A, (d, "N"), w)
    N = A.shape[1]
    for name, t, shape in (("delta", delta, (b, d)), ("B", B, (b, N)), ("C", C, (b, N)), ("state", state, (b, d, N))):
        _expect(name, t, shape, w)
    for name, t, shape in (("D", D, (d,)), ("z", z, (b, d)), ("delta_bias", delta_bias, (d,))):
        if t is not None:
            _expect(name, t, shape, w)
