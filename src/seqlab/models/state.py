"""States are values: small frozen dataclasses of tensors that report their size.

A mixer never keeps its state on the module. It takes a state (or None) and returns a new one, so the same model
can serve many streams, and a state can be copied, detached (truncated backpropagation through time), moved to a
device or serialized (see `seqlab.infer.stream`).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from seqlab.errors import InputError


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


# A mixer's state layout (its state class and each tensor's shape), kept per mixer module: noted from the states
# its model returns (`note_layout`), or probed once with one token when a state arrives before any was returned.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def note_layout(mixer: nn.Module, state: Any) -> None:
    """Remember the layout of a state `mixer` returned, so that checking a state later runs no probe."""
    if state is not None and mixer not in _LAYOUTS:
        _LAYOUTS[mixer] = (type(state), {k: tuple(v.shape) for k, v in state.tensors().items()})


def _layout(mixer: nn.Module, like: torch.Tensor) -> tuple[type, dict[str, tuple[int, ...]]]:
    if mixer not in _LAYOUTS:
        with torch.no_grad():
            _, probe = mixer(torch.zeros(1, 1, like.shape[-1], dtype=like.dtype, device=like.device))
        note_layout(mixer, probe)
    return _LAYOUTS[mixer]


def check_layer_state(mixer: nn.Module, state: Any, batch: int | None, like: torch.Tensor, where: str) -> None:
    """`state` is a state `mixer` could have returned for `batch` sequences: its state class, and each tensor the
    shape the mixer's own state has (any length along `time_axis`, `batch` along `batch_axis`); else one
    InputError naming `where` (e.g. "state layer 1 (gru)") and the mismatch (batch None: any batch). `like`: a
    tensor of the mixer's input width (D), dtype and device, for the one-token probe that reads the layout when no
    state of this mixer was noted yet (kept per mixer module)."""
    cls, shapes = _layout(mixer, like)
    if type(state) is not cls:
        raise InputError(f"{where}: got a {type(state).__name__}, but this model's mixer there keeps a "
                         f"{cls.__name__}; pass the state this model returned")
    tensors = state.tensors()
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None:
            raise InputError(f"{where}: {cls.__name__} field '{name}' is not a tensor; pass the state this model "
                             "returned")
        got = tuple(t.shape)
        axes = [a % len(shape) for a in (cls.batch_axis, cls.time_axis) if a is not None]
        same = len(got) == len(shape) and all(g == s or i in axes for i, (g, s) in enumerate(zip(got, shape)))
        if not same:
            want = tuple("B" if i == axes[0] else "T" if i in axes else s for i, s in enumerate(shape))
            raise InputError(f"{where}: {cls.__name__}.{name} has shape {got}, but this model's mixer there keeps "
                             f"{want}; the state comes from another model")
        if batch is not None and got[axes[0]] != batch:
            raise InputError(f"{where}: {cls.__name__}.{name} holds {got[axes[0]]} sequences but the tokens have "
                             f"batch {batch}; pass the state of the same batch")
