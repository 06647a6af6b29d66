"""LSTM and GRU mixers: torch's fused cells (cuDNN on a GPU, oneDNN/ATen on a CPU), with the state carried.

Glossary
    Dh    rnn.d_hidden, the cell width (d_model unless set; a different width adds an output projection)
    h, c  hidden and cell state, (1, B, Dh) each, as `torch.nn.LSTM` lays them out, kept in fp32

`forward` runs torch's fused cell over T steps; `step` is the same cell for one token written out (a few tiny
ops, no module call), which the decode plan and the ONNX export call.

Training is sequential in time (backpropagation through time): this is the cost the lab's training-speed section
shows against attention's parallel form. The state is fixed-size whatever the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from seqlab.config import ModelConfig, Section, check_types, positive
from seqlab.models.blocks import linear_fn
from seqlab.models.registry import register_mixer
from seqlab.models.state import State


@dataclass(frozen=True)
class RNNConfig(Section):
    """Config section `rnn`, for `lstm` and `gru`: a hidden size other than d_model adds an output projection."""

    d_hidden: int | None = None  # None means d_model

    def __post_init__(self) -> None:
        check_types(self, "rnn.")
        positive(self, "rnn.", "d_hidden")

    def hidden(self, d_model: int) -> int:
        return self.d_hidden or d_model


@dataclass(frozen=True)
class LSTMState(State):
    h: torch.Tensor  # (1, B, Dh), fp32
    c: torch.Tensor  # (1, B, Dh), fp32
    batch_axis: ClassVar[int] = 1  # torch.nn.LSTM's layout


@dataclass(frozen=True)
class GRUState(State):
    h: torch.Tensor  # (1, B, Dh), fp32
    batch_axis: ClassVar[int] = 1


class _RNNMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, cell: type[nn.RNNBase]):
        super().__init__()
        hidden = cfg.rnn.hidden(cfg.d_model)
        self.rnn = cell(cfg.d_model, hidden, batch_first=True)
        self.out = nn.Linear(hidden, cfg.d_model, bias=False) if hidden != cfg.d_model else None

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        return self.out(y) if self.out is not None else y

    def _run(self, x: torch.Tensor, hx: Any) -> tuple[torch.Tensor, Any]:
        """torch's fused RNN over x (B, T, D) from hx (fp32 state), computed in x's dtype."""
        if hx is not None and x.dtype != torch.float32:
            hx = tuple(h.to(x.dtype) for h in hx) if isinstance(hx, tuple) else hx.to(x.dtype)
        return self.rnn(x, hx)

    def bind(self, portable: bool = False) -> tuple:
        """(W_ih^T, W_hh^T, b_ih, b_hh, out projection or None) for `step`."""
        r = self.rnn
        return (r.weight_ih_l0.t(), r.weight_hh_l0.t(), r.bias_ih_l0, r.bias_hh_l0,
                linear_fn(self.out, portable) if self.out is not None else None)

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state, whatever T: h (and c for an LSTM), (1, B, Dh) each, in fp32."""
        return self.n_states * batch * self.rnn.hidden_size * torch.promote_types(dtype, torch.float32).itemsize


@register_mixer("lstm", "rnn", RNNConfig)
class LSTM(_RNNMixer):
    """LSTM (gate order i, f, g, o as torch.nn.LSTM):
        [i, f, g, o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
        c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),    h_t = sigmoid(o) tanh(c_t)"""

    STATE_FORMULA = "2 x d_hidden (h and c) fp32 x batch"
    n_states = 2

    def __init__(self, cfg: ModelConfig, name: str = "lstm"):
        super().__init__(cfg, nn.LSTM)

    def forward(self, x: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        y, (h, c) = self._run(x, None if state is None else (state.h, state.c))  # y (B, T, Dh)
        return self._project(y), LSTMState(_fp32(h), _fp32(c))

    def step(self, x: torch.Tensor, state: LSTMState, w: tuple | None = None) -> tuple[torch.Tensor, LSTMState]:
        """One token, x (B, D) -> (B, D); the cell update in fp32 whatever the weights' dtype."""
        w_ih, w_hh, b_ih, b_hh, out = w or self.bind()
        h, c = state.h[0], state.c[0]  # (B, Dh), fp32
        gates = torch.addmm(b_ih, x, w_ih) + torch.addmm(b_hh, h.to(x.dtype), w_hh)  # (B, 4 Dh)
        i, f, g, o = gates.to(c.dtype).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        y = h.to(x.dtype)
        return (out(y) if out is not None else y), LSTMState(h.unsqueeze(0), c.unsqueeze(0))


@register_mixer("gru", "rnn", RNNConfig)
class GRU(_RNNMixer):
    """GRU (gate order r, z, n as torch.nn.GRU):
        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r (W_hn h + b_hn)),  h_t = (1 - z) n + z h_{t-1}"""

    STATE_FORMULA = "d_hidden (h) fp32 x batch"
    n_states = 1

    def __init__(self, cfg: ModelConfig, name: str = "gru"):
        super().__init__(cfg, nn.GRU)

    def forward(self, x: torch.Tensor, state: GRUState | None = None) -> tuple[torch.Tensor, GRUState]:
        y, h = self._run(x, None if state is None else state.h)  # y (B, T, Dh)
        return self._project(y), GRUState(_fp32(h))

    def step(self, x: torch.Tensor, state: GRUState, w: tuple | None = None) -> tuple[torch.Tensor, GRUState]:
        """One token, x (B, D) -> (B, D); the gates and the update in fp32 whatever the weights' dtype."""
        w_ih, w_hh, b_ih, b_hh, out = w or self.bind()
        h = state.h[0]  # (B, Dh), fp32
        gi = torch.addmm(b_ih, x, w_ih).to(h.dtype).chunk(3, dim=-1)  # (B, Dh) x 3
        gh = torch.addmm(b_hh, h.to(x.dtype), w_hh).to(h.dtype).chunk(3, dim=-1)
        r, z = torch.sigmoid(gi[0] + gh[0]), torch.sigmoid(gi[1] + gh[1])
        n = torch.tanh(gi[2] + r * gh[2])
        h = n + z * (h - n)  # (1 - z) n + z h
        y = h.to(x.dtype)
        return (out(y) if out is not None else y), GRUState(h.unsqueeze(0))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """A recurrent state is kept in fp32 (fp64 stays fp64) whatever the weights' dtype."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
