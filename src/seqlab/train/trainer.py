"""One training loop for every architecture and every objective.

    seqlab.train(config, task, out)                           # `seqlab train --config FILE --task T --out DIR`
    fit(model, task_batches(task, cfg), cross_entropy, cfg)   # the loop alone, on a model you built
    fit(student, task_batches(task, cfg), DistillLoss(teacher, student, dcfg), cfg)   # any loss: see
                                                              # seqlab.train.losses for the protocol

One optimizer step (`train` config section, see `seqlab.config.TrainConfig`):
    1. lr = warmup then cosine, a pure function of the step (so the step is the schedule's whole state);
    2. take the *global* batch (`batch_size` rows) of this step from the batch source (`seqlab.train.batches`:
       random batches from a seeded generator, or segment `step mod N` of a stream for truncated BPTT); this
       process trains on its rows (DDP), in `grad_accum` micro-batches;
    3. each micro-batch's loss is the loss function's sum over its masked tokens divided by the global number of
       masked tokens, so the gradient is exactly that of the mean over the global batch whatever the split;
    4. clip the gradient norm (logged); a non-finite loss or gradient skips the step (counted; the run stops
       after `max_nonfinite` in a row); else AdamW (weight decay on >= 2-D weights only).
Around it: evaluation every `eval_every` steps, JSON-lines metrics, a progress bar, checkpoints every
`checkpoint_every` steps and at the end that resume bit-identically (see `seqlab.train.resume`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from seqlab.config import RunConfig, TrainConfig
from seqlab.data import Batch, Metrics, Task, make_task
from seqlab.errors import InputError
from seqlab.models import ModelState, build_model, check_fits, implementations
from seqlab.train import resume
from seqlab.train.batches import BatchSource, task_batches
from seqlab.train.distributed import World, check_divisible, init_world
from seqlab.train.losses import Loss, LossFn, cross_entropy


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (>= 2-D: linear and embedding weights), never on gains or biases,
    nor on a parameter its mixer marked `_no_weight_decay` (Mamba's A_log, 2-D but a recurrence parameter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decays = [p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decays) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """`cpu`, `cuda` or `auto` (CUDA when present); under torchrun each process takes its local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("config field 'train.device' = 'cuda': no CUDA device is available; use cpu or auto")
        return torch.device("cuda", world.local_rank if world is not None else 0)
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for matmuls when asked; weights, optimizer state and the loss stay fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def detach_state(state: ModelState, kv_window: int) -> ModelState:
    """The state to carry into the next segment: cut from the graph (truncated BPTT), a growing state (KV cache)
    trimmed to its last `kv_window` positions (`State.trim`)."""
    return ModelState(tuple(layer.trim(kv_window).detach() if layer is not None else None for layer in state.layers),
                      state.pos)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches: int = 8, batch_size: int = 32, seed: int = 1234, *,
             stateful: bool = False, kv_window: int | None = None, precision: str = "fp32") -> dict[str, float]:
    """The task's metrics over `batches` held-out batches, every masked token weighted equally.

    Batches come from a generator seeded with `seed`; with `stateful`, they are the first `batches` consecutive
    segments of the task's stream instead, the state carried across them (`batches` = 0: the whole stream).
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    metrics = Metrics()
    if stateful:
        if not hasattr(task, "stream"):
            raise InputError(f"stateful evaluation needs a streaming task (corpus); '{task.name}' has no stream")
        stream = task.stream(batch_size)
        n = len(stream) if batches == 0 else min(batches, len(stream))
        source = (stream.segment(i) for i in range(n))
    else:
        gen = torch.Generator().manual_seed(seed)
        source = (task.batch(batch_size, gen) for _ in range(batches))
    state = None
    for batch in source:
        inputs = batch.inputs.to(device)
        with autocast(device, precision):
            logits, new_state = model(inputs, state)
        metrics.update(logits.float(), batch)
        if stateful:
            state = detach_state(new_state, kv_window or task.seq_len)
    model.train(was_training)
    return metrics.compute()


# ---------------------------------------------------------------------------------------------------------
# the loop


def _finite_floats(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def fit(model: nn.Module, batches: BatchSource, loss_fn: LossFn, cfg: TrainConfig, *, progress: bool = True,
        desc: str = "train", log: Callable[[dict], None] | None = None, eval_task: Task | None = None,
        checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
        run_config: dict | None = None) -> dict[str, Any]:
    """Train `model` on `batches` (a source from `seqlab.train.batches`, usually `task_batches(task, cfg)`) with
    `loss_fn` (`seqlab.train.losses`) for cfg.steps optimizer steps; returns the final evaluation and throughput.

    log: called (on rank 0) with one dict per logged step and per evaluation, what `train` writes as JSON lines:
        {"step", "loss", <the loss's metrics>, "grad_norm", "lr", "tokens_per_s"} and {"step", "eval_<metric>"}.
    eval_task: what evaluation reads (default: the batch source's task); evaluation is cross-entropy and accuracy
        (`evaluate`) whatever the training loss.
    checkpoint_dir: where checkpoints go (every cfg.checkpoint_every steps and at the end); None: nowhere.
    resume_from: a checkpoint written by this loop to continue from, exactly where it stopped.
    run_config: stored in each checkpoint (what `train` checks on --resume).
    """
    world = init_world(cfg.device)
    device = resolve_device(cfg.device, world)
    micro = check_divisible(cfg.batch_size, cfg.grad_accum, world)
    if batches.batch_size != cfg.batch_size:
        raise InputError(f"the batch source draws {batches.batch_size} rows per step but config field "
                         f"'train.batch_size' = {cfg.batch_size}; build it with task_batches(task, cfg)")
    eval_task = eval_task or batches.task
    kv_window = cfg.kv_window or batches.task.seq_len

    model.to(device).train()
    torch.manual_seed(cfg.seed)  # the global RNG draws the model's own randomness (recurrent depth's r); checkpointed
    own: list[nn.Parameter] = []  # the loss's own parameters, trained beside the model's
    if isinstance(loss_fn, nn.Module):
        own = list(loss_fn.to(device).parameters())
    opt = make_optimizer(nn.ModuleList([model, loss_fn]) if own else model, cfg)
    counters = resume.Counters()
    carry: list[ModelState | None] = [None] * cfg.grad_accum
    if resume_from is not None:
        counters, carry = resume.restore_checkpoint(Path(resume_from), model, loss_fn, opt, batches, micro, device,
                                                    cfg.grad_accum)
    net = model
    if world.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    def checkpoint() -> None:
        if checkpoint_dir is not None and world.is_main:
            resume.save_checkpoint(Path(checkpoint_dir), model, loss_fn, opt, batches, counters, carry, run_config)

    def emit(row: dict[str, Any]) -> None:
        if log is not None and world.is_main:
            log(_finite_floats(row))

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, eval_task, cfg.eval_batches, cfg.batch_size, cfg.seed + 1,
                           stateful=batches.carries_state, kv_window=kv_window, precision=cfg.precision)
        emit({"step": counters.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    tokens_at_start, start = counters.tokens, time.perf_counter()
    history: list[dict[str, Any]] = []
    bar = tqdm(total=cfg.steps, initial=counters.step, desc=desc, disable=not progress or not world.is_main,
               leave=False, dynamic_ncols=True)
    while counters.step < cfg.steps:
        step = counters.step
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        if not batches.continues(step):
            carry = [None] * cfg.grad_accum  # a new pass over a stream, or independent batches: no state
        batch = batches.batch(step)
        loss_value, metrics, grad_norm = _optimizer_step(net, loss_fn, own, opt, batch, carry, cfg, world, micro,
                                                         device, kv_window if batches.carries_state else None)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            counters.bad_in_a_row = 0
        else:
            counters.skipped += 1
            counters.bad_in_a_row += 1
            carry = [None] * cfg.grad_accum  # a state computed from a bad step is not worth carrying
        counters.step += 1
        counters.tokens += batch.inputs.numel()
        bar.update(1)

        elapsed = time.perf_counter() - start
        row = {"step": counters.step, "loss": loss_value, **metrics, "grad_norm": grad_norm, "lr": lr,
               "tokens_per_s": (counters.tokens - tokens_at_start) / max(elapsed, 1e-9)}
        if not finite:
            row["skipped"] = counters.skipped
        if counters.step % cfg.log_every == 0 or counters.step == cfg.steps or not finite:
            history.append(row)
            emit(row)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if counters.bad_in_a_row >= cfg.max_nonfinite:
            bar.close()
            raise TrainingDiverged(_diverged_message(counters, cfg, checkpoint_dir))
        if cfg.eval_every and counters.step % cfg.eval_every == 0 and counters.step < cfg.steps:
            run_eval()
        due = cfg.checkpoint_every and counters.step % cfg.checkpoint_every == 0 and counters.step < cfg.steps
        if due and counters.bad_in_a_row == 0:  # during a streak of bad steps, keep the last good checkpoint
            checkpoint()
    bar.close()
    if counters.result is not None:  # resumed after the final checkpoint: the run is done, nothing to redo
        if Path(resume_from).name != "checkpoint":
            checkpoint()  # restored from the copy a crash left aside (`resume.find_checkpoint`): put it in place
        world.barrier()
        return {**counters.result, "history": history}
    seconds = time.perf_counter() - start
    counters.result = {
        "eval": run_eval(),
        "train_loss": history[-1]["loss"] if history else None,
        "steps": counters.step,
        "skipped_steps": counters.skipped,
        "seconds": seconds,
        "tokens_per_s": (counters.tokens - tokens_at_start) / max(seconds, 1e-9),
    }
    checkpoint()
    world.barrier()  # nobody leaves before rank 0 has written the final checkpoint
    return {**counters.result, "history": history}


def _optimizer_step(net: nn.Module, loss_fn: LossFn, own: list[nn.Parameter], opt: torch.optim.Optimizer,
                    batch: Batch, carry: list[ModelState | None], cfg: TrainConfig, world: World, micro: int,
                    device: torch.device, kv_window: int | None) -> tuple[float, dict[str, float], float]:
    """One step on this process's rows of the global `batch`, in cfg.grad_accum micro-batches; the update is
    skipped when the loss or the gradient is not finite. Updates `carry` in place when `kv_window` is given
    (the source carries state). Returns the global batch's loss, the loss's metrics (per masked position) and
    the gradient norm before clipping."""
    counted = max(int(batch.mask.sum()), 1)  # masked tokens in the global batch
    local = batch[world.rows(cfg.batch_size)]
    totals, names = None, []
    for a in range(cfg.grad_accum):
        part = local[a * micro : (a + 1) * micro]
        out = _micro_step(net, loss_fn, part, carry[a], device, cfg.precision, scale=world.size / counted,
                          sync=a == cfg.grad_accum - 1)
        terms = torch.stack([out.total, *out.metrics.values()])  # (1 + metrics,)
        totals = terms if totals is None else totals + terms
        names = list(out.metrics)
        if kv_window is not None:
            carry[a] = detach_state(out.state, kv_window)
    totals = world.all_reduce_sum(totals)  # DDP averaged the model's gradients already
    loss_value, *values = (totals / counted).tolist()
    if world.distributed:
        for p in own:  # the loss's own parameters are not in DDP: average their gradients here
            if p.grad is not None:
                world.all_reduce_sum(p.grad).div_(world.size)
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf).item()
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_value, dict(zip(names, values)), grad_norm


def _diverged_message(counters: resume.Counters, cfg: TrainConfig, checkpoint_dir: str | Path | None) -> str:
    last = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir is not None else None
    kept = f"the last good checkpoint is '{last}'" if last is not None and last.exists() else \
        "no checkpoint was written"
    return (f"stopped at step {counters.step}: {counters.bad_in_a_row} steps in a row had a non-finite loss or "
            f"gradient (train.max_nonfinite = {cfg.max_nonfinite}; {counters.skipped} skipped in all); {kept}. "
            "Try a lower train.lr, train.grad_clip > 0, or train.precision = fp32.")


def _micro_step(net: nn.Module, loss_fn: LossFn, part: Batch, state: ModelState | None, device: torch.device,
                precision: str, scale: float, sync: bool) -> Loss:
    """Forward and backward on one micro-batch (the gradient all-reduce held back until the last one, `sync`).
    Returns the loss, detached, except its state (the caller detaches what it carries)."""
    part = Batch(part.inputs.to(device), part.targets.to(device), part.mask.to(device), part.byte_level)
    no_sync = getattr(net, "no_sync", None)
    with (contextlib.nullcontext() if sync or no_sync is None else no_sync()):
        with autocast(device, precision):
            out = loss_fn(net, part, state)
        (out.total * scale).backward()
    return Loss(out.total.detach().float(), out.state, {k: v.detach().float() for k, v in out.metrics.items()})


# ---------------------------------------------------------------------------------------------------------
# a whole run: config -> output folder


def _as_run_config(config: RunConfig | dict | str | Path) -> RunConfig:
    if isinstance(config, (str, Path)):
        return RunConfig.load(config)
    if isinstance(config, dict):
        return RunConfig.from_dict(config)
    if isinstance(config, RunConfig):
        return config
    raise InputError(f"config must be a RunConfig, a dict or a JSON file path, got {type(config).__name__}")


def eval_task_params(config: RunConfig) -> dict[str, Any]:
    """Task parameters for evaluation: the training task's, with `eval_task` overrides (corpus: validation)."""
    overrides = config.eval_task or {}
    params = {**config.task, **overrides}
    if params["name"] == "corpus" and "split" not in overrides:
        params["split"] = "validation"
    return params


def _build_task(params: dict[str, Any]) -> Task:
    return make_task(params["name"], **{k: v for k, v in params.items() if k != "name"})


def train(config: RunConfig | dict | str | Path, task: str | None = None, out: str | Path = "runs/train", *,
          progress: bool = True, resume: bool = False, allow_large: bool = False) -> dict[str, Any]:
    """Train the model a RunConfig describes; write out/config.json, out/metrics.jsonl, out/result.json and
    out/checkpoint (a `seqlab.load`-able folder that also holds what `resume=True` needs to continue the run).
    The result (returned, and in result.json) includes `implementations`: what each mixer's op ran, "auto"
    resolved, and numba's version (`seqlab.models.implementations`).

    `config` is a RunConfig, a dict, or the path of a JSON file; `task`, if given and not the config's task,
    replaces it (with its default parameters; set others with `task.<param>` in the config).
    A run whose weights, optimizer state and one micro-batch's activations cannot fit in the memory available is
    refused before anything is allocated (`seqlab.models.size`); allow_large=True skips that check.
    """
    config = _as_run_config(config)
    if task is not None and task != config.task["name"]:
        config = config.replace(task={"name": task})  # another task's parameters would not apply
    task_obj = _build_task(config.task)
    eval_obj = _build_task(eval_task_params(config))
    for t in (task_obj, eval_obj):
        if config.model.vocab_size < t.vocab_size:
            raise InputError(f"config field 'model.vocab_size' = {config.model.vocab_size} is smaller than task "
                             f"'{t.name}' needs ({t.vocab_size})")
    out = Path(out)
    resolved = config.to_dict()
    resume_from = None
    if resume:
        resume_from = _resume_point(out, resolved)
    elif (out / "checkpoint").exists():
        raise InputError(f"output folder '{out}' already holds a run (checkpoint/); pass --resume to continue it, "
                         "or choose another --out")
    world = init_world(config.train.device)
    micro = -(-config.train.batch_size // (config.train.grad_accum * world.size))  # rows per forward, rounded up
    check_fits(config.model, f"training with {micro} rows of {task_obj.seq_len} tokens per micro-batch", batch=micro,
               tokens=max(task_obj.seq_len, eval_obj.seq_len), training=True,
               device=resolve_device(config.train.device, world), allow_large=allow_large)
    if world.is_main:
        _prepare_out(out, resolved, resumed_at=_step_of(resume_from))
    model = build_model(config.model, seed=config.train.seed, allow_large=True)  # checked above, with the rest

    metrics_file = open(out / "metrics.jsonl", "a") if world.is_main else None
    try:
        def log(row: dict) -> None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

        result = fit(model, task_batches(task_obj, config.train), cross_entropy, config.train, progress=progress,
                     log=log, eval_task=eval_obj, checkpoint_dir=out, resume_from=resume_from, run_config=resolved)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    result = {**{k: v for k, v in result.items() if k != "history"}, "implementations": implementations(model)}
    if world.is_main:
        _write_atomic(out / "result.json", json.dumps(_finite_floats(result), indent=2) + "\n")
    return result


def _resume_point(out: Path, resolved: dict) -> Path:
    path = resume.find_checkpoint(out)
    saved = resume.read_training_state(path)[0]["run_config"]
    if saved != json.loads(json.dumps(resolved)):
        diff = _first_difference(saved, json.loads(json.dumps(resolved)))
        raise InputError(f"cannot resume '{out}': the config differs from the run's at '{diff}'; resume with the "
                         "same config, or start a new run in another --out")
    return path


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".")


def _step_of(checkpoint: Path | None) -> int | None:
    return None if checkpoint is None else resume.read_training_state(checkpoint)[0]["step"]


def _prepare_out(out: Path, resolved: dict, resumed_at: int | None) -> None:
    """Create `out`, write the resolved config, and start metrics.jsonl (on resume: cut to the checkpoint's step).
    Each file is replaced by a rename, so a kill at any instant leaves the old file or the new one, never a
    truncated one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "config.json", json.dumps(resolved, indent=2) + "\n")
        metrics = out / "metrics.jsonl"
        if resumed_at is None:
            _write_atomic(metrics, "")
        else:
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            kept = [r for r in rows if r.strip() and _row_step(r) <= resumed_at]
            _write_atomic(metrics, "".join(r + "\n" for r in kept))
    except OSError as e:
        raise InputError(f"cannot write to output folder '{out}': {e.strerror or e}") from None


def _row_step(row: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a kill mid-write counts as after the checkpoint."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
