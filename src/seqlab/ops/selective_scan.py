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

Entry points:
    selective_scan(..., impl="chunked")  parallel over chunks; for training and prefill
    selective_scan(..., impl="ref")      runs `selective_scan_ref` (ops/naive.py): the plain loop over time, written
                                         apart from this file (no shared helper), the twin the tests compare against
    selective_scan(..., impl="kernel")   the fused numba kernel (ops/kernels.py, the optional `kernels` extra):
                                         one pass forward, states recomputed in backward from checkpoints
    selective_scan(..., impl="auto")     "kernel" where `resolve_impl` says so (the extra installed, CPU, fp32
                                         compute), else "chunked"; what `mamba.impl` defaults to
    selective_scan_step(...)             one step from a state; O(1) decoding
    selective_scan_update(...)           the same step without checks or casts (what decoding calls)

Return convention: the scans ALWAYS return a tuple `(y, final_state_or_None)`, so the return type never depends on
`return_final_state`.

Limits, honestly:
- The chunked form is eager PyTorch (impl="kernel" is the fused one, with the optional numba extra). Mamba-1's
  decay differs per (channel, state) pair, so the work is O(batch * d_inner * L * N) elementwise in every algorithm
  (the CUDA kernel keeps that in registers; here it goes through cache and memory). The chunked form wins by
  removing the per-step Python/autograd overhead and by a hand-written backward that works in place, not by doing
  less arithmetic; on CPU expect several times, not orders of magnitude, over the loop, less as batch * d_inner
  grows (benchmarks/bench_scans.py measures it).
- Memory for forward+backward (chunked): one (batch, d_inner, L, N) fp32 tensor of states is kept for backward
  (1 GiB for batch 4, d_inner 512, N 16, L 8192), plus the (batch, d_inner, L) inputs. The kernel keeps every 64th.
- The chunked form's and the kernel's backward are first-order only; the naive twin supports any order.
- A must be negative (Mamba parametrizes A = -exp(A_log)). With A > 0 the recurrence itself grows without bound,
  and overflow is then a property of the input, not of the algorithm. Values are not checked (that would force a
  device sync).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from seqlab.errors import InputError
from seqlab.ops.checks import check_selective_scan, check_selective_scan_step
from seqlab.ops.naive import selective_scan_ref

IMPLS = ("auto", "ref", "chunked", "kernel")
SLAB = 2**17  # values in one step of all chunks (512 KiB in fp32) above which chunk_size=None takes longer chunks


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   return_final_state=False, impl="chunked", chunk_size=None):
    """Run the selective scan over a whole sequence.

    Args:
        u, delta: (batch, d_inner, L), any L >= 1. z: (batch, d_inner, L) or None.
        A: (d_inner, N), negative. B, C: (batch, N, L). D, delta_bias: (d_inner,) or None.
        delta_softplus: apply softplus to delta (after adding delta_bias).
        initial_state: (batch, d_inner, N) or None (zeros); differentiable.
        return_final_state: also return the state after the last step (differentiable).
        impl: "chunked" (parallel over chunks), "ref" (the naive twin `selective_scan_ref`, a loop), "kernel"
            (fused, compiled by numba: needs the `kernels` extra, InputError without it; CPU tensors only) or
            "auto" (`resolve_impl`: "kernel" for CPU tensors computed in fp32 when the extra imports, else
            "chunked").
        chunk_size: steps per chunk for impl="chunked" (ignored by "ref"). None picks it: 64, doubled while one
            step of all chunks (batch * chunks * d_inner * N values) exceeds SLAB, so the sequential passes work on
            cache-sized tensors whatever the length (measured fastest on CPU by benchmarks/bench_scans.py).
            For impl="kernel": the steps between the states kept for backward (None: 64).

    Returns:
        (y, final_state): y (batch, d_inner, L) in u's dtype; final_state (batch, d_inner, N) in fp32 (fp64 for
        fp64 inputs) when return_final_state, else None. Always a tuple.
    """
    if impl not in IMPLS:
        raise InputError(f"selective_scan: unknown impl {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    impl = resolve_impl(impl, u.device, u.dtype)
    if impl == "ref":  # the naive twin, which checks its own inputs
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  initial_state=initial_state, return_final_state=return_final_state)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"selective_scan: chunk_size must be a positive int or None, got {chunk_size!r}")
    check_selective_scan("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)
    cdt = _compute_dtype(u)
    if impl == "kernel":  # fuses the discretization, skip and gate too: every input goes in as given, in cdt
        u_c, delta_c, A_c, B_c, C_c, D_c, z_c, bias_c, x0 = (None if t is None else _to(t, cdt) for t in
                                                             (u, delta, A, B, C, D, z, delta_bias, initial_state))
        y, x = _kernel()(u_c, delta_c, A_c, B_c, C_c, D_c, z_c, bias_c, delta_softplus, x0, chunk_size)
        return y.to(u.dtype), (x if return_final_state else None)
    delta = _discretize_delta(delta.to(cdt), delta_bias, delta_softplus)
    u_c, A, B, C = u.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt)
    x0 = None if initial_state is None else initial_state.to(cdt)
    y, x = _scan_chunked(u_c, delta, A, B, C, x0, chunk_size)
    y = _skip_and_gate(y, u_c, D, z)
    return y.to(u.dtype), (x if return_final_state else None)


def selective_scan_step(u, delta, A, B, C, state, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One recurrent step from `state`, for O(1) decoding. Same math as the scan with L = 1.

    Args:
        u, delta: (batch, d_inner); z: (batch, d_inner) or None. A: (d_inner, N). B, C: (batch, N).
        state: (batch, d_inner, N), fp32 (another float dtype is cast). D, delta_bias: (d_inner,) or None.

    Returns:
        (y, new_state): y (batch, d_inner) in u's dtype, new_state (batch, d_inner, N) in fp32.
    """
    check_selective_scan_step("selective_scan_step", u, delta, A, B, C, state, D, z, delta_bias)
    cdt = _compute_dtype(u)
    delta = _discretize_delta(_to(delta, cdt), delta_bias, delta_softplus)
    u_c = _to(u, cdt)
    y, x = selective_scan_update(_to(state, cdt), u_c, delta, _to(A, cdt), _to(B, cdt), _to(C, cdt),
                                 None if D is None else _to(D, cdt), None if z is None else _to(z, cdt))
    return _to(y, u.dtype), x


def selective_scan_update(state, u, delta, A, B, C, D=None, z=None):
    """The lean one-token update the decode steps call: no input checks, no dtype casts, delta already
    discretized (softplus and bias applied). state (b, d, N) and every input in the compute dtype (fp32 or fp64);
    u, delta, z (b, d), A (d, N), B, C (b, N), D (d,) -> (y (b, d), new state (b, d, N)).
    `selective_scan_step` is this with checks, casts and the discretization."""
    x = torch.addcmul((delta * u).unsqueeze(-1) * B.unsqueeze(1), torch.exp(delta.unsqueeze(-1) * A), state)
    y = (x @ C.unsqueeze(-1)).squeeze(-1)  # <x, C>: a batched matrix-vector product, (b, d)
    if D is not None:
        y = y + D * u
    return (y * F.silu(z) if z is not None else y), x


def resolve_impl(impl: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The implementation `selective_scan(impl=impl)`, `gla(impl=impl)` and `delta_rule(impl=impl)` (the same rule)
    run on tensors on `device` of `dtype`: `impl` itself, except "auto", which is "kernel" when all three hold, else
    "chunked":
      - the `kernels` extra imports (numba; `numba_version()` is not None),
      - the device is the CPU (the kernel is CPU code; on a GPU the chunked form runs),
      - the compute dtype is fp32 (fp32, bf16 and fp16 inputs). fp64 inputs compute in fp64, where the kernel
        calls libm's scalar exp instead of its vectorized fp32 one; that specialization exists for the tests'
        rounding-level checks, and "auto" leaves fp64 to the chunked form rather than compile it too.
    Where the rule picks the kernel it was measured faster at every size measured, the test suite's and the quick
    lab's small ones included: (batch, d_inner) from (1, 32) to (16, 64) and (4, 128), L 1 to 512, N 16, one
    thread: 1.3x to 6.6x the chunked form's speed forward + backward and 1.1x to 7.7x forward alone, in CPU time
    (benchmarks/bench_kernels.py --small; benchmarks/results/kernels_small.json). GLA's kernel likewise: 1.5x to
    7.4x forward + backward and 1.6x to 7.0x forward alone at (batch, heads, dk, dv) from (2, 2, 8, 16) to
    (16, 4, 8, 16) and (4, 4, 16, 32), L 1 to 512 (1.8x to 10.6x and 1.5x to 9.3x at a GLA model's chunk_size 64),
    and 3.5x to 4.9x forward + backward at training shapes (bench_kernels.py --gla [--small] [--chunk-size 64];
    benchmarks/results/kernels_gla*.json). The delta rule's: 1.5x to 4.3x forward + backward at the small sizes
    (gated and plain; batch 2 to 16, 2 to 4 heads, dk 6 to 16, dv 12 to 32, L 1 to 512) and 1.2x to 2.4x at
    training shapes (bench_kernels.py --delta-rule [--plain] [--small]; benchmarks/results/kernels_delta_rule*.json).
    Its cost is numba's: ~0.2 s to import, and on a process's first call ~0.6 s to load the cached machine code, or
    10-20 s to compile it once where no cache exists yet (a fresh install; the same fp32 code that
    tests/test_ops_kernels.py compiles; GLA's and the delta rule's kernels a few seconds more each, on their first
    call).
    Nothing falls back silently: "kernel" without the extra stays an InputError."""
    if impl != "auto":
        return impl
    fp32 = torch.promote_types(dtype, torch.float32) == torch.float32
    return "kernel" if torch.device(device).type == "cpu" and fp32 and numba_version() is not None else "chunked"


def numba_version() -> str | None:
    """numba's version when the `kernels` extra imports (ops/kernels.py with it), else None. Result files record
    it beside the implementations that ran (`seqlab.models.implementations`)."""
    try:
        import seqlab.ops.kernels  # noqa: F401  optional dependency: numba, the `kernels` extra
    except ModuleNotFoundError as e:
        if e.name not in ("numba", "llvmlite"):
            raise
        return None
    import numba
    return numba.__version__


def load_kernel(op: str, module: str, name: str):
    """The kernel `name` from the seqlab.ops module `module` (one that imports numba), or an InputError naming the
    extra when numba is missing: what impl="kernel" of the op `op` calls."""
    try:
        return getattr(importlib.import_module(f"seqlab.ops.{module}"), name)  # optional dependency: numba
    except ModuleNotFoundError as e:
        if e.name not in ("numba", "llvmlite"):
            raise
        raise InputError(f"{op}: impl='kernel' needs numba, the optional `kernels` extra: "
                         "pip install 'seqlab[kernels]' (or use impl='chunked')") from e


def _kernel():
    """`selective_scan_kernel` from ops/kernels.py, or an InputError naming the extra when numba is missing."""
    return load_kernel("selective_scan", "kernels", "selective_scan_kernel")


# ---------------------------------------------------------------------------------------------------------------
# Math shared by the chunked scan, the step and the update (not by the naive twin: it writes its own)


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`; t itself when it already is (as `t.to(dtype)`, without the op call: one step makes ~10)."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 inputs; fp64 stays fp64 (so tests can compare in double precision)."""
    return torch.promote_types(u.dtype, torch.float32)


def _discretize_delta(delta, delta_bias, delta_softplus):
    """delta (b, d, L) or (b, d) -> softplus(delta + delta_bias) (each part optional)."""
    if delta_bias is not None:
        bias = _to(delta_bias, delta.dtype)
        delta = delta + (bias.unsqueeze(-1) if delta.dim() == 3 else bias)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z):
    """y, u, z (b, d, L) or (b, d); D (d,): y + D u, then times silu(z) (each part optional)."""
    if D is not None:
        Dc = _to(D, y.dtype)
        y = y + (Dc.unsqueeze(-1) if y.dim() == 3 else Dc) * u
    if z is not None:
        y = y * F.silu(_to(z, y.dtype))
    return y


def _scan_chunked(u, delta, A, B, C, x0, chunk_size):
    """Parallel over chunks: `_ChunkedScan` on the discretized inputs (delta_l u_l is formed here, under autograd)."""
    inputs = (delta, delta * u, A, B, C, x0)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    b, d, L = u.shape
    if chunk_size is None:
        chunk_size = 64
        while chunk_size < L and b * -(-L // chunk_size) * d * A.shape[1] > SLAB:
            chunk_size *= 2
    return _ChunkedScan.apply(*inputs, min(chunk_size, L), keep)


def _chunks(t, T, pad):
    """(b, K, L) -> (T, b, nc, K): step-in-chunk first, so that one step of every chunk is one contiguous slab.
    Padded steps are zeros (for delta: decay exp(0) = 1 and no input, so they carry the state unchanged)."""
    b, K, L = t.shape
    if pad:
        t = F.pad(t, (0, pad))
    return t.view(b, K, -1, T).permute(3, 0, 2, 1).contiguous()


def _unchunk(t, L):
    """(T, b, nc, K) -> (b, K, L), the inverse of `_chunks` (padding dropped)."""
    T, b, nc, K = t.shape
    return t.permute(1, 3, 2, 0).reshape(b, K, nc * T)[..., :L]


class _ChunkedScan(torch.autograd.Function):
    """x_l = exp(delta_l A) * x_{l-1} + w_l B_l,  y_l = <x_l, C_l>, chunk-parallel, with a hand-written backward.

    Forward, for a sequence cut into nc chunks of T steps. A "slab" is one step of every chunk at once,
    (b, nc, N, d): channels last, so every elementwise op runs over contiguous d, and small enough to stay in cache.
      1. T steps over slabs: each chunk's end state from a zero start;
      2. nc steps over chunks: the true state entering each chunk, X_c = P_c * X_{c-1} + (end state of chunk c),
         where the chunk decay P_c = exp(A * (sum of delta over the chunk)) is a cumulative log-decay, <= 0;
      3. T steps over slabs again, from the true entering states: the states (kept for backward) and y = C @ x.
    Sequential depth 2T + nc instead of L. Every exponent is delta * A or (sum of delta) * A, both <= 0 for A < 0
    and delta >= 0: nothing overflows, and no exp(-cumsum) is ever formed.

    Backward: the adjoint state lam_l = dLoss/dx_l obeys the same recurrence reversed,
        lam_l = C_l gy_l + exp(delta_{l+1} A) * lam_{l+1}      (the last step also gets the final state's gradient),
    run with the same three stages. Then, with G_l = lam_l * x_{l-1} * exp(delta_l A):
        gC_l = sum_d gy_l x_l,   gB_l = sum_d lam_l w_l,   gw_l = sum_n lam_l B_l,
        gdelta_l = sum_n G_l A,   gA = sum_(b, l) G_l delta_l,   gx0 = exp(delta_0 A) * lam_0.
    Why by hand and not autograd: autograd records ~10 ops per step and stores a fresh (b, d, L, N) tensor for most
    of them. Here forward keeps one list of state slabs ((b, d, L, N) in all), the decays exp(delta_t A) are
    recomputed slab by slab when needed (as fast as storing and reading them back, measured, at half the memory),
    and every other op writes in place or into a reused slab-sized buffer: on CPU, memory traffic and the page
    faults of large fresh temporaries are where the time goes.
    Why not the quadratic "attention" form inside a chunk: the decay differs per (channel, state) pair, so that
    form materializes (b, d, T, T, N), T times the work of the recurrence.
    """

    @staticmethod
    def forward(ctx, delta, w, A, B, C, x0, T, keep):  # keep: store the states for backward (False: inference)
        b, d, L = delta.shape
        N = A.shape[1]
        nc = -(-L // T)
        pad = nc * T - L
        dl = _chunks(delta, T, pad).unsqueeze(3)  # (T, b, nc, 1, d)
        wl = _chunks(w, T, pad).unsqueeze(3)  # (T, b, nc, 1, d)
        Bl = _chunks(B, T, pad).unsqueeze(4)  # (T, b, nc, N, 1)
        Cl = _chunks(C, T, pad).unsqueeze(3)  # (T, b, nc, 1, N)
        At = A.t().contiguous()  # (N, d)

        # 1. end state of every chunk from a zero start
        h, e = delta.new_zeros(b, nc, N, d), delta.new_empty(b, nc, N, d)  # e: one step's decays, in (0, 1]
        for t in range(T):
            h.mul_(torch.mul(dl[t], At, out=e).exp_()).addcmul_(wl[t], Bl[t])

        # 2. across chunks: X_c = P_c * X_{c-1} + h_c
        P = torch.mul(dl.sum(0), At).exp_()  # (b, nc, N, d)
        start = torch.empty_like(h)  # the state entering each chunk
        x = x0.transpose(1, 2) if x0 is not None else delta.new_zeros(b, N, d)  # (b, N, d)
        for c in range(nc):
            start[:, c] = x
            x = P[:, c] * x + h[:, c]

        # 3. every chunk again from its true entering state: states[t + 1] is the state after step t
        states, y = [start], delta.new_empty(T, b, nc, 1, d)
        for t in range(T):
            torch.mul(dl[t], At, out=e).exp_()
            x_t = torch.mul(e, states[t]) if keep else start.mul_(e)  # without keep: one state slab, in place
            torch.matmul(Cl[t], x_t.addcmul_(wl[t], Bl[t]), out=y[t])  # (b, nc, 1, d): sum over n of C x
            if keep:
                states.append(x_t)

        if keep:
            ctx.save_for_backward(dl, wl, Bl, Cl, At, P, *states)
        ctx.L, ctx.has_x0 = L, x0 is not None
        return _unchunk(y.squeeze(3), L), x.transpose(1, 2)  # (b, d, L), final state (b, d, N)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gx):
        dl, wl, Bl, Cl, At, P, *states = ctx.saved_tensors
        L, T = ctx.L, dl.shape[0]
        b, nc, N, d = P.shape
        gyl = _chunks(gy, T, nc * T - L).unsqueeze(3)  # (T, b, nc, 1, d); zero on padded steps
        Ct, Bt = Cl.transpose(-1, -2), Bl.transpose(-1, -2)  # (T, b, nc, N, 1), (T, b, nc, 1, N)
        e, tmp = torch.empty_like(P), torch.empty_like(P)

        def decay(t):  # exp(delta_t A) for step t of every chunk, into e
            return torch.mul(dl[t], At, out=e).exp_()

        # 1. reversed, every chunk from a zero end: the adjoint at each chunk's first step
        m = torch.zeros_like(P)
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                m.mul_(decay(t + 1))
            m.addcmul_(Ct[t], gyl[t])

        # 2. across chunks, reversed: R_c (what flows into chunk c's last step from the right)
        #    R_{c-1} = exp(delta_first(c) A) * m_c + P_c * R_c, starting from the final state's gradient
        m.mul_(decay(0))
        lam = torch.empty_like(P)
        R = gx.transpose(1, 2).to(P.dtype) if gx is not None else P.new_zeros(b, N, d)  # (b, N, d)
        for c in range(nc - 1, -1, -1):
            lam[:, c] = R
            R = P[:, c] * R + m[:, c]
        gx0 = R.transpose(1, 2) if ctx.has_x0 else None  # dLoss/dx0 = exp(delta_0 A) * lam_0

        # 3. every chunk again, reversed, from its true R: lam_t, and the gradients of step t
        gC, gB = P.new_empty(T, b, nc, N), P.new_empty(T, b, nc, N)
        gw, gdelta = P.new_empty(T, b, nc, 1, d), P.new_empty(T, b, nc, d)
        gA = torch.zeros_like(P)  # sum over steps of G delta, then over (b, nc)
        lam.addcmul_(Ct[T - 1], gyl[T - 1])
        for t in range(T - 1, -1, -1):
            torch.sum(torch.mul(states[t + 1], gyl[t], out=tmp), -1, out=gC[t])  # sum over d of gy x
            torch.sum(torch.mul(lam, wl[t], out=tmp), -1, out=gB[t])  # sum over d of lam w
            torch.matmul(Bt[t], lam, out=gw[t])  # sum over n of lam B
            G = torch.mul(lam, states[t], out=tmp).mul_(decay(t))  # dLoss/d(delta_t A)
            if t > 0:  # lam_{t-1}
                lam.mul_(e).addcmul_(Ct[t - 1], gyl[t - 1])
            gA.addcmul_(G, dl[t])
            torch.sum(G.mul_(At), 2, out=gdelta[t])
        gw = gw.squeeze(3)
        gA = gA.sum((0, 1)).t()  # (d, N)
        return _unchunk(gdelta, L), _unchunk(gw, L), gA, _unchunk(gB, L), _unchunk(gC, L), gx0, None, None
