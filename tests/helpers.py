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
