"""LSTM and GRU mixers: torch's fused cells (cuDNN on a GPU, oneDNN/ATen on a CPU), with the state carried.

Glossary
    Dh    rnn.d_hidden, the cell width (d_model unless set; a different width adds an output projection)
    h, c  hidden and cell state, (1, B, Dh) each, as `torch.nn.LSTM` lays them out

Training is sequential in time (backpropagation through time): this is the cost the lab's training-speed section
shows against attention's parallel form. The state is fixed-size whatever the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seqlab.config import ModelConfig
from seqlab.models.registry import register_mixer
from seqlab.models.state import State


@dataclass(frozen=True)
class LSTMState(State):
    h: torch.Tensor  # (1, B, Dh)
    c: torch.Tensor  # (1, B, Dh)


@dataclass(frozen=True)
class GRUState(State):
    h: torch.Tensor  # (1, B, Dh)


class _RNNMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, cell: type[nn.RNNBase]):
        super().__init__()
        self.rnn = cell(cfg.d_model, cfg.rnn_hidden, batch_first=True)
        self.out = nn.Linear(cfg.rnn_hidden, cfg.d_model, bias=False) if cfg.rnn_hidden != cfg.d_model else None

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        return self.out(y) if self.out is not None else y


@register_mixer("lstm")
class LSTM(_RNNMixer):
    def __init__(self, cfg: ModelConfig, name: str = "lstm"):
        super().__init__(cfg, nn.LSTM)

    def forward(self, x: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        y, (h, c) = self.rnn(x, None if state is None else (state.h, state.c))  # y (B, T, Dh)
        return self._project(y), LSTMState(h, c)


@register_mixer("gru")
class GRU(_RNNMixer):
    def __init__(self, cfg: ModelConfig, name: str = "gru"):
        super().__init__(cfg, nn.GRU)

    def forward(self, x: torch.Tensor, state: GRUState | None = None) -> tuple[torch.Tensor, GRUState]:
        y, h = self.rnn(x, None if state is None else state.h)  # y (B, T, Dh)
        return self._project(y), GRUState(h)
