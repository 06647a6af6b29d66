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

    def forward(self, x: torch.Tensor, pos0: int) -> torch.Tensor:  # x (B, H, T, hd)
        T = x.shape[-2]
        pos = torch.arange(pos0, pos0 + T, device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)  # (T, hd)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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

    def forward(self, x: torch.Tensor, state=None):  # x (B, T, D)
        h, state = self.mixer(self.norm1(x), state)
        x = x + self.post_norm1(h)
        if self.mlp is not None:
            x = x + self.post_norm2(self.mlp(self.norm2(x)))
        return x, state
