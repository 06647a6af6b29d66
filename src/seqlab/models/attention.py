"""Causal softmax self-attention with rotary positions, grouped-query heads and a KV cache.

Glossary
    H     attention.n_heads, query heads
    Hkv   attention.kv_heads, key/value heads (Hkv divides H; Hkv < H is grouped-query attention)
    hd    head_dim = D / H
    W     attention.window (sliding_attention only): a query sees itself and the W tokens before it
    P     number of cached positions before the current chunk

`attention` keeps every key and value: its cache, and so its memory and per-token cost, grows with the context.
`sliding_attention` keeps the last W: its cache stops growing once the context passes W tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.models.blocks import Rotary
from seqlab.models.registry import register_mixer
from seqlab.models.state import State


@dataclass(frozen=True)
class KVCache(State):
    """Keys and values after rotation, k, v (B, Hkv, S, hd), and `pos`, the number of tokens seen so far.

    S == pos for full attention; S == min(pos, W) for sliding-window attention.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int


@register_mixer("attention")
@register_mixer("sliding_attention")
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "attention"):
        super().__init__()
        a = cfg.attention
        self.n_heads, self.kv_heads, self.head_dim = a.n_heads, a.kv_heads, cfg.head_dim
        self.window = a.window if name == "sliding_attention" else None
        self.wq = nn.Linear(cfg.d_model, a.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, a.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, a.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.head_dim, a.rope_theta)

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        B, T, _ = x.shape
        pos0 = state.pos if state is not None else 0
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, pos0), self.rotary(k, pos0)
        if state is not None:
            k = torch.cat([state.k, k], dim=2)  # (B, Hkv, P + T, hd)
            v = torch.cat([state.v, v], dim=2)
        P = k.shape[2] - T
        mask = self._mask(T, P, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and P == 0 and T > 1,
            enable_gqa=self.kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        y = self.wo(y.transpose(1, 2).reshape(B, T, -1))
        if self.window is not None:
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]  # only the last W keys are ever seen again
        return y, KVCache(k, v, pos0 + T)

    def _mask(self, T: int, P: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (T, P + T) mask, True where query i may see key j; None where is_causal or no mask suffices."""
        sees_all_cache = self.window is None or P + T - 1 <= self.window
        if (P == 0 or T == 1) and sees_all_cache:
            return None  # plain causal (P == 0) or one query that sees every key
        qpos = torch.arange(P, P + T, device=device)[:, None]  # positions relative to the first cached key
        kpos = torch.arange(P + T, device=device)[None, :]
        mask = kpos <= qpos
        if self.window is not None:
            mask &= qpos - kpos <= self.window
        return mask
