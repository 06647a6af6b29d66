"""Test-time compute: how a recurrent-depth model's quality changes with the number of core steps r.

    curve = scaling_curve(model, task, steps=[1, 2, 4, 8, 16], exit=("kl", 5e-4))
    plot_scaling(curve, "think.png")

For every r the model runs with exactly r steps ("fixed"), and, with an exit criterion, with at most r steps and
per-token adaptive exit ("adaptive": the mean steps the tokens used, and the accuracy that keeps). Every r reads
the same held-out batches (a generator seeded with `seed`), so the points differ only in r.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seqlab.data import Metrics, Task
from seqlab.errors import InputError
from seqlab.measure import Timer
from seqlab.models.recurrent_depth import EXITS, RecurrentDepthModel


def parse_steps(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8]; every entry an integer >= 1."""
    try:
        steps = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--steps {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not steps or min(steps) < 1:
        raise InputError(f"--steps {text!r}: every step count must be >= 1")
    return steps


# The threshold `--exit kl` or `--exit latent` uses when none is given. Chosen by measurement on prefix parity at
# 4x the training length (benchmarks/bench_thinking.py --only exit; README "Adaptive exit"): kl 5e-4, the old
# default, exited with 0% of the sequences right, kl 1e-9 with 81%; the relative latent change at 3e-4 with 98%
# (benchmarks/results/thinking_exit_small.json: 64 sequences of 128 bits, one model, one seed).
DEFAULT_THRESHOLDS = {"kl": 1e-9, "latent": 3e-4}


def parse_exit(text: str | None) -> tuple[str, float] | None:
    """"kl", "kl:1e-9", "latent:0.003" or "none" -> (criterion, threshold) or None (without a threshold: the
    criterion's `DEFAULT_THRESHOLDS` entry)."""
    if text is None:
        return None
    name, _, value = text.partition(":")
    if name not in EXITS:
        raise InputError(f"--exit {text!r}: criterion {name!r} does not exist; expected one of {', '.join(EXITS)} "
                         "(optionally with :THRESHOLD, e.g. latent:3e-3)")
    if name == "none":
        return None
    try:
        threshold = float(value) if value else DEFAULT_THRESHOLDS[name]
    except ValueError:
        raise InputError(f"--exit {text!r}: threshold {value!r} is not a number") from None
    if not threshold >= 0:
        raise InputError(f"--exit {text!r}: threshold must be >= 0")
    return name, threshold


@torch.no_grad()
def evaluate_steps(model: RecurrentDepthModel, task: Task, steps: int, exit: tuple[str, float] | None = None,
                   batches: int = 4, batch_size: int = 64, seed: int = 1234, schedule: bool = True) -> dict[str, float]:
    """The task's metrics with r = `steps` (at most, with `exit`), plus mean_steps_used, effective_depth, the work
    done (core_evals_per_token: core token-evaluations per token, core_flops_per_token: their matmul FLOPs,
    coda_evals_per_token: the KL criterion's coda passes) and the CPU and wall seconds of the model calls."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed)  # s_0 noise, when the model starts from noise
    metrics, used, count, core, coda, cpu, wall, timer = Metrics(), 0.0, 0, 0, 0, 0.0, 0.0, Timer()
    for _ in range(batches):
        batch = task.batch(batch_size, gen)
        name, threshold = exit if exit is not None else ("none", 0.0)
        with timer:
            out = model.think(batch.inputs.to(device), steps=steps, exit=name, threshold=threshold, generator=noise,
                              schedule=schedule)
        cpu, wall = cpu + timer.cpu[-1], wall + timer.last_wall
        metrics.update(out.logits.float(), batch)
        used += out.steps_used.sum().item()
        count += out.steps_used.numel()
        core, coda = core + out.core_evals, coda + out.coda_evals
    model.train(was_training)
    mean_used = used / count
    d = model.config.depth
    return {"steps": steps, "mean_steps_used": mean_used,
            "effective_depth": d.prelude + mean_used * d.core + d.coda,
            "core_evals_per_token": core / count, "core_flops_per_token": core / count * model.core_flops_per_eval(),
            "coda_evals_per_token": coda / count, "cpu_s": cpu, "wall_s": wall, **metrics.compute()}


def scaling_curve(model: torch.nn.Module, task: Task, steps: list[int], exit: tuple[str, float] | None = None,
                  batches: int = 4, batch_size: int = 64, seed: int = 1234,
                  progress: bool = False) -> dict[str, Any]:
    """{"task", "fixed": [one row per r], "adaptive": [one row per r, as the maximum] (with `exit` only)}.

    progress: show a bar (on stderr) that advances by r per evaluated r, so it tracks the compute spent."""
    if not isinstance(model, RecurrentDepthModel):
        raise InputError(f"test-time scaling needs a recurrent-depth model (arch recurrent_depth); this one has arch "
                         f"{model.config.arch!r}")
    if model.config.vocab_size < task.vocab_size:
        raise InputError(f"task '{task.name}' needs vocab_size {task.vocab_size}; the model has vocab_size "
                         f"{model.config.vocab_size}")

    modes = [None] if exit is None else [None, exit]
    bar = tqdm(total=sum(steps) * len(modes), desc="think", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    rows: list[list[dict[str, float]]] = []
    for mode in modes:
        rows.append([])
        for r in steps:
            rows[-1].append(evaluate_steps(model, task, r, mode, batches, batch_size, seed))
            bar.update(r)
    bar.close()
    out: dict[str, Any] = {"task": task.name, "seq_len": task.seq_len,
                           "train_mean_steps": model.config.depth.mean_steps, "fixed": rows[0]}
    if exit is not None:
        out["exit"] = {"criterion": exit[0], "threshold": exit[1]}
        out["adaptive"] = rows[1]
    return out


def plot_scaling(curves: dict[str, Any] | list[dict[str, Any]], path: str | Path, metric: str = "accuracy",
                 title: str | None = None) -> Path:
    """Plot `metric` against r (log2 axis) for one or more `scaling_curve` results; adaptive exit at its mean
    steps used. Writes a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [curves] if isinstance(curves, dict) else curves
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        label = c.get("label", f"{c['task']} T={c['seq_len']}")
        ax.plot([r["steps"] for r in c["fixed"]], [r[metric] for r in c["fixed"]], "o-", label=label)
        if c.get("adaptive"):
            ax.plot([r["mean_steps_used"] for r in c["adaptive"]], [r[metric] for r in c["adaptive"]], "x--",
                    label=f"{label}, exit {c['exit']['criterion']}:{c['exit']['threshold']:g} (x: mean steps)")
    mean = curves[0].get("train_mean_steps")
    if mean:
        ax.axvline(mean, color="gray", linestyle=":", label=f"training mean r = {mean:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("core steps r (test time)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"test-time scaling: {metric} against r")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
