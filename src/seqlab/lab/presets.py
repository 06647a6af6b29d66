"""Lab configs: what to compare, on which task, with which budget. A preset is a JSON file users can copy and edit.

    {"name": "quick", "seed": 0,
     "quality": {"task": {"name": "mqar", ...}, "mixers": ["attention", "gru", "lstm+attention"],
                 "model": {"n_layers": 2, ...}, "target_params": 100000, "train": {"steps": 300, ...}}}

A mixer entry "a+b" is a hybrid whose layers cycle through a, b, a, b, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from seqlab.config import MIXERS, TrainConfig, _check_types, _choice, _positive, _Section
from seqlab.errors import InputError

PRESETS = ("quick",)


@dataclass(frozen=True)
class QualitySection(_Section):
    """Train every mixer at a matched parameter count on one task and evaluate it."""

    task: dict = field(default_factory=lambda: {"name": "mqar"})
    mixers: tuple[str, ...] = ("attention", "sliding_attention", "lstm", "gru", "conv")
    model: dict = field(default_factory=dict)  # base ModelConfig fields; d_model is chosen to match target_params
    target_params: int | None = None  # None: use model.d_model as given for every mixer
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batches: int = 16
    state_context: int = 1024  # context at which each model's state bytes are reported

    def __post_init__(self) -> None:
        _check_types(self, "quality.")
        _positive(self, "quality.", "target_params", "eval_batches", "state_context")
        if not self.mixers:
            raise InputError("config field 'quality.mixers' is empty; list at least one mixer")
        for i, entry in enumerate(self.mixers):
            for part in entry.split("+"):
                _choice("quality.", f"mixers[{i}]", part, MIXERS)


@dataclass(frozen=True)
class LabConfig(_Section):
    name: str = "custom"
    seed: int = 0
    quality: QualitySection = field(default_factory=QualitySection)


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return Path(str(resources.files("seqlab.lab") / "presets" / f"{name}.json"))


def load_preset(name: str) -> LabConfig:
    return LabConfig.load(preset_path(name))
