"""What a resumed run needs, as safetensors + JSON (no pickle): optimizer moments, every RNG state, the data
position and the recurrent state carried between segments (truncated BPTT).

A training checkpoint is a `seqlab.save` folder (config.json + model.safetensors, so `seqlab eval` and
`seqlab.load` read it) with three more files written in the same atomic rename:

    optimizer.safetensors   AdamW's per-parameter state: `state.<param index>.<exp_avg|exp_avg_sq|step>` (the
                            model's parameters, then the loss's own, if it has any)
    trainer.safetensors     RNG states (torch CPU `rng.torch`, CUDA `rng.cuda.<i>`), the batch source's position
                            (`rng.data`: the data generator, for random batches), the carried model state
                            (`carry.*`) and the loss's own parameters (`loss.*`, distillation's projections)
    trainer.json            step, counters, the Python and NumPy RNG states, the carried state's layout, the run
                            config; the learning-rate schedule is a pure function of the step, so the step is
                            its whole state
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seqlab.checkpoint import read_json, read_tensors, save
from seqlab.errors import InputError
from seqlab.models import ModelState
from seqlab.train.batches import BatchSource

OPTIMIZER_FILE = "optimizer.safetensors"
TENSORS_FILE = "trainer.safetensors"
JSON_FILE = "trainer.json"


# ---------------------------------------------------------------------------------------------------------
# optimizer


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        f"state.{index}.{key}": value
        for index, state in opt.state_dict()["state"].items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore per-parameter state; the param groups come from the (identical) config, the lr from the step."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    current = opt.state_dict()
    n_params = sum(len(g["params"]) for g in current["param_groups"])
    if any(i >= n_params for i in state):
        raise InputError(f"{OPTIMIZER_FILE} holds state for {max(state) + 1} parameters; the model has {n_params}")
    opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})


# ---------------------------------------------------------------------------------------------------------
# random number generators


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def rng_json() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rngs(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, mt, gauss = saved["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------------------
# carried model state (truncated BPTT): one ModelState (or None) per micro-batch


def carry_tensors(carry: list[ModelState | None]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Tensors `carry.<micro-batch>.<layer>.<field>` and a JSON layout (positions and non-tensor fields)."""
    tensors: dict[str, torch.Tensor] = {}
    layout: list[Any] = []
    for a, state in enumerate(carry):
        if state is None:
            layout.append(None)
            continue
        layers = []
        for i, layer in enumerate(state.layers):
            if layer is None:
                layers.append(None)
                continue
            for name, t in layer.tensors().items():
                tensors[f"carry.{a}.{i}.{name}"] = t
            others = {
                f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.name not in layer.tensors()
            }
            layers.append(others)
        layout.append({"pos": state.pos, "layers": layers})
    return tensors, layout


def restore_carry(
    tensors: dict[str, torch.Tensor], layout: list[Any], template: ModelState, device: torch.device
) -> list[ModelState | None]:
    """Rebuild the carried states; `template` is any state of the same model (it gives each layer's type)."""
    carry: list[ModelState | None] = []
    for a, entry in enumerate(layout):
        if entry is None:
            carry.append(None)
            continue
        layers = []
        for i, others in enumerate(entry["layers"]):
            if others is None:
                layers.append(None)
                continue
            fields = {
                name: tensors[f"carry.{a}.{i}.{name}"].to(device) for name in template.layers[i].tensors()
            }
            layers.append(dataclasses.replace(template.layers[i], **fields, **others))
        carry.append(ModelState(tuple(layers), entry["pos"]))
    return carry


# ---------------------------------------------------------------------------------------------------------
# reading a training checkpoint back


def find_checkpoint(out: Path) -> Path:
    """The newest complete checkpoint of a run in `out`.

    That is `out/checkpoint`, or, if a crash hit the instant between the two renames that replace it, the
    previous one the writer had moved aside (`.checkpoint.old-*`), which is complete.
    """
    path = out / "checkpoint"
    if (path / JSON_FILE).is_file():
        return path
    aside = sorted(out.glob(".checkpoint.old-*"), key=lambda p: p.stat().st_mtime)
    for candidate in reversed(aside):
        if (candidate / JSON_FILE).is_file():
            return candidate
    raise InputError(
        f"cannot resume: no training checkpoint in '{path}' (expected {JSON_FILE} written by seqlab train); "
        "run without --resume to start a new run"
    )


def read_training_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainer.json, optimizer tensors, trainer tensors) of a checkpoint, each verified against its hash."""
    return read_json(path, JSON_FILE), read_tensors(path, OPTIMIZER_FILE), read_tensors(path, TENSORS_FILE)


# ---------------------------------------------------------------------------------------------------------
# a whole training checkpoint: write, and read back into a fresh run


@dataclasses.dataclass
class Counters:
    """What the loop has done; saved in trainer.json."""

    step: int = 0  # optimizer steps done (skipped ones included)
    tokens: int = 0  # tokens trained on, all processes together
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0
    result: dict | None = None  # the finished run's result (final evaluation, throughput): in the last checkpoint,
    #                             so resuming a finished run returns it instead of evaluating (and logging) again


def save_checkpoint(folder: Path, model: nn.Module, loss_fn: Any, opt: torch.optim.Optimizer,
                    batches: BatchSource, counters: Counters, carry: list[ModelState | None],
                    run_config: dict | None) -> None:
    """Write `folder/checkpoint` (atomically replacing the previous one) with all a resumed run needs."""
    carried, layout = carry_tensors(carry)
    own = loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {}
    state = {**dataclasses.asdict(counters), "rng": rng_json(), "carry": layout, "run_config": run_config}
    save(model, folder / "checkpoint",
         tensors={OPTIMIZER_FILE: optimizer_tensors(opt),
                  TENSORS_FILE: {**rng_tensors(), **batches.state_tensors(), **carried,
                                 **{f"loss.{k}": v for k, v in own.items()}}},
         json_files={JSON_FILE: state})
    for stale in (*folder.glob(".checkpoint.old-*"), *folder.glob(".checkpoint.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-write; the new checkpoint supersedes them


def restore_checkpoint(path: Path, model: nn.Module, loss_fn: Any, opt: torch.optim.Optimizer,
                       batches: BatchSource, micro: int, device: torch.device,
                       grad_accum: int) -> tuple[Counters, list[ModelState | None]]:
    """Load a checkpoint written by `save_checkpoint` into a freshly set-up run; returns its counters and the
    carried states (one per micro-batch)."""
    saved, opt_tensors, tensors = read_training_state(path)
    model.load_state_dict(read_tensors(path))
    if isinstance(loss_fn, nn.Module):
        loss_fn.load_state_dict({k[len("loss."):]: v.to(device) for k, v in tensors.items() if k.startswith("loss.")})
    load_optimizer(opt, {k: v.to(device) if not k.endswith(".step") else v for k, v in opt_tensors.items()})
    batches.load_state_tensors(tensors)
    counters = Counters(**{f.name: saved.get(f.name, f.default) for f in dataclasses.fields(Counters)})
    carry: list[ModelState | None] = [None] * grad_accum
    if any(entry is not None for entry in saved["carry"]):
        with torch.no_grad():
            _, template = model(torch.zeros(micro, 1, dtype=torch.long, device=device))
        carry = restore_carry(tensors, saved["carry"], template, device)
    restore_rngs(tensors, saved["rng"])  # last: the template forward above may draw from them (recurrent depth's r)
    return counters, carry
