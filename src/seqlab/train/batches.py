"""Where `fit` reads its batches: a batch source gives the global batch of every optimizer step and keeps its
position in the checkpoint, so that a resumed run reads exactly the batches an uninterrupted one would have.

    source = task_batches(task, cfg)     # what a TrainConfig asks for: the stream when cfg.stream, else random
    source.batch(step) -> Batch          # the global batch of optimizer step `step` (cfg.batch_size rows); fit
                                         # calls it once per step, in order, from the step it starts or resumes at
    source.continues(step) -> bool       # batch(step) continues the rows of batch(step - 1): fit carries the
                                         # model state across (truncated BPTT) instead of starting from none
    source.carries_state                 # whether fit keeps the state after each step at all (and checkpoints it)
    source.state_tensors() / load_state_tensors(tensors)   # the position, in trainer.safetensors
    source.task, source.batch_size       # what evaluation reads by default; the global batch's rows

Every process of a data-parallel run holds the same source and draws the same global batch (see
`seqlab.train.distributed`).
"""

from __future__ import annotations

import torch

from seqlab.config import TrainConfig
from seqlab.data import Batch, Task
from seqlab.errors import InputError


class RandomBatches:
    """Independent batches `task.batch(batch_size, gen)` from one generator seeded with `seed`; the generator's
    state is the position."""

    carries_state = False

    def __init__(self, task: Task, batch_size: int, seed: int):
        self.task, self.batch_size = task, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, step: int) -> Batch:
        return self.task.batch(self.batch_size, self.gen)  # the step is implicit: one draw per step, in order

    def continues(self, step: int) -> bool:
        return False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"rng.data": self.gen.get_state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(tensors["rng.data"])


class StreamBatches:
    """Consecutive segments of a streaming task (corpus): step s reads segment s mod N, so the step is the whole
    position. With `carry_state`, the state reached at the end of a segment starts the next one; a new pass over
    the stream (segment 0) starts from no state."""

    def __init__(self, task: Task, batch_size: int, carry_state: bool = True):
        if not hasattr(task, "stream"):
            raise InputError(f"config field 'train.stream' = true needs a streaming task (corpus); '{task.name}' "
                             "only draws independent batches")
        self.task, self.batch_size, self.carries_state = task, batch_size, carry_state
        self.stream = task.stream(batch_size)

    def batch(self, step: int) -> Batch:
        return self.stream.segment(step % len(self.stream))

    def continues(self, step: int) -> bool:
        return self.carries_state and step % len(self.stream) != 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


BatchSource = RandomBatches | StreamBatches


def task_batches(task: Task, cfg: TrainConfig) -> BatchSource:
    """The batches a TrainConfig asks for: the task's stream when cfg.stream (state carried when cfg.carry_state),
    else independent batches from a generator seeded with cfg.seed."""
    if cfg.stream:
        return StreamBatches(task, cfg.batch_size, cfg.carry_state)
    return RandomBatches(task, cfg.batch_size, cfg.seed)
