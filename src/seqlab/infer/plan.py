"""Decode plans: one token of a `LanguageModel` with its weights bound once, for the per-token loop of `generate`.

    step = DecodePlan.build(model) or model       # None when the model is not one a plan covers
    logits, state = step(tokens, state)           # tokens (B, 1): the same logits and state as model(tokens, state)

A plan holds `model.bind()` (every weight as a lean callable: one addmm on a transposed view per linear, functional
norms) and calls `model.step` with it, which runs each block's and mixer's own `step`: the plan has no math of its
own. Why bind: at batch 1 on a CPU a decode step is a few dozen tiny tensor ops, and an nn.Module call around a
linear layer (with `F.linear`'s argument handling) costs about as much as the product itself.
benchmarks/bench_profile.py measures what this buys against `transformers`; tests/test_decode_plan.py checks the
plan against the module path for every mixer, norm, MLP and attention variant.

What a plan covers, and what it does not:
- `LanguageModel`s whose weights are fp32 or fp64, every mixer. An int8 layer decodes by its `decode`
  (`seqlab.models.int8`: its module, or int8 matrix products); any other layer that is not a plain `nn.Linear` is
  called as its module.
- It is built for one run of decoding: it holds the parameters, not copies, so in-place updates are seen, but a
  module or parameter replaced after `build` (another device, `quantize`, `load_state_dict(assign=True)`) is not.
  `generate` builds one per call (well under a millisecond); a `Stream` builds one on its first one-token feed.
- Anything that is not a one-token decode step (no state yet, T > 1, autograd on, a learned position table that
  has run out) goes to the model's own call, which handles it or says what is wrong; module hooks do not run per
  token (`generate(..., plan=False)` decodes through `model(...)` instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from seqlab.measure import Timer
from seqlab.models.lm import LanguageModel
from seqlab.models.state import ModelState


class DecodePlan:
    """The per-token step of one `LanguageModel`: (tokens (B, 1), ModelState) -> (logits (B, 1, V), ModelState)."""

    def __init__(self, model: LanguageModel):
        self.model = model
        self.weights = model.bind()
        self.n_layers = len(model.blocks)
        self.max_positions = model.config.max_positions if model.pos_embed is not None else None

    @classmethod
    def build(cls, model: Any) -> DecodePlan | None:
        """A plan for `model`, or None when it is not a `LanguageModel` with fp32 / fp64 weights."""
        if not isinstance(model, LanguageModel):
            return None
        if any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters()):
            return None
        return cls(model)

    def __call__(self, tokens: torch.Tensor, state: ModelState | None) -> tuple[torch.Tensor, ModelState]:
        if (not isinstance(state, ModelState) or len(state.layers) != self.n_layers
                or not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != 1
                or torch.is_grad_enabled() or (self.max_positions is not None and state.pos >= self.max_positions)):
            return self.model(tokens, state)  # not a decode step, or bad input (the model says what is wrong)
        logits, state = self.model.step(tokens[:, 0], state, self.weights)
        return logits.unsqueeze(1), state


def time_decode(model: Any, logits: torch.Tensor, state: ModelState, steps: int, warmup: int = 0,
                sync: Callable[[], None] = lambda: None) -> tuple[Timer, torch.Tensor, ModelState]:
    """Greedy decoding of `warmup + steps` tokens from (logits (B, T, V), state) through the model's plan (the path
    `seqlab.generate` takes), each step timed (wall and CPU) with `sync` inside the timing (a device's
    synchronize); the warm-up steps' times are thrown away. Returns the Timer (medians: per token at batch B) and
    the last logits and state. The benchmarks that measure decode latency against context all time it this way."""
    step = DecodePlan.build(model) or model
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    timer = Timer()
    for i in range(warmup + steps):
        with timer if i >= warmup else Timer():
            logits, state = step(token, state)
            token = logits[:, -1].argmax(-1, keepdim=True)
            sync()
    return timer, logits, state
