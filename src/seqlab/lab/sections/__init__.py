"""Lab sections. Each module defines a frozen `Config`, `plan(cfg, lab)` -> cells, `run(cell, cfg, lab, dir,
progress)` -> a JSON-able result, and `render(section_results, out)` -> a report Section.

A cell is the unit of work, of resuming and of failure: it writes `cells/<section>/<cell id>/cell.json` when it
finishes, and a cell that raises is recorded with its error while the lab goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from seqlab.lab.sections import quality, training


@dataclass(frozen=True)
class Cell:
    id: str  # unique within its section; also its folder name under cells/<section>/
    spec: dict[str, Any]  # what the section's run() needs, JSON-able, written beside the result


SECTIONS: dict[str, ModuleType] = {"quality": quality, "training": training}
