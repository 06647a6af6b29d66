"""Lab configs: which sections to run, and each section's tasks, mixers and budget.

A preset is a JSON file users can copy and edit (`seqlab lab --config FILE`):

    {"name": "quick", "seed": 0, "threads": 1,
     "sections": ["quality", "training", "inference", "thinking", "latents", "distill"],
     "quality": {"tasks": [{"name": "mqar", ...}], "mixers": ["attention", "gru", "lstm+attention"], ...},
     "training": {"mixers": [...], "seq_lens": [128, 512, 2048], ...},
     "inference": {...}, "thinking": {...}, "latents": {...}, "distill": {...}}

A mixer entry "a+b" is a hybrid whose layers cycle through a, b, a, b, ...; "recurrent_depth" (or
"recurrent_depth:gru", naming the mixer of its blocks) is the recurrent-depth model. Each section's fields are
documented on its `Config` in `seqlab.lab.sections.<section>`.

Presets: quick (the default: every section in about 6 minutes on a 2-core CPU; a smoke run), standard (66 minutes
on a 2-core CPU, measured end to end: benchmarks/results/lab_standard; sized so that the models learn their tasks),
full (for a GPU: larger models, longer contexts, more steps). Quick and standard run at one torch thread (`threads`,
None: torch's default, which full keeps): the lab's models are small, and a second thread slows them down as soon as
anything else shares the cores (benchmarks/bench_threads.py). Quick and standard train every model of the quality
and distill sections over 3 seeds (`seeds`) and report mean and spread; the recall-vs-state frontier, the real-model
anchor and the conversion cell stay one seed. Measured at one torch
thread on a 2-core CPU at load 5-7, quick's quality section took 108 CPU s at 1 seed and 242 at 3, its distill
section 40 and 45, the other four sections 27: the whole quick lab 314 CPU s at 3 seeds against 174 at 1. Load
inflates CPU time too: on a quiet 2-core CPU the whole quick lab took 353 s of lab time at 3 seeds and torch's
default two threads (`bash scripts/lab.sh` on a fresh clone), 234 s at one thread beside a test run (load 1.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from seqlab.config import Section, check_types, choice, positive
from seqlab.data import make_task
from seqlab.errors import InputError
from seqlab.lab.sections import SECTIONS, distill, inference, latents, quality, thinking, training
from seqlab.lab.sections.quality import split_task

PRESETS = ("quick", "standard", "full")


@dataclass(frozen=True)
class LabConfig(Section):
    name: str = "custom"
    seed: int = 0
    threads: int | None = None  # torch threads for the whole run; None: torch's default
    sections: tuple[str, ...] = tuple(SECTIONS)  # the sections to run, in report order
    quality: quality.Config = field(default_factory=quality.Config)
    training: training.Config = field(default_factory=training.Config)
    inference: inference.Config = field(default_factory=inference.Config)
    thinking: thinking.Config = field(default_factory=thinking.Config)
    latents: latents.Config = field(default_factory=latents.Config)
    distill: distill.Config = field(default_factory=distill.Config)

    def __post_init__(self) -> None:
        check_types(self, "")
        positive(self, "", "threads")
        for i, name in enumerate(self.sections):
            choice("", f"sections[{i}]", name, tuple(SECTIONS))
        for name in self.sections:
            check_tasks(f"{name}.", self.section(name))

    def section(self, name: str) -> Section:
        return getattr(self, name)


def task_entries(prefix: str, section: Section) -> Iterator[tuple[str, dict]]:
    """(where, entry) for every task entry of a section: a `task` dict, each entry of a `tasks` list, and the
    `task` of a dict field (e.g. quality's frontier)."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if f.name == "task" and isinstance(value, dict):
            yield f"{prefix}task", value
        elif f.name == "tasks" and isinstance(value, tuple):
            yield from ((f"{prefix}tasks[{i}]", t) for i, t in enumerate(value))
        elif isinstance(value, dict) and isinstance(value.get("task"), dict):
            yield f"{prefix}{f.name}.task", value["task"]


def check_tasks(prefix: str, section: Section) -> None:
    """Every task a section names builds, with its training and its evaluation parameters, so a bad parameter is
    one error before the first cell runs rather than every cell failing."""
    for where, entry in task_entries(prefix, section):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(f"config field '{where}' = {entry!r}: expected {{'name': TASK, ...params}}")
        for params in split_task(entry):
            try:
                make_task(entry["name"], **params)
            except InputError as e:
                raise InputError(f"config field '{where}': {e}") from None


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return Path(str(resources.files("seqlab.lab") / "presets" / f"{name}.json"))


def load_preset(name: str) -> LabConfig:
    return LabConfig.load(preset_path(name))


def pick_sections(cfg: LabConfig, only: list[str] | None, skip: list[str] | None) -> list[str]:
    """The sections to run: the config's list, narrowed by --only and --skip (names checked)."""
    for flag, names in (("--only", only), ("--skip", skip)):
        for n in names or ():
            if n not in SECTIONS:
                raise InputError(f"{flag} {n!r}: unknown section; sections: {', '.join(SECTIONS)}")
    chosen = [s for s in cfg.sections if (not only or s in only) and s not in (skip or ())]
    if not chosen:
        raise InputError("no section left to run after --only/--skip")
    return chosen
