"""Input checks shared by the ops and their naive twins: one clear InputError naming the function, the tensor, the
expected shape and the one given. Checks only: no math lives here (the twins must not share any with the fast ops).
"""

from __future__ import annotations

import math

import torch

from seqlab.errors import InputError


def expect(where: str, name: str, t: object, shape: tuple) -> None:
    """`t` must be a floating-point tensor of `shape`; an int in `shape` must match, a string names a free size."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where}: {name} must be a tensor of shape {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{where}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if len(shape) != t.dim() or any(isinstance(s, int) and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join(str(s) for s in shape) + ")"
        raise InputError(f"{where}: {name} must have shape {want}, got {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# selective scan


def check_selective_scan(where, u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The scan's inputs: u, delta, z (batch, d_inner, L >= 1), A (d_inner, N), B, C (batch, N, L), D and
    delta_bias (d_inner,), initial_state (batch, d_inner, N); the optional ones may be None."""
    expect(where, "u", u, ("batch", "d_inner", "L"))
    b, d, L = u.shape
    if L < 1:
        raise InputError(f"{where}: u must have length L >= 1, got shape {tuple(u.shape)}")
    expect(where, "A", A, (d, "N"))
    N = A.shape[1]
    expect(where, "delta", delta, (b, d, L))
    expect(where, "B", B, (b, N, L))
    expect(where, "C", C, (b, N, L))
    for name, t, shape in (("D", D, (d,)), ("z", z, (b, d, L)), ("delta_bias", delta_bias, (d,)),
                           ("initial_state", initial_state, (b, d, N))):
        if t is not None:
            expect(where, name, t, shape)


def _step_shapes_ok(u, delta, A, B, C, state, D, z, delta_bias) -> bool:
    """True when every check of `check_selective_scan_step` passes: the same conditions as plain comparisons (no
    string building, no generator per tensor), run on every decoding step; a False leads to the checks that
    explain it."""
    T = torch.Tensor
    if not (isinstance(u, T) and isinstance(A, T) and u.dim() == 2 and A.dim() == 2):
        return False
    b, d = u.shape
    N = A.shape[1]
    bd, bN = (b, d), (b, N)
    if not (A.shape[0] == d and isinstance(delta, T) and delta.shape == bd and isinstance(B, T) and B.shape == bN
            and isinstance(C, T) and C.shape == bN and isinstance(state, T) and state.shape == (b, d, N)):
        return False
    if not (D is None or (isinstance(D, T) and D.shape == (d,))) or not (z is None or (isinstance(z, T) and
                                                                                         z.shape == bd)):
        return False
    if not (delta_bias is None or (isinstance(delta_bias, T) and delta_bias.shape == (d,))):
        return False
    return all(t is None or t.is_floating_point() for t in (u, delta, A, B, C, state, D, z, delta_bias))


def check_selective_scan_step(where, u, delta, A, B, C, state, D, z, delta_bias):
    """One step's inputs: u, delta, z (batch, d_inner), A (d_inner, N), B, C (batch, N), state (batch, d_inner, N),
    D and delta_bias (d_inner,)."""
    if _step_shapes_ok(u, delta, A, B, C, state, D, z, delta_bias):
        return
    expect(where, "u", u, ("batch", "d_inner"))
    b, d = u.shape
    expect(where, "A", A, (d, "N"))
    N = A.shape[1]
    for name, t, shape in (("delta", delta, (b, d)), ("B", B, (b, N)), ("C", C, (b, N)), ("state", state, (b, d, N))):
        expect(where, name, t, shape)
    for name, t, shape in (("D", D, (d,)), ("z", z, (b, d)), ("delta_bias", delta_bias, (d,))):
        if t is not None:
            expect(where, name, t, shape)


# ---------------------------------------------------------------------------------------------------------------
# gated linear attention


def check_gla(where, q, k, v, g, state, lead):
    """q, k, g (*lead, dk), v (*lead, dv), state (B, H, dk, dv). lead names the leading dims: ("B", "H", "L") for
    the scan (where state is the initial state and may be None), ("B", "H") for one step."""
    expect(where, "q", q, (*lead, "dk"))
    if len(lead) == 3 and q.shape[2] < 1:
        raise InputError(f"{where}: q must have length L >= 1, got shape {tuple(q.shape)}")
    dims, dk = tuple(q.shape[:-1]), q.shape[-1]
    expect(where, "k", k, (*dims, dk))
    expect(where, "g", g, (*dims, dk))
    expect(where, "v", v, (*dims, "dv"))
    if state is not None or len(lead) == 2:
        expect(where, "initial_state" if len(lead) == 3 else "state", state, (*dims[:2], dk, v.shape[-1]))


def check_scale(where, scale):
    """A query scale is None (dk ** -0.5) or a finite number."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise InputError(f"{where}: scale must be a finite number or None, got {scale!r}")


def check_minrnn(where, log_a, log_b, initial_state):
    """log_a, log_b (B, T, D) with T >= 1; initial_state (B, D) or None."""
    expect(where, "log_a", log_a, ("B", "T", "D"))
    B, T, D = log_a.shape
    if T < 1:
        raise InputError(f"{where}: the sequence is empty (log_a has shape {tuple(log_a.shape)}); expected T >= 1")
    expect(where, "log_b", log_b, (B, T, D))
    if initial_state is not None:
        expect(where, "initial_state", initial_state, (B, D))


# ---------------------------------------------------------------------------------------------------------------
# delta rule


def check_delta_rule(where, q, k, v, beta, g, state, lead):
    """q, k (*lead, dk), v (*lead, dv), beta and g (*lead) (g may be None), state (B, H, dk, dv). lead names the
    leading dims: ("B", "H", "L") for the scan (where state is the initial state and may be None), ("B", "H") for
    one step."""
    expect(where, "q", q, (*lead, "dk"))
    if len(lead) == 3 and q.shape[2] < 1:
        raise InputError(f"{where}: q must have length L >= 1, got shape {tuple(q.shape)}")
    dims, dk = tuple(q.shape[:-1]), q.shape[-1]
    expect(where, "k", k, (*dims, dk))
    expect(where, "v", v, (*dims, "dv"))
    expect(where, "beta", beta, dims)
    if g is not None:
        expect(where, "g", g, dims)
    if state is not None or len(lead) == 2:
        expect(where, "initial_state" if len(lead) == 3 else "state", state, (*dims[:2], dk, v.shape[-1]))


# ---------------------------------------------------------------------------------------------------------------
# state-space duality (Mamba-2)


def _check_ssd_groups(where, H, G):
    if H % G:
        raise InputError(f"{where}: B and C have {G} groups, which must divide the {H} heads of x")


def check_ssd(where, x, dt, A, B, C, D, dt_bias, initial_state):
    """The scan's inputs: x (batch, L >= 1, H, P), dt (batch, L, H), A, D, dt_bias (H,), B, C (batch, L, G, N)
    with G dividing H, initial_state (batch, H, P, N); D, dt_bias and initial_state may be None."""
    expect(where, "x", x, ("batch", "L", "H", "P"))
    b, L, H, P = x.shape
    if L < 1:
        raise InputError(f"{where}: x must have length L >= 1, got shape {tuple(x.shape)}")
    expect(where, "dt", dt, (b, L, H))
    expect(where, "A", A, (H,))
    expect(where, "B", B, (b, L, "G", "N"))
    G, N = B.shape[2], B.shape[3]
    expect(where, "C", C, (b, L, G, N))
    _check_ssd_groups(where, H, G)
    for name, t, shape in (("D", D, (H,)), ("dt_bias", dt_bias, (H,)), ("initial_state", initial_state, (b, H, P, N))):
        if t is not None:
            expect(where, name, t, shape)


def check_ssd_step(where, x, dt, A, B, C, state, D, dt_bias):
    """One step's inputs: x (batch, H, P), dt (batch, H), A, D, dt_bias (H,), B, C (batch, G, N) with G dividing H,
    state (batch, H, P, N); D and dt_bias may be None."""
    expect(where, "x", x, ("batch", "H", "P"))
    b, H, P = x.shape
    expect(where, "dt", dt, (b, H))
    expect(where, "A", A, (H,))
    expect(where, "B", B, (b, "G", "N"))
    G, N = B.shape[1], B.shape[2]
    expect(where, "C", C, (b, G, N))
    _check_ssd_groups(where, H, G)
    expect(where, "state", state, (b, H, P, N))
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            expect(where, name, t, (H,))
