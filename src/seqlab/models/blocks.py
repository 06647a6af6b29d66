"""Shared building blocks: norms, the MLP, rotary position embeddings, and the residual block.

Glossary
    D      d_model, the residual stream width
    F      the MLP hidden width (`ModelConfig.ff_dim`)
    theta  the RoPE base (`attention.rope_theta`)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.models.registry import build_mixer


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class MLP(nn.Module):
    """SwiGLU (w2(silu(w1 x) * w3 x)) or GELU (w2(gelu(w1 x))) feed-forward layer; biases only with `mlp_bias`.

    `gelu_tanh` is GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), which GPT-2 uses.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.w1 = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.mlp_bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.mlp_bias) if cfg.mlp == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), "rotate half" layout: dims i and i + d/2 form a pair.

    The angle of pair i at position p is p * theta^(-2i/d). Positions are absolute, so a chunk that starts at
    position p0 (continuing from a cache) is rotated exactly as it would be inside one long call.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # cos and signed sin tables for positions [0, len), fp32, built on first use and grown by doubling; derived
        # values only (never in the state_dict), rebuilt from inv_freq when its device or dtype changes
        self.register_buffer("cos_table", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, head_dim), persistent=False)

    def _tables(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables, (n, hd) with n >= end: cos(angle) twice, and -sin(angle) then sin(angle), so that
        rotate_half(x) * sin == roll(x, hd/2) * signed sin."""
        cos, sin = self.cos_table, self.sin_table
        if cos.shape[0] < end or cos.dtype != torch.float32 or cos.device != self.inv_freq.device:
            n = max(end, 2 * cos.shape[0], 64)
            with torch.inference_mode(False):  # a table built while decoding must stay usable when training
                cos, sin = self._build(n)
            self.cos_table, self.sin_table = cos, sin
        return cos, sin

    def _build(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.inv_freq
        angles = torch.outer(torch.arange(n, device=f.device, dtype=torch.float32), f)  # (n, hd/2)
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1)  # (n, hd)
        sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
        return cos, sin

    def forward(self, x: torch.Tensor, pos0: int) -> torch.Tensor:  # x (B, H, T, hd)
        T = x.shape[-2]
        cos, sin = self._tables(pos0 + T)
        cos, sin = cos[pos0:pos0 + T], sin[pos0:pos0 + T]  # (T, hd)
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] = roll(x, hd/2) * [-1, 1]
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)).

    With `sandwich_norm` the mixer and MLP outputs are normalized too before they join the residual stream, which
    keeps a latent state bounded when a block is iterated many times (recurrent depth).
    """

    def __init__(self, cfg: ModelConfig, mixer: str):
        super().__init__()
        self.mixer_name = mixer
        self.norm1 = make_norm(cfg)
        self.mixer = build_mixer(mixer, cfg)
        self.post_norm1 = make_norm(cfg) if cfg.sandwich_norm else nn.Identity()
        self.mlp = MLP(cfg) if cfg.mlp != "none" else None
        self.norm2 = make_norm(cfg) if self.mlp is not None else None
        self.post_norm2 = make_norm(cfg) if cfg.sandwich_norm and self.mlp is not None else nn.Identity()
        self.sandwich = cfg.sandwich_norm  # post norms are Identity otherwise: not called at all (fewer calls/token)

    def forward(self, x: torch.Tensor, state=None):  # x (B, T, D)
        h, state = self.mixer(self.norm1(x), state)
        x = x + (self.post_norm1(h) if self.sandwich else h)
        if self.mlp is not None:
            h = self.mlp(self.norm2(x))
            x = x + (self.post_norm2(h) if self.sandwich else h)
        return x, state
