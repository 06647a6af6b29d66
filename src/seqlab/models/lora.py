"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear layers, and their merge back into plain weights.

    adapted = add_lora(model, rank=8, alpha=16.0, names=["blocks.3.mixer.wq", ...])   # wraps those nn.Linear
    ... train: only the adapters' A and B (and whatever else you left trainable) change ...
    merge_lora(model)                                                                 # plain nn.Linear again

Glossary: W (out, in) the frozen base weight; A (r, in) and B (out, r) the adapter, r the rank; the layer computes
    y = x W^T + b + (alpha / r) x A^T B^T
B starts at zero, so an adapted model computes exactly what it did before training. Merging sets
W <- W + (alpha / r) B A and drops A and B: the model's state_dict has its original keys and shapes again, so a
saved checkpoint stays a plain safetensors file that any seqlab loader reads, and the merged layer gives the
adapted layer's outputs (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from seqlab.errors import InputError


class LoRALinear(nn.Module):
    """`base` (an nn.Linear, frozen) plus a trainable low-rank update of rank `rank` scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        self.A = nn.Parameter(torch.empty(rank, w.shape[1], dtype=w.dtype, device=w.device))  # (r, in)
        self.B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))  # (out, r): 0 at start
        bound = 1 / math.sqrt(w.shape[1])  # nn.Linear's own init range, as in the LoRA reference code
        with torch.no_grad():
            self.A.copy_(torch.rand(self.A.shape, generator=generator) * 2 * bound - bound)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the adapted layer applies: W + (alpha / r) B A (out, in)."""
        return self.base.weight + self.scale * self.B @ self.A

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.A.t()) @ self.B.t())  # x (..., in) -> (..., r) -> (..., out)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (the same object, changed in place)."""
        self.base.weight.add_(self.scale * self.B @ self.A)
        return self.base


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def add_lora(model: nn.Module, names: Iterable[str], rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Wrap each nn.Linear of `model` named in `names` in a LoRALinear (in place; A drawn from a generator seeded
    with `seed`, in the order of `names`). Returns the names wrapped."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"lora rank = {rank!r}: expected a whole number >= 1")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise InputError(f"lora alpha = {alpha!r}: expected a number > 0")
    gen = torch.Generator().manual_seed(seed)
    done = []
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise InputError(f"lora: '{name}' is a {type(module).__name__}, not a linear layer")
        if rank > min(module.weight.shape):
            raise InputError(f"lora rank = {rank} exceeds the smaller side of '{name}' {tuple(module.weight.shape)}")
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, LoRALinear(module, rank, alpha, gen))
        done.append(name)
    return done


def lora_layers(model: nn.Module) -> list[str]:
    """Names of the LoRALinear layers in `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put the plain nn.Linear back (in place); returns the names."""
    names = lora_layers(model)
    for name in names:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, getattr(parent, leaf).merged())
    return names
