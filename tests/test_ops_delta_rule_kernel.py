"""delta_rule(..., impl="kernel"), the fused numba recurrence (ops/delta_rule_kernel.py, the optional `kernels`
extra), against the naive twin: outputs, final state and every input's gradient (beta, g and the initial state
included), gated and plain, in fp32 (the kernel's vectorized exp) and fp64 (libm, so only rounding differs);
checkpoint intervals that do and do not divide L, L = 1, strong and tiny decays, low and high beta; impl="auto".
Without numba these are skipped, and the test that needs no numba checks the error that names the extra and that
"auto" runs the chunked form."""

import importlib.util
import sys

import pytest
import torch
from helpers import assert_matches, assert_states_close, carried_run, outputs_and_grads, rel_err, tiny
from test_ops_delta_rule import make_inputs

from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.models import implementations
from seqlab.ops import delta_rule, delta_rule_ref

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed (pip install 'seqlab[kernels]'): no impl='kernel'")


def run(x, impl, checkpoint=16, scale=None):
    """o, final state and every input's gradient for a fixed random cotangent (the final state's included)."""
    if impl == "ref":
        return outputs_and_grads(lambda **k: delta_rule_ref(**k, return_final_state=True, scale=scale), x)
    return outputs_and_grads(lambda **k: delta_rule(**k, return_final_state=True, impl=impl, chunk_size=checkpoint,
                                                    scale=scale), x)


CASES = {  # (B, H, L, dk, dv, checkpoint K, initial state, gate, beta, scale)
    "L=37, K=8 (not a multiple)": (2, 2, 37, 4, 3, 8, True, "mild", "mid", None),
    "L=1": (1, 2, 1, 3, 2, 16, True, "mild", "mid", None),
    "L=16, K=4 (a multiple), scale": (1, 1, 16, 5, 4, 4, True, "mild", "mid", 0.3),
    "plain (no gate), K=7": (2, 1, 20, 4, 5, 7, True, None, "mid", None),
    "strong decay, K=5": (2, 1, 20, 4, 3, 5, True, "strong", "mid", None),
    "tiny decay, high beta": (1, 2, 12, 3, 4, 4, True, "tiny", "high", None),
    "no initial state, low beta, K=1": (1, 2, 9, 3, 6, 1, False, "mild", "low", None),
    "K > L, plain": (2, 1, 5, 2, 2, 64, True, None, "mid", None),
}


@needs_numba
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_ref(case, dtype):
    """fp32: the kernel against the fp64 twin on the same values, to a few fp32 ulps (1e-5 leaves room). fp64:
    libm, against the fp64 twin, to rounding."""
    B, H, L, dk, dv, K, init, gate, beta, scale = CASES[case]
    x = make_inputs(B, H, L, dk, dv, seed=L, init=init, gate=gate, beta=beta, dtype=dtype)
    got = run(x, "kernel", K, scale)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_matches(got, run({k: v.double() for k, v in x.items()}, "ref", scale=scale),
                   1e-5 if dtype == torch.float32 else 1e-12, case)


@needs_numba
def test_kernel_bf16_no_grad_no_final_state_and_auto(monkeypatch):
    """bf16 inputs compute in fp32 (fp32 state, bf16 output); return_final_state=False gives None; under no_grad
    nothing is kept; impl="auto" runs the kernel for CPU fp32 tensors and the chunked form for fp64 ones."""
    import seqlab.ops.delta_rule_kernel as kernel_module
    calls, kernel = [], kernel_module.delta_rule_kernel
    monkeypatch.setattr(kernel_module, "delta_rule_kernel", lambda *a: calls.append(a[0].dtype) or kernel(*a))
    x = make_inputs(2, 2, 11, 4, 3, seed=0)
    xb = {k: v.to(torch.bfloat16) for k, v in x.items()}
    o, s = delta_rule(**xb, return_final_state=True, impl="kernel")
    o0, s0 = delta_rule(**xb, return_final_state=True, impl="chunked")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(s, s0) <= 1e-5 and rel_err(o, o0) <= 1e-2
    with torch.no_grad():
        o, s = delta_rule(**x, impl="kernel")
    assert s is None and not o.requires_grad
    torch.testing.assert_close(o, delta_rule(**x)[0], atol=1e-5, rtol=1e-5)
    calls.clear()
    delta_rule(**x, impl="auto")
    delta_rule(**{k: v.double() for k, v in x.items()}, impl="auto")
    assert calls == [torch.float32]


@needs_numba
@pytest.mark.parametrize("mixer", ["deltanet", "gated_deltanet"])
def test_model_kernel_matches_chunked(mixer):
    """DeltaNet and Gated DeltaNet models with deltanet.impl="kernel": the same logits, carried state and parameter
    gradients as the chunked form; implementations(model) says so, and "auto" (the default) resolves to "kernel"
    on this CPU, to "chunked" for fp64 weights."""
    models = [tiny(mixer, deltanet={"n_heads": 2, "chunk_size": 8, "impl": impl}) for impl in ("chunked", "kernel")]
    tokens = torch.randint(0, 37, (2, 21), generator=torch.Generator().manual_seed(5))
    (fast, fast_state, fast_grads), (kern, kern_state, kern_grads) = (carried_run(m, tokens) for m in models)
    assert implementations(models[1])[mixer] == implementations(tiny(mixer))[mixer] == "kernel"
    assert implementations(tiny(mixer).double())[mixer] == "chunked"
    torch.testing.assert_close(kern, fast, atol=1e-5, rtol=1e-5)
    assert_states_close(kern_state, fast_state, atol=1e-5)
    for n, g in fast_grads.items():
        assert rel_err(kern_grads[n], g) <= 1e-4, n


def test_deltanet_impl_default_is_auto_and_checked():
    """deltanet.impl defaults to "auto" and the config keeps it; an unknown one names the choices."""
    cfg = ModelConfig.from_dict({"mixer": "gated_deltanet", "vocab_size": 37, "d_model": 32, "n_layers": 1})
    assert cfg.deltanet.impl == "auto" and ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match=r"'deltanet.impl' = 'fast': expected one of auto, chunked, ref, kernel"):
        ModelConfig.from_dict({**cfg.to_dict(), "deltanet": {"impl": "fast"}})


def test_kernel_without_numba_names_the_extra(monkeypatch):
    """No silent fallback: without numba, impl="kernel" is an InputError that says which extra to install; "auto"
    runs the chunked form, and implementations(model) says so."""
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now fails as if it were not installed
    for name in ("seqlab.ops.kernels", "seqlab.ops.delta_rule_kernel"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    x = make_inputs(1, 2, 4, 3, 2, seed=0)
    with pytest.raises(InputError, match=r"delta_rule: impl='kernel' needs numba.*seqlab\[kernels\]"):
        delta_rule(**x, impl="kernel")
    torch.testing.assert_close(delta_rule(**x, impl="auto")[0], delta_rule(**x, impl="chunked")[0], atol=0, rtol=0)
    assert implementations(tiny("gated_deltanet")) == {"gated_deltanet": "chunked", "numba": "not installed"}
