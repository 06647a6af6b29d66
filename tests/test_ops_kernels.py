"""selective_scan(..., impl="kernel"), the fused numba kernel (ops/kernels.py, the optional `kernels` extra), against
the naive twin: outputs, final state and every input's gradient, in fp32 (the kernel's own vectorized exp and
softplus) and fp64 (libm, so only rounding differs); checkpoint intervals that do and do not divide L; strong
decay; a Mamba model with impl="kernel" against impl="chunked". Without numba these are skipped, and the one test
that needs no numba checks the error that names the extra."""

import importlib.util
import sys

import pytest
import torch
from helpers import assert_states_close, carried_run, tiny
from test_ops_selective_scan import make_inputs, rel_err

from seqlab.errors import InputError
from seqlab.ops import selective_scan, selective_scan_ref

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed (pip install 'seqlab[kernels]'): no impl='kernel'")


def run(x, impl, dtype, softplus=True, checkpoint=None, seed=1):
    """y, final state and every input's gradient for a fixed random cotangent, the inputs cast to `dtype`."""
    x = {k: v.detach().to(dtype).requires_grad_() for k, v in x.items()}
    if impl == "ref":
        y, s = selective_scan_ref(**x, delta_softplus=softplus, return_final_state=True)
    else:
        y, s = selective_scan(**x, delta_softplus=softplus, return_final_state=True, impl=impl,
                              chunk_size=checkpoint)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), list(x.values()))
    return y.detach(), s.detach(), dict(zip(x, grads))


def assert_close_to(got, want, tol):
    (y, s, g), (y0, s0, g0) = got, want
    assert rel_err(y, y0) <= tol, f"output {rel_err(y, y0):.1e}"
    assert rel_err(s, s0) <= tol, f"final state {rel_err(s, s0):.1e}"
    assert set(g) == set(g0)
    for n in g0:
        assert torch.isfinite(g[n]).all(), f"grad {n} not finite"
        assert rel_err(g[n], g0[n]) <= tol, f"grad {n}: {rel_err(g[n], g0[n]):.2e}"


CASES = {  # (b, d, N, L, checkpoint K, optional inputs, softplus, strong decay)
    "L=37, K=8 (not a multiple)": (2, 3, 4, 37, 8, True, True, False),
    "L=1": (1, 2, 3, 1, None, True, True, False),
    "L=16, K=4 (a multiple)": (1, 2, 5, 16, 4, True, True, False),
    "strong decay, K=7": (2, 3, 4, 20, 7, True, True, True),
    "no optional inputs, no softplus": (2, 2, 3, 19, 5, False, False, False),
    "N=17, K=1": (1, 3, 17, 9, 1, True, True, False),  # N not a multiple of the vector width
}


@needs_numba
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_ref(case, dtype):
    """fp32: the kernel's polynomial exp and softplus against the fp64 twin on the same values, to a few fp32 ulps
    (measured <= 3e-7; 1e-5 leaves room). fp64: libm, against the fp64 twin, to rounding."""
    b, d, N, L, K, optional, softplus, strong = CASES[case]
    x = make_inputs(b, d, N, L, seed=L, optional=optional, strong=strong, dtype=dtype)
    if not softplus:  # a step size used as given must be positive
        x["delta"] = x["delta"].abs() + 0.01
    got = run(x, "kernel", dtype, softplus, K)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close_to(got, run(x, "ref", torch.float64, softplus), 1e-5 if dtype == torch.float32 else 1e-12)


@needs_numba
def test_kernel_bf16_inputs_compute_in_fp32():
    """bf16 inputs are cast to fp32 (the state stays fp32) and the output comes back in bf16, as the chunked form."""
    x = make_inputs(2, 3, 4, 11, seed=0)
    xb = {k: v.to(torch.bfloat16) for k, v in x.items()}
    y, s = selective_scan(**xb, delta_softplus=True, return_final_state=True, impl="kernel")
    y0, s0 = selective_scan(**xb, delta_softplus=True, return_final_state=True, impl="chunked")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(s, s0) <= 1e-5 and rel_err(y, y0) <= 1e-2


@needs_numba
def test_kernel_without_final_state_or_grad():
    """return_final_state=False gives None; under no_grad nothing is kept for backward."""
    x = make_inputs(1, 2, 3, 10, seed=3)
    with torch.no_grad():
        y, s = selective_scan(**x, delta_softplus=True, impl="kernel")
    assert s is None and not y.requires_grad
    torch.testing.assert_close(y, selective_scan(**x, delta_softplus=True)[0], atol=1e-5, rtol=1e-5)


@needs_numba
def test_mamba_model_kernel_matches_chunked():
    """A Mamba model with mamba.impl="kernel": the same logits, carried state and parameter gradients as the
    chunked scans (fp32, so the kernel's exp and the chunked sums differ in rounding only)."""
    models = [tiny("mamba", mamba={"chunk_size": 8, "impl": impl}) for impl in ("chunked", "kernel")]
    tokens = torch.randint(0, 37, (2, 21), generator=torch.Generator().manual_seed(5))
    results = [carried_run(model, tokens) for model in models]
    (fast, fast_state, fast_grads), (kern, kern_state, kern_grads) = results
    assert models[1].blocks[0].mixer.cfg.impl == "kernel"
    torch.testing.assert_close(kern, fast, atol=1e-5, rtol=1e-5)
    assert_states_close(kern_state, fast_state, atol=1e-5)
    for n, g in fast_grads.items():
        assert rel_err(kern_grads[n], g) <= 1e-4, n


def test_kernel_without_numba_names_the_extra(monkeypatch):
    """No silent fallback: without numba, impl="kernel" is an InputError that says which extra to install."""
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "seqlab.ops.kernels", raising=False)
    x = make_inputs(1, 2, 3, 4, seed=0)
    with pytest.raises(InputError, match=r"impl='kernel' needs numba.*seqlab\[kernels\]"):
        selective_scan(**x, impl="kernel")
