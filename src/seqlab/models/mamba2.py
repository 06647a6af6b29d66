"""The Mamba-2 block (Dao & Gu 2024, "Transformers are SSMs"): multi-head SSD behind a short causal convolution, with
a gated RMSNorm.

Glossary (code name: paper symbol)
    d_inner  E * D, the expanded width (E = mamba2.expand), split into H heads of P = mamba2.head_dim
    H, P     heads and head_dim: d_inner = H * P
    G        mamba2.n_groups: B and C are shared by the H / G heads of a group (like grouped-query attention)
    N        mamba2.d_state, the state size per head row
    dt       Delta, the step per head: softplus(W_dt u + dt_bias), (B, T, H)
    A        -exp(A_log), (H,): one scalar decay rate per head (Mamba-1 has a (d_inner, N) matrix)
    B, C     input-dependent input and output vectors, (B, T, G, N)
    D        skip connection per head, (H,)
    z        the gate branch, applied inside the norm: RMSNorm(y * silu(z)) per group (norm_before_gate=False)

    [z, x, B, C, dt] = in_proj(u)                     (d_inner, d_inner, G N, G N, H)
    [x, B, C] = silu(causal_conv1d([x, B, C]))        short depthwise conv, kernel mamba2.d_conv
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t      per head, h_t (P, N)
    out = out_proj(rmsnorm_per_group(y * silu(z)) * w)

The state is the convolution's last d_conv - 1 inputs (B, d_inner + 2 G N, d_conv - 1) plus the SSM state h,
(B, H, P, N), kept in fp32. A call with T == 1 from a state takes the step path: O(1) work per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig, Section, check_types, choice, positive
from seqlab.errors import InputError
from seqlab.models.blocks import Fn, linear_fn
from seqlab.models.conv import causal_conv1d, causal_conv1d_step
from seqlab.models.registry import register_mixer
from seqlab.models.state import State
from seqlab.ops import ssd, ssd_update


@dataclass(frozen=True)
class Mamba2Config(Section):
    """Config section `mamba2`: the Mamba-2 block (Dao & Gu 2024). Symbols: N = d_state, E = expand, P = head_dim,
    G = n_groups. Defaults as published (mamba_ssm's Mamba2), except the chunk, sized for CPU."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int | None = None  # None: 64 as published where it divides d_inner, else the widest that does
    n_groups: int = 1
    A_init_min: float = 1.0  # A = -uniform[A_init_min, A_init_max] at init
    A_init_max: float = 16.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    chunk_size: int = 64
    impl: str = "chunked"
    proj_bias: bool = False  # biases on in_proj and out_proj (Hugging Face `use_bias`)
    conv_bias: bool = True  # a bias on the short convolution (Hugging Face `use_conv_bias`)
    norm_eps: float = 1e-5  # the gated RMSNorm's epsilon

    def __post_init__(self) -> None:
        check_types(self, "mamba2.")
        positive(self, "mamba2.", "d_state", "d_conv", "expand", "head_dim", "n_groups", "A_init_min", "A_init_max",
                 "dt_min", "dt_max", "dt_init_floor", "chunk_size", "norm_eps")
        choice("mamba2.", "impl", self.impl, ("chunked", "ref"))
        for lo, hi in (("dt_min", "dt_max"), ("A_init_min", "A_init_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise InputError(f"config field 'mamba2.{lo}' = {getattr(self, lo)}: must be <= mamba2.{hi} = "
                                 f"{getattr(self, hi)}")

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def head_width(self, d_model: int) -> int:
        """P, the head width: head_dim, or (None) the widest divisor of d_inner up to the published 64, so any width
        builds (a d_model 48 model gets heads of 48)."""
        d_inner = self.d_inner(d_model)
        return self.head_dim or max(p for p in range(1, min(64, d_inner) + 1) if d_inner % p == 0)

    def n_heads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.head_width(d_model)

    def check_model(self, cfg: ModelConfig) -> None:
        """d_inner splits into whole heads, and the heads into whole groups."""
        if "mamba2" not in cfg.layer_mixers:
            return
        d_inner = self.d_inner(cfg.d_model)
        P = self.head_width(cfg.d_model)
        if d_inner % P:
            raise InputError(f"config field 'mamba2.head_dim' = {P}: d_inner = expand * d_model = {d_inner} must be a "
                             "multiple of it")
        if self.n_heads(cfg.d_model) % self.n_groups:
            raise InputError(f"config field 'mamba2.n_groups' = {self.n_groups}: must divide the "
                             f"{self.n_heads(cfg.d_model)} heads (d_inner / head_dim)")


@dataclass(frozen=True)
class Mamba2State(State):
    conv: torch.Tensor  # (B, d_inner + 2 G N, d_conv - 1), the convolution's last inputs
    ssm: torch.Tensor  # (B, H, P, N), fp32


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """RMSNorm(y * silu(z)) over each of `groups` equal slices of the last dim, times weight; computed in fp32 (fp64
    for fp64) and returned in y's dtype. Gate first, then norm: Mamba-2's norm_before_gate=False. Plain ops, so the
    ONNX exporter traces it."""
    cdt = torch.promote_types(y.dtype, torch.float32)
    g = y.to(cdt) * F.silu(z.to(cdt))
    g = g.unflatten(-1, (groups, -1))  # (..., G, d_inner / G)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.flatten(-2).to(y.dtype)


@register_mixer("mamba2", "mamba2", Mamba2Config)
class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "mamba2"):
        super().__init__()
        m = cfg.mamba2
        self.cfg = m
        self.d_inner, self.H, self.P = m.d_inner(cfg.d_model), m.n_heads(cfg.d_model), m.head_width(cfg.d_model)
        self.G, self.N = m.n_groups, m.d_state
        self.conv_dim = self.d_inner + 2 * self.G * self.N  # x, B and C go through the convolution
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.H, bias=m.proj_bias)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim, bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=m.proj_bias)
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True  # recurrence parameters: never pulled toward zero by weight decay
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The published init: A = -uniform[A_init_min, A_init_max] per head (stored as A_log); dt log-uniform in
        [dt_min, dt_max] (floored at dt_init_floor), stored as its inverse softplus in dt_bias; D = 1; norm weight
        1. in_proj, conv and out_proj keep the model's init."""
        m = self.cfg
        self.A_log.copy_(torch.log(torch.empty(self.H).uniform_(m.A_init_min, m.A_init_max)))
        dt = torch.exp(torch.rand(self.H) * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min))
        dt = dt.clamp(min=m.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    STATE_FORMULA = ("(n_heads x head_dim x d_state fp32 SSM + (d_inner + 2 n_groups d_state) x (d_conv - 1) conv "
                     "window) x batch")

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state, whatever T: the SSM state h (B, H, P, N) in fp32 and the convolution's last
        d_conv - 1 inputs (B, d_inner + 2 G N, d_conv - 1) in the activations' dtype."""
        ssm = self.H * self.P * self.N * torch.promote_types(dtype, torch.float32).itemsize
        return batch * (ssm + self.conv_dim * (self.conv.kernel_size[0] - 1) * dtype.itemsize)

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None) -> tuple[torch.Tensor, Mamba2State]:
        B, T, _ = x.shape
        if T == 1 and state is not None:  # one token from a state: the O(1) recurrent update
            y, state = self.step(x[:, 0], state)
            return y.unsqueeze(1), state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.H], dim=-1)
        xBC, conv_window = causal_conv1d(xBC.transpose(1, 2), self.conv.weight, self.conv.bias,
                                         None if state is None else state.conv)  # (B, conv_dim, T)
        xs, Bm, Cm = F.silu(xBC.transpose(1, 2)).split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        A = -torch.exp(self.A_log.float())  # (H,)
        y, h = ssd(xs.unflatten(-1, (self.H, self.P)), dt, A, Bm.unflatten(-1, (self.G, self.N)),
                   Cm.unflatten(-1, (self.G, self.N)), D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                   initial_state=None if state is None else state.ssm, return_final_state=True,
                   impl=self.cfg.impl, chunk_size=self.cfg.chunk_size)  # y (B, T, H, P)
        y = gated_rmsnorm(y.flatten(-2), z, self.norm_weight, self.G, self.cfg.norm_eps)  # (B, T, d_inner)
        return self.out_proj(y), Mamba2State(conv_window, h)

    def bind(self, portable: bool = False) -> Mamba2Weights:
        """The weights `step` uses, captured once: lean projections, the conv kernel as (conv_dim, d_conv). The
        gated norm is written out in plain ops either way (`portable` reaches only the int8 layers)."""
        return Mamba2Weights(linear_fn(self.in_proj, portable), linear_fn(self.out_proj, portable),
                             self.conv.weight.squeeze(1), self.conv.bias, self.dt_bias, self.A_log, self.D,
                             self.norm_weight)

    def step(self, x: torch.Tensor, state: Mamba2State,
             w: Mamba2Weights | None = None) -> tuple[torch.Tensor, Mamba2State]:
        """One token, x (B, D) -> (B, D): the convolution as a dot product with its window, then one update of h
        per head; nothing in here depends on how many tokens came before. The recurrence runs in fp32 (fp64 for
        fp64) whatever the weights' dtype."""
        w = w or self.bind()
        z, xBC, dt = w.in_proj(x).split([self.d_inner, self.conv_dim, self.H], dim=-1)
        xBC, window = causal_conv1d_step(xBC, state.conv, w.conv_w, w.conv_b)  # (B, conv_dim)
        xs, Bm, Cm = F.silu(xBC).split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        cdt = state.ssm.dtype  # fp32 (fp64 for an fp64 model)
        dt = F.softplus(dt.to(cdt) + w.dt_bias.to(cdt))  # (B, H)
        # -1 for the batch, never a traced constant: the exported graph keeps a dynamic batch axis
        y, h = ssd_update(state.ssm, xs.to(cdt).view(-1, self.H, self.P), dt, -torch.exp(w.A_log.to(cdt)),
                          Bm.to(cdt).view(-1, self.G, self.N), Cm.to(cdt).view(-1, self.G, self.N), w.D.to(cdt))
        y = gated_rmsnorm(y.flatten(1).to(x.dtype), z, w.norm_w, self.G, self.cfg.norm_eps)
        return w.out_proj(y), Mamba2State(window, h)


class Mamba2Weights(NamedTuple):
    in_proj: Fn
    out_proj: Fn
    conv_w: torch.Tensor  # (conv_dim, d_conv)
    conv_b: torch.Tensor | None
    dt_bias: torch.Tensor  # (H,)
    A_log: torch.Tensor  # (H,); A = -exp(A_log)
    D: torch.Tensor  # (H,)
    norm_w: torch.Tensor  # (d_inner,)
