"""gla(..., impl="kernel"), the fused numba recurrence (ops/gla_kernel.py, the optional `kernels` extra), against the
naive twin: outputs, final state and every input's gradient (initial state included), in fp32 (the kernel's
vectorized exp) and fp64 (libm, so only rounding differs); checkpoint intervals that do and do not divide L, L = 1,
strong decay; impl="auto"; a GLA model with gla.impl="kernel" against "chunked". Without numba these are skipped,
and the tests that need no numba check the error that names the extra and that "auto" runs the chunked form."""

import importlib.util
import sys

import pytest
import torch
from helpers import assert_matches, assert_states_close, carried_run, outputs_and_grads, rel_err, tiny
from test_ops_gla import make_inputs

from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.models import implementations
from seqlab.ops import gla, gla_ref

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed (pip install 'seqlab[kernels]'): no impl='kernel'")


@pytest.fixture
def no_numba(monkeypatch):
    """`import numba` fails from here to the end of the test, as if the extra were not installed."""
    monkeypatch.setitem(sys.modules, "numba", None)
    for name in ("seqlab.ops.kernels", "seqlab.ops.gla_kernel"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def run(x, impl, checkpoint=16, scale=None):
    """o, final state and every input's gradient for a fixed random cotangent (the final state's included)."""
    if impl == "ref":
        return outputs_and_grads(lambda **k: gla_ref(**k, return_final_state=True, scale=scale), x)
    return outputs_and_grads(lambda **k: gla(**k, return_final_state=True, impl=impl, chunk_size=checkpoint,
                                             scale=scale), x)


CASES = {  # (B, H, L, dk, dv, checkpoint K, initial state, strong decay, scale)
    "L=37, K=8 (not a multiple)": (2, 2, 37, 4, 3, 8, True, False, None),
    "L=1": (1, 2, 1, 3, 2, 16, True, False, None),
    "L=16, K=4 (a multiple)": (1, 1, 16, 5, 4, 4, True, False, 0.3),
    "strong decay, K=7": (2, 1, 20, 4, 5, 7, True, True, None),
    "no initial state, K=1": (1, 2, 9, 3, 6, 1, False, False, None),
    "K > L": (2, 1, 5, 2, 2, 64, True, False, None),
}


@needs_numba
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_ref(case, dtype):
    """fp32: the kernel against the fp64 twin on the same values, to a few fp32 ulps (measured <= 3e-7; 1e-5 leaves
    room). fp64: libm, against the fp64 twin, to rounding."""
    B, H, L, dk, dv, K, init, strong, scale = CASES[case]
    x = make_inputs(B, H, L, dk, dv, seed=L, init=init, strong=strong, dtype=dtype)
    got = run(x, "kernel", K, scale)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_matches(got, run({k: v.double() for k, v in x.items()}, "ref", scale=scale),
                   1e-5 if dtype == torch.float32 else 1e-12, case)


@needs_numba
def test_kernel_bf16_inputs_compute_in_fp32():
    """bf16 inputs are cast to fp32 (the state stays fp32) and the output comes back in bf16, as the chunked form."""
    x = {k: v.to(torch.bfloat16) for k, v in make_inputs(2, 2, 11, 4, 3, seed=0).items()}
    o, s = gla(**x, return_final_state=True, impl="kernel")
    o0, s0 = gla(**x, return_final_state=True, impl="chunked")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(s, s0) <= 1e-5 and rel_err(o, o0) <= 1e-2


@needs_numba
def test_kernel_without_final_state_or_grad_and_auto(monkeypatch):
    """return_final_state=False gives None; under no_grad nothing is kept for backward; impl="auto" runs the kernel
    for CPU fp32 tensors and the chunked form for fp64 ones."""
    import seqlab.ops.gla_kernel as kernel_module
    calls, kernel = [], kernel_module.gla_kernel
    monkeypatch.setattr(kernel_module, "gla_kernel", lambda *a: calls.append(a[0].dtype) or kernel(*a))
    x = make_inputs(1, 2, 10, 3, 2, seed=3)
    with torch.no_grad():
        o, s = gla(**x, impl="kernel")
    assert s is None and not o.requires_grad
    torch.testing.assert_close(o, gla(**x)[0], atol=1e-5, rtol=1e-5)
    gla(**x, impl="auto")
    gla(**{k: v.double() for k, v in x.items()}, impl="auto")
    assert calls == [torch.float32, torch.float32]


@needs_numba
def test_gla_model_kernel_matches_chunked():
    """A GLA model with gla.impl="kernel": the same logits, carried state and parameter gradients as the chunked
    form, and implementations(model) says so; "auto" resolves to "kernel" on this CPU."""
    models = [tiny("gla", gla={"n_heads": 2, "chunk_size": 8, "impl": impl}) for impl in ("chunked", "kernel")]
    tokens = torch.randint(0, 37, (2, 21), generator=torch.Generator().manual_seed(5))
    (fast, fast_state, fast_grads), (kern, kern_state, kern_grads) = (carried_run(m, tokens) for m in models)
    assert implementations(models[1])["gla"] == "kernel"
    assert implementations(tiny("gla"))["gla"] == "kernel"  # the default, "auto"
    assert implementations(tiny("gla").double())["gla"] == "chunked"
    torch.testing.assert_close(kern, fast, atol=1e-5, rtol=1e-5)
    assert_states_close(kern_state, fast_state, atol=1e-5)
    for n, g in fast_grads.items():
        assert rel_err(kern_grads[n], g) <= 1e-4, n


def test_kernel_without_numba_names_the_extra(no_numba):
    """No silent fallback: without numba, impl="kernel" is an InputError that says which extra to install; "auto"
    runs the chunked form, and implementations(model) says so."""
    x = make_inputs(1, 2, 4, 3, 2, seed=0)
    with pytest.raises(InputError, match=r"gla: impl='kernel' needs numba.*seqlab\[kernels\]"):
        gla(**x, impl="kernel")
    torch.testing.assert_close(gla(**x, impl="auto")[0], gla(**x, impl="chunked")[0])
    model = tiny("gla", gla={"impl": "auto"})
    assert implementations(model) == {"gla": "chunked", "numba": "not installed"}


@needs_numba
@pytest.mark.parametrize("L, cut", [(23, 9), (5, 1), (40, 39)])
def test_split_sequence_with_carried_state_equals_one_call(L, cut):
    """The kernel's final state carried into a second call gives the one-call outputs and state."""
    x = make_inputs(2, 2, L, 4, 3, seed=8)
    full_o, full_s = gla(**x, return_final_state=True, impl="kernel", chunk_size=8)
    first = {k: v[:, :, :cut] if k != "initial_state" else v for k, v in x.items()}
    second = {k: v[:, :, cut:] for k, v in x.items() if k != "initial_state"}
    o1, s1 = gla(**first, return_final_state=True, impl="kernel", chunk_size=8)
    o2, s2 = gla(**second, initial_state=s1, return_final_state=True, impl="kernel", chunk_size=8)
    assert rel_err(torch.cat([o1, o2], 2), full_o) <= 1e-5
    assert rel_err(s2, full_s) <= 1e-5


def test_gla_impl_default_is_auto_and_checked():
    """gla.impl defaults to "auto" and the config keeps it (not what it resolves to); an unknown one names the
    choices."""
    cfg = ModelConfig.from_dict({"mixer": "gla", "vocab_size": 37, "d_model": 32, "n_layers": 1})
    assert cfg.gla.impl == "auto" and ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match=r"'gla.impl' = 'fast': expected one of auto, chunked, ref, kernel"):
        ModelConfig.from_dict({**cfg.to_dict(), "gla": {"impl": "fast"}})
