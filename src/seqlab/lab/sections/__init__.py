"""Lab sections. Each module defines a frozen `Config`, `plan(cfg, lab)` -> cells, `run(cell, cfg, lab, dir,
progress)` -> a JSON-able result, and `render(section_results, out)` -> a report Section. A section may also
define `summarize(cells, cfg)` -> a JSON-able summary over its finished cells (e.g. crossover points), which the
runner stores in results.json under the section's "summary", so that the report only formats stored numbers.
`render` and `highlight` read their results through `seqlab.document.sourced`: format numbers straight from the
fields (scaled by a constant at most), so the report can say which field each printed number came from.

A cell (`seqlab.lab.cell`) is the unit of work, of resuming and of failure.
"""

from __future__ import annotations

from types import ModuleType

from seqlab.lab.sections import distill, inference, latents, quality, thinking, training

SECTIONS: dict[str, ModuleType] = {"quality": quality, "training": training, "inference": inference,
                                   "thinking": thinking, "latents": latents, "distill": distill}
