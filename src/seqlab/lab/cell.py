"""A lab cell: the unit of work, of resuming and of failure.

A cell writes `cells/<section>/<cell id>/cell.json` when it finishes, and a cell that raises is recorded with its
error while the lab goes on. A cell that needs another cell's output (a checkpoint) finds it under
`run_dir(cell_dir) / "cells" / <section> / <cell id>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def error_rows(cells: list[dict], width: int) -> list[list[str]]:
    """Report table rows for failed cells: the cell name, then its error across the remaining columns."""
    return [[c["cell"], f"failed: {c['error']}"] + [""] * (width - 2) for c in cells if "error" in c]
