"""One training loop for every architecture.

    seqlab.train(config, task, out)        # what `seqlab train --config FILE --task T --out DIR` runs
    fit(model, task, cfg)                  # the loop alone, on a model you built (the lab uses this)

One optimizer step (`train` config section, see `seqlab.config.TrainConfig`):
    1. lr = warmup then cosine, a pure function of the step (so the step is the schedule's whole state);
    2. draw the *global* batch (`batch_size` rows) from the data generator, or take segment `step mod N` of the
       stream (truncated BPTT); this process trains on its rows (DDP), in `grad_accum` micro-batches;
    3. each micro-batch's loss is its summed cross-entropy over the global number of masked tokens, so the
       gradient is exactly that of the mean over the global batch whatever the split;
    4. clip the gradient norm (logged); a non-finite loss or gradient skips the step (counted; the run stops
       after `max_nonfinite` in a row); else AdamW (weight decay on >= 2-D weights only).
Around it: evaluation every `eval_every` steps, JSON-lines metrics, a progress bar, checkpoints every
`checkpoint_every` steps and at the end that resume bit-identically (see `seqlab.train.resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seqlab.checkpoint import save
from seqlab.config import RunConfig, TrainConfig
from seqlab.data import Batch, Metrics, Task, make_task, masked_cross_entropy
from seqlab.errors import InputError
from seqlab.models import ModelState, build_model
from seqlab.models.attention import KVCache
from seqlab.train import resume
from seqlab.train.distributed import World, check_divisible, init_world


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
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
    """The state to carry into the next segment: cut from the graph (truncated BPTT), KV caches bounded."""
    layers = []
    for layer in state.layers:
        if isinstance(layer, KVCache) and layer.k.shape[2] > kv_window:
            layer = dataclasses.replace(layer, k=layer.k[:, :, -kv_window:], v=layer.v[:, :, -kv_window:])
        layers.append(layer.detach() if layer is not None else None)
    return ModelState(tuple(layers), state.pos)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, batches: int = 8, batch_size: int = 32, seed: int = 1234, *,
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


@dataclasses.dataclass
class Counters:
    """What the loop has done; saved in trainer.json."""

    step: int = 0  # optimizer steps done (skipped ones included)
    tokens: int = 0  # tokens trained on, all processes together
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0


def _finite_floats(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, *, progress: bool = True, desc: str = "train",
        log: Callable[[dict], None] | None = None, eval_task: Task | None = None,
        checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
        run_config: dict | None = None) -> dict[str, Any]:
    """Train `model` on `task` for cfg.steps optimizer steps; returns the final evaluation and throughput.

    log: called (on rank 0) with one dict per logged step and per evaluation, what `train` writes as JSON lines.
    eval_task: what evaluation reads (default: `task`).
    checkpoint_dir: where checkpoints go (every cfg.checkpoint_every steps and at the end); None: nowhere.
    resume_from: a checkpoint written by this loop to continue from, exactly where it stopped.
    run_config: stored in each checkpoint (what `train` checks on --resume).
    """
    world = init_world(cfg.device)
    device = resolve_device(cfg.device, world)
    micro = check_divisible(cfg.batch_size, cfg.grad_accum, world)
    eval_task = eval_task or task
    stream = None
    if cfg.stream:
        if not hasattr(task, "stream"):
            raise InputError(f"config field 'train.stream' = true needs a streaming task (corpus); '{task.name}' "
                             "only draws independent batches")
        stream = task.stream(cfg.batch_size)
    kv_window = cfg.kv_window or task.seq_len

    model.to(device).train()
    torch.manual_seed(cfg.seed)  # the global RNG draws the model's own randomness (recurrent depth's r); checkpointed
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    counters = Counters()
    carry: list[ModelState | None] = [None] * cfg.grad_accum
    if resume_from is not None:
        counters, carry = _restore(Path(resume_from), model, opt, gen, micro, device, cfg.grad_accum)
    net = model
    if world.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    def checkpoint() -> None:
        if checkpoint_dir is not None and world.is_main:
            _save(Path(checkpoint_dir), model, opt, gen, counters, carry, run_config)

    def emit(row: dict[str, Any]) -> None:
        if log is not None and world.is_main:
            log(_finite_floats(row))

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, eval_task, cfg.eval_batches, cfg.batch_size, cfg.seed + 1,
                           stateful=stream is not None and cfg.carry_state, kv_window=kv_window,
                           precision=cfg.precision)
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
        if stream is not None:
            segment = step % len(stream)
            if segment == 0 or not cfg.carry_state:
                carry = [None] * cfg.grad_accum  # a new pass over the stream starts from an empty state
            batch = stream.segment(segment)
        else:
            batch = task.batch(cfg.batch_size, gen)
        loss_value, accuracy, grad_norm = _optimizer_step(net, opt, batch, carry, cfg, world, micro, device,
                                                          kv_window if stream is not None else None)
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
        row = {"step": counters.step, "loss": loss_value, "accuracy": accuracy, "grad_norm": grad_norm, "lr": lr,
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
    seconds = time.perf_counter() - start
    final = run_eval()
    checkpoint()
    world.barrier()  # nobody leaves before rank 0 has written the final checkpoint
    return {
        "eval": final,
        "train_loss": history[-1]["loss"] if history else None,
        "steps": counters.step,
        "skipped_steps": counters.skipped,
        "seconds": seconds,
        "tokens_per_s": (counters.tokens - tokens_at_start) / max(seconds, 1e-9),
        "history": history,
    }


def _optimizer_step(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, carry: list[ModelState | None],
                    cfg: TrainConfig, world: World, micro: int, device: torch.device,
                    kv_window: int | None) -> tuple[float, float, float]:
    """One step on this process's rows of the global `batch`, in cfg.grad_accum micro-batches; the update is
    skipped when the loss or the gradient is not finite. Updates `carry` in place when `kv_window` is given
    (stream training). Returns the global batch's loss, accuracy and the gradient norm before clipping."""
    counted = max(int(batch.mask.sum()), 1)  # masked tokens in the global batch
    local = batch[world.rows(cfg.batch_size)]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for a in range(cfg.grad_accum):
        part = local[a * micro : (a + 1) * micro]
        loss, state, hits = _micro_step(net, part, carry[a], device, cfg.precision,
                                        scale=world.size / counted, sync=a == cfg.grad_accum - 1)
        loss_sum += loss
        correct += hits
        if kv_window is not None and cfg.carry_state:
            carry[a] = detach_state(state, kv_window)
    totals = world.all_reduce_sum(torch.stack([loss_sum, correct]))  # DDP averaged the gradients already
    loss_value, accuracy = (totals / counted).tolist()
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf).item()
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_value, accuracy, grad_norm


def _diverged_message(counters: Counters, cfg: TrainConfig, checkpoint_dir: str | Path | None) -> str:
    last = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir is not None else None
    kept = f"the last good checkpoint is '{last}'" if last is not None and last.exists() else \
        "no checkpoint was written"
    return (f"stopped at step {counters.step}: {counters.bad_in_a_row} steps in a row had a non-finite loss or "
            f"gradient (train.max_nonfinite = {cfg.max_nonfinite}; {counters.skipped} skipped in all); {kept}. "
            "Try a lower train.lr, train.grad_clip > 0, or train.precision = fp32.")


def _micro_step(net: torch.nn.Module, part: Batch, state: ModelState | None, device: torch.device,
                precision: str, scale: float, sync: bool) -> tuple[torch.Tensor, ModelState, torch.Tensor]:
    """Forward and backward on one micro-batch. Returns (summed loss, new state, correct count), all detached
    except the state (the caller detaches what it carries)."""
    part = Batch(part.inputs.to(device), part.targets.to(device), part.mask.to(device))
    no_sync = getattr(net, "no_sync", None)
    with (contextlib.nullcontext() if sync or no_sync is None else no_sync()):
        with autocast(device, precision):
            logits, new_state = net(part.inputs, state)
        counted = part.mask.sum()
        loss = masked_cross_entropy(logits, part) * counted  # summed over this micro-batch's masked tokens
        (loss * scale).backward()
    hits = ((logits.detach().argmax(-1) == part.targets) & part.mask).sum()
    return loss.detach().float(), new_state, hits.float()


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def _save(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
          counters: Counters, carry: list[ModelState | None], run_config: dict | None) -> None:
    carried, layout = resume.carry_tensors(carry)
    state = {
        **dataclasses.asdict(counters),
        "rng": resume.rng_json(),
        "carry": layout,
        "run_config": run_config,
    }
    save(model, folder / "checkpoint",
         tensors={resume.OPTIMIZER_FILE: resume.optimizer_tensors(opt),
                  resume.TENSORS_FILE: {**resume.rng_tensors(gen), **carried}},
         json_files={resume.JSON_FILE: state})
    for stale in (*folder.glob(".checkpoint.old-*"), *folder.glob(".checkpoint.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-write; the new checkpoint supersedes them


def _restore(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, micro: int,
             device: torch.device, grad_accum: int) -> tuple[Counters, list[ModelState | None]]:
    from seqlab.checkpoint import read_tensors

    saved, opt_tensors, tensors = resume.read_training_state(path)
    model.load_state_dict(read_tensors(path))
    resume.load_optimizer(opt, {k: v.to(device) if not k.endswith(".step") else v for k, v in opt_tensors.items()})
    resume.restore_rngs(tensors, saved["rng"], gen)
    counters = Counters(**{f.name: saved[f.name] for f in dataclasses.fields(Counters)})
    carry: list[ModelState | None] = [None] * grad_accum
    if any(entry is not None for entry in saved["carry"]):
        with torch.no_grad():
            _, template = model(torch.zeros(micro, 1, dtype=torch.long, device=device))
        carry = resume.restore_carry(tensors, saved["carry"], template, device)
    return counters, carry


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
          progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train the model a RunConfig describes; write out/config.json, out/metrics.jsonl, out/result.json and
    out/checkpoint (a `seqlab.load`-able folder that also holds what `resume=True` needs to continue the run).

    `config` is a RunConfig, a dict, or the path of a JSON file; `task`, if given and not the config's task,
    replaces it (with its default parameters; set others with `task.<param>` in the config).
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
    if world.is_main:
        _prepare_out(out, resolved, resumed_at=_step_of(resume_from))
    model = build_model(config.model, seed=config.train.seed)

    metrics_file = open(out / "metrics.jsonl", "a") if world.is_main else None
    try:
        def log(row: dict) -> None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

        result = fit(model, task_obj, config.train, progress=progress, log=log, eval_task=eval_obj,
                     checkpoint_dir=out, resume_from=resume_from, run_config=resolved)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    result = {k: v for k, v in result.items() if k != "history"}
    if world.is_main:
        (out / "result.json").write_text(json.dumps(_finite_floats(result), indent=2) + "\n")
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
    """Create `out`, write the resolved config, and start metrics.jsonl (on resume: cut to the checkpoint)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        metrics = out / "metrics.jsonl"
        if resumed_at is None:
            metrics.write_text("")
        else:
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= resumed_at]
            metrics.write_text("".join(r + "\n" for r in kept))
    except OSError as e:
        raise InputError(f"cannot write to output folder '{out}': {e.strerror or e}") from None
