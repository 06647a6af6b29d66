"""Run a lab config: train and measure every cell, write results.json, then the report.

Each cell (one mixer on one task) is independent: its config, metrics and checkpoint go into
`OUT/cells/<section>/<cell>/`, and a cell that fails is recorded with its error while the others go on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seqlab.checkpoint import save
from seqlab.config import ModelConfig
from seqlab.data import make_task
from seqlab.lab.presets import LabConfig
from seqlab.models import LanguageModel, build_model
from seqlab.train import fit


def hybrid_layers(entry: str, n_layers: int) -> tuple[str, ...]:
    """"lstm+attention" with 4 layers -> (lstm, attention, lstm, attention)."""
    parts = entry.split("+")
    return tuple(parts[i % len(parts)] for i in range(n_layers))


def count_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # no memory, no init cost
        return LanguageModel(cfg).num_parameters()


def matched_config(base: dict, entry: str, target: int | None) -> ModelConfig:
    """The config for mixer `entry` whose parameter count is closest to `target`, varying d_model only."""
    n_layers = base.get("n_layers", ModelConfig.n_layers)
    fields = {**base, "layers": hybrid_layers(entry, n_layers), "n_layers": n_layers}
    if target is None:
        return ModelConfig.from_dict(fields)
    heads = base.get("attention", {}).get("n_heads", 4)
    step = 2 * heads  # keeps d_model divisible by the heads with an even head dim
    best = None
    for d in range(step, 1025, step):
        cfg = ModelConfig.from_dict({**fields, "d_model": d})
        n = count_parameters(cfg)
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, cfg)
        if n > target:
            break
    return best[1]


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu"}


@torch.no_grad()
def state_bytes(model: torch.nn.Module, context: int) -> int:
    """Bytes of the model's state after `context` tokens (batch 1)."""
    tokens = torch.zeros(1, context, dtype=torch.long)
    _, state = model(tokens)
    return state.nbytes


def run_quality(cfg: LabConfig, out: Path, progress: bool) -> dict[str, Any]:
    q = cfg.quality
    task = make_task(q.task["name"], **{k: v for k, v in q.task.items() if k != "name"})
    base = {"vocab_size": task.vocab_size, **q.model}
    cells = []
    bar = tqdm(q.mixers, desc="quality", disable=not progress, dynamic_ncols=True)
    for entry in bar:
        bar.set_postfix(cell=entry)
        cell_dir = out / "cells" / "quality" / entry
        cell: dict[str, Any] = {"mixer": entry}
        try:
            model_cfg = matched_config(base, entry, q.target_params)
            model = build_model(model_cfg, seed=cfg.seed)
            result = fit(model, task, q.train.replace(eval_batches=q.eval_batches, seed=cfg.seed),
                         progress=progress, desc=entry)
            cell.update(
                params=model.num_parameters(), d_model=model_cfg.d_model, eval=result["eval"],
                train_loss=result["train_loss"], train_seconds=result["seconds"],
                train_tokens_per_s=result["tokens_per_s"], state_bytes=state_bytes(model, q.state_context),
                loss_curve=[[r["step"], r["loss"]] for r in result["history"]],
            )
            save(model, cell_dir / "checkpoint", json_files={"metrics.json": cell})
        except Exception as e:  # a failing cell is recorded and the lab goes on
            cell["error"] = f"{type(e).__name__}: {e}"
            cell["traceback"] = traceback.format_exc()
        cells.append(cell)
    return {"task": q.task, "target_params": q.target_params, "state_context": q.state_context,
            "train": q.train.to_dict(), "cells": cells}


def run_lab(cfg: LabConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run the lab into folder `out`: results.json, report.md, plots/ and cells/."""
    from seqlab.lab.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lab_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {"preset": cfg.name, "seed": cfg.seed, "machine": machine(),
                 "started": dt.datetime.now().isoformat(timespec="seconds")},
    }
    results["quality"] = run_quality(cfg, out, progress)
    results["meta"]["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)
    return results
