"""The training loop: AdamW + warmup/cosine, gradient clipping, periodic evaluation, JSON-lines metrics."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seqlab.checkpoint import save
from seqlab.config import RunConfig, TrainConfig
from seqlab.data import Task, make_task, masked_cross_entropy, task_metrics
from seqlab.errors import InputError
from seqlab.models import build_model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (>= 2-D: linear and embedding weights), never on gains or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, batches: int = 8, batch_size: int = 32,
             seed: int = 1234) -> dict[str, float]:
    """Mean of the task's metrics over `batches` held-out batches drawn from a generator seeded with `seed`."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    for _ in range(batches):
        batch = task.batch(batch_size, gen)
        logits, _ = model(batch.inputs)
        for k, v in task_metrics(logits, batch).items():
            totals[k] = totals.get(k, 0.0) + v
    model.train(was_training)
    return {k: v / batches for k, v in totals.items()}


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, *, progress: bool = True, desc: str = "train",
        log: Any = None) -> dict[str, Any]:
    """Train `model` on batches of `task` for cfg.steps steps. Returns final metrics and throughput.

    `log`, if given, is called with one dict per logged step (what `train` writes as JSON lines).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    model.train()
    tokens, start, history = 0, time.perf_counter(), []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = task.batch(cfg.batch_size, gen)
        logits, _ = model(batch.inputs)
        loss = masked_cross_entropy(logits, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        tokens += batch.inputs.numel()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            row = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr_at(step, cfg),
                   "tokens_per_s": tokens / elapsed}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if log is not None:
                log(row)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            metrics = evaluate(model, task, cfg.eval_batches, cfg.batch_size, seed=cfg.seed + 1)
            if log is not None:
                log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    seconds = time.perf_counter() - start
    final = evaluate(model, task, cfg.eval_batches, cfg.batch_size, seed=cfg.seed + 1)
    if log is not None:
        log({"step": cfg.steps - 1, **{f"eval_{k}": v for k, v in final.items()}})
    return {"eval": final, "train_loss": history[-1]["loss"], "seconds": seconds,
            "tokens_per_s": tokens / seconds, "history": history}


def train(config: RunConfig | dict | str | Path, task: str | None = None, out: str | Path = "runs/train",
          *, progress: bool = True) -> dict[str, Any]:
    """Train the model a RunConfig describes and save it to `out/checkpoint`.

    `config` is a RunConfig, a dict, or the path of a JSON file; `task`, if given, overrides `config.task.name`.
    `out` receives config.json (the resolved config), metrics.jsonl and the checkpoint folder.
    """
    if isinstance(config, (str, Path)):
        config = RunConfig.load(config)
    elif isinstance(config, dict):
        config = RunConfig.from_dict(config)
    if task is not None:
        config = config.replace(task={**config.task, "name": task})
    params = {k: v for k, v in config.task.items() if k != "name"}
    task_obj = make_task(config.task["name"], **params)
    if config.model.vocab_size < task_obj.vocab_size:
        raise InputError(f"model.vocab_size = {config.model.vocab_size} is smaller than task "
                         f"'{task_obj.name}' needs ({task_obj.vocab_size})")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise InputError(f"cannot write to output folder '{out}': {e.strerror}") from None
    model = build_model(config.model, seed=config.train.seed)
    with open(out / "metrics.jsonl", "w") as f:
        def log(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        result = fit(model, task_obj, config.train, progress=progress, log=log)
    save(model, out / "checkpoint")
    result = {k: v for k, v in result.items() if k != "history"}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result

