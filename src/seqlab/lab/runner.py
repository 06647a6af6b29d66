"""Run a lab: plan every section's cells, run them (skipping finished ones on --resume), write results.json and
the report. A cell's result is written to `cells/<section>/<cell>/cell.json` the moment it finishes, and
results.json is rewritten after every cell, so an interrupted run loses at most the cell it was in.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seqlab.checkpoint import write_json
from seqlab.errors import InputError
from seqlab.lab.presets import LabConfig, pick_sections
from seqlab.lab.report import build_report
from seqlab.lab.sections import SECTIONS
from seqlab.measure import cpu_seconds, load_average
from seqlab.ops.selective_scan import numba_version, resolve_impl


def machine() -> dict[str, Any]:
    """The machine and what ran on it: `numba` (its version, or "not installed": the `kernels` extra) and
    `impl_auto`, what impl="auto" (the default of mamba.impl, gla.impl and deltanet.impl) runs for the lab's CPU
    fp32 models: "kernel" (the numba kernels) or "chunked"."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "numba": numba_version() or "not installed", "impl_auto": resolve_impl("auto", "cpu")}


def _prepare(cfg: LabConfig, out: Path, resume: bool) -> LabConfig:
    saved = out / "lab_config.json"
    if resume:
        if not saved.is_file():
            raise InputError(f"cannot resume: '{out}' holds no lab run (no lab_config.json); run without --resume")
        return LabConfig.load(saved)  # resume what was started, whatever preset flags came with --resume
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder '{out}' is not empty; use --resume to continue the lab run in it, or "
                         "choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder '{out}': {e.strerror}") from None
    write_json(saved, cfg.to_dict())
    return cfg


def run_lab(cfg: LabConfig, out: str | Path, *, resume: bool = False, only: list[str] | None = None,
            skip: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the lab into folder `out`; returns the content of results.json."""
    out = Path(out)
    names = pick_sections(cfg, only, skip)
    cfg = _prepare(cfg, out, resume)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    plans = {name: SECTIONS[name].plan(cfg.section(name), cfg) for name in names}
    start, cpu_start = time.perf_counter(), cpu_seconds()
    previous = json.loads((out / "results.json").read_text()) if resume and (out / "results.json").is_file() else {}
    before = previous.get("meta", {})  # a resumed run keeps the first part's start, time and starting load
    results: dict[str, Any] = {
        "meta": {"preset": cfg.name, "seed": cfg.seed, "machine": machine(),
                 "started": before.get("started", dt.datetime.now().isoformat(timespec="seconds")),
                 "seconds": before.get("seconds", 0.0), "cpu_seconds": before.get("cpu_seconds", 0.0),
                 "load_average": {"start": before.get("load_average", {}).get("start") or load_average(),
                                  "end": None}},
        "sections": dict(previous.get("sections", {})),  # a resumed --only run keeps the other sections
    }
    elapsed_before, cpu_before = results["meta"]["seconds"], results["meta"]["cpu_seconds"]

    def stamp() -> None:  # the run's wall and CPU time and the load average so far
        results["meta"]["seconds"] = elapsed_before + time.perf_counter() - start
        results["meta"]["cpu_seconds"] = cpu_before + cpu_seconds() - cpu_start
        results["meta"]["load_average"]["end"] = load_average()

    overall = tqdm(total=sum(len(p) for p in plans.values()), desc="lab", disable=not progress, position=0,
                   dynamic_ncols=True)
    for name, cells in plans.items():
        section, section_cfg = SECTIONS[name], cfg.section(name)
        entry = {"config": section_cfg.to_dict(), "cells": []}
        results["sections"][name] = entry
        results["sections"] = {k: results["sections"][k] for k in SECTIONS if k in results["sections"]}
        section_bar = tqdm(cells, desc=f"  {name}", disable=not progress, position=1, leave=False,
                           dynamic_ncols=True)
        section_start = time.perf_counter()
        for cell in section_bar:
            overall.set_postfix_str(f"{name}: {cell.id}")
            cell_dir = out / "cells" / name / cell.id
            done = cell_dir / "cell.json"
            if resume and done.is_file():
                record = json.loads(done.read_text())
                if "error" not in record:
                    entry["cells"].append(record)
                    overall.update(1)
                    continue
            cell_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)  # a cell's global randomness (e.g. recurrent depth's r draws) is its own
            random.seed(cfg.seed)
            try:
                result = section.run(cell, section_cfg, cfg, cell_dir, progress)
                record = {"cell": cell.id, "spec": cell.spec, **result, "cell_seconds": time.perf_counter() - t0}
            except Exception as e:  # a failing cell is recorded, and the lab goes on
                record = {"cell": cell.id, "spec": cell.spec, "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()}
                tqdm.write(f"seqlab lab: cell {name}/{cell.id} failed: {record['error']}")
            write_json(done, record)
            entry["cells"].append(record)
            stamp()
            write_json(out / "results.json", results)
            overall.update(1)
        section_bar.close()
        entry["seconds"] = time.perf_counter() - section_start
        if hasattr(section, "summarize"):  # numbers derived from several cells, stored so the report only formats
            try:
                entry["summary"] = section.summarize(entry["cells"], section_cfg)
            except Exception as e:
                entry["summary_error"] = f"{type(e).__name__}: {e}"
                tqdm.write(f"seqlab lab: summary of section {name} failed: {entry['summary_error']}")
        write_json(out / "results.json", results)
    overall.close()
    stamp()
    write_json(out / "results.json", results)
    build_report(results, out)
    return results
