"""Models: mixers (one file each), blocks, the language model, and `build_model`."""

from __future__ import annotations

from typing import Any

import torch

from seqlab.config import ModelConfig
from seqlab.errors import InputError

# The mixers, in the order they are listed everywhere: importing a mixer's file registers it (its name, its config
# section and its module). A new mixer is one more name on this line; the order is kept (isort is off here).
# isort: off
from seqlab.models import attention, rnn, conv, mamba, gla, deltanet, minrnn, mamba2  # noqa: F401
# isort: on
from seqlab.models.lm import LanguageModel
from seqlab.models.recurrent_depth import RecurrentDepthModel
from seqlab.models.registry import available_mixers, build_mixer, register_mixer
from seqlab.models.size import check_fits, estimate_bytes
from seqlab.models.state import ModelState, State
from seqlab.ops.selective_scan import numba_version

__all__ = ["LanguageModel", "ModelState", "State", "available_mixers", "build_mixer", "build_model",
           "register_mixer", "as_config", "check_fits", "estimate_bytes", "RecurrentDepthModel", "count_parameters",
           "matched_width", "implementations"]


def as_config(config: ModelConfig | dict | None = None, **fields: Any) -> ModelConfig:
    """A ModelConfig from a config object, a dict (e.g. parsed JSON), or keyword fields."""
    if config is not None and fields:
        raise InputError("give either a config or keyword fields, not both")
    if isinstance(config, ModelConfig):
        return config
    if config is None:
        config = fields
    if not isinstance(config, dict):
        raise InputError(f"config must be a ModelConfig or a dict, got {type(config).__name__}")
    return ModelConfig.from_dict(config)


def build_model(config: ModelConfig | dict | None = None, *, seed: int | None = None, allow_large: bool = False,
                **fields: Any):
    """Build a model: `build_model(mixer="gru", d_model=128)`, `build_model(cfg)` or `build_model({...})`.

    With `seed`, the initial weights depend on the seed alone (the global RNG is left as it was). Weights that
    would not fit in the memory available are refused before anything is allocated (`seqlab.models.size`);
    `allow_large=True` skips that check.
    """
    cfg = as_config(config, **fields)
    device = torch.get_default_device()
    if device.type != "meta":
        check_fits(cfg, "build_model", device=device, allow_large=allow_large)
    cls = RecurrentDepthModel if cfg.arch == "recurrent_depth" else LanguageModel
    if seed is None:
        return cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def count_parameters(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Parameters of a model with this config, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_model(cfg).num_parameters(exclude_embeddings=exclude_embeddings)


def matched_width(fields: dict[str, Any], target: int, step: int, *, exclude_embeddings: bool = False,
                  max_width: int = 8192, name: str = "this") -> ModelConfig:
    """The config `fields` with the d_model (a multiple of `step`, at most `max_width`) whose parameter count is
    closest to `target`; widths a mixer does not allow (e.g. GLA widths its heads do not divide) are skipped."""
    best: tuple[int, ModelConfig] | None = None
    for d in range(step, max_width + 1, step):
        try:
            cfg = ModelConfig.from_dict({**fields, "d_model": d})
        except InputError:
            continue
        n = count_parameters(cfg, exclude_embeddings=exclude_embeddings)
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, cfg)
        if n > target:
            break
    if best is None:
        raise InputError(f"no d_model up to {max_width} builds a valid {name} model with these settings")
    return best[1]


def implementations(model: torch.nn.Module) -> dict[str, str]:
    """What each mixer of `model` with an `impl` option runs, "auto" resolved for the device and dtype of its
    weights, and numba's version: e.g. {"mamba": "kernel", "gla": "chunked", "numba": "0.68.1"} ("numba":
    "not installed" without the `kernels` extra). Result files record this beside their figures."""
    found: dict[str, str] = {}
    for block in model.modules():
        mixer = getattr(block, "mixer", None)
        impl = getattr(getattr(mixer, "cfg", None), "impl", None)
        if hasattr(block, "mixer_name") and impl is not None:
            found[block.mixer_name] = mixer.implementation() if hasattr(mixer, "implementation") else impl
    return {**found, "numba": numba_version() or "not installed"}
