"""Test-time compute: a recurrent-depth model trained with r drawn around `depth.mean_steps`, then evaluated with
every r in `steps` (fixed), and with per-token adaptive exit (at most r steps; the mean steps the tokens used).

Two cells: `train` trains the model and saves it to its folder (`cells/thinking/train/checkpoint`, which the
latents section reuses), `scaling` loads it and measures, with `seqlab.analysis.thinking.scaling_curve`, the
accuracy against r and adaptive exit's mean steps against accuracy, plus one point per extra exit threshold
(`thresholds`) at the largest r: the exit's compute/accuracy trade-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from seqlab.analysis.stats import chance_accuracy, eval_counts, learned, separated, wilson
from seqlab.analysis.thinking import evaluate_steps, scaling_curve
from seqlab.checkpoint import load, save
from seqlab.config import Section as ConfigSection
from seqlab.config import TrainConfig, check_types, choice, positive
from seqlab.data import make_task
from seqlab.document import Section, save_figure
from seqlab.errors import InputError
from seqlab.lab.cell import Cell, run_dir
from seqlab.lab.sections.quality import split_task, task_label
from seqlab.models import build_model
from seqlab.train import fit, recurrent_depth, task_batches

TITLE = "Test-time compute"


@dataclass(frozen=True)
class Config(ConfigSection):
    task: dict = field(default_factory=lambda: {"name": "mqar", "vocab_size": 32, "seq_len": 32, "num_pairs": 4})
    model: dict = field(default_factory=lambda: {
        "arch": "recurrent_depth", "mixer": "attention", "d_model": 32, "attention": {"n_heads": 2},
        "depth": {"prelude": 1, "core": 1, "coda": 1, "mean_steps": 4, "backprop_steps": 2}})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=16))
    steps: tuple[int, ...] = (1, 2, 4, 8, 16)  # the r values of the curve
    exit: str = "latent"  # kl | latent: the adaptive exit criterion (latent: measured better, see analysis.thinking)
    thresholds: tuple[float, ...] = (3e-2, 3e-3, 3e-4)  # the first also gives the adaptive curve over r
    eval_batches: int = 4
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        check_types(self, "thinking.")
        positive(self, "thinking.", "eval_batches", "eval_batch_size")
        choice("thinking.", "exit", self.exit, ("kl", "latent"))
        task_label(self.task)
        if self.model.get("arch") != "recurrent_depth":
            raise InputError(f"config field 'thinking.model.arch' = {self.model.get('arch')!r}: expected "
                             "'recurrent_depth' (test-time compute iterates the core of a recurrent-depth model)")
        if not self.steps or min(self.steps) < 1:
            raise InputError(f"config field 'thinking.steps' = {list(self.steps)}: expected integers >= 1")
        if not self.thresholds or min(self.thresholds) < 0:
            raise InputError(f"config field 'thinking.thresholds' = {list(self.thresholds)}: expected numbers >= 0")


def plan(cfg: Config, lab: Any) -> list:
    return [Cell("train", {"task": cfg.task}), Cell("scaling", {"task": cfg.task, "steps": list(cfg.steps)})]


def train_model(cfg: Config, seed: int, folder: Path, progress: bool, desc: str = "thinking/train") -> dict:
    """Train the section's recurrent-depth model on its task and save it to `folder`; returns the fit result."""
    train_params, _ = split_task(cfg.task)
    task = make_task(cfg.task["name"], **train_params)
    model = build_model({"vocab_size": task.vocab_size, **cfg.model}, seed=seed)
    train_cfg = cfg.train.replace(seed=seed)
    result = fit(model, task_batches(task, train_cfg), recurrent_depth, train_cfg, progress=progress, desc=desc)
    save(model, folder, json_files={"train_config.json": train_cfg.to_dict(), "task.json": cfg.task})
    return {**result, "params": model.num_parameters(), "model": model}


def checkpoint_of(run: Path) -> Path:
    return run / "cells" / "thinking" / "train" / "checkpoint"


def run(cell: Any, cfg: Config, lab: Any, cell_dir: Path, progress: bool) -> dict[str, Any]:
    if cell.id == "train":
        result = train_model(cfg, lab.seed, cell_dir / "checkpoint", progress)
        d = result["model"].config.depth
        return {"params": result["params"], "d_model": result["model"].config.d_model,
                "mixer": result["model"].config.mixer, "train_mean_steps": d.mean_steps, "sampler": d.sampler,
                "backprop_steps": d.backprop_steps, "train_eval": result["eval"], "train_seconds": result["seconds"],
                "loss_curve": [[r["step"], r["loss"]] for r in result["history"]]}
    ckpt = checkpoint_of(run_dir(cell_dir))
    if not (ckpt / "model.safetensors").is_file():
        raise RuntimeError(f"no trained model at '{ckpt}': the thinking/train cell did not finish")
    model = load(ckpt)
    _, eval_params = split_task(cfg.task)
    task = make_task(cfg.task["name"], **eval_params)
    seed = lab.seed + 1
    curve = scaling_curve(model, task, list(cfg.steps), (cfg.exit, cfg.thresholds[0]), cfg.eval_batches,
                          cfg.eval_batch_size, seed)
    r_max = max(cfg.steps)
    sweep = [{"threshold": t, **evaluate_steps(model, task, r_max, (cfg.exit, t), cfg.eval_batches,
                                               cfg.eval_batch_size, seed)} for t in cfg.thresholds]
    queries = eval_counts(task, cfg.eval_batches, cfg.eval_batch_size, seed)["queries"]
    for row in [*curve["fixed"], *curve["adaptive"], *sweep]:
        row["interval"] = wilson(row["accuracy"], queries)
    fixed = {row["steps"]: row for row in curve["fixed"]}
    best = max(curve["fixed"], key=lambda row: row["accuracy"])
    chance = chance_accuracy(task)
    return {"task": task_label(cfg.task), "seq_len": task.seq_len, "train_mean_steps": curve["train_mean_steps"],
            "queries": queries, "chance": chance, "learned": learned(best["interval"], chance),
            "gain_beyond_noise": separated(best["interval"], fixed[min(fixed)]["interval"]),
            "exit": curve["exit"], "fixed": curve["fixed"], "adaptive": curve["adaptive"], "exit_sweep": sweep,
            "best_steps": best["steps"], "best_accuracy": best["accuracy"],
            "gain_best_over_r1": best["accuracy"] - fixed[min(fixed)]["accuracy"],
            "max_steps": r_max}


def render(results: dict[str, Any], out: Path) -> Section:
    sec = Section(TITLE)
    cells = {c["cell"]: c for c in results["cells"]}
    train, scaling = cells.get("train"), cells.get("scaling")
    failed = [c for c in results["cells"] if "error" in c]
    if train and "error" not in train:
        sec.p(f"A recurrent-depth model ({train['mixer']} blocks, d_model {train['d_model']}, {train['params']:,} "
              f"parameters) trained with r drawn by the {train['sampler']} sampler around "
              f"{train['train_mean_steps']:g} "
              f"steps (backpropagating through the last {train['backprop_steps']}), for "
              f"{results['config']['train']['steps']} steps; its accuracy at the training r: "
              f"{train['train_eval']['accuracy']:.3f}.")
    if scaling and "error" not in scaling:
        ex = scaling["exit"]
        sec.p(f"Task {scaling['task']} at length {scaling['seq_len']}. Fixed: exactly r core steps for every token. "
              f"Adaptive: at most r steps; a token exits when its {ex['criterion']} change falls below "
              f"{ex['threshold']:g}. Every row reads the same held-out batches"
              + (f": {scaling['queries']:,} evaluated queries, accuracy with its Wilson score interval"
                 if "queries" in scaling else "")
              + (f"; chance {scaling['chance']:.3f}." if scaling.get("chance") is not None else "."))
        if scaling.get("learned") is False:
            sec.p("Flag: this model has not learned its task (its best accuracy is within noise of chance), so "
                  "nothing below says how test-time compute helps a model that works.")
        adaptive = {row["steps"]: row for row in scaling["adaptive"]}
        headers = ["r", "effective depth", "accuracy", "interval", "loss", "adaptive: mean steps",
                   "adaptive: accuracy"]
        rows = [[str(r["steps"]), f"{r['effective_depth']:.0f}", f"{r['accuracy']:.3f}", _interval(r),
                 f"{r['loss']:.3f}", f"{adaptive[r['steps']]['mean_steps_used']:.2f}",
                 f"{adaptive[r['steps']]['accuracy']:.3f}"] for r in scaling["fixed"]]
        sec.table(headers, rows)
        sec.table([f"{ex['criterion']} threshold (at most {scaling['max_steps']} steps)", "mean steps used",
                   "core evaluations per token", "CPU s", "accuracy", "interval", "loss"],
                  [[f"{s['threshold']:g}", f"{s['mean_steps_used']:.2f}",
                    f"{s['core_evals_per_token']:.2f}" if "core_evals_per_token" in s else "-",
                    f"{s['cpu_s']:.2f}" if "cpu_s" in s else "-", f"{s['accuracy']:.3f}", _interval(s),
                    f"{s['loss']:.3f}"] for s in scaling["exit_sweep"]])
        path = "plots/thinking.png"
        _plot(scaling, out / path)
        cheapest = min(scaling["exit_sweep"], key=lambda s: s["mean_steps_used"])
        sec.figure(path, f"Accuracy against test-time steps r (left) and adaptive exit's mean steps against "
                         f"accuracy (right): {_curve_words(scaling)}; the loosest exit threshold "
                         f"({cheapest['threshold']:g}) spends {cheapest['mean_steps_used']:.2f} steps per token for "
                         f"{cheapest['accuracy']:.3f}.")
    if failed:
        sec.table(["cell", "error"], [[c["cell"], f"failed: {c['error']}"] for c in failed])
    return sec


def _interval(row: dict) -> str:
    return f"{row['interval'][0]:.3f}-{row['interval'][1]:.3f}" if "interval" in row else "-"


def _curve_words(scaling: dict) -> str:
    """How accuracy moves with r, in words: at r = 1, and the highest and lowest r values reach; whether the
    highest is above r = 1 beyond the noise, and a flag when the model has not learned its task."""
    fixed = scaling["fixed"]
    first, hi, lo = fixed[0], max(fixed, key=lambda r: r["accuracy"]), min(fixed, key=lambda r: r["accuracy"])
    words = (f"accuracy is {first['accuracy']:.3f} at r = {first['steps']}, highest at r = {hi['steps']} "
             f"({hi['accuracy']:.3f}) and lowest at r = {lo['steps']} ({lo['accuracy']:.3f})")
    if scaling.get("learned") is False:
        return words + " (the model has not learned its task: no conclusion)"
    if scaling.get("gain_beyond_noise") is False:
        return words + " (no difference beyond the noise)"
    return words


def _plot(scaling: dict, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    fixed, adaptive = scaling["fixed"], scaling["adaptive"]
    ax1.plot([r["steps"] for r in fixed], [r["accuracy"] for r in fixed], "o-", label="fixed r")
    ax1.plot([r["mean_steps_used"] for r in adaptive], [r["accuracy"] for r in adaptive], "x--",
             label=f"adaptive ({scaling['exit']['criterion']} < {scaling['exit']['threshold']:g}), at mean steps")
    ax1.axvline(scaling["train_mean_steps"], color="gray", linestyle=":", label="training mean r")
    if scaling.get("chance") is not None:
        for a in (ax1, ax2):
            a.axhline(scaling["chance"], color="black", linestyle="--", lw=1, label="chance")
    if "interval" in fixed[0]:
        ax1.fill_between([r["steps"] for r in fixed], [r["interval"][0] for r in fixed],
                         [r["interval"][1] for r in fixed], alpha=0.2, label="Wilson interval")
    ax1.set_ylim(0, 1.02)
    ax2.set_ylim(0, 1.02)
    ax1.set(xscale="log", xlabel="core steps r", ylabel="accuracy")
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    sweep = scaling["exit_sweep"]
    ax2.plot([s["mean_steps_used"] for s in sweep], [s["accuracy"] for s in sweep], "s-", color="tab:green")
    for s in sweep:
        ax2.annotate(f"{s['threshold']:g}", (s["mean_steps_used"], s["accuracy"]), fontsize=7)
    ax2.set(xlabel=f"mean steps used (at most {scaling['max_steps']})", ylabel="accuracy",
            title=f"adaptive exit ({scaling['exit']['criterion']}): thresholds")
    ax2.grid(alpha=0.3)
    save_figure(fig, path)


def highlight(results: dict[str, Any]) -> str | None:
    scaling = next((c for c in results["cells"] if c["cell"] == "scaling" and "error" not in c), None)
    if scaling is None:
        return None
    cheapest = min(scaling["exit_sweep"], key=lambda s: s["mean_steps_used"])
    return (f"The recurrent-depth model's {_curve_words(scaling)}; adaptive exit ({scaling['exit']['criterion']} < "
            f"{cheapest['threshold']:g}) spends {cheapest['mean_steps_used']:.2f} steps per token for "
            f"{cheapest['accuracy']:.3f}.")
