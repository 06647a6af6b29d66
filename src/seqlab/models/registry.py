"""The mixer registry: a name in the config -> the module class that implements it.

A mixer is one file under `seqlab.models` that defines its config section, its state, its module (forward, step,
bind, state_bytes) and registers itself with `@register_mixer`; `seqlab/models/__init__.py` imports it (its one
registry line). Nothing else in seqlab names it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from seqlab.config import MIXERS, ModelConfig, register_mixer_config
from seqlab.errors import InputError

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_mixer(name: str, section: str | None = None,
                   config: type | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_mixer("mamba", "mamba", MambaConfig)` makes `mixer="mamba"` valid in configs,
    with its options as the config section "mamba" (a frozen `seqlab.config.Section` dataclass defined beside the
    mixer), and builds this class for it. Mixers list in the order they register."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        register_mixer_config(name, section, config)
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_mixers() -> list[str]:
    """Names of the mixers that can be built, in the order they registered (`seqlab.config.MIXERS`)."""
    return [name for name in MIXERS if name in _REGISTRY]


def build_mixer(name: str, cfg: ModelConfig) -> nn.Module:
    if name not in _REGISTRY:
        raise InputError(f"mixer {name!r} is not available; available mixers: {', '.join(available_mixers())}")
    return _REGISTRY[name](cfg, name)
