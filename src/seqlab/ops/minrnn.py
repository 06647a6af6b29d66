"""The minimal RNNs' scan (Feng et al. 2024, "Were RNNs All We Needed?"): h_t = a_t h_{t-1} + b_t, elementwise,
with a_t in (0, 1] and b_t > 0 given in log space, computed in parallel over time.

Glossary (code name -- meaning)
    log_a      log a_t <= 0, the decay: log(1 - z_t) for minGRU, log f'_t for minLSTM   (B, T, D)
    log_b      log b_t, the input: log(z_t g(h~_t)) for minGRU, log(i'_t g(h~_t)) for minLSTM   (B, T, D)
    h, state   h_t, (B, D); kept in fp32 (fp64 for fp64 inputs)
    a*_t       sum_{s <= t} log a_s, the cumulative log decay inside a chunk

Because the gates depend on x_t only (not on h_{t-1}), the recurrence is a linear scan, and in log space it is a
cumulative sum and a log-cumulative-sum-exp (Heinsen 2023):
    h_t = exp(a*_t) h_0 + exp(a*_t + logcumsumexp_{s <= t}(log b_s - a*_s))
The h_0 term is added in linear space, so an initial state of any sign (or zero) is exact and never goes through a
log. Three entry points:
    minrnn_scan(..., impl="chunked")   the log-space form, chunk by chunk (a state carried between chunks)
    minrnn_scan_ref(...)               the plain loop over time (ops/naive.py), the twin the tests compare against
    minrnn_step / minrnn_update        one step from a state: h = a h + b (checks + casts / none)

Limits, honestly: inside a chunk a*_t and logcumsumexp(.) can both be large (|a*_t| grows with the chunk length and
the decay), and their sum cancels: fp32 keeps about 7 digits of |a*_t|, so with chunk_size 64 and a decay of
exp(-5) per step (|a*| ~ 320) h carries relative errors near 3e-5. Chunks bound that; the loop has no such error.
"""

from __future__ import annotations

import torch

from seqlab.errors import InputError
from seqlab.ops.checks import check_minrnn
from seqlab.ops.naive import minrnn_scan_ref

IMPLS = ("ref", "chunked")


def minrnn_scan(log_a, log_b, initial_state=None, return_final_state=False, impl="chunked", chunk_size=64):
    """h_t = a_t h_{t-1} + b_t over a whole sequence, from log_a (<= 0) and log_b, each (B, T, D).

    Args:
        initial_state: h_0 (B, D) or None (zeros); differentiable.
        impl: "chunked" (log-space, parallel inside chunks of `chunk_size` steps) or "ref" (the loop twin).

    Returns:
        (h, final_state): h (B, T, D) in log_b's dtype; final_state (B, D) in fp32 (fp64 for fp64 inputs) when
        return_final_state, else None. Always a tuple.
    """
    if impl not in IMPLS:
        raise InputError(f"minrnn_scan: unknown impl {impl!r}; expected one of {', '.join(map(repr, IMPLS))}")
    if impl == "ref":
        return minrnn_scan_ref(log_a, log_b, initial_state=initial_state, return_final_state=return_final_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"minrnn_scan: chunk_size must be a positive int, got {chunk_size!r}")
    check_minrnn("minrnn_scan", log_a, log_b, initial_state)
    cdt = torch.promote_types(log_b.dtype, torch.float32)
    log_a, log_b = log_a.to(cdt), log_b.to(cdt)
    h = None if initial_state is None else initial_state.to(cdt)
    out = []
    for s in range(0, log_a.shape[1], chunk_size):
        a_star = log_a[:, s:s + chunk_size].cumsum(1)  # (B, c, D), <= 0
        hc = torch.exp(a_star + torch.logcumsumexp(log_b[:, s:s + chunk_size] - a_star, dim=1))  # from h = 0
        if h is not None:
            hc = hc + torch.exp(a_star) * h.unsqueeze(1)  # the carried state, decayed, in linear space
        out.append(hc)
        h = hc[:, -1]
    # the final state is copied out of the last chunk, which a view of it would keep alive
    return torch.cat(out, 1).to(log_b.dtype), (h.clone() if return_final_state else None)


def minrnn_step(log_a, log_b, state):
    """One step from `state`: log_a, log_b (B, D), state (B, D) fp32 -> (h in log_b's dtype, new state fp32)."""
    check_minrnn("minrnn_step", log_a.unsqueeze(1), log_b.unsqueeze(1), state)
    cdt = torch.promote_types(log_b.dtype, torch.float32)
    h = minrnn_update(state.to(cdt), torch.exp(log_a.to(cdt)), torch.exp(log_b.to(cdt)))
    return h.to(log_b.dtype), h


def minrnn_update(state, a, b):
    """The lean step the mixers call, in linear space: h = a * state + b (no checks, no casts)."""
    return torch.addcmul(b, a, state)
