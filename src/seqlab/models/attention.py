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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig, Section, check_types, positive
from seqlab.errors import InputError
from seqlab.models.blocks import Fn, Rotary, linear_fn
from seqlab.models.registry import register_mixer
from seqlab.models.state import State


@dataclass(frozen=True)
class AttentionConfig(Section):
    """Config section `attention`: softmax attention (`attention`) and its sliding-window variant
    (`sliding_attention`)."""

    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads (plain multi-head)
    window: int = 64  # sliding_attention: a query sees itself and the `window` tokens before it
    rope_theta: float = 10000.0
    bias: bool = False  # biases on the q, k, v and output projections (GPT-2)

    def __post_init__(self) -> None:
        check_types(self, "attention.")
        positive(self, "attention.", "n_heads", "n_kv_heads", "window", "rope_theta")
        if self.n_heads % self.kv_heads:
            raise InputError(
                f"config field 'attention.n_kv_heads' = {self.n_kv_heads}: must divide "
                f"attention.n_heads = {self.n_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def head_dim(self, d_model: int) -> int:
        return d_model // self.n_heads

    def check_model(self, cfg: ModelConfig) -> None:
        """Sizes that depend on the model: heads divide d_model, rotary needs an even head width."""
        if not {"attention", "sliding_attention"} & set(cfg.layer_mixers):
            return
        if cfg.d_model % self.n_heads:
            raise InputError(f"config field 'd_model' = {cfg.d_model}: must be divisible by attention.n_heads = "
                             f"{self.n_heads}")
        if cfg.position == "rope" and self.head_dim(cfg.d_model) % 2:
            raise InputError(f"config field 'd_model' = {cfg.d_model}: d_model / attention.n_heads = "
                             f"{self.head_dim(cfg.d_model)} must be even for rotary embeddings")


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

    Two kinds, chosen by who made the cache, never by the grad mode. Decoding (`Attention.step`, and
    `Attention.reserve`, which `generate` and `Stream` call): k and v are views into a preallocated `KVBuffer` and a
    new token is written in place after the last entry instead of concatenating the whole cache; such a cache is
    for inference (a later in-place write would invalidate what autograd saved). Training (`Attention.forward` from
    no state or from a plain cache): plain tensors joined by concatenation, differentiable. The buffer holds S
    entries plus room to grow: it is allocated at S + max(S // 4, 64) entries when it fills up (so appending costs
    O(1) amortized and the allocation is at most 25% + 64 entries above S), or at exactly the size asked for by
    `Attention.reserve`; `capacity` and `allocated_nbytes` report it.

    Aliasing: a cache returned by a later step may share the buffer with this one, but it only ever writes past
    this cache's last entry, and only when nobody wrote there before (else it copies), so this cache stays a value:
    it can be reused, branched from or serialized at any time. `map` (and so `to`, `detach`) returns a compact plain
    copy with no spare room.
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

    time_axis: ClassVar[int] = 2  # grows with the context (the ONNX export gives it a dynamic axis)

    def map(self, fn: Any) -> KVCache:
        return KVCache(fn(self.k), fn(self.v), self.pos)

    def trim(self, n: int) -> KVCache:
        """A plain copy keeping the last n entries (a bounded context to carry between training segments)."""
        if self.k.shape[2] <= n:
            return self
        return KVCache(self.k[:, :, -n:], self.v[:, :, -n:], self.pos)


@dataclass(frozen=True)
class SlotCache(State):
    """A fixed-size cache for `Attention.step_slots`: k, v (B, Hkv, S, hd), slot i holds position i."""

    k: torch.Tensor
    v: torch.Tensor
    time_axis: ClassVar[int] = 2


def _room(n: int) -> int:
    """Entries to allocate for n used ones: 25% (at least 64) spare, so growth copies O(1) entries per token."""
    return n + max(n // 4, 64)


@register_mixer("sliding_attention", "attention", AttentionConfig)  # decorators apply bottom-up: attention first
@register_mixer("attention", "attention", AttentionConfig)
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "attention"):
        super().__init__()
        a = cfg.attention
        hd = a.head_dim(cfg.d_model)
        self.n_heads, self.kv_heads, self.head_dim = a.n_heads, a.kv_heads, hd
        self.window = a.window if name == "sliding_attention" else None
        self.wq = nn.Linear(cfg.d_model, a.n_heads * hd, bias=a.bias)
        self.wk = nn.Linear(cfg.d_model, a.kv_heads * hd, bias=a.bias)
        self.wv = nn.Linear(cfg.d_model, a.kv_heads * hd, bias=a.bias)
        self.wo = nn.Linear(a.n_heads * hd, cfg.d_model, bias=a.bias)
        # position="learned": positions enter once, at the embedding (GPT-2), so no rotation here
        self.rotary = Rotary(hd, a.rope_theta) if cfg.position == "rope" else None

    STATE_FORMULA = "2 x kv_heads x head_dim x T (sliding: x min(T, window)) x batch x element size"

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the cache after T tokens (`KVCache.nbytes`): 2 x Hkv x hd x T' x batch x element size, with
        T' = T, or min(T, W) for a sliding window. Keys and values are kept in the activations' dtype."""
        used = T if self.window is None else min(T, self.window)
        return 2 * self.kv_heads * self.head_dim * used * batch * dtype.itemsize

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """x (B, T, D), any T, continuing from `state`. How the new keys join the cache is the cache's own kind:
        a cache that holds a preallocated buffer (made by `step` or `reserve`: decoding, outside autograd) is
        appended to in place; a plain one (made by `forward`, or a copy made by `map` / `detach` / `to`) is
        concatenated with, which autograd can differentiate through (training with a carried state)."""
        B, T, _ = x.shape
        pos0 = state.pos if state is not None else 0
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, pos0), self.rotary(k, pos0)
        buffer, start = None, 0
        if state is not None and state.buffer is None:
            k = torch.cat([state.k, k], dim=2)  # (B, Hkv, P + T, hd), differentiable
            v = torch.cat([state.v, v], dim=2)
        elif state is not None:
            buffer, start = self._append(state, k, v)
            end = buffer.fill
            k, v = buffer.k[:, :, start:end], buffer.v[:, :, start:end]  # (B, Hkv, P + T, hd), views
        y, state = self._attend(q, k, v, T, pos0, buffer, start)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1)), state  # (B, T, D)

    def bind(self, portable: bool = False) -> tuple[Fn, Fn, Fn, Fn]:
        """The projections (wq, wk, wv, wo) as lean callables for `step` (see `seqlab.models.blocks`)."""
        return tuple(linear_fn(m, portable) for m in (self.wq, self.wk, self.wv, self.wo))  # type: ignore[return-value]

    def step(self, x: torch.Tensor, state: KVCache, w: tuple | None = None) -> tuple[torch.Tensor, KVCache]:
        """One token from a cache, for decoding (outside autograd): x (B, D) -> (B, D). The new k, v are written
        into the cache's buffer (`_append`, which makes one with spare room if the cache has none), then one
        query attends to the cached keys. w: `bind()`'s projections (made here when not given)."""
        wq, wk, wv, wo = w or self.bind()
        B = x.shape[0]  # (B, H * hd) is (B, H, 1, hd) as a view: no transpose
        q, k = wq(x).view(B, self.n_heads, 1, self.head_dim), wk(x).view(B, self.kv_heads, 1, self.head_dim)
        v = wv(x).view(B, self.kv_heads, 1, self.head_dim)
        if self.rotary is not None:
            q, k = self.rotary.step(q, k, state.pos)
        buffer, start = self._append(state, k, v)
        k, v = buffer.k[:, :, start:buffer.fill], buffer.v[:, :, start:buffer.fill]  # (B, Hkv, P + 1, hd), views
        y, state = self._attend(q, k, v, 1, state.pos, buffer, start)  # (B, H, 1, hd)
        return wo(y.reshape(B, -1)), state

    def step_slots(self, x: torch.Tensor, state: SlotCache, pos: torch.Tensor,
                   w: tuple | None = None) -> tuple[torch.Tensor, SlotCache]:
        """`step` on a fixed-size cache, for a graph whose sizes cannot grow (the ONNX export): k, v (B, Hkv, S,
        hd), slot i holds position i; `pos` (1,) is a tensor, the token's position. The new key goes to slot pos
        (a scatter) and the query sees slots <= pos (and >= pos - W with a window): the same attention as `step`
        over the same keys, written with elementary ops (grouped heads by a reshape, an explicit softmax)."""
        wq, wk, wv, wo = w or self.bind()
        B, H, Hkv, hd = x.shape[0], self.n_heads, self.kv_heads, self.head_dim
        S = state.k.shape[2]
        q, k, v = wq(x).view(B, H, 1, hd), wk(x).view(B, Hkv, 1, hd), wv(x).view(B, Hkv, 1, hd)
        if self.rotary is not None:
            q, k = self.rotary.at(q, pos), self.rotary.at(k, pos)
        index = pos.view(1, 1, 1, 1).expand(B, Hkv, 1, hd)
        k_cache, v_cache = state.k.scatter(2, index, k), state.v.scatter(2, index, v)  # slot pos <- the new key
        slots = torch.arange(S, device=x.device)
        visible = slots <= pos  # (S,): causal, and never an unwritten slot
        if self.window is not None:
            visible = visible & (pos - slots <= self.window)
        qg = q.reshape(B, Hkv, H // Hkv, hd)  # (B, Hkv, G, hd): heads h = g_kv * G + j
        scores = (qg @ k_cache.transpose(-1, -2)) * hd ** -0.5  # (B, Hkv, G, S)
        y = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v_cache  # (B, Hkv, G, hd)
        return wo(y.reshape(B, H * hd)), SlotCache(k_cache, v_cache)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T: int, pos0: int, buffer: KVBuffer | None,
                start: int) -> tuple[torch.Tensor, KVCache]:
        """Attention of q (B, H, T, hd) over k, v (B, Hkv, P + T, hd), and the cache after it (only the last W keys
        kept for a sliding window): (y (B, H, T, hd), KVCache)."""
        P = k.shape[2] - T
        mask = self._mask(T, P, q.device)
        if T == 1 and mask is None and not torch.is_grad_enabled():  # one decoding query that sees every key
            y = _one_query(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and P == 0 and T > 1,
                enable_gqa=self.kv_heads != self.n_heads,
            )
        if self.window is not None and k.shape[2] > self.window:
            start += k.shape[2] - self.window  # only the last W keys are ever seen again
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]
            if buffer is None:  # plain tensors: copy, since views would keep every key of the chunk alive
                k, v = k.clone(), v.clone()
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


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for one query per head, q (B, H, 1, hd) over k, v (B, Hkv, S, hd) -> (B, H, 1,
    hd), with the G = H / Hkv query heads of a group as the rows of one product against their shared keys. CPU
    SDPA with enable_gqa (torch 2.13) reads the cache as if every query head had its own copy: at 32k cached
    tokens of SmolLM2's shape (9 query heads on 3 KV heads) this is 3.2 ms per layer against SDPA's 6.0."""
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, hd)  # (B, Hkv, G, hd): head h = group h // G, row h % G
    scores = (qg @ k.transpose(-1, -2)) * hd ** -0.5  # (B, Hkv, G, S)
    return (scores.softmax(dim=-1) @ v).reshape(B, H, 1, hd)
