"""Decode plans: one token of a `LanguageModel`, written against its weights, for the per-token loop of `generate`.

    step = DecodePlan.build(model) or model       # None when the model is not one a plan covers
    logits, state = step(tokens, state)           # tokens (B, 1): the same logits and state as model(tokens, state)

Why: at batch 1 on a CPU, a decode step of a small model is a few dozen tiny tensor ops, and their fixed costs
dominate: an nn.Module call around a linear layer (with `F.linear`'s argument handling) costs about as much as the
product itself. A plan captures every weight once (no copy: the parameters themselves, and transposed views of
them), keeps activations 2-D (B, D) and calls `addmm` directly. benchmarks/bench_profile.py measures what this buys
against `transformers`; tests/test_decode_plan.py checks that it returns the module path's logits and states for
every mixer, norm, MLP and attention variant.

What a plan covers, and what it does not:
- `LanguageModel`s whose weights are fp32 or fp64. Attention layers (full, sliding, grouped-query, RoPE or learned
  positions) run their own `Attention.step` (the module's one-token path too) with addmm projections, Mamba layers
  a leaner copy of `Mamba.step` (see `_mamba_step`); every other mixer (lstm, gru, conv, gla) is called as its
  module, and so is any linear layer that is not a plain `nn.Linear` (int8 layers, for one).
- It is built for one run of decoding: it holds the parameters, not copies, so in-place updates are seen, but a
  module or parameter replaced after `build` (another device, `quantize`, `load_state_dict(assign=True)`) is not.
  `generate` builds one per call (well under a millisecond); a `Stream` builds one on its first one-token feed.
- Token ids are checked as the model checks them (one clear error); module hooks do not run per token
  (`generate(..., plan=False)` decodes through `model(...)` instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.models.attention import Attention, KVCache
from seqlab.models.blocks import MLP, Block
from seqlab.models.lm import LanguageModel
from seqlab.models.mamba import Mamba, MambaState
from seqlab.models.state import ModelState
from seqlab.ops.selective_scan import _skip_and_gate, _step

Fn = Callable[[torch.Tensor], torch.Tensor]


class DecodePlan:
    """The per-token step of one `LanguageModel`: (tokens (B, 1), ModelState) -> (logits (B, 1, V), ModelState)."""

    def __init__(self, model: LanguageModel):
        self.model = model
        self.embed = model.embed.weight
        self.pos_embed = model.pos_embed.weight if model.pos_embed is not None else None
        self.max_positions = model.config.max_positions
        self.layers = [_block_step(block) for block in model.blocks]
        self.norm = _norm(model.norm)
        self.head = _linear(model.head) if model.head is not None else _tied_head(model.embed.weight)

    @classmethod
    def build(cls, model: Any) -> DecodePlan | None:
        """A plan for `model`, or None when it is not a `LanguageModel` with fp32 / fp64 weights."""
        if not isinstance(model, LanguageModel):
            return None
        if any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters()):
            return None
        return cls(model)

    def __call__(self, tokens: torch.Tensor, state: ModelState | None) -> tuple[torch.Tensor, ModelState]:
        if (not isinstance(state, ModelState) or len(state.layers) != len(self.layers)
                or not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != 1
                or torch.is_grad_enabled() or (self.pos_embed is not None and state.pos >= self.max_positions)):
            return self.model(tokens, state)  # not a decode step, or bad input (the model says what is wrong)
        self.model.check_tokens(tokens)  # ids out of range: the model's own error
        pos = state.pos
        x = self.embed[tokens[:, 0]]  # (B, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed[pos]
        new = []
        for step, s in zip(self.layers, state.layers):
            x, s = step(x, s)
            new.append(s)
        return self.head(self.norm(x)).unsqueeze(1), ModelState(tuple(new), pos + 1)


# ---------------------------------------------------------------------------------------------------------------
# Pieces: each takes and returns 2-D activations (B, width)


def _linear(m: nn.Module) -> Fn:
    """y = x W^T + b by one addmm on a transposed view of the weight; other layer types are called as modules."""
    if type(m) is not nn.Linear:
        return m
    wt, b = m.weight.t(), m.bias
    if b is None:
        return lambda x: torch.mm(x, wt)
    return lambda x: torch.addmm(b, x, wt)


def _tied_head(embed: torch.Tensor) -> Fn:
    et = embed.t()
    return lambda x: torch.mm(x, et)


def _norm(m: nn.Module) -> Fn | None:
    """The functional form of a LayerNorm / RMSNorm; None for Identity (a sandwich norm that is off)."""
    if isinstance(m, nn.Identity):
        return None
    if type(m) is nn.LayerNorm:
        shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    if type(m) is nn.RMSNorm:
        shape, w, eps = m.normalized_shape, m.weight, m.eps
        return lambda x: F.rms_norm(x, shape, w, eps)
    return m


def _mlp(m: MLP | None) -> Fn | None:
    if m is None:
        return None
    w1, w2 = _linear(m.w1), _linear(m.w2)
    if m.w3 is not None:
        w3 = _linear(m.w3)
        return lambda x: w2(F.silu(w1(x)) * w3(x))
    approximate = "tanh" if m.kind == "gelu_tanh" else "none"
    return lambda x: w2(F.gelu(w1(x), approximate=approximate))


def _block_step(block: Block) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]:
    """Block.forward for one token: x + mixer(norm(x)), then x + mlp(norm(x)), post norms when sandwiched."""
    norm1, norm2 = _norm(block.norm1), _norm(block.norm2) if block.norm2 is not None else None
    post1, post2 = _norm(block.post_norm1), _norm(block.post_norm2)
    mixer, mlp = _mixer_step(block.mixer), _mlp(block.mlp)

    def step(x: torch.Tensor, s: Any) -> tuple[torch.Tensor, Any]:
        h, s = mixer(norm1(x), s)
        x = x + (post1(h) if post1 is not None else h)
        if mlp is not None:
            h = mlp(norm2(x))
            x = x + (post2(h) if post2 is not None else h)
        return x, s

    return step


def _mixer_step(mixer: nn.Module) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]:
    if type(mixer) is Attention:
        return _attention_step(mixer)
    if type(mixer) is Mamba:
        return _mamba_step(mixer)

    def module_step(x: torch.Tensor, s: Any) -> tuple[torch.Tensor, Any]:  # any other mixer: its own T == 1 path
        y, s = mixer(x.unsqueeze(1), s)
        return y.squeeze(1), s

    return module_step


def _attention_step(a: Attention) -> Callable[[torch.Tensor, KVCache], tuple[torch.Tensor, KVCache]]:
    """`Attention.step` with the projections as addmm closures."""
    proj = tuple(_linear(m) for m in (a.wq, a.wk, a.wv, a.wo))
    return lambda x, s: a.step(x, s, proj)


def _mamba_step(m: Mamba) -> Callable[[torch.Tensor, MambaState], tuple[torch.Tensor, MambaState]]:
    """Mamba.step with its per-call constants hoisted: A = -exp(A_log) is computed again only when A_log's version
    counter moves (an in-place update; every step for a model built under inference_mode, whose tensors have no
    counter), the conv kernel is viewed as (d_inner, k), and the dt_proj bias enters through addmm (softplus(dt W^T
    + b), as the scan's delta_bias adds it). Not `Mamba.step` itself with lighter projections (as attention does):
    that step goes through `selective_scan_step`'s input checks and dtype casts (needed for bf16 models, no-ops
    here) and recomputes A, and calling it measured 2.8x instead of 3.5x transformers' tokens/s."""
    in_proj, x_proj, out_proj = _linear(m.in_proj), _linear(m.x_proj), _linear(m.out_proj)
    dt_wt, dt_b, A_log, D = m.dt_proj.weight.t(), m.dt_proj.bias, m.A_log, m.D
    conv_w, conv_b = m.conv.weight.squeeze(1), m.conv.bias  # (d_inner, d_conv)
    split = [m.dt_rank, m.N, m.N]
    A_at: list[Any] = [None, None]  # [A_log's version, A]

    def step(x: torch.Tensor, s: MambaState) -> tuple[torch.Tensor, MambaState]:
        if A_log.is_inference():  # made under inference_mode: no version counter, so computed every step
            A = -torch.exp(A_log.float())
        else:
            if A_at[0] != A_log._version:
                A_at[:] = A_log._version, -torch.exp(A_log.detach().float())
            A = A_at[1]
        xs, z = in_proj(x).chunk(2, dim=-1)  # (B, d_inner) each
        window = torch.cat([s.conv, xs.unsqueeze(-1)], dim=-1)  # (B, d_inner, d_conv)
        xs = (window * conv_w).sum(-1)
        if conv_b is not None:
            xs = xs + conv_b
        xs = F.silu(xs)
        dt, Bm, Cm = x_proj(xs).split(split, dim=-1)
        delta = F.softplus(torch.addmm(dt_b, dt, dt_wt))
        h, y = _step(s.ssm, xs, delta, A, Bm, Cm)
        return out_proj(_skip_and_gate(y, xs, D, z)), MambaState(window[..., 1:], h)

    return step
