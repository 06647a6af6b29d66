"""Latent trajectories: what the recurrent-depth model's latent state does as the core iterates.

One cell analyses one batch of the thinking section's task with `seqlab.analysis.latents.analyze`: it captures
s_0 .. s_S for every token, fits one PCA over all of them, labels each token's trajectory (fixed point, orbit,
slider, other) and summarizes the classes (shares, steps to converge, loss per class). The model is the one the
thinking section trained in this run (`cells/thinking/train/checkpoint`) when it is there; otherwise (e.g.
`--only latents`) this cell trains the same model itself, with the thinking section's settings, into its own
folder. The plotted coordinates are stored in results.json, so the report redraws them from the JSON alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqlab.analysis.latents import (
    LABELS,
    Rules,
    analyze,
    capture,
    fit_pca,
    plot_classes,
    plot_distance_to_final,
    plot_pc_pairs,
)
from seqlab.analysis.stats import chance_accuracy, learned, wilson
from seqlab.checkpoint import load
from seqlab.config import Section as ConfigSection
from seqlab.config import check_types, positive
from seqlab.data import make_task
from seqlab.document import Section, count
from seqlab.errors import InputError
from seqlab.lab.cell import Cell, run_dir
from seqlab.lab.sections.quality import split_task, task_label
from seqlab.lab.sections.thinking import checkpoint_of, train_model

TITLE = "Latent trajectories"
MAX_GREY = 400  # tokens whose distance curves are kept for the grey background of the distance plot


@dataclass(frozen=True)
class Config(ConfigSection):
    steps: int = 32  # S: core iterations captured (more than the training r shows where the latent goes)
    rows: int = 4  # batch rows analysed (tokens: rows x the task's length)
    components: int = 6  # principal components (PC1..PC6: three pair plots)
    rules: dict | None = None  # classifier thresholds (seqlab.analysis.latents.Rules); None: the defaults
    digits: int = 5  # significant digits kept for plotted coordinates in results.json

    def __post_init__(self) -> None:
        check_types(self, "latents.")
        positive(self, "latents.", "steps", "rows", "components", "digits")
        if self.steps < 2:
            raise InputError(f"config field 'latents.steps' = {self.steps}: the classifier needs at least 2 steps")
        self.classifier_rules()  # a bad threshold is an error now, not after training

    def classifier_rules(self):
        return Rules(**(self.rules or {}))


def plan(cfg: Config, lab: Any) -> list:
    return [Cell("trajectories", {"task": lab.thinking.task, "steps": cfg.steps})]


def _round(x: torch.Tensor, digits: int) -> list:
    return [float(f"{v:.{digits}g}") for v in x.flatten().tolist()]


def run(cell: Any, cfg: Config, lab: Any, cell_dir: Path, progress: bool) -> dict[str, Any]:
    ckpt = checkpoint_of(run_dir(cell_dir))
    if (ckpt / "model.safetensors").is_file():
        model, source = load(ckpt), "thinking/train"
    else:
        model = train_model(lab.thinking, lab.seed, cell_dir / "checkpoint", progress,
                                     desc="latents/train")["model"]
        source = "latents/trajectories (trained here: no thinking/train checkpoint in this run)"
    _, eval_params = split_task(lab.thinking.task)
    task = make_task(lab.thinking.task["name"], **eval_params)
    batch = task.batch(cfg.rows, torch.Generator().manual_seed(lab.seed + 2))
    res = analyze(model, batch.inputs, batch.targets, batch.mask, cfg.steps, rules=cfg.classifier_rules(),
                  components=cfg.components, plots_dir=None, byte_level=batch.byte_level)
    # The plotted coordinates: the same capture and PCA as `analyze`, kept for the chosen tokens (row 0).
    cap = capture(model, batch.inputs, cfg.steps)
    traj = cap.trajectory  # (S + 1, B, T, D)
    mask = batch.mask.bool()
    queries = int(mask.sum())
    accuracy = float((cap.logits.argmax(-1) == batch.targets)[mask].float().mean()) if queries else 0.0
    chance = chance_accuracy(task)
    interval = wilson(accuracy, queries)
    S1, B, T, D = traj.shape
    flat = traj.reshape(S1, B * T, D)
    pca = fit_pca(flat.reshape(-1, D), cfg.components)
    chosen = [c["pos"] for c in res["chosen"]]
    z = pca.project(flat[:, chosen])  # (S + 1, n, k)
    dist = (flat - flat[-1]).norm(dim=-1) / flat.norm(dim=-1).mean(0).clamp_min(1e-12)  # (S + 1, N)
    # kept: the first MAX_GREY tokens (drawn in grey) and then the chosen ones, so results.json stays small
    dist = torch.cat([dist[:, :MAX_GREY], dist[:, chosen]], dim=1)
    counted = [t for t in res["tokens"] if t["loss"] is not None]
    return {
        "model_source": source, "task": task_label(lab.thinking.task), "seq_len": task.seq_len,
        "steps": res["steps"], "rows": res["rows"], "positions": res["positions"], "d_model": res["d_model"],
        "accuracy": accuracy, "queries": queries, "interval": interval, "chance": chance,
        "learned": learned(interval, chance),
        "pca": {**res["pca"], "explained_first_two": sum(res["pca"]["explained_ratio"][:2])},
        "rules": res["rules"], "summary": res["summary"], "mean_loss": res["mean_loss"],
        "labels": list(LABELS), "chosen": res["chosen"],
        "z_shape": list(z.shape), "z": _round(z, cfg.digits),
        "distance_shape": list(dist.shape), "distance": _round(dist, cfg.digits),
        "converge_step": [t["converge_step"] for t in counted], "token_loss": [t["loss"] for t in counted],
    }


def render(results: dict[str, Any], out: Path) -> Section:
    sec = Section(TITLE)
    for c in results["cells"]:
        if "error" in c:
            sec.table(["cell", "error"], [[c["cell"], f"failed: {c['error']}"]])
            continue
        s = c["summary"]
        sec.p(f"The recurrent-depth model from {c['model_source']}, run for {c['steps']} core steps on {c['rows']} "
              f"rows of {c['task']} ({c['positions']} positions each, {s['tokens']} tokens). One PCA over every "
              f"latent of every step; PC1-PC{count(c['pca']['explained_ratio'])} explain "
              f"{c['pca']['explained_total']:.1%} of the variance."
              + (f" The model's accuracy on these tokens: {c['accuracy']:.3f} over {c['queries']:,} queries "
                 f"(interval {c['interval'][0]:.3f}-{c['interval'][1]:.3f}"
                 + (f", chance {c['chance']:.3f})." if c.get("chance") is not None else ").")
                 if "accuracy" in c else ""))
        if c.get("learned") is False:
            sec.p("Flag: this model has not learned its task (accuracy within noise of chance). Its trajectories "
                  "describe an untrained loop: read nothing about how a working model thinks into the classes below.")
        headers = ["class", "share", "tokens", "mean loss (nats)"]
        loss_by = s.get("loss_by_class", {})
        rows = [[label, f"{s['shares'][label]:.3f}", str(s["counts"][label]),
                 "-" if loss_by.get(label) is None else f"{loss_by[label]:.3f}"] for label in c["labels"]]
        sec.table(headers, rows)
        conv = s.get("converge_steps")
        if conv:
            rho = s.get("spearman_converge_loss")
            sec.p(f"Fixed points converge after {conv['median']:g} steps (median; from {conv['min']} to "
                  f"{conv['max']})" + (f"; Spearman correlation of steps to converge with token loss: {rho:.2f}."
                                       if rho is not None else "."))
        z = torch.tensor(c["z"]).reshape(c["z_shape"])
        names = [x["name"] for x in c["chosen"]]
        ratio = c["pca"]["explained_ratio"]
        plot_pc_pairs(z, names, out / "plots" / "latents-pcs.png", ratio)
        top = max(s["shares"], key=lambda k: s["shares"][k])
        sec.figure("plots/latents-pcs.png",
                   f"Trajectories of {count(c['chosen'])} tokens of row 0 in the first principal planes (circle: s_0, "
                   f"star: s_{c['steps']}); PC1 and PC2 explain {ratio[0]:.1%} and "
                   f"{ratio[1] if len(ratio) > 1 else 0.0:.1%} of the variance.")
        dist = torch.tensor(c["distance"]).reshape(c["distance_shape"])  # (S + 1, grey tokens + chosen tokens)
        n_grey = dist.shape[1] - len(names)
        plot_distance_to_final(dist, [n_grey + j for j in range(len(names))], names,
                               out / "plots" / "latents-distance.png")
        sec.figure("plots/latents-distance.png",
                   f"Distance of each token's latent to its final state against the step (log scale); "
                   f"{s['counts']['fixed_point']} of {s['tokens']} tokens settle to a fixed point.")
        converge = torch.tensor(c["converge_step"] or [-1])
        loss = torch.tensor(c["token_loss"] or [0.0])
        plot_classes(s, converge, loss if c["token_loss"] else None, out / "plots" / "latents-classes.png")
        has_scatter = bool(c["token_loss"]) and any(x >= 0 for x in c["converge_step"])
        sec.figure("plots/latents-classes.png",
                   ("Share of each trajectory class (left) and steps to converge against token loss for fixed points "
                    "(right)" if has_scatter else "Share of each trajectory class")
                   + f"; the most common class is {top} at {s['shares'][top]:.1%} of tokens.")
    return sec


def highlight(results: dict[str, Any]) -> str | None:
    c = next((c for c in results["cells"] if "error" not in c), None)
    if c is None:
        return None
    shares = c["summary"]["shares"]
    flag = (" (from a model that has not learned its task: no conclusion)" if c.get("learned") is False else "")
    return (f"Over {c['steps']} core steps, "
            + ", ".join(f"{shares[k]:.1%} {k.replace('_', ' ')}s" if k not in ("other", "undecided")
                        else f"{shares[k]:.1%} {k}" for k in c["labels"])
            + f"; PC1-PC2 explain {c['pca']['explained_first_two']:.1%} of the latent variance{flag}.")
