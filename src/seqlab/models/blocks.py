"""Shared building blocks: norms, the MLP, rotary position embeddings, and the residual block.

Glossary
    D      d_model, the residual stream width
    F      the MLP hidden width (`ModelConfig.ff_dim`)
    theta  the RoPE base (`attention.rope_theta`)

Two paths through every module, one formula each:
    forward(x, state)        x (B, T, D): training, prefill; any T
    step(x, state, w)        x (B, D): one token, decoding. `w = module.bind()` captures the weights once as lean
                             callables (`linear_fn`: one addmm on a transposed view, no nn.Module call around it),
                             which is what a decode plan (`seqlab.infer.plan`) and the ONNX export hold on to.
At batch 1 on a CPU, a step is a few dozen tiny ops and an nn.Module call around each linear costs about as much
as the product itself, hence `bind`. `bind(portable=True)` spells RMSNorm out (x * rsqrt(mean(x^2) + eps) * w),
which the TorchScript ONNX exporter can translate and `F.rms_norm` it cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.models.int8 import Int8Linear
from seqlab.models.registry import build_mixer

Fn = Callable[[torch.Tensor], torch.Tensor]
StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]  # (x (B, D), state) -> (y (B, D), state)


def linear_fn(m: nn.Module, portable: bool = False) -> Fn:
    """y = x W^T + b as one addmm on a transposed view of the weight (x 2-D); an int8 layer as its `step_fn` (its
    `decode`; portable: the module itself, whose dequantizing forward the ONNX exporter translates); any other layer
    type as itself, called as a module. Holds the parameters, not copies."""
    if isinstance(m, Int8Linear) and not portable:
        return m.step_fn()
    if type(m) is not nn.Linear:
        return m
    wt, b = m.weight.t(), m.bias
    if b is None:
        return lambda x: torch.mm(x, wt)
    return lambda x: torch.addmm(b, x, wt)


def norm_fn(m: nn.Module, portable: bool = False) -> Fn | None:
    """The functional form of a LayerNorm / RMSNorm module (None for Identity: a sandwich norm that is off).
    portable: RMSNorm written out in elementary ops (for the ONNX exporter)."""
    if isinstance(m, nn.Identity):
        return None
    if type(m) is nn.LayerNorm:
        shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    if type(m) is nn.RMSNorm:
        shape, w, eps = m.normalized_shape, m.weight, m.eps
        if portable:
            eps = eps if eps is not None else torch.finfo(torch.float32).eps
            return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        return lambda x: F.rms_norm(x, shape, w, eps)
    return m


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
        return _mlp(x, self.w1, self.w2, self.w3, self.approximate)

    @property
    def approximate(self) -> str:
        return "tanh" if self.kind == "gelu_tanh" else "none"

    def bind(self, portable: bool = False) -> Fn:
        """The MLP on (B, D) activations with lean linears."""
        w1, w2, approximate = linear_fn(self.w1, portable), linear_fn(self.w2, portable), self.approximate
        w3 = linear_fn(self.w3, portable) if self.w3 is not None else None
        return lambda x: _mlp(x, w1, w2, w3, approximate)


def _mlp(x: torch.Tensor, w1: Fn, w2: Fn, w3: Fn | None, approximate: str) -> torch.Tensor:
    if w3 is not None:
        return w2(F.silu(w1(x)) * w3(x))
    return w2(F.gelu(w1(x), approximate=approximate))


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
        if cos.shape[0] < end or cos.dtype != self._dtype() or cos.device != self.inv_freq.device:
            n = max(end, 2 * cos.shape[0], 64)
            with torch.inference_mode(False):  # a table built while decoding must stay usable when training
                cos, sin = self._build(n)
            self.cos_table, self.sin_table = cos, sin
        return cos, sin

    def _dtype(self) -> torch.dtype:
        """The angles' dtype: fp32 (also for a bf16 / fp16 model, whose inv_freq would lose the positions), fp64 for
        an fp64 model."""
        return torch.promote_types(self.inv_freq.dtype, torch.float32)

    def _build(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self._dtype()
        return _cos_sin(torch.arange(n, device=self.inv_freq.device, dtype=dtype), self.inv_freq.to(dtype))

    def forward(self, x: torch.Tensor, pos0: int) -> torch.Tensor:  # x (B, H, T, hd)
        T = x.shape[-2]
        cos, sin = self._tables(pos0 + T)
        return _rotate(x, cos[pos0:pos0 + T], sin[pos0:pos0 + T])  # tables (T, hd)

    def step(self, q: torch.Tensor, k: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, 1, hd) and k (B, Hkv, 1, hd) of one token at position `pos`, rotated: `forward(q, pos)` and
        `forward(k, pos)` with the tables' rows looked up once for both (a decode step's rotation; the lookup
        costs as much as the rotation at small sizes)."""
        cos, sin = self._tables(pos + 1)
        cos, sin = cos[pos], sin[pos]  # (hd,)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, hd) rotated at the absolute `positions` (T,), a tensor: angles computed, not looked up (the
        ONNX export, whose position is a graph input). Equals `forward(x, p0)` for positions p0 .. p0 + T - 1."""
        dtype = self._dtype()
        cos, sin = _cos_sin(positions.to(dtype), self.inv_freq.to(dtype))
        return _rotate(x, cos, sin)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(angle) twice and -sin(angle) then sin(angle), (n, hd), for angles positions x inv_freq (n, hd/2)."""
    angles = torch.outer(positions, inv_freq)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] = roll(x, hd/2) * [-1, 1] (sin signed)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
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
        post1, post2 = (self.post_norm1, self.post_norm2) if self.sandwich else (None, None)
        return residual(x, state, self.norm1, self.mixer, post1, self.mlp, self.norm2, post2)

    def bind(self, portable: bool = False) -> BlockWeights:
        """The block's weights for `step`: lean norms, the mixer's bound step, the bound MLP."""
        step, w = self.mixer.step, self.mixer.bind(portable)
        return BlockWeights(norm_fn(self.norm1, portable), lambda x, s: step(x, s, w),
                            norm_fn(self.post_norm1, portable), self.mlp.bind(portable) if self.mlp is not None
                            else None,
                            norm_fn(self.norm2, portable) if self.norm2 is not None else None,
                            norm_fn(self.post_norm2, portable))

    def step(self, x: torch.Tensor, state: Any, w: BlockWeights | None = None) -> tuple[torch.Tensor, Any]:
        """One token, x (B, D), from the mixer's state: the same residual formula as `forward`."""
        return residual(x, state, *(w or self.bind()))


class BlockWeights(NamedTuple):
    """What `Block.bind` captures; post norms are None when off."""

    norm1: Fn
    mixer: StepFn
    post1: Fn | None
    mlp: Fn | None
    norm2: Fn | None
    post2: Fn | None


def residual(x: torch.Tensor, state: Any, norm1: Fn, mixer: StepFn, post1: Fn | None, mlp: Fn | None,
             norm2: Fn | None, post2: Fn | None) -> tuple[torch.Tensor, Any]:
    """x + mixer(norm1(x)), then x + mlp(norm2(x)); each branch through its post norm when sandwiched."""
    h, state = mixer(norm1(x), state)
    x = x + (post1(h) if post1 is not None else h)
    if mlp is not None:
        h = mlp(norm2(x))
        x = x + (post2(h) if post2 is not None else h)
    return x, state
