"""Data parallelism through `torchrun`: PyTorch's DDP (gloo on CPU, NCCL on GPU).

`torchrun --nproc_per_node 2 -m seqlab train ...` starts two processes and sets RANK / WORLD_SIZE / LOCAL_RANK
in their environment (the launcher's protocol, read here and nowhere else). Each process builds the same model
from the same seed, draws the same *global* batch from the same generator and trains on its own rows of it; DDP
averages the gradients. So the data order, and the result, do not depend on the number of processes: a run on
two processes matches a one-process run with the same global batch, up to floating-point summation order.
Rank 0 alone writes checkpoints, metrics and the progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqlab.errors import InputError


@dataclass(frozen=True)
class World:
    """Where this process sits: `rank` of `size` processes (size 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` rows."""
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_world() -> World:
    """The World torchrun describes in the environment, or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: str) -> World:
    """Join the process group torchrun set up (once per process): NCCL for `device` cuda (or auto with a GPU),
    else gloo."""
    world = launched_world()
    if world.distributed and not dist.is_initialized():
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world


def check_divisible(batch_size: int, grad_accum: int, world: World) -> int:
    """The micro-batch size: batch_size / (grad_accum * processes); InputError when it does not divide."""
    parts = grad_accum * world.size
    if batch_size % parts:
        raise InputError(
            f"config field 'train.batch_size' = {batch_size}: must be divisible by train.grad_accum "
            f"({grad_accum}) x processes ({world.size}) = {parts}"
        )
    return batch_size // parts


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
