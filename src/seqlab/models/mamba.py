"""The Mamba block (Gu & Dao 2023): a selective state-space model behind a short causal convolution, gated.

Glossary (code name: paper symbol)
    d_inner  E * D, the expanded width (E = mamba.expand)
    N        mamba.d_state, the state size per channel
    delta    input-dependent step size, softplus(dt_proj(dt) + dt_bias), (B, d_inner, T)
    A        -exp(A_log), (d_inner, N), the continuous-time decay; dA = exp(delta * A)
    B, C     input-dependent input and output matrices, (B, N, T)
    D        skip connection, (d_inner,)
    z        the gate branch; y *= silu(z)

    [x, z] = in_proj(u)                       (B, T, 2 * d_inner)
    x      = silu(causal_conv1d(x))           short depthwise conv, kernel mamba.d_conv
    dt, B, C = x_proj(x)                      (dt_rank, N, N)
    h_t    = exp(delta_t A) h_{t-1} + delta_t B_t x_t,   y_t = C_t h_t + D x_t
    out    = out_proj(y * silu(z))

The state is the convolution's last d_conv - 1 inputs plus the SSM state h, (B, d_inner, N), kept in fp32. A call
with T == 1 takes the step path: O(1) work per token, no scan machinery, whatever the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.models.conv import causal_conv1d
from seqlab.models.registry import register_mixer
from seqlab.models.state import State
from seqlab.ops import selective_scan, selective_scan_step


@dataclass(frozen=True)
class MambaState(State):
    conv: torch.Tensor  # (B, d_inner, d_conv - 1), the convolution's last inputs
    ssm: torch.Tensor  # (B, d_inner, N), fp32


@register_mixer("mamba")
class Mamba(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "mamba"):
        super().__init__()
        m = cfg.mamba
        self.cfg = m
        self.d_inner, self.dt_rank, self.N = cfg.mamba_d_inner, cfg.mamba_dt_rank, m.d_state
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner, bias=m.proj_bias)
        self.conv = nn.Conv1d(self.d_inner, self.d_inner, m.d_conv, groups=self.d_inner, bias=m.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.N))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=m.proj_bias)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True  # recurrence parameters: never pulled toward zero by weight decay
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The published init: A = -(1..N) per channel (S4D-real); dt in [dt_min, dt_max] log-uniformly, stored
        as the inverse softplus in the dt_proj bias; dt_proj weight uniform in +-dt_rank^-0.5; D = 1."""
        m = self.cfg
        self.A_log.copy_(torch.log(torch.arange(1, self.N + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min))
        dt = dt.clamp(min=m.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) == dt

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, MambaState]:
        B, T, _ = x.shape
        if T == 1 and state is not None:  # decoding: the O(1) recurrent update
            return self.step(x, state)
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, T) each
        xs, conv_window = causal_conv1d(xs, self.conv.weight, self.conv.bias, None if state is None else state.conv)
        xs = F.silu(xs)
        dt, Bm, Cm = self.x_proj(xs.transpose(1, 2)).split([self.dt_rank, self.N, self.N], dim=-1)  # (B, T, .)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, T); bias added in the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        y, h = selective_scan(xs, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), D=self.D.float(), z=z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                              initial_state=None if state is None else state.ssm, return_final_state=True,
                              impl=self.cfg.impl, chunk_size=self.cfg.chunk_size)
        return self.out_proj(y.transpose(1, 2)), MambaState(conv_window, h)

    def step(self, x: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token, x (B, 1, D): the convolution as a dot product with its window and one `selective_scan_step`;
        nothing in here depends on how many tokens came before."""
        xs, z = self.in_proj(x.select(1, 0)).chunk(2, dim=-1)  # (B, d_inner) each
        conv = state.conv if state.conv.dtype == xs.dtype else state.conv.to(xs.dtype)
        window = torch.cat([conv, xs.unsqueeze(-1)], dim=-1)  # (B, d_inner, d_conv)
        xs = (window * self.conv.weight.squeeze(1)).sum(-1)  # (B, d_inner)
        if self.conv.bias is not None:
            xs = xs + self.conv.bias
        xs = F.silu(xs)
        dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.N, self.N], dim=-1)  # (B, .)
        y, h = selective_scan_step(xs, F.linear(dt, self.dt_proj.weight), -torch.exp(self.A_log.float()), Bm, Cm,
                                   state.ssm, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                                   delta_softplus=True)
        return self.out_proj(y).unsqueeze(1), MambaState(window[..., 1:], h)
