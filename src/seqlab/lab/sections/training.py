"""Training cost: tokens/s and peak memory of one training step per mixer, at growing sequence lengths.

Attention trains in parallel over the sequence (its cost per token grows with T through the T x T scores);
LSTM and GRU run a sequential loop over time; the scans run chunk-parallel. Each cell runs in a process of its
own, so its peak resident memory is its own: the figure reported is the growth of the peak during the timed steps
over the peak after building the model and one warm-up step. `fresh_process: true` starts a new interpreter per
cell (the cleanest, but importing torch costs seconds per cell on a loaded machine); `false` measures in the
lab's process, resetting the peak before the timed steps (Linux: /proc/self/clear_refs; elsewhere the peak cannot
be reset, and the growth reads 0 unless the cell exceeds every earlier peak of the process).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from seqlab.config import Section as ConfigSection
from seqlab.config import TrainConfig, check_types, positive
from seqlab.document import Section, fmt_bytes, save_figure
from seqlab.errors import InputError
from seqlab.lab.cell import Cell, error_rows
from seqlab.lab.sections.quality import check_entry, matched_config
from seqlab.measure import Timer, peak_growth, run_fresh, serve
from seqlab.models import build_model
from seqlab.train.trainer import make_optimizer

TITLE = "Training cost"


@dataclass(frozen=True)
class Config(ConfigSection):
    mixers: tuple[str, ...] = ("attention", "lstm", "gru", "conv")
    seq_lens: tuple[int, ...] = (128, 512, 2048)
    batch_size: int = 4
    steps: int = 5  # timed steps per cell, after one warm-up step
    model: dict = field(default_factory=dict)
    target_params: int | None = None
    depth: dict = field(default_factory=dict)  # RecurrentDepthConfig fields for "recurrent_depth" entries
    fresh_process: bool = True  # false: measure in the lab's process (peak reset per cell on Linux)

    def __post_init__(self) -> None:
        check_types(self, "training.")
        positive(self, "training.", "batch_size", "steps", "target_params")
        if not self.mixers or not self.seq_lens:
            raise InputError("config fields 'training.mixers' and 'training.seq_lens' must not be empty")
        for i, entry in enumerate(self.mixers):
            check_entry("training.", i, entry, self.model.get("n_layers", 2))
        for T in self.seq_lens:
            if T < 1:
                raise InputError(f"config field 'training.seq_lens' holds {T}: every length must be >= 1")


def plan(cfg: Config, lab: Any) -> list:
    return [Cell(f"{m}/T{T}", {"mixer": m, "seq_len": T}) for m in cfg.mixers for T in cfg.seq_lens]


def run(cell: Any, cfg: Config, lab: Any, cell_dir: Path, progress: bool) -> dict[str, Any]:
    job = {"mixer": cell.spec["mixer"], "seq_len": cell.spec["seq_len"], "batch_size": cfg.batch_size,
           "steps": cfg.steps, "model": cfg.model, "target_params": cfg.target_params, "seed": lab.seed,
           "depth": cfg.depth, "threads": lab.threads}
    model_cfg = matched_config({"vocab_size": 256, **cfg.model}, job["mixer"], cfg.target_params, cfg.depth)
    (cell_dir / "job.json").write_text(json.dumps({**job, "model_config": model_cfg.to_dict()}, indent=2) + "\n")
    if not cfg.fresh_process:
        return worker(job)
    result = run_fresh(["-m", "seqlab.lab.sections.training"], job)
    if "error" in result:
        raise RuntimeError(f"training-cost worker failed: {result['error']}")
    return result


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Time `steps` training steps (forward, backward, AdamW) of a matched model on random tokens."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    cfg = matched_config({"vocab_size": 256, **job["model"]}, job["mixer"], job["target_params"], job.get("depth"))
    model = build_model(cfg, seed=job["seed"]).train()
    opt = make_optimizer(model, TrainConfig())
    gen = torch.Generator().manual_seed(job["seed"])
    tokens = torch.randint(0, 256, (job["batch_size"], job["seq_len"] + 1), generator=gen)

    def step() -> None:
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, optimizer state
    timer = Timer()
    with peak_growth() as mem:
        for _ in range(job["steps"]):
            with timer:
                step()
    median = timer.median_wall
    return {"mixer": job["mixer"], "seq_len": job["seq_len"], "params": model.num_parameters(),
            "d_model": cfg.d_model, "step_seconds_median": median, "repeats": job["steps"],
            "tokens_per_s": job["batch_size"] * job["seq_len"] / median,
            "peak_rss_bytes": mem["peak"], "peak_growth_bytes": mem["growth"]}


def render(results: dict[str, Any], out: Path) -> Section:
    sec = Section(TITLE)
    cfg = results["config"]
    ok = [c for c in results["cells"] if "error" not in c]
    where = ("each cell in a fresh process" if cfg.get("fresh_process", True) else
             "in the lab's process (the peak is reset before each cell's timed steps; memory the allocator freed "
             "earlier is reused, so small models may show no growth)")
    sec.p(f"One training step (forward, backward, AdamW) at batch {cfg['batch_size']}, median of {cfg['steps']} "
          f"timed steps after a warm-up, {where}. Peak growth: how much the process's peak resident memory rose "
          "during the timed steps.")
    headers = ["mixer", "seq len", "params", "step (ms)", "tokens/s", "peak growth"]
    rows = [[c["mixer"], str(c["seq_len"]), f"{c['params']:,}", f"{1000 * c['step_seconds_median']:.1f}",
             f"{c['tokens_per_s']:,.0f}", fmt_bytes(c["peak_growth_bytes"])] for c in ok]
    sec.table(headers, rows + error_rows(results["cells"], len(headers)))
    if ok:
        path = "plots/training-cost.png"
        _plot(ok, out / path)
        longest = max(c["seq_len"] for c in ok)
        at = sorted((c for c in ok if c["seq_len"] == longest), key=lambda c: -c["tokens_per_s"])
        sec.figure(path, f"Training throughput (left, log-log) and peak memory growth (right) against sequence "
                         f"length; at length {longest}, "
                         f"{at[0]['mixer']} trains fastest ({at[0]['tokens_per_s']:,.0f} tokens/s) and "
                         f"{at[-1]['mixer']} slowest ({at[-1]['tokens_per_s']:,.0f} tokens/s).")
    return sec


def _plot(cells: list[dict], path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for mixer in dict.fromkeys(c["mixer"] for c in cells):
        mine = sorted((c for c in cells if c["mixer"] == mixer), key=lambda c: c["seq_len"])
        T = [c["seq_len"] for c in mine]
        ax1.plot(T, [c["tokens_per_s"] for c in mine], marker="o", label=mixer)
        ax2.plot(T, [c["peak_growth_bytes"] / 2**20 for c in mine], marker="o", label=mixer)
    ax1.set(yscale="log", xlabel="sequence length", ylabel="training tokens/s")
    ax2.set(xlabel="sequence length", ylabel="peak memory growth (MiB)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    save_figure(fig, path)


def highlight(results: dict[str, Any]) -> str | None:
    ok = [c for c in results["cells"] if "error" not in c]
    if not ok:
        return None
    longest = max(c["seq_len"] for c in ok)
    at = sorted((c for c in ok if c["seq_len"] == longest), key=lambda c: -c["tokens_per_s"])
    return (f"At length {longest}, {at[0]['mixer']} trains fastest ({at[0]['tokens_per_s']:,.0f} tokens/s) and "
            f"{at[-1]['mixer']} slowest ({at[-1]['tokens_per_s']:,.0f} tokens/s).")


if __name__ == "__main__":  # a cell's fresh process (fresh_process: true)
    serve(worker)
