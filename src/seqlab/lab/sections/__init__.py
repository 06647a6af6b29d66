"""Lab sections. Each module defines a frozen `Config`, `plan(cfg, lab)` -> cells, `run(cell, cfg, lab, dir,
progress)` -> a JSON-able result, and `render(section_results, out)` -> a report Section. A section may also
define `summarize(cells, cfg)` -> a JSON-able summary over its finished cells (e.g. crossover points), which the
runner stores in results.json under the section's "summary", so that the report only formats stored numbers.

A cell is the unit of work, of resuming and of failure: it writes `cells/<section>/<cell id>/cell.json` when it
finishes, and a cell that raises is recorded with its error while the lab goes on. A cell that needs another
cell's output (a checkpoint) finds it under `run_dir(cell_dir) / "cells" / <section> / <cell id>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from seqlab.lab.sections import distill, inference, latents, quality, thinking, training


@dataclass(frozen=True)
class Cell:
    id: str  # unique within its section; also its folder name under cells/<section>/
    spec: dict[str, Any]  # what the section's run() needs, JSON-able, written beside the result


def run_dir(cell_dir: Path) -> Path:
    """The lab run folder of a cell's folder `<run>/cells/<section>/<cell id>` (ids may hold one '/')."""
    cell_dir = Path(cell_dir).resolve()
    for parent in cell_dir.parents:
        if parent.name == "cells" and (parent.parent / "lab_config.json").is_file():
            return parent.parent
    raise RuntimeError(f"'{cell_dir}' is not inside a lab run folder (no cells/ beside a lab_config.json)")


SECTIONS: dict[str, ModuleType] = {"quality": quality, "training": training, "inference": inference,
                                   "thinking": thinking, "latents": latents, "distill": distill}
