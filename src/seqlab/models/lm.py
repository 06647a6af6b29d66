"""The language model: embedding -> n_layers residual blocks -> norm -> head.

    logits, state = model(tokens)                  # parallel over the whole sequence
    logits, state = model(tokens[:, -1:], state)   # continue from a state, one token or a chunk

Feeding a sequence in one call, in chunks, or token by token gives the same logits and the same final state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.models.blocks import Block, make_norm
from seqlab.models.state import ModelState


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
        """GPT-2 style init: N(0, init_std) for linear and embedding weights, output projections scaled down by
        sqrt(2 * n_layers); then each mixer's own published init (`reset_parameters` of the mixer) wins."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo", "w2", "out_proj")) else 1
                nn.init.normal_(module.weight, 0.0, std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if hasattr(block.mixer, "reset_parameters"):
                block.mixer.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 1:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"tokens must be a (batch, time) tensor with time >= 1, got {shape}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"tokens must be int64 token ids, got dtype {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
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
            new_states.append(s)
        pos = (state.pos if state is not None else 0) + tokens.shape[1]
        return self.logits(self.norm(x)), ModelState(tuple(new_states), pos)

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
