"""Input checks shared by the ops: one clear InputError naming the tensor, the expected shape and the one given."""

from __future__ import annotations

import torch

from seqlab.errors import InputError


def expect(where: str, name: str, t: object, shape: tuple) -> None:
    """`t` must be a floating-point tensor of `shape`; an int in `shape` must match, a string names a free size."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where}: {name} must be a tensor of shape {shape}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{where}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if len(shape) != t.dim() or any(isinstance(s, int) and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join(str(s) for s in shape) + ")"
        raise InputError(f"{where}: {name} must have shape {want}, got {tuple(t.shape)}")
