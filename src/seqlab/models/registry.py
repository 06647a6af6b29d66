"""The mixer registry: a name in the config -> the module class that implements it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from seqlab.config import MIXERS, ModelConfig
from seqlab.errors import InputError

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_mixer("gru")`. The name must be listed in `seqlab.config.MIXERS`."""
    if name not in MIXERS:
        raise ValueError(f"mixer name {name!r} is not listed in seqlab.config.MIXERS")

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_mixers() -> list[str]:
    """Names of the mixers that can be built, in the order of `seqlab.config.MIXERS`."""
    return [name for name in MIXERS if name in _REGISTRY]


def build_mixer(name: str, cfg: ModelConfig) -> nn.Module:
    if name not in _REGISTRY:
        raise InputError(f"mixer {name!r} is not available; available mixers: {', '.join(available_mixers())}")
    return _REGISTRY[name](cfg, name)
