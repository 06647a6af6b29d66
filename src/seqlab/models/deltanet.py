"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length") and
Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule"): one
module, registered as `deltanet` (no decay, a_t = 1) and `gated_deltanet` (a_t = exp(g_t)), config section
`deltanet`.

Glossary (code name: paper symbol)
    H, Hv        deltanet.n_heads query/key heads, deltanet.n_v_heads value heads (default H; more value heads than
                 query/key heads share each q/k head among Hv / H consecutive value heads, as Qwen3-Next and
                 OLMo-Hybrid do)
    dk, dv       key and value width per head: deltanet.head_dim (default 0.75 * d_model / H: Gated DeltaNet's
                 6 heads x 256 at d_model 2048) and deltanet.v_head_dim (default 2 * dk: its expand_v = 2)
    q, k, v      q_t, k_t, v_t: projections, each through a short causal depthwise conv (deltanet.conv_size) and
                 SiLU; q and k L2-normalized per head (x / sqrt(|x|^2 + 1e-6), as the reference code)
    beta         beta_t = sigmoid(W_b x_t) per value head (x 2 with deltanet.allow_neg_eigval: range (0, 2))
    g            log a_t = -exp(A_log) * softplus(W_a x_t + dt_bias) per value head (gated_deltanet only; the
                 Mamba-2 parameterization, A = exp(A_log) ~ U(0, 16), dt = softplus(dt_bias) ~ logU(1e-3, 1e-1))
    S            the state, (B, Hv, dk, dv), fp32 (the paper's S transposed; see ops/delta_rule.py)

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t / sqrt(dk)
    out = out_proj(rmsnorm_per_head(o) * silu(W_g x))        (the output gate)

The three convolutions are depthwise, so they run as one convolution over the concatenated [q, k, v] channels; the
state is that convolution's last conv_size - 1 inputs and S. A call with T == 1 from a state takes `step`.
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
from seqlab.models.blocks import Fn, linear_fn, norm_fn
from seqlab.models.conv import causal_conv1d, causal_conv1d_step
from seqlab.models.registry import register_mixer
from seqlab.models.state import State
from seqlab.ops import delta_rule, delta_rule_update
from seqlab.ops.selective_scan import resolve_impl

L2_EPS = 1e-6  # q, k <- x / sqrt(|x|^2 + eps), the reference implementation's L2 norm


@dataclass(frozen=True)
class DeltaNetConfig(Section):
    """Config section `deltanet`: DeltaNet and Gated DeltaNet, multi-head, short convs, output norm and gate.

    impl: the delta rule's implementation (`seqlab.ops.delta_rule`). "auto" (the default) runs the fused numba
    kernel when the optional `kernels` extra is installed, the tensors are on the CPU and compute in fp32, and the
    chunked form otherwise (a GPU, fp64, no numba): `seqlab.ops.selective_scan.resolve_impl`, applied at every
    call; the config keeps "auto". The kernel measured 1.2-4.3x the chunked form's speed forward + backward, gated
    and plain, at every size measured, the tests' and the quick lab's included (benchmarks/bench_kernels.py
    --delta-rule [--plain] [--small]). "kernel" asks for it outright (an InputError without the extra), "chunked"
    and "ref" (the loop twin) for those. chunk_size: steps per chunk (chunked) or between the states kept for
    backward (kernel).
    """

    n_heads: int = 4
    n_v_heads: int | None = None  # None: n_heads
    head_dim: int | None = None  # None: int(0.75 * d_model / n_heads)
    v_head_dim: int | None = None  # None: 2 * head_dim
    conv_size: int = 4
    norm_eps: float = 1e-5  # the per-head output RMSNorm
    allow_neg_eigval: bool = False  # beta = 2 sigmoid(.) in (0, 2): OLMo-Hybrid's default, not the paper's
    chunk_size: int = 32  # the CPU optimum measured at d_model 120-256 (16, 32, 64 tried; 64 is 0-40% slower)
    impl: str = "auto"

    def __post_init__(self) -> None:
        check_types(self, "deltanet.")
        positive(self, "deltanet.", "n_heads", "n_v_heads", "head_dim", "v_head_dim", "conv_size", "norm_eps",
                 "chunk_size")
        choice("deltanet.", "impl", self.impl, ("auto", "chunked", "ref", "kernel"))  # kernel: the `kernels` extra
        if self.n_v_heads is not None and self.n_v_heads % self.n_heads:
            raise InputError(f"config field 'deltanet.n_v_heads' = {self.n_v_heads}: must be a multiple of "
                             f"deltanet.n_heads = {self.n_heads}")

    def v_heads(self) -> int:
        return self.n_v_heads or self.n_heads

    def d_head(self, d_model: int) -> int:
        """dk, the key width per head."""
        return self.head_dim or int(0.75 * d_model / self.n_heads)

    def d_v_head(self, d_model: int) -> int:
        """dv, the value width per head."""
        return self.v_head_dim or 2 * self.d_head(d_model)

    def check_model(self, cfg: ModelConfig) -> None:
        """The default key width 0.75 * d_model / n_heads must be at least 1."""
        if {"deltanet", "gated_deltanet"} & set(cfg.layer_mixers) and self.d_head(cfg.d_model) < 1:
            raise InputError(f"config field 'deltanet.n_heads' = {self.n_heads}: 0.75 * d_model = "
                             f"{0.75 * cfg.d_model} leaves no key width per head; set deltanet.head_dim")


@dataclass(frozen=True)
class DeltaNetState(State):
    conv: torch.Tensor  # (B, 2 H dk + Hv dv, conv_size - 1): the convolution's last inputs, oldest first
    S: torch.Tensor  # (B, Hv, dk, dv), fp32


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


@register_mixer("gated_deltanet", "deltanet", DeltaNetConfig)  # decorators apply bottom-up: deltanet first
@register_mixer("deltanet", "deltanet", DeltaNetConfig)
class DeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "gated_deltanet"):
        super().__init__()
        c = cfg.deltanet
        self.cfg = c
        self.gated = name == "gated_deltanet"
        D = cfg.d_model
        self.H, self.Hv, self.dk, self.dv = c.n_heads, c.v_heads(), c.d_head(D), c.d_v_head(D)
        self.key_dim, self.value_dim = self.H * self.dk, self.Hv * self.dv
        self.q_proj = nn.Linear(D, self.key_dim, bias=False)
        self.k_proj = nn.Linear(D, self.key_dim, bias=False)
        self.v_proj = nn.Linear(D, self.value_dim, bias=False)
        self.b_proj = nn.Linear(D, self.Hv, bias=False)  # beta
        self.g_proj = nn.Linear(D, self.value_dim, bias=False)  # the output gate
        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv = nn.Conv1d(conv_dim, conv_dim, c.conv_size, groups=conv_dim, bias=False)
        if self.gated:
            self.a_proj = nn.Linear(D, self.Hv, bias=False)  # the decay's input-dependent step
            self.A_log = nn.Parameter(torch.empty(self.Hv))
            self.dt_bias = nn.Parameter(torch.empty(self.Hv))
            for p in (self.A_log, self.dt_bias):
                p._no_weight_decay = True  # recurrence parameters: never pulled toward zero by weight decay
        self.norm = nn.RMSNorm(self.dv, eps=c.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, D, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gated DeltaNet's published init: A = exp(A_log) ~ U(0, 16) per head; dt ~ logU(0.001, 0.1) clamped at
        1e-4, stored as its inverse softplus in dt_bias. (The linear layers take the model's init.)"""
        if not self.gated:
            return
        self.A_log.copy_(torch.log(torch.empty(self.Hv).uniform_(0, 16)))
        dt = torch.exp(torch.rand(self.Hv) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt

    STATE_FORMULA = ("(n_v_heads x head_dim x v_head_dim fp32 + (2 x n_heads x head_dim + n_v_heads x v_head_dim)"
                     " x (conv_size - 1) conv window) x batch")

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state, whatever T: S (B, Hv, dk, dv) in fp32 and the convolution's last conv_size - 1
        inputs (B, 2 H dk + Hv dv, conv_size - 1) in the activations' dtype."""
        S = self.Hv * self.dk * self.dv * torch.promote_types(dtype, torch.float32).itemsize
        return batch * (S + self.conv.in_channels * (self.conv.kernel_size[0] - 1) * dtype.itemsize)

    def implementation(self) -> str:
        """The implementation this module's forward runs on its weights' device ("auto" resolved)."""
        return resolve_impl(self.cfg.impl, self.out_proj.weight.device, self.out_proj.weight.dtype)

    def _qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The convolved [q, k, v] (..., 2 H dk + Hv dv) -> q, k (..., Hv, dk) L2-normalized, v (..., Hv, dv)."""
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = qkv.shape[:-1]
        q, k = (l2norm(t.reshape(*lead, self.H, self.dk)) for t in (q, k))
        if self.Hv > self.H:  # each q/k head serves Hv / H consecutive value heads
            r = self.Hv // self.H
            q, k = (t.unsqueeze(-2).expand(*lead, self.H, r, self.dk).reshape(*lead, self.Hv, self.dk)
                    for t in (q, k))
        return q, k, v.reshape(*lead, self.Hv, self.dv)

    def forward(self, x: torch.Tensor, state: DeltaNetState | None = None) -> tuple[torch.Tensor, DeltaNetState]:
        B, T, _ = x.shape
        if T == 1 and state is not None:  # one token from a state: the O(1) recurrent update
            y, state = self.step(x[:, 0], state)
            return y.unsqueeze(1), state
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1).transpose(1, 2)  # (B, C, T)
        qkv, window = causal_conv1d(qkv, self.conv.weight, None, None if state is None else state.conv)
        # SiLU in (B, T, C), contiguous: its backward is ~4x slower on a transposed gradient
        q, k, v = (t.transpose(1, 2) for t in self._qkv(F.silu(qkv.transpose(1, 2).contiguous())))  # (B, Hv, T, d)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # (B, Hv, T)
        if self.cfg.allow_neg_eigval:
            beta = 2 * beta
        g = None
        if self.gated:  # the decay in fp32 (fp64 for fp64) whatever the weights' dtype
            cdt = torch.promote_types(x.dtype, torch.float32)
            g = -torch.exp(self.A_log.to(cdt)) * F.softplus(self.a_proj(x).to(cdt) + self.dt_bias.to(cdt))
            g = g.transpose(1, 2)  # (B, Hv, T)
        o, S = delta_rule(q, k, v, beta, g, initial_state=None if state is None else state.S,
                          return_final_state=True, impl=self.cfg.impl, chunk_size=self.cfg.chunk_size)
        o = self.norm(o.transpose(1, 2))  # (B, T, Hv, dv)
        o = o * F.silu(self.g_proj(x)).view(B, T, self.Hv, self.dv)
        return self.out_proj(o.reshape(B, T, self.value_dim)), DeltaNetState(window, S)

    def bind(self, portable: bool = False) -> DeltaNetWeights:
        """The weights `step` uses, captured once as lean callables; the conv kernel as (C, conv_size)."""
        gate = (linear_fn(self.a_proj, portable), self.A_log, self.dt_bias) if self.gated else (None, None, None)
        return DeltaNetWeights(*(linear_fn(m, portable) for m in (self.q_proj, self.k_proj, self.v_proj, self.b_proj,
                                                         self.g_proj, self.out_proj)),
                               *gate, self.conv.weight.squeeze(1), norm_fn(self.norm, portable))

    def step(self, x: torch.Tensor, state: DeltaNetState,
             w: DeltaNetWeights | None = None) -> tuple[torch.Tensor, DeltaNetState]:
        """One token, x (B, D) -> (B, D): the convolution as a dot product with its window, then one delta-rule
        update per head, in fp32 (fp64 for fp64) whatever the weights' dtype."""
        w = w or self.bind()
        B, cdt = x.shape[0], state.S.dtype
        qkv = torch.cat([w.q_proj(x), w.k_proj(x), w.v_proj(x)], -1)  # (B, C)
        qkv, window = causal_conv1d_step(qkv, state.conv, w.conv_w, None)  # (B, C)
        q, k, v = self._qkv(F.silu(qkv))  # (B, Hv, d)
        beta = torch.sigmoid(w.b_proj(x))  # (B, Hv)
        if self.cfg.allow_neg_eigval:
            beta = 2 * beta
        g = None
        if self.gated:
            g = -torch.exp(w.A_log.to(cdt)) * F.softplus(w.a_proj(x).to(cdt) + w.dt_bias.to(cdt))
        o, S = delta_rule_update(state.S, q.to(cdt) * self.dk ** -0.5, k.to(cdt), v.to(cdt), beta.to(cdt), g)
        o = w.norm(o.to(x.dtype)) * F.silu(w.g_proj(x)).view(B, self.Hv, self.dv)  # (B, Hv, dv)
        return w.out_proj(o.reshape(B, self.value_dim)), DeltaNetState(window, S)


class DeltaNetWeights(NamedTuple):
    q_proj: Fn
    k_proj: Fn
    v_proj: Fn
    b_proj: Fn
    g_proj: Fn
    out_proj: Fn
    a_proj: Fn | None  # gated_deltanet only
    A_log: torch.Tensor | None  # (Hv,)
    dt_bias: torch.Tensor | None  # (Hv,)
    conv_w: torch.Tensor  # (2 H dk + Hv dv, conv_size)
    norm: Fn
