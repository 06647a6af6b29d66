"""The language model: embedding -> n_layers residual blocks -> norm -> head.

    logits, state = model(tokens)                  # parallel over the whole sequence
    logits, state = model(tokens[:, -1:], state)   # continue from a state, one token or a chunk

    logits, state = model.step(tokens[:, -1], state)   # one token per sequence, (B,) -> logits (B, V)

Feeding a sequence in one call, in chunks, or token by token gives the same logits and the same final state.
`step` is the lean one-token path (each block's and mixer's `step`, weights bound once by `bind`) that decoding
and the ONNX export run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.models.blocks import Block, BlockWeights, Fn, linear_fn, make_norm, norm_fn, residual
from seqlab.models.int8 import TiedHead
from seqlab.models.state import ModelState, check_layer_state, note_layout


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # position="learned": an absolute position table added to the token embedding (GPT-2)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, name) for name in cfg.layer_mixers)
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`init_weights` for the linear and embedding weights, then each mixer's own published init wins."""
        init_weights(self, self.config)
        for block in self.blocks:
            if hasattr(block.mixer, "reset_parameters"):
                block.mixer.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def check_tokens(self, tokens: torch.Tensor, dims: int = 2) -> None:
        """tokens must be int64 ids in range, (batch, time) with time >= 1 (dims = 1: (batch,), for `step`)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != dims or tokens.shape[-1] < 1:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            want = "a (batch, time) tensor with time >= 1" if dims == 2 else "a (batch,) tensor, one token each"
            raise InputError(f"tokens must be {want}, got {shape}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"tokens must be int64 token ids, got dtype {tokens.dtype}")
        if tokens.numel() == 1:  # one token (decoding at batch 1): one read, no reduction
            lo = hi = int(tokens)
        else:
            lo, hi = (int(t) for t in torch.aminmax(tokens))  # one pass for both bounds
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"token id {bad} is out of range: expected 0 <= id < vocab_size = {self.config.vocab_size}"
            )

    def check_state(self, state: ModelState, batch: int) -> None:
        if not isinstance(state, ModelState) or len(state.layers) != len(self.blocks):
            raise InputError(
                f"state must be the ModelState this model returned ({len(self.blocks)} layers), got "
                f"{type(state).__name__}"
            )
        for i, (block, s) in enumerate(zip(self.blocks, state.layers)):  # each layer's class and tensor shapes
            if s is not None:  # None: that layer starts from zeros
                check_layer_state(block.mixer, s, batch, self.embed.weight,
                                  f"state layer {i} ({block.mixer_name})")

    def forward(self, tokens: torch.Tensor, state: ModelState | None = None) -> tuple[torch.Tensor, ModelState]:
        """tokens (B, T) int64 -> logits (B, T, V) and the state after the last token."""
        self.check_tokens(tokens)
        if state is not None:
            self.check_state(state, tokens.shape[0])
        x = self.hidden(tokens)  # (B, T, D)
        if self.pos_embed is not None:
            x = x + self.positions(state.pos if state is not None else 0, tokens.shape[1])
        layer_states = state.layers if state is not None else (None,) * len(self.blocks)
        new_states = []
        for block, s in zip(self.blocks, layer_states):
            x, s = block(x, s)
            note_layout(block.mixer, s)  # what check_state compares a state passed back in with
            new_states.append(s)
        pos = (state.pos if state is not None else 0) + tokens.shape[1]
        return self.logits(self.norm(x)), ModelState(tuple(new_states), pos)

    def bind(self, portable: bool = False) -> LMWeights:
        """Every weight `step` uses, captured once (no copies): what a decode plan holds for a run of decoding.
        portable: elementary-op norms, for the ONNX export (see `seqlab.models.blocks`)."""
        return LMWeights(self.embed.weight, self.pos_embed.weight if self.pos_embed is not None else None,
                         tuple(block.bind(portable) for block in self.blocks), norm_fn(self.norm, portable),
                         linear_fn(self.head, portable) if self.head is not None else self._tied_head(portable))

    def _tied_head(self, portable: bool) -> Fn:
        """x E^T; in an int8 model that decodes with int8 products (decode='dynamic') and an int8 head (the
        default), the int8 copy of E's rows that `seqlab.models.int8.TiedHead` keeps (the embedding itself stays
        fp32 for the lookup)."""
        q = getattr(self, "quantization", None) or {}
        if not portable and q.get("decode") == "dynamic" and q.get("head", "int8") == "int8":
            if getattr(self, "_int8_head", None) is None:
                self._int8_head = TiedHead()
            return self._int8_head.fn(self.embed.weight)
        et = self.embed.weight.t()
        return lambda x: torch.mm(x, et)

    def step(self, tokens: torch.Tensor, state: ModelState, w: LMWeights | None = None) -> tuple[torch.Tensor,
                                                                                                 ModelState]:
        """One token per sequence from a state: tokens (B,) int64 -> logits (B, V) and the next state; the same
        logits and state as `model(tokens[:, None], state)`, through every block's lean `step`. w: `bind()`'s
        weights (made here when not given; a decode plan passes the ones it holds)."""
        w = w or self.bind()
        self.check_tokens(tokens, 1)
        if not isinstance(state, ModelState) or len(state.layers) != len(w.blocks):
            self.check_state(state, tokens.shape[0])
        x = w.embed[tokens]  # (B, D)
        if w.pos_embed is not None:
            if state.pos >= self.config.max_positions:
                self.positions(state.pos, 1)  # the error that names the table's size
            x = x + w.pos_embed[state.pos]
        new = []
        for block, s in zip(w.blocks, state.layers):
            x, s = residual(x, s, *block)
            new.append(s)
        return w.head(w.norm(x)), ModelState(tuple(new), state.pos + 1)

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state after T tokens by each mixer's formula (`mixer.state_bytes`); `state.nbytes` of a
        real state equals it. dtype: the activations' dtype (recurrent states are fp32 whatever it is)."""
        return sum(block.mixer.state_bytes(T, batch, dtype) for block in self.blocks)

    def positions(self, pos0: int, T: int) -> torch.Tensor:
        """The learned position embeddings of positions pos0 .. pos0 + T - 1, (T, D)."""
        if pos0 + T > self.config.max_positions:
            raise InputError(f"position {pos0 + T - 1} is out of range: this model's learned position table has "
                             f"max_positions = {self.config.max_positions} rows")
        return self.pos_embed.weight[pos0:pos0 + T]

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h (B, T, D) -> (B, T, V)
        return self.head(h) if self.head is not None else F.linear(h, self.embed.weight)


class LMWeights(NamedTuple):
    """What `LanguageModel.bind` captures."""

    embed: torch.Tensor  # (V, D)
    pos_embed: torch.Tensor | None  # (max_positions, D), learned positions only
    blocks: tuple[BlockWeights, ...]
    norm: Fn
    head: Fn


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Initialize every linear and embedding weight of `model` by the scheme `cfg.init`.

    gpt2:  N(0, init_std), output projections (wo, w2, out_proj) scaled down by 1 / sqrt(2 * n_layers), biases zero
           (GPT-2, nanoGPT). Suits larger models; at small width with AdamW at lr ~3e-3 attention can sit for
           thousands of steps on the plateau of recall tasks (MQAR loss ln P), see benchmarks/bench_quality.py.
    torch: PyTorch's own defaults (Linear uniform +-1/sqrt(fan_in), Embedding N(0, 1)), drawn again here; pair it
           with an untied head (`tie_embeddings=False`), since a N(0, 1) embedding as the head gives huge logits.
    """
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if cfg.init == "torch":
            module.reset_parameters()
            continue
        scale = 1 / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo", "w2", "out_proj")) else 1
        nn.init.normal_(module.weight, 0.0, cfg.init_std * scale)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
