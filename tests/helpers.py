"""Shared test helpers: tiny model configs and state comparison."""

from __future__ import annotations

import pytest
import torch

import seqlab
from seqlab.models.state import ModelState


def tiny(mixer: str | None = None, layers: tuple[str, ...] | None = None, **overrides):
    """A tiny fp32 model for equivalence tests (sizes small enough for milliseconds per call)."""
    fields = dict(vocab_size=37, d_model=32, n_layers=2, attention={"n_heads": 4, "window": 5},
                  mamba={"chunk_size": 8}, gla={"n_heads": 2, "chunk_size": 8},
                  deltanet={"n_heads": 2, "chunk_size": 8},
                  mamba2={"d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 8})
    if layers is not None:
        fields.update(layers=layers, n_layers=len(layers))
    else:
        fields["mixer"] = mixer
    fields.update(overrides)
    return seqlab.build_model(fields, seed=0).eval()


def state_tensors(state: ModelState) -> list[torch.Tensor]:
    return [t for s in state.layers for t in s.tensors().values()]


def assert_states_close(a: ModelState, b: ModelState, atol: float = 1e-4) -> None:
    assert a.pos == b.pos
    ta, tb = state_tensors(a), state_tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def need_onnx() -> None:
    """Skip the calling test unless onnx and onnxruntime are installed."""
    for name in ("onnx", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (pip install 'seqlab[onnx]'): ONNX export "
                                         "checks skipped")


def outputs_and_grads(fn, x: dict, seed: int = 1):
    """For an op `fn(**inputs) -> (output, final state)`: the output, the final state and the gradient of every
    input (a fresh leaf copy of each tensor in `x`) for a fixed random cotangent drawn from `seed`."""
    x = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    out, state = fn(**x)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    g_state = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    names = list(x)
    grads = torch.autograd.grad((out * g_out).sum() + (state * g_state).sum(), [x[n] for n in names])
    return out.detach(), state.detach(), dict(zip(names, grads))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (elementwise relative error is meaningless near zero)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_matches(got, want, tol: float, what: str = "") -> None:
    """(output, final state, {input: gradient}) `got` equals `want` within relative error `tol`, every gradient
    finite and of the same inputs."""
    out, state, g = got
    out0, state0, g0 = want
    assert rel_err(out, out0) <= tol, f"{what} output: {rel_err(out, out0):.2e}"
    assert rel_err(state, state0) <= tol, f"{what} final state: {rel_err(state, state0):.2e}"
    assert set(g) == set(g0)
    for n in g0:
        assert torch.isfinite(g[n]).all(), f"{what} grad {n} not finite"
        assert rel_err(g[n], g0[n]) <= tol, f"{what} grad {n}: {rel_err(g[n], g0[n]):.2e}"


def carried_run(model, tokens: torch.Tensor, split: int = 4):
    """Logits of tokens[:, split:] fed from the state after tokens[:, :split] (so scans start from a nonzero state),
    the state after them, and every parameter's gradient of mean(logits^2): what two implementations must share."""
    _, state = model(tokens[:, :split])
    logits, state = model(tokens[:, split:], state)
    logits.square().mean().backward()
    return logits, state, {n: p.grad for n, p in model.named_parameters()}
