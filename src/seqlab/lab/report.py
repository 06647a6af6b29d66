"""The lab report: results.json rendered through the document model of `seqlab.document`, to Markdown and to one
self-contained HTML file.

Every number in the report is formatted from results.json, so `build_report(results, out)` (and the command
`seqlab report DIR`) rebuilds both files from the JSON alone. Figures are drawn from results.json too, into
`plots/`, and embedded in the HTML as base64 PNG, so the HTML reads offline with no other file. Each section reads
its results through `seqlab.document.sourced`, so the document records which field every printed number came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seqlab.document import Document, Section, sourced, write
from seqlab.errors import InputError
from seqlab.lab.sections import SECTIONS

SMOKE_PRESETS = ("quick",)  # presets whose budgets only check that everything runs


def header_note(meta: dict) -> str:
    m = meta["machine"]
    smoke = (f"SMOKE RUN (preset `{meta['preset']}`): every model trains for a handful of steps to check that the "
             "lab runs end to end; most have not learned their tasks, so no number below compares mixers or says "
             "what a method is worth. Run the standard preset for a comparison. "
             if meta["preset"] in SMOKE_PRESETS else "")
    return smoke + (f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), device "
            f"{m['device']}, torch {m['torch']}, Python {m['python']}. Preset `{meta['preset']}`, seed "
            f"{meta['seed']}. Started {meta['started']}; the run took {meta.get('seconds', 0):.0f} s"
            + load_note(meta) + ".")


def load_note(meta: dict) -> str:
    """The run's CPU time and the machine's load average at its start and end (1-minute figures): timings taken
    beside other work are slower than the machine can do, and the reader should know."""
    note = f" of wall time and {meta['cpu_seconds']:.0f} s of CPU time" if "cpu_seconds" in meta else ""
    load = meta.get("load_average") or {}
    if load.get("start") and load.get("end"):
        note += (f"; load average {load['start'][0]:.1f} at its start and {load['end'][0]:.1f} at its end "
                 f"({meta['machine']['cpu_count']} CPUs)")
    return note


def lab_document(results: dict[str, Any], out: str | Path) -> Document:
    """The report of `results` (the content of results.json) as a document; its plots are drawn into `out`/plots.
    Each section's `sources` (the document's, for the note) are the results.json fields formatted while writing it:
    every number it prints is one of them."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    sources: list = []
    data = sourced(results, sources)
    sections, summary = [], Section("At a glance")

    def take() -> list:  # the sources logged so far, taken out of the log
        taken = sources[:]
        sources.clear()
        return taken

    for name, section in SECTIONS.items():
        if name in results.get("sections", {}):
            try:
                rendered = section.render(data["sections"][name], out)
                rendered.sources = take()
                line = section.highlight(data["sections"][name]) if hasattr(section, "highlight") else None
            except Exception as e:  # one section's broken results must not cost the others their report
                take()
                rendered, line = Section(getattr(section, "TITLE", name)), None
                rendered.p(f"This section's report could not be drawn from results.json: {type(e).__name__}: {e}")
            sections.append(rendered)
            if line:
                summary.p(f"{rendered.title}: {line}")
                summary.sources += take()
    if summary.blocks:
        sections.insert(0, summary)
    note = header_note(data["meta"])
    return Document(f"seqlab lab report: preset {results['meta']['preset']}", note, sections, take())


def build_report(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into `out` from `results` (the content of results.json) alone."""
    md, page = write(lab_document(results, out), Path(out))
    return md, page


def rebuild(run_dir: str | Path) -> tuple[Path, Path]:
    """Rebuild the report of a finished lab run from its results.json (`seqlab report DIR`)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise InputError(f"'{run_dir}' has no results.json; expected a folder written by seqlab lab")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"'{path}' is not valid JSON: {err}") from None
    return build_report(results, run_dir)
