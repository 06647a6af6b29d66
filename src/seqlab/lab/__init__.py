"""The lab: one command that trains and measures every architecture side by side and writes a report."""

from seqlab.lab.presets import LabConfig, load_preset
from seqlab.lab.report import rebuild
from seqlab.lab.runner import run_lab

__all__ = ["LabConfig", "load_preset", "rebuild", "run_lab"]
