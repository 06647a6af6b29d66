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
from seqlab.ops import selective_scan, selective_scan_update
from seqlab.ops.selective_scan import resolve_impl


@dataclass(frozen=True)
class MambaConfig(Section):
    """Config section `mamba`: the selective state-space block (Gu & Dao 2023). Symbols: N = d_state, E = expand.

    impl: the selective scan's implementation (`seqlab.ops.selective_scan`). "auto" (the default) runs the fused
    numba kernel when the optional `kernels` extra is installed, the tensors are on the CPU and compute in fp32
    (fp32, bf16, fp16 models), and the chunked form otherwise (a GPU, fp64, no numba): the rule of
    `seqlab.ops.selective_scan.resolve_impl`, applied at every call to the tensors it gets. The config keeps
    "auto", so a checkpoint saved with it loads and runs on machines with and without the extra;
    `seqlab.models.implementations(model)` says what it resolves to. "kernel" asks for the kernel outright (an
    InputError without the extra), "chunked" and "ref" (the loop twin) for those.
    """

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None means ceil(d_model / 16), as published
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    chunk_size: int = 64  # chunked: steps per chunk; kernel: steps between the states kept for backward
    impl: str = "auto"
    proj_bias: bool = False  # biases on in_proj and out_proj (Hugging Face `use_bias`)
    conv_bias: bool = True  # a bias on the short convolution (Hugging Face `use_conv_bias`)

    def __post_init__(self) -> None:
        check_types(self, "mamba.")
        positive(self, "mamba.", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "chunk_size")
        choice("mamba.", "impl", self.impl, ("auto", "chunked", "ref", "kernel"))  # kernel: the `kernels` extra
        if self.dt_min > self.dt_max:
            raise InputError(f"config field 'mamba.dt_min' = {self.dt_min}: must be <= mamba.dt_max = {self.dt_max}")

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def rank(self, d_model: int) -> int:
        """dt_rank, the width of delta's low-rank projection."""
        return self.dt_rank or math.ceil(d_model / 16)


@dataclass(frozen=True)
class MambaState(State):
    conv: torch.Tensor  # (B, d_inner, d_conv - 1), the convolution's last inputs
    ssm: torch.Tensor  # (B, d_inner, N), fp32


@register_mixer("mamba", "mamba", MambaConfig)
class Mamba(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "mamba"):
        super().__init__()
        m = cfg.mamba
        self.cfg = m
        self.d_inner, self.dt_rank, self.N = m.d_inner(cfg.d_model), m.rank(cfg.d_model), m.d_state
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

    STATE_FORMULA = "(d_inner x d_state fp32 SSM + d_inner x (d_conv - 1) conv window) x batch"

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state, whatever T: the SSM state h (B, d_inner, N) in fp32 and the convolution's last
        d_conv - 1 inputs (B, d_inner, d_conv - 1) in the activations' dtype."""
        ssm = self.d_inner * self.N * torch.promote_types(dtype, torch.float32).itemsize
        return batch * (ssm + self.d_inner * (self.conv.kernel_size[0] - 1) * dtype.itemsize)

    def implementation(self) -> str:
        """The scan implementation this module's forward runs on its weights' device ("auto" resolved)."""
        return resolve_impl(self.cfg.impl, self.A_log.device, self.A_log.dtype)

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, MambaState]:
        B, T, _ = x.shape
        if T == 1 and state is not None:  # one token from a state: the O(1) recurrent update
            y, state = self.step(x[:, 0], state)
            return y.unsqueeze(1), state
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

    def bind(self, portable: bool = False) -> MambaWeights:
        """The weights `step` uses, captured once: lean projections, the conv kernel as (d_inner, d_conv), dt_proj
        transposed for an addmm that adds its bias (the bias the scan adds as delta_bias)."""
        return MambaWeights(linear_fn(self.in_proj, portable), linear_fn(self.x_proj, portable),
                            linear_fn(self.out_proj, portable),
                            self.dt_proj.weight.t(), self.dt_proj.bias, Decay(self.A_log), self.D,
                            self.conv.weight.squeeze(1), self.conv.bias)

    def step(self, x: torch.Tensor, state: MambaState,
             w: MambaWeights | None = None) -> tuple[torch.Tensor, MambaState]:
        """One token, x (B, D) -> (B, D): the convolution as a dot product with its window, then one update of h;
        nothing in here depends on how many tokens came before. The recurrence runs in fp32 (fp64 for fp64)
        whatever the weights' dtype."""
        w = w or self.bind()
        xs, z = w.in_proj(x).chunk(2, dim=-1)  # (B, d_inner) each
        xs, window = causal_conv1d_step(xs, state.conv, w.conv_w, w.conv_b)  # (B, d_inner)
        xs = F.silu(xs)
        dt, Bm, Cm = w.x_proj(xs).split([self.dt_rank, self.N, self.N], dim=-1)  # (B, .)
        cdt = state.ssm.dtype  # fp32 (fp64 for an fp64 model)
        if xs.dtype == cdt:
            delta = F.softplus(torch.addmm(w.dt_b, dt, w.dt_wt))  # (B, d_inner)
            y, h = selective_scan_update(state.ssm, xs, delta, w.A(), Bm, Cm, w.D, z)
        else:  # a bf16 / fp16 model: the discretization and the update in fp32, the output in the model's dtype
            delta = F.softplus(torch.mm(dt, w.dt_wt).to(cdt) + w.dt_b.to(cdt))
            y, h = selective_scan_update(state.ssm, xs.to(cdt), delta, w.A().to(cdt), Bm.to(cdt),
                                         Cm.to(cdt), w.D.to(cdt), z.to(cdt))
            y = y.to(xs.dtype)
        return w.out_proj(y), MambaState(window, h)


class Decay:
    """A = -exp(A_log) for the decode step, computed once and again only when A_log changes in place (its version
    counter moves). Under autograd, or for a tensor made under inference_mode (no version counter), it is computed
    at every call, so gradients reach A_log and nothing stale is ever used."""

    __slots__ = ("A_log", "version", "value")

    def __init__(self, A_log: torch.Tensor):
        self.A_log, self.version, self.value = A_log, None, None

    def __call__(self) -> torch.Tensor:
        A_log = self.A_log
        if torch.is_grad_enabled() or A_log.is_inference():
            return -torch.exp(A_log)
        if self.version != A_log._version:
            self.version, self.value = A_log._version, -torch.exp(A_log.detach())
        return self.value


class MambaWeights(NamedTuple):
    in_proj: Fn
    x_proj: Fn
    out_proj: Fn
    dt_wt: torch.Tensor  # (dt_rank, d_inner)
    dt_b: torch.Tensor  # (d_inner,)
    A: Decay  # A(): -exp(A_log), (d_inner, N)
    D: torch.Tensor  # (d_inner,)
    conv_w: torch.Tensor  # (d_inner, d_conv)
    conv_b: torch.Tensor | None
