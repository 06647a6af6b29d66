"""Training objectives for `fit`. A loss function is called once per micro-batch:

    loss_fn(model, batch, state) -> Loss(total, state, metrics)

    model    the model in training; under DDP its DistributedDataParallel wrapper: call it (so the gradients are
             averaged across processes) and read its attributes through `unwrap(model)`
    batch    this micro-batch (a slice of the step's global batch), on the model's device
    state    the model state carried from the previous segment (stream training with carry_state), else None
    total    the loss *summed* over the micro-batch's masked positions (0-dim, differentiable). fit scales it by
             processes / (masked positions of the global batch) before backward, so the gradient is that of the
             mean over the global batch however it is cut into micro-batches and processes
    state    the model state after the micro-batch (fit detaches it and carries it when the source says so)
    metrics  {name: 0-dim tensor}, each summed over the masked positions like `total`; fit logs each divided by
             the global batch's masked positions (correct predictions -> accuracy), after `loss`

fit runs loss_fn under the run's autocast (train.precision = bf16); compute the loss terms in fp32. A loss with
parameters of its own is an nn.Module (distillation's hidden-state projections, `seqlab.distill.DistillLoss`):
fit trains them beside the model, averages their gradients across processes and saves them in the checkpoint.

Here: `cross_entropy` (next-token / answer cross-entropy, what `seqlab train` optimizes) and `recurrent_depth`
(the same with the number of core steps r drawn by the model's own sampler, and logged as the metric `r`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seqlab.data import Batch, masked_cross_entropy
from seqlab.errors import InputError
from seqlab.models import ModelState, RecurrentDepthModel


@dataclass
class Loss:
    """What a loss function returns for one micro-batch (see the module docstring)."""

    total: torch.Tensor  # summed over the masked positions
    state: ModelState | None
    metrics: dict[str, torch.Tensor]  # each summed over the masked positions


class LossFn(Protocol):
    def __call__(self, model: nn.Module, batch: Batch, state: ModelState | None) -> Loss: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of its DistributedDataParallel wrapper when it has one."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def correct(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Masked positions whose arg-max prediction is the target; logits (B, T, V)."""
    return ((logits.detach().argmax(-1) == batch.targets) & batch.mask).sum()


def cross_entropy(model: nn.Module, batch: Batch, state: ModelState | None) -> Loss:
    """Cross-entropy on the masked targets; logs accuracy. A recurrent-depth model draws its r itself (as its
    forward does in training mode) without logging it: `recurrent_depth` logs it."""
    logits, new_state = model(batch.inputs, state)
    total = masked_cross_entropy(logits, batch) * batch.mask.sum()  # the mean times the count: the sum
    return Loss(total, new_state, {"accuracy": correct(logits, batch)})


def recurrent_depth(model: nn.Module, batch: Batch, state: ModelState | None) -> Loss:
    """Cross-entropy of a recurrent-depth model run with r core steps drawn by its own sampler (from the global
    RNG, which fit seeds and checkpoints), the first r - backprop_steps of them without gradient; logs accuracy
    and r (per masked position like every metric: with one micro-batch per step, the step's r). One r per
    micro-batch, the same on every process: exactly the draws of the model's training-mode forward, so this
    objective and `cross_entropy` train a recurrent-depth model identically."""
    inner = unwrap(model)
    if not isinstance(inner, RecurrentDepthModel):
        raise InputError(f"the recurrent-depth objective needs a recurrent-depth model (arch 'recurrent_depth'); "
                         f"got arch {inner.config.arch!r}")
    r, _ = inner.sample_steps()  # think(steps=r) then runs the first r - backprop_steps without gradient
    logits, new_state = model(batch.inputs, state, steps=r)
    counted = batch.mask.sum()
    total = masked_cross_entropy(logits, batch) * counted
    return Loss(total, new_state, {"accuracy": correct(logits, batch), "r": r * counted})
