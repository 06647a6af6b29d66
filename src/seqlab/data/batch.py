"""What every task hands the model and how it is scored: `Batch`, the `Task` protocol, the masked loss and the
metrics. A leaf of `seqlab.data`: the synthetic tasks and the corpus both build on it.

A `Batch` holds `inputs` (B, T) int64, `targets` (B, T) int64 and a loss `mask` (B, T) bool; loss and accuracy
count only where `mask` is True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from seqlab.errors import InputError


@dataclass(frozen=True)
class Batch:
    """One batch of a task. `targets` may hold any value where `mask` is False."""

    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64: next token / answer at each position
    mask: torch.Tensor  # (B, T) bool: True where loss and accuracy count
    byte_level: bool = False  # the tokens are bytes: metrics also report bits per byte
    nbytes: torch.Tensor | None = None  # (B, T) int: UTF-8 bytes of text each target token stands for (BPE text)

    def __getitem__(self, rows: slice) -> Batch:
        """A slice of the rows (a data-parallel rank's share of a global batch)."""
        nbytes = None if self.nbytes is None else self.nbytes[rows]
        return Batch(self.inputs[rows], self.targets[rows], self.mask[rows], self.byte_level, nbytes)

    def __len__(self) -> int:
        return self.inputs.shape[0]


@runtime_checkable
class Task(Protocol):
    name: str
    vocab_size: int
    seq_len: int

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch: ...


def _check_logits(logits: torch.Tensor, batch: Batch) -> None:
    if logits.dim() != 3 or logits.shape[:2] != batch.inputs.shape:
        raise InputError(
            f"logits of shape {tuple(logits.shape)} do not match the batch: expected "
            f"({batch.inputs.shape[0]}, {batch.inputs.shape[1]}, vocab_size)"
        )


def masked_cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy (nats, fp32) over the masked positions; logits (B, T, V). 0 when none is masked."""
    _check_logits(logits, batch)
    mask = batch.mask.to(logits.device)
    picked = logits[mask].float()  # (N, V): only the positions that count
    if picked.shape[0] == 0:
        return logits.float().sum() * 0.0  # keeps the graph, so backward() still works
    return F.cross_entropy(picked, batch.targets.to(logits.device)[mask])


class Metrics:
    """Accumulates loss and accuracy over many batches, weighting every masked token (and sequence) equally.

    `compute()` returns loss (nats per masked token), accuracy (per masked token), seq_accuracy (the fraction
    of sequences with every masked position right; sequences with no masked position are left out), and for text
    (byte-level batches, or batches carrying `nbytes`) bits_per_byte = total nats / total UTF-8 bytes / ln 2,
    which is loss / ln 2 for bytes and compares a BPE model with a byte model on the same text. """

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.tokens = 0
        self.seq_correct = 0
        self.seqs = 0
        self.text_nats = 0.0  # loss and UTF-8 bytes of the text batches (byte-level or with nbytes)
        self.text_bytes = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, batch: Batch) -> Metrics:
        _check_logits(logits, batch)
        mask = batch.mask.to(logits.device)
        targets = batch.targets.to(logits.device)
        counted = mask.sum().item()
        if counted:
            loss = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum").item()
            self.loss_sum += loss
            if batch.byte_level or batch.nbytes is not None:
                self.text_nats += loss
                self.text_bytes += int(counted) if batch.nbytes is None else int(batch.nbytes[mask.cpu()].sum())
        hit = (logits.argmax(dim=-1) == targets) & mask  # (B, T)
        right = hit | ~mask  # (B, T): True where right or not counted
        has_any = mask.any(dim=1)
        self.correct += int(hit.sum().item())
        self.tokens += int(counted)
        self.seq_correct += int((right.all(dim=1) & has_any).sum().item())
        self.seqs += int(has_any.sum().item())
        return self

    def compute(self) -> dict[str, float]:
        tokens, seqs = max(self.tokens, 1), max(self.seqs, 1)
        out = {
            "loss": self.loss_sum / tokens,
            "accuracy": self.correct / tokens,
            "seq_accuracy": self.seq_correct / seqs,
        }
        if self.text_bytes:
            out["bits_per_byte"] = self.text_nats / self.text_bytes / math.log(2)
        return out


def task_metrics(logits: torch.Tensor, batch: Batch) -> dict[str, float]:
    """loss, accuracy, seq_accuracy (and bits_per_byte for the corpus) of one batch; see `Metrics`."""
    return Metrics().update(logits, batch).compute()


@torch.no_grad()
def accuracy_by_length(logits: torch.Tensor, batch: Batch) -> dict[int, float]:
    """Sequence accuracy grouped by the number of masked positions per sequence (`copy`: string length)."""
    _check_logits(logits, batch)
    mask = batch.mask.to(logits.device)
    right = ((logits.argmax(dim=-1) == batch.targets.to(logits.device)) | ~mask).all(dim=1)
    lengths = mask.sum(dim=1)
    return {
        int(n): right[lengths == n].float().mean().item() for n in lengths.unique().tolist() if n > 0
    }
