"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): a GRU and an LSTM whose gates and candidate
depend on the input x_t only, so that training runs as a parallel scan over time while decoding stays an O(1)
recurrence, the modern answer to "RNNs cannot train in parallel".

Glossary (code name: paper symbol)
    Dh        minrnn.expand * D, the hidden width (an output projection back to D when Dh != D)
    k         the update gate's pre-activation; z_t = sigmoid(k_t)                              (minGRU)
    f, i      the forget and input gates' pre-activations; f_t = sigmoid(f), i_t = sigmoid(i)    (minLSTM)
    h~        the candidate state, g(h~_t) with g(x) = x + 1/2 for x >= 0, sigmoid(x) below: positive, so that
              the scan can run in log space (the paper's log-space variant)
    h         the hidden state, (B, Dh), fp32

    minGRU:   h_t = (1 - z_t) h_{t-1} + z_t g(h~_t)
    minLSTM:  h_t = f'_t h_{t-1} + i'_t g(h~_t),   f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)
              (log f'_t = -softplus(d_t), log i'_t = -softplus(-d_t), d_t = softplus(-f) - softplus(-i))

`forward` builds log a_t and log b_t for every step and runs `seqlab.ops.minrnn_scan`; `step` computes a_t, b_t in
linear space for one token and updates h: the same numbers, O(1) per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig, Section, check_types, choice, positive
from seqlab.models.blocks import linear_fn
from seqlab.models.registry import register_mixer
from seqlab.models.state import State
from seqlab.ops import minrnn_scan, minrnn_update


@dataclass(frozen=True)
class MinRNNConfig(Section):
    """Config section `minrnn`, for `mingru` and `minlstm`."""

    expand: float = 1.0  # Dh = expand * d_model
    chunk_size: int = 64  # steps per chunk of the log-space scan
    impl: str = "chunked"  # chunked | ref (the loop twin)

    def __post_init__(self) -> None:
        check_types(self, "minrnn.")
        positive(self, "minrnn.", "expand", "chunk_size")
        choice("minrnn.", "impl", self.impl, ("chunked", "ref"))

    def hidden(self, d_model: int) -> int:
        return max(1, int(self.expand * d_model))


@dataclass(frozen=True)
class MinRNNState(State):
    h: torch.Tensor  # (B, Dh), fp32


def g(x: torch.Tensor) -> torch.Tensor:
    """x + 1/2 for x >= 0, sigmoid(x) below: continuous, positive, the candidate's activation."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x), computed without forming g(x) for x < 0 (where it is -softplus(-x))."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


@register_mixer("minlstm", "minrnn", MinRNNConfig)  # decorators apply bottom-up: mingru first
@register_mixer("mingru", "minrnn", MinRNNConfig)
class MinRNN(nn.Module):
    STATE_FORMULA = "minrnn.expand x d_model fp32 x batch"

    def __init__(self, cfg: ModelConfig, name: str = "mingru"):
        super().__init__()
        m = cfg.minrnn
        self.cfg, self.lstm = m, name == "minlstm"
        self.d_hidden = m.hidden(cfg.d_model)
        # [h~, k] for minGRU, [h~, f, i] for minLSTM, in one projection
        self.in_proj = nn.Linear(cfg.d_model, (3 if self.lstm else 2) * self.d_hidden, bias=False)
        self.out_proj = nn.Linear(self.d_hidden, cfg.d_model, bias=False) if self.d_hidden != cfg.d_model else None

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state, whatever T: h (B, Dh) in fp32."""
        return batch * self.d_hidden * torch.promote_types(dtype, torch.float32).itemsize

    def _log_gates(self, gates: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log a, log of the input's weight): minGRU (log(1 - z), log z), minLSTM (log f', log i')."""
        if self.lstm:
            d = F.softplus(-gates[0]) - F.softplus(-gates[1])
            return -F.softplus(d), -F.softplus(-d)
        return -F.softplus(gates[0]), -F.softplus(-gates[0])

    def forward(self, x: torch.Tensor, state: MinRNNState | None = None) -> tuple[torch.Tensor, MinRNNState]:
        B, T, _ = x.shape
        if T == 1 and state is not None:  # one token from a state: the O(1) update
            y, state = self.step(x[:, 0], state)
            return y.unsqueeze(1), state
        cand, *gates = self.in_proj(x).float().chunk(3 if self.lstm else 2, dim=-1)  # (B, T, Dh) each
        log_a, log_w = self._log_gates(gates)
        h, last = minrnn_scan(log_a, log_w + log_g(cand), initial_state=None if state is None else state.h,
                              return_final_state=True, impl=self.cfg.impl, chunk_size=self.cfg.chunk_size)
        h = h.to(x.dtype)
        return (self.out_proj(h) if self.out_proj is not None else h), MinRNNState(last)

    def bind(self, portable: bool = False) -> tuple:
        """(in_proj, out_proj or None) for `step`."""
        out = linear_fn(self.out_proj, portable) if self.out_proj is not None else None
        return linear_fn(self.in_proj, portable), out

    def step(self, x: torch.Tensor, state: MinRNNState, w: tuple | None = None) -> tuple[torch.Tensor, MinRNNState]:
        """One token, x (B, D) -> (B, D): a and b in linear space, then h = a h + b, in fp32."""
        in_proj, out_proj = w or self.bind()
        cand, *gates = in_proj(x).to(state.h.dtype).chunk(3 if self.lstm else 2, dim=-1)  # (B, Dh) each
        if self.lstm:
            d = F.softplus(-gates[0]) - F.softplus(-gates[1])
            a, weight = torch.sigmoid(-d), torch.sigmoid(d)  # f', i'
        else:
            a, weight = torch.sigmoid(-gates[0]), torch.sigmoid(gates[0])  # 1 - z, z
        h = minrnn_update(state.h, a, weight * g(cand))
        y = h.to(x.dtype)
        return (out_proj(y) if out_proj is not None else y), MinRNNState(h)
