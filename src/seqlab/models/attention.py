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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.models.blocks import Rotary
from seqlab.models.registry import register_mixer
from seqlab.models.state import State


class KVBuffer:
    """Preallocated keys and values, k, v (B, Hkv, capacity, hd), shared by the KVCaches that view it.

    `fill` is the high-water mark: entries [0, fill) may be seen by some cache, entries from `fill` on are free.
    Entries below `fill` are never written again, so a cache that views this buffer keeps its value whatever is
    decoded later.
    """

    __slots__ = ("k", "v", "fill")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fill: int):
        self.k, self.v, self.fill = k, v, fill

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def holding(cls, k: torch.Tensor, v: torch.Tensor, capacity: int) -> KVBuffer:
        """A new buffer with room for `capacity` entries, the first ones a copy of k, v (B, Hkv, S, hd)."""
        B, H, S, hd = k.shape
        buf = cls(k.new_empty(B, H, capacity, hd), v.new_empty(B, H, capacity, v.shape[-1]), S)
        buf.k[:, :, :S] = k
        buf.v[:, :, :S] = v
        return buf


@dataclass(frozen=True)
class KVCache(State):
    """Keys and values after rotation, k, v (B, Hkv, S, hd), and `pos`, the number of tokens seen so far.

    S == pos for full attention; S == min(pos, W) for sliding-window attention. `nbytes` counts these S entries
    (the used part of the cache): 2 x Hkv x hd x S x element size per sequence.

    Memory: outside autograd (`torch.no_grad` / `torch.inference_mode`, i.e. decoding), k and v are views into a
    preallocated `KVBuffer` and a new token is written in place after the last entry instead of concatenating the
    whole cache. The buffer holds S entries plus room to grow: it is allocated at S + max(S // 4, 64) entries when
    it fills up (so appending costs O(1) amortized and the allocation is at most 25% + 64 entries above S), or at
    exactly the size asked for by `Attention.reserve`; `capacity` and `allocated_nbytes` report it.

    Aliasing: a cache returned by a later step may share the buffer with this one, but it only ever writes past
    this cache's last entry, and only when nobody wrote there before (else it copies), so this cache stays a value:
    it can be reused, branched from or serialized at any time. `map` (and so `to`, `detach`) returns a compact copy
    with no spare room. With autograd on (training), caches are plain tensors joined by concatenation.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int
    buffer: KVBuffer | None = field(default=None, compare=False, repr=False, metadata={"transient": True})
    start: int = field(default=0, compare=False, repr=False, metadata={"transient": True})  # k == buffer.k[start:]

    @property
    def end(self) -> int:
        """The index in `buffer` just after the last entry of this cache."""
        return self.start + self.k.shape[2]

    @property
    def capacity(self) -> int:
        """Entries allocated (used + spare room)."""
        return self.buffer.capacity - self.start if self.buffer is not None else self.k.shape[2]

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated for this cache's keys and values, spare room included (>= nbytes)."""
        if self.buffer is None:
            return self.nbytes
        k, v = self.buffer.k[:, :, self.start:], self.buffer.v[:, :, self.start:]
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    def can_append(self, n: int) -> bool:
        """True when n more entries fit in place: the buffer has room and nothing was written after this cache."""
        b = self.buffer
        return b is not None and b.fill == self.end and self.end + n <= b.capacity

    def map(self, fn: Any) -> KVCache:
        return KVCache(fn(self.k), fn(self.v), self.pos)


def _room(n: int) -> int:
    """Entries to allocate for n used ones: 25% (at least 64) spare, so growth copies O(1) entries per token."""
    return n + max(n // 4, 64)


@register_mixer("attention")
@register_mixer("sliding_attention")
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "attention"):
        super().__init__()
        a = cfg.attention
        self.n_heads, self.kv_heads, self.head_dim = a.n_heads, a.kv_heads, cfg.head_dim
        self.window = a.window if name == "sliding_attention" else None
        self.wq = nn.Linear(cfg.d_model, a.n_heads * cfg.head_dim, bias=a.bias)
        self.wk = nn.Linear(cfg.d_model, a.kv_heads * cfg.head_dim, bias=a.bias)
        self.wv = nn.Linear(cfg.d_model, a.kv_heads * cfg.head_dim, bias=a.bias)
        self.wo = nn.Linear(a.n_heads * cfg.head_dim, cfg.d_model, bias=a.bias)
        # position="learned": positions enter once, at the embedding (GPT-2), so no rotation here
        self.rotary = Rotary(cfg.head_dim, a.rope_theta) if cfg.position == "rope" else None

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        B, T, _ = x.shape
        if T == 1 and state is not None and not torch.is_grad_enabled():  # decoding: one token into the cache
            y, state = self.step(x.view(B, -1), state)
            return y.unsqueeze(1), state
        pos0 = state.pos if state is not None else 0
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, pos0), self.rotary(k, pos0)
        buffer, start = None, 0
        if state is not None and torch.is_grad_enabled():
            k = torch.cat([state.k, k], dim=2)  # (B, Hkv, P + T, hd), differentiable
            v = torch.cat([state.v, v], dim=2)
        elif state is not None:
            buffer, start = self._append(state, k, v)
            end = buffer.fill
            k, v = buffer.k[:, :, start:end], buffer.v[:, :, start:end]  # (B, Hkv, P + T, hd), views
        y, state = self._attend(q, k, v, T, pos0, buffer, start)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), state  # (B, T, D)

    def step(self, x: torch.Tensor, state: KVCache, proj: tuple | None = None) -> tuple[torch.Tensor, KVCache]:
        """One token from a cache, outside autograd: x (B, D) -> (B, D). The new k, v are written into the cache's
        buffer (`_append`), then one query attends to the cached keys. proj: the (wq, wk, wv, wo) callables, the
        layers themselves by default (a `seqlab.infer.plan.DecodePlan` passes lighter ones)."""
        wq, wk, wv, wo = proj or (self.wq, self.wk, self.wv, self.wo)
        B = x.shape[0]  # (B, H * hd) is (B, H, 1, hd) as a view: no transpose
        q, k = wq(x).view(B, self.n_heads, 1, self.head_dim), wk(x).view(B, self.kv_heads, 1, self.head_dim)
        v = wv(x).view(B, self.kv_heads, 1, self.head_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, state.pos), self.rotary(k, state.pos)
        buffer, start = self._append(state, k, v)
        k, v = buffer.k[:, :, start:buffer.fill], buffer.v[:, :, start:buffer.fill]  # (B, Hkv, P + 1, hd), views
        y, state = self._attend(q, k, v, 1, state.pos, buffer, start)  # (B, H, 1, hd)
        return wo(y.reshape(B, -1)), state

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T: int, pos0: int, buffer: KVBuffer | None,
                start: int) -> tuple[torch.Tensor, KVCache]:
        """Attention of q (B, H, T, hd) over k, v (B, Hkv, P + T, hd), and the cache after it (only the last W keys
        kept for a sliding window): (y (B, H, T, hd), KVCache)."""
        P = k.shape[2] - T
        mask = self._mask(T, P, q.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and P == 0 and T > 1,
            enable_gqa=self.kv_heads != self.n_heads,
        )
        if self.window is not None and k.shape[2] > self.window:
            start += k.shape[2] - self.window  # only the last W keys are ever seen again
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
        return y, KVCache(k, v, pos0 + T, buffer, start)

    def _append(self, state: KVCache, k: torch.Tensor, v: torch.Tensor) -> tuple[KVBuffer, int]:
        """Write the new k, v (B, Hkv, T, hd) after the cache's entries: in place when `state` owns the buffer's
        tail and there is room, else into a new buffer with spare room. Returns the buffer and where the cache
        starts in it; the entries run up to `buffer.fill`."""
        T = k.shape[2]
        if state.can_append(T):
            buffer, start = state.buffer, state.start
        else:
            S = state.k.shape[2]
            buffer, start = KVBuffer.holding(state.k.to(k.dtype), state.v.to(v.dtype), _room(S + T)), 0
        end = start + state.k.shape[2]
        buffer.k[:, :, end:end + T] = k
        buffer.v[:, :, end:end + T] = v
        buffer.fill = end + T
        return buffer, start

    def reserve(self, state: KVCache, n: int) -> KVCache:
        """A cache equal to `state` with room for n more tokens without reallocating (one copy at most).

        Sliding-window caches never need more than W + n entries, so they get at most W + max(W // 4, 64) + 1.
        """
        S = state.k.shape[2]
        if self.window is not None:
            n = min(n, _room(self.window) + 1 - S)
        if n <= 0 or state.can_append(n):
            return state
        buffer = KVBuffer.holding(state.k, state.v, S + n)
        return KVCache(buffer.k[:, :, :S], buffer.v[:, :, :S], state.pos, buffer, 0)

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
