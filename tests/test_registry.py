"""Adding a mixer: one file (its config section, state, module) and one registration, nothing else in seqlab.

The test defines a toy mixer here, an exponential moving average with a learned input and output projection, the
way a mixer file under `seqlab.models` would, registers it, and checks that configs, the model contract, the
decode plan, the profiler's state formula and the ONNX export graph all take it with no change anywhere; then it
unregisters it so the rest of the suite sees the usual mixers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_states_close
from torch import nn

import seqlab
from seqlab import config
from seqlab.config import ModelConfig, Section, check_types
from seqlab.errors import InputError
from seqlab.infer.plan import DecodePlan
from seqlab.infer.profile import state_bytes_formula, state_formulas
from seqlab.interop.export import ExportGraph
from seqlab.models import registry
from seqlab.models.blocks import linear_fn
from seqlab.models.state import State


@dataclass(frozen=True)
class EMAConfig(Section):
    decay: float = 0.9

    def __post_init__(self) -> None:
        check_types(self, "ema.")
        if not 0 < self.decay < 1:
            raise InputError(f"config field 'ema.decay' = {self.decay}: must be in (0, 1)")


@dataclass(frozen=True)
class EMAState(State):
    h: torch.Tensor  # (B, D), fp32


class EMA(nn.Module):
    """h_t = a h_{t-1} + (1 - a) W_in x_t,  y_t = W_out h_t."""

    STATE_FORMULA = "d_model fp32 x batch"

    def __init__(self, cfg: ModelConfig, name: str = "ema"):
        super().__init__()
        self.a = cfg.ema.decay
        self.w_in = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.w_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def state_bytes(self, T, batch=1, dtype=torch.float32):
        return batch * self.w_in.out_features * 4

    def forward(self, x, state=None):  # x (B, T, D)
        u, h = self.w_in(x), torch.zeros_like(x[:, 0]) if state is None else state.h
        ys = []
        for t in range(x.shape[1]):
            h = self.a * h + (1 - self.a) * u[:, t]
            ys.append(h)
        return self.w_out(torch.stack(ys, 1)), EMAState(h)

    def bind(self, portable=False):
        return linear_fn(self.w_in), linear_fn(self.w_out)

    def step(self, x, state, w=None):  # x (B, D)
        w_in, w_out = w or self.bind()
        h = self.a * state.h + (1 - self.a) * w_in(x)
        return w_out(h), EMAState(h)


@pytest.fixture
def ema():
    registry.register_mixer("ema", "ema", EMAConfig)(EMA)
    yield
    config.MIXERS.remove("ema")
    del config.SECTIONS["ema"], registry._REGISTRY["ema"]


def test_a_mixer_registered_from_its_own_file_works_everywhere(ema):
    assert "ema" in seqlab.available_mixers()
    cfg = ModelConfig.from_dict({"layers": ["ema", "attention", "ema"], "d_model": 16, "vocab_size": 19,
                                 "ema": {"decay": 0.5}, "attention": {"n_heads": 2}})
    assert cfg.ema.decay == 0.5 and cfg.to_dict()["ema"] == {"decay": 0.5}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = seqlab.build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, 19, (2, 9))
    with torch.no_grad():
        full, full_state = model(tokens)
        state, plan = model(tokens[:, :4])[1], DecodePlan.build(model)
        for t in range(4, 9):
            logits, state = plan(tokens[:, t:t + 1], state)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
        assert_states_close(state, full_state, atol=1e-5)
        graph = ExportGraph(model, cache_size=16)
        out, *_ = graph(tokens, torch.tensor([0]), *graph.zero_state(2))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    assert state_bytes_formula(cfg, 9, batch=2) == full_state.nbytes
    assert state_formulas(cfg)["ema"] == "d_model fp32 x batch"


def test_a_mixer_section_is_checked_and_unknown_sections_are_named(ema):
    with pytest.raises(InputError, match=r"'ema.decay' = 1.5: must be in \(0, 1\)"):
        ModelConfig.from_dict({"mixer": "ema", "ema": {"decay": 1.5}})
    with pytest.raises(InputError, match="unknown config key 'emma'; allowed keys: .*ema"):
        ModelConfig.from_dict({"mixer": "ema", "emma": {}})
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_mixer("ema", "ema", EMAConfig)(EMA)


def test_mixers_list_in_the_order_of_the_registry_line():
    """The import line in seqlab/models/__init__.py sets the order every listing uses (isort must not sort it)."""
    assert seqlab.available_mixers()[:7] == ["attention", "sliding_attention", "lstm", "gru", "conv", "mamba", "gla"]
    assert seqlab.available_mixers() == config.MIXERS
