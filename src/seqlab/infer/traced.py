"""A traced decode plan: the exported one-token step, traced with TorchScript and frozen, so that no Python runs
inside a decode step.

    plan = TracedPlan(model, batch=1, cache_size=256)        # traces once: about a second for a small model
    out = seqlab.generate(model, prompt, 64, plan=plan)      # the same greedy tokens as the eager plan

The graph is `seqlab.interop.export.ExportGraph` with T = 1, the very graph `seqlab export-onnx --mode step` writes:
`LanguageModel.step` through every block's and mixer's own `step` (weights bound with `bind(portable=True)`),
attention on a fixed-size cache (`Attention.step_slots`: cache_size slots, slot i holds position i, every step
attends over all slots with the unwritten ones masked). `torch.jit.trace` records its tensor ops once and
`torch.jit.freeze` folds the weights in as constants; TorchScript's interpreter then runs the ops with no Python
between them. Why: at batch 1 on a CPU a small model's step is a few hundred tiny tensor ops, and the eager plan
pays Python and argument handling for each; benchmarks/bench_decode.py measures what tracing buys, per model, next
to onnxruntime running the same graph.

It is an explicit choice (`generate(..., plan=TracedPlan(...))`), never picked for you, because it fixes things the
eager plan leaves free:
- the batch and the longest context (`cache_size`; a model with no attention still checks it, so one plan has
  one contract) are fixed when it is built; its attention cost per token follows cache_size, not the position;
- the weights are copied into the frozen graph: a plan sees none of the model's later weight updates (build a new
  one), and holds a second copy of the weights while it lives;
- only `LanguageModel`s (arch "lm") with fp32 weights; anything else is an InputError here.
Its logits equal the eager plan's to float rounding (the slot attention spells softmax out), and greedy decoding
picks the same tokens (tests/test_traced_plan.py).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from seqlab.errors import InputError
from seqlab.models.lm import LanguageModel
from seqlab.models.state import ModelState


class TracedState(NamedTuple):
    """A traced plan's state: the graph's flat state tensors (attention's as cache_size slots) and the position."""

    tensors: tuple[torch.Tensor, ...]
    pos: int


class TracedPlan:
    """The frozen TorchScript step of one `LanguageModel`: (tokens (batch, 1), TracedState) -> (logits (batch, 1,
    V), TracedState). `start` turns the model's own state (after a prefill) into a TracedState."""

    def __init__(self, model: LanguageModel, batch: int = 1, cache_size: int = 1024):
        from seqlab.interop.export import ExportGraph  # the export's graph; imported here, where it is used

        if not isinstance(model, LanguageModel):
            raise InputError(f"TracedPlan needs a seqlab LanguageModel (arch 'lm'), got {type(model).__name__}")
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise InputError("TracedPlan needs fp32 weights; this model has "
                             f"{sorted({str(p.dtype) for p in model.parameters()})}")
        for name, value in (("batch", batch), ("cache_size", cache_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"TracedPlan: {name} = {value!r}: must be a positive integer")
        if model.pos_embed is not None and cache_size > model.config.max_positions:
            raise InputError(f"TracedPlan: cache_size = {cache_size} is longer than this model's learned position "
                             f"table (max_positions = {model.config.max_positions})")
        self.model, self.batch, self.cache_size = model, batch, cache_size
        self.graph = ExportGraph(model.eval(), cache_size)
        device = next(model.parameters()).device
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        pos = torch.zeros(1, dtype=torch.long, device=device)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values it records as constants
            traced = torch.jit.trace(self.graph, (tokens, pos, *self.graph.zero_state(batch)), check_trace=False)
            self.fn = torch.jit.freeze(traced.eval())
        self._pos = [torch.tensor([p], device=device) for p in range(cache_size)]  # pos inputs, made once

    def check(self, model: torch.nn.Module, batch: int, length: int) -> None:
        """An InputError unless this plan can decode `model` at `batch` rows up to `length` tokens of context."""
        if model is not self.model:
            raise InputError("this TracedPlan was built for another model: build one for this model")
        if batch != self.batch:
            raise InputError(f"this TracedPlan was built for batch {self.batch}, got batch {batch}")
        if length > self.cache_size:
            raise InputError(f"a context of {length} tokens is longer than this TracedPlan's cache_size = "
                             f"{self.cache_size}: build one with a larger cache_size")

    def start(self, state: ModelState) -> TracedState:
        """The model's state after a prefill (a `ModelState`) as the graph's flat state: a KV cache is copied into
        its slots (position p at slot p), every other state tensor is used as it is."""
        flat, zeros = [], self.graph.zero_state(self.batch)
        i = 0
        for cls, fields, s in zip(self.graph.state_class, self.graph.layout, state.layers):
            for f in fields:
                z = zeros[i]
                i += 1
                if s is None:  # that layer starts from zeros
                    flat.append(z)
                    continue
                t = getattr(s, f)
                if cls.time_axis is not None:  # the cache's last entries are positions pos - S .. pos - 1
                    S = t.shape[cls.time_axis]
                    z.narrow(cls.time_axis, state.pos - S, S).copy_(t)
                    t = z
                flat.append(t)
        return TracedState(tuple(flat), state.pos)

    def __call__(self, tokens: torch.Tensor, state: TracedState) -> tuple[torch.Tensor, TracedState]:
        if not isinstance(state, TracedState):
            raise InputError(f"a TracedPlan steps from a TracedState (from its start()), got {type(state).__name__}")
        if state.pos >= self.cache_size:
            raise InputError(f"position {state.pos} is past this TracedPlan's cache_size = {self.cache_size}")
        if not isinstance(tokens, torch.Tensor) or tokens.shape != (self.batch, 1):
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"tokens must be a ({self.batch}, 1) tensor, got {shape}")
        self.model.check_tokens(tokens[:, 0], 1)  # ids in range: the graph would index out of bounds
        logits, *new = self.fn(tokens, self._pos[state.pos], *state.tensors)
        return logits, TracedState(tuple(new), state.pos + 1)
