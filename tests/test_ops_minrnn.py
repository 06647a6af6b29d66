"""minGRU / minLSTM: the log-space chunked scan against its loop twin, and the mixers against the papers'
recurrences written out here in linear space."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.errors import InputError
from seqlab.ops import minrnn_scan, minrnn_scan_ref, minrnn_step


def inputs(B, T, D, decay, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    log_a = -F.softplus(torch.randn(B, T, D, generator=g, dtype=dtype) * decay)  # <= 0
    log_b = torch.randn(B, T, D, generator=g, dtype=dtype)
    h0 = torch.randn(B, D, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (log_a, log_b, h0)]


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 70), D=st.integers(1, 5), chunk=st.sampled_from([1, 4, 16, 64]),
       decay=st.sampled_from([0.1, 1.0, 8.0]), with_h0=st.booleans())
def test_chunked_matches_the_loop_twin_fp64(B, T, D, chunk, decay, with_h0):
    log_a, log_b, h0 = inputs(B, T, D, decay)
    h0_arg = h0 if with_h0 else None
    out = {}
    for name, fn in (("fast", lambda: minrnn_scan(log_a, log_b, h0_arg, True, chunk_size=chunk)),
                     ("ref", lambda: minrnn_scan_ref(log_a, log_b, h0_arg, True))):
        h, last = fn()
        weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=h.dtype)
        grads = torch.autograd.grad((h * weights).sum() + last.sum(), [log_a, log_b, h0], allow_unused=True)
        out[name] = (h, last, grads)
    (h1, s1, g1), (h2, s2, g2) = out["fast"], out["ref"]
    torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert a is None and b is None and not with_h0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_step_is_one_step_of_the_twin_and_extreme_gates_stay_finite():
    log_a, log_b, h0 = (t.detach() for t in inputs(2, 1, 4, 1.0))
    h, s = minrnn_step(log_a[:, 0], log_b[:, 0], h0)
    ref, ref_s = minrnn_scan_ref(log_a, log_b, h0, True)
    torch.testing.assert_close(h, ref[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=0)
    strong = torch.full((1, 300, 3), -80.0)  # decay exp(-80) per step, in fp32: cumulative sums reach -24,000
    h, _ = minrnn_scan(strong, torch.zeros(1, 300, 3), torch.ones(1, 3), chunk_size=64)
    assert torch.isfinite(h).all() and torch.allclose(h, torch.ones_like(h), rtol=1e-3)  # h_t = 1 * e^-80 h + 1


def test_bad_input_is_named():
    with pytest.raises(InputError, match="log_b must have shape"):
        minrnn_scan(torch.zeros(1, 3, 2), torch.zeros(1, 2, 2))
    with pytest.raises(InputError, match="unknown impl 'loop'"):
        minrnn_scan(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), impl="loop")


@pytest.mark.parametrize("mixer", ["mingru", "minlstm"])
def test_mixer_equals_the_papers_recurrence(mixer):
    """The log-space parallel form equals the sequential minGRU / minLSTM of Feng et al. written in linear space."""
    model = tiny(mixer, minrnn={"expand": 1.5, "chunk_size": 4})
    layer = model.blocks[0].mixer
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        y, state = layer(x)
        proj = layer.in_proj(x)
        h = torch.zeros(2, layer.d_hidden)
        hs = []
        for t in range(11):
            if mixer == "mingru":
                cand, k = proj[:, t].chunk(2, -1)
                z = torch.sigmoid(k)
                h = (1 - z) * h + z * torch.where(cand >= 0, cand + 0.5, torch.sigmoid(cand))
            else:
                cand, f, i = proj[:, t].chunk(3, -1)
                f, i = torch.sigmoid(f), torch.sigmoid(i)
                h = f / (f + i) * h + i / (f + i) * torch.where(cand >= 0, cand + 0.5, torch.sigmoid(cand))
            hs.append(h)
        expected = layer.out_proj(torch.stack(hs, 1))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.h, h, atol=1e-5, rtol=1e-5)
