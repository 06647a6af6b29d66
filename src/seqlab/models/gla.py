"""Gated linear attention (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training").

Glossary (code name: paper symbol)
    H        gla.n_heads
    dk, dv   key and value width per head: D * gla.expand_k / H and D * gla.expand_v / H
    alpha    the forget gate, alpha_t = sigmoid(low-rank(x_t))^(1/tau), applied as g_t = log alpha_t
             = logsigmoid(.) / tau (tau = gla.gate_logit_normalizer), per key dimension
    S        the state, (B, H, dk, dv), fp32

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,     o_t = q_t S_t / sqrt(dk)
    out = out_proj(rmsnorm_per_head(o) * silu(W_r x))        (the output gate)

A call with T == 1 from a state takes `step`: one O(dk * dv) update per head, no scan machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig, Section, check_types, choice, positive
from seqlab.errors import InputError
from seqlab.models.blocks import Fn, linear_fn, norm_fn
from seqlab.models.registry import register_mixer
from seqlab.models.state import State
from seqlab.ops import gla, gla_update
from seqlab.ops.selective_scan import resolve_impl


@dataclass(frozen=True)
class GLAConfig(Section):
    """Config section `gla`: gated linear attention (Yang et al. 2024), multi-head, with output gate and norm.

    impl: the recurrence's implementation (`seqlab.ops.gla`). "auto" (the default) runs the fused numba kernel when
    the optional `kernels` extra is installed, the tensors are on the CPU and compute in fp32, and the chunked form
    otherwise (a GPU, fp64, no numba): `seqlab.ops.selective_scan.resolve_impl`, applied at every call; the config
    keeps "auto". The kernel measured 1.5-10x the chunked form's speed forward + backward at every size measured,
    the tests' and the quick lab's included (benchmarks/bench_kernels.py --gla [--small] [--chunk-size 64]).
    "kernel" asks for it outright (an InputError without the extra), "chunked" and "ref" (the loop twin) for those.
    chunk_size: steps per chunk (chunked) or between the states kept for backward (kernel).
    """

    n_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank: int = 16
    gate_logit_normalizer: float = 16.0
    chunk_size: int = 64
    impl: str = "auto"

    def __post_init__(self) -> None:
        check_types(self, "gla.")
        positive(self, "gla.", "n_heads", "expand_k", "expand_v", "gate_low_rank", "gate_logit_normalizer",
                 "chunk_size")
        choice("gla.", "impl", self.impl, ("auto", "chunked", "ref", "kernel"))  # kernel: the `kernels` extra

    def d_key(self, d_model: int) -> int:
        return int(d_model * self.expand_k)

    def d_value(self, d_model: int) -> int:
        return int(d_model * self.expand_v)

    def check_model(self, cfg: ModelConfig) -> None:
        """The key and value widths split into whole heads."""
        if "gla" not in cfg.layer_mixers:
            return
        for name, width in (("expand_k", self.d_key(cfg.d_model)), ("expand_v", self.d_value(cfg.d_model))):
            if width % self.n_heads or width == 0:
                raise InputError(f"config field 'gla.{name}' = {getattr(self, name)}: d_model * {name} = {width} "
                                 f"must be a positive multiple of gla.n_heads = {self.n_heads}")


@dataclass(frozen=True)
class GLAState(State):
    S: torch.Tensor  # (B, H, dk, dv), fp32


@register_mixer("gla", "gla", GLAConfig)
class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "gla"):
        super().__init__()
        g = cfg.gla
        self.cfg = g
        self.H = g.n_heads
        d_key, d_value = g.d_key(cfg.d_model), g.d_value(cfg.d_model)
        self.dk, self.dv = d_key // g.n_heads, d_value // g.n_heads
        self.q_proj = nn.Linear(cfg.d_model, d_key, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, d_key, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, d_value, bias=False)
        self.gate_proj = nn.Linear(cfg.d_model, d_value, bias=False)  # output gate W_r
        self.gk_down = nn.Linear(cfg.d_model, g.gate_low_rank, bias=False)  # forget gate, low rank
        self.gk_up = nn.Linear(g.gate_low_rank, d_key, bias=True)
        self.norm = nn.RMSNorm(self.dv, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(d_value, cfg.d_model, bias=False)

    STATE_FORMULA = "n_heads x d_key/n_heads x d_value/n_heads fp32 x batch"

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state, whatever T: one (dk, dv) matrix per head, (B, H, dk, dv), in fp32."""
        return batch * self.H * self.dk * self.dv * torch.promote_types(dtype, torch.float32).itemsize

    def implementation(self) -> str:
        """The implementation this module's forward runs on its weights' device ("auto" resolved)."""
        return resolve_impl(self.cfg.impl, self.q_proj.weight.device, self.q_proj.weight.dtype)

    def _heads(self, t: torch.Tensor, d: int) -> torch.Tensor:  # (B, T, H * d) -> (B, H, T, d)
        B, T, _ = t.shape
        return t.view(B, T, self.H, d).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: GLAState | None = None) -> tuple[torch.Tensor, GLAState]:
        B, T, _ = x.shape
        if T == 1 and state is not None:  # one token from a state: the O(1) recurrent update
            y, state = self.step(x[:, 0], state)
            return y.unsqueeze(1), state
        q = self._heads(self.q_proj(x), self.dk)
        k = self._heads(self.k_proj(x), self.dk)
        v = self._heads(self.v_proj(x), self.dv)
        gk = F.logsigmoid(self.gk_up(self.gk_down(x))) / self.cfg.gate_logit_normalizer
        gk = self._heads(gk, self.dk)  # (B, H, T, dk), log forget gate <= 0
        o, S = gla(q, k, v, gk, initial_state=None if state is None else state.S, return_final_state=True,
                   impl=self.cfg.impl, chunk_size=self.cfg.chunk_size)
        o = self.norm(o).transpose(1, 2).reshape(B, T, -1)  # (B, T, H * dv)
        return self.out_proj(o * F.silu(self.gate_proj(x))), GLAState(S)

    def bind(self, portable: bool = False) -> GLAWeights:
        """The weights `step` uses, captured once as lean callables."""
        return GLAWeights(*(linear_fn(m, portable) for m in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj,
                                                    self.gk_down, self.gk_up, self.out_proj)),
                          norm_fn(self.norm, portable))

    def step(self, x: torch.Tensor, state: GLAState, w: GLAWeights | None = None) -> tuple[torch.Tensor, GLAState]:
        """One token, x (B, D) -> (B, D): one O(dk * dv) update per head, in fp32 (fp64 for fp64)."""
        w = w or self.bind()
        B, H, cdt = x.shape[0], self.H, state.S.dtype
        q = w.q_proj(x).view(B, H, self.dk)
        k = w.k_proj(x).view(B, H, self.dk)
        v = w.v_proj(x).view(B, H, self.dv)
        gk = (F.logsigmoid(w.gk_up(w.gk_down(x))) / self.cfg.gate_logit_normalizer).view(B, H, self.dk)
        q = q.to(cdt) * self.dk ** -0.5
        o, S = gla_update(state.S, q, k.to(cdt), v.to(cdt), gk.to(cdt))  # o (B, H, dv)
        o = w.norm(o.to(x.dtype)).reshape(B, -1)  # (B, H * dv)
        return w.out_proj(o * F.silu(w.gate_proj(x))), GLAState(S)


class GLAWeights(NamedTuple):
    q_proj: Fn
    k_proj: Fn
    v_proj: Fn
    gate_proj: Fn
    gk_down: Fn
    gk_up: Fn
    out_proj: Fn
    norm: Fn
