"""States are values: small frozen dataclasses of tensors that report their size.

A mixer never keeps its state on the module. It takes a state (or None) and returns a new one, so the same model
can serve many streams, and a state can be copied, detached (truncated backpropagation through time), moved to a
device or serialized (see `seqlab.infer.stream`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


class State:
    """Mixin for frozen dataclasses whose tensor fields make up a recurrent state or a cache.

    Layout, for code that handles states of any mixer without naming it (the ONNX export, training's carried state):
    `batch_axis`, the axis of the batch in every tensor field; `time_axis`, the axis that grows with the context
    (a KV cache), None for a fixed-size state.
    """

    batch_axis: ClassVar[int] = 0
    time_axis: ClassVar[int | None] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by field name (non-tensor fields such as positions are left out)."""
        return {
            f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)
        }

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def map(self, fn: Any) -> Any:
        """A copy with `fn` applied to every tensor field."""
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})  # type: ignore

    def detach(self) -> Any:
        return self.map(torch.Tensor.detach)

    def trim(self, n: int) -> Any:
        """The state with at most the last n tokens of context kept; a fixed-size state is returned as it is."""
        return self

    def to(self, *args: Any, **kwargs: Any) -> Any:
        return self.map(lambda t: t.to(*args, **kwargs))


@dataclass(frozen=True)
class ModelState:
    """The state of a whole language model: one entry per layer, plus the number of tokens consumed so far."""

    layers: tuple[Any, ...]
    pos: int = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers if s is not None)

    def map(self, fn: Any) -> ModelState:
        return ModelState(tuple(s.map(fn) if s is not None else None for s in self.layers), self.pos)

    def detach(self) -> ModelState:
        return self.map(torch.Tensor.detach)

    def to(self, *args: Any, **kwargs: Any) -> ModelState:
        return self.map(lambda t: t.to(*args, **kwargs))
