"""Synthetic sequence tasks that expose what recurrent models and Transformers do differently.

Every task has the same interface: `task.batch(batch_size, generator) -> Batch`, where a `Batch` holds
`inputs` (B, T) int64, `targets` (B, T) int64 and a loss `mask` (B, T) bool. The model reads `inputs` and must
predict `targets[b, t]` at position t from `inputs[b, :t+1]` (causally); loss and accuracy count only where
`mask` is True. All randomness comes from the `torch.Generator` passed in, so a seed fixes every batch.

Glossary (shared by the docstrings below):
    V   vocabulary size          T   sequence length (`seq_len`)
    B   batch size               .   a position whose target does not count (mask False)

`make_task(name, **params)` builds a task by name (the synthetic ones here, "corpus" from `seqlab.data.corpus`);
`masked_cross_entropy` and `task_metrics` (or the `Metrics` accumulator, for many batches), in
`seqlab.data.batch`, score a model's logits against a batch, the same way for every task.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from seqlab.data.batch import (  # noqa: F401  (re-exported: seqlab.data.tasks.masked_cross_entropy etc.)
    Batch,
    Metrics,
    Task,
    accuracy_by_length,
    masked_cross_entropy,
    task_metrics,
)
from seqlab.data.corpus import CorpusTask
from seqlab.errors import InputError

# ----------------------------------------------------------------------------------------------------
# parameter checks


def _int(task: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"task '{task}': parameter {name} = {value!r} must be an integer")
    if value < minimum:
        raise InputError(f"task '{task}': parameter {name} = {value} must be >= {minimum}")


def _check_batch_size(task: str, batch_size: Any) -> None:
    _int(task, "batch_size", batch_size, 1)


# ----------------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall, as in Zoology (Arora et al. 2023).

    Keys come from the lower half of the vocabulary [0, V/2), values from the upper half [V/2, V); both are
    drawn without replacement within a sequence. The first 2P positions are the context k1 v1 k2 v2 ... kP vP.
    The rest of the sequence is random filler tokens, into which every key is written once, as a query, at an
    even offset 2g from the end of the context. The gaps g are drawn without replacement with P(g)
    proportional to (g + 1) ** (power_a - 1) (Zoology's power law, a = 0.01), so most queries sit close to the
    context. At a query
    position the target is the key's value; nothing else counts.

    Worked example (V = 16, T = 12, P = 2; keys 0..7, values 8..15; filler f drawn from the whole vocabulary):

        position   0   1   2   3 |  4   5   6   7   8   9  10  11
        inputs     3  12   6   9 |  6   f   f   f   3   f   f   f     (queries at gaps g = 0 and 2)
        targets    .   .   .   . |  9   .   .   .  12   .   .   .
        mask       0   0   0   0 |  1   0   0   0   1   0   0   0

    Needs T >= 4P (the context and room for P query slots) and P <= V/2.
    """

    vocab_size: int = 64
    seq_len: int = 64
    num_pairs: int = 8
    power_a: float = 0.01
    name: ClassVar[str] = "mqar"

    def __post_init__(self) -> None:
        _int(self.name, "vocab_size", self.vocab_size, 4)
        _int(self.name, "seq_len", self.seq_len, 4)
        _int(self.name, "num_pairs", self.num_pairs, 1)
        if self.num_pairs > self.vocab_size // 2:
            raise InputError(
                f"task 'mqar': num_pairs = {self.num_pairs} needs that many distinct keys, but vocab_size "
                f"= {self.vocab_size} has only {self.vocab_size // 2} (keys: the lower half of the vocab)"
            )
        if 4 * self.num_pairs > self.seq_len:
            raise InputError(
                f"task 'mqar': num_pairs = {self.num_pairs} does not fit in seq_len = {self.seq_len}: the "
                f"context takes 2 * num_pairs and the queries need 2 * num_pairs more, so seq_len must be >= "
                f"{4 * self.num_pairs} (or num_pairs <= {self.seq_len // 4})"
            )
        if not isinstance(self.power_a, (int, float)) or not 0 < self.power_a <= 1:
            raise InputError(f"task 'mqar': power_a = {self.power_a!r} must be in (0, 1]")

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(self.name, batch_size)
        B, T, V, P = batch_size, self.seq_len, self.vocab_size, self.num_pairs
        half = V // 2
        keys = torch.rand(B, half, generator=generator).argsort(dim=1)[:, :P]  # (B, P) distinct per row
        values = torch.rand(B, V - half, generator=generator).argsort(dim=1)[:, :P] + half  # (B, P)
        slots = (T - 2 * P) // 2  # query slots at even offsets after the context
        weights = (torch.arange(slots, dtype=torch.float64) + 1) ** (self.power_a - 1)
        gaps = torch.multinomial(weights.expand(B, slots), P, replacement=False, generator=generator)  # (B,P)
        inputs = torch.randint(0, V, (B, T), generator=generator)  # filler everywhere, overwritten below
        inputs[:, 0 : 2 * P : 2] = keys
        inputs[:, 1 : 2 * P : 2] = values
        where = 2 * P + 2 * gaps  # (B, P) query positions
        inputs.scatter_(1, where, keys)
        targets = torch.zeros(B, T, dtype=torch.long).scatter_(1, where, values)
        mask = torch.zeros(B, T, dtype=torch.bool).scatter_(1, where, True)
        return Batch(inputs, targets, mask)


@dataclass(frozen=True)
class SelectiveCopy:
    """Selective copying, as in the Mamba paper (Gu & Dao 2023, section 3.1).

    Token 0 is noise, token 1 is the recall marker, data tokens come from [2, V). The first T - K positions
    are noise with K data tokens scattered at random (sorted) positions; the last K positions are markers, and
    at the i-th marker the target is the i-th data token. Solving it needs content-aware selection: the gaps
    vary.

    Worked example (V = 8, T = 10, K = 3):

        position   0  1  2  3  4  5  6 | 7  8  9
        inputs     0  5  0  0  3  0  7 | 1  1  1
        targets    .  .  .  .  .  .  . | 5  3  7
        mask       0  0  0  0  0  0  0 | 1  1  1
    """

    vocab_size: int = 16
    seq_len: int = 64
    num_tokens: int = 8
    name: ClassVar[str] = "selective_copy"

    NOISE: ClassVar[int] = 0
    MARKER: ClassVar[int] = 1

    def __post_init__(self) -> None:
        _int(self.name, "vocab_size", self.vocab_size, 3)
        _int(self.name, "seq_len", self.seq_len, 2)
        _int(self.name, "num_tokens", self.num_tokens, 1)
        if 2 * self.num_tokens > self.seq_len:
            raise InputError(
                f"task 'selective_copy': num_tokens = {self.num_tokens} does not fit in seq_len = "
                f"{self.seq_len}: the data and the markers need 2 * num_tokens = {2 * self.num_tokens} "
                "positions"
            )

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(self.name, batch_size)
        B, T, K = batch_size, self.seq_len, self.num_tokens
        context = T - K
        data = torch.randint(2, self.vocab_size, (B, K), generator=generator)
        where = torch.rand(B, context, generator=generator).argsort(dim=1)[:, :K].sort(dim=1).values  # (B, K)
        inputs = torch.full((B, T), self.NOISE, dtype=torch.long)
        inputs.scatter_(1, where, data)
        inputs[:, context:] = self.MARKER
        targets = torch.zeros(B, T, dtype=torch.long)
        targets[:, context:] = data
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, context:] = True
        return Batch(inputs, targets, mask)


@dataclass(frozen=True)
class Induction:
    """Induction: a trigger token followed by a target somewhere in a random sequence; at the end the trigger
    appears again and the model must emit the target (the "induction head" pattern [A][B] ... [A] -> [B]).

    The trigger is token V - 1 and appears nowhere else; every other token is uniform over [0, V - 1). The
    trigger sits at a uniform position p in [0, T - 3], the target at p + 1, and the last position holds the
    trigger again; only the last position counts. Train at one `seq_len` and test at a longer one (e.g. 4x) to
    see which models generalize in length.

    Worked example (V = 8, T = 8, trigger 7, p = 2, target 4):

        position   0  1  2  3  4  5  6  7
        inputs     3  0  7  4  6  1  5  7
        targets    .  .  .  .  .  .  .  4
        mask       0  0  0  0  0  0  0  1
    """

    vocab_size: int = 16
    seq_len: int = 64
    name: ClassVar[str] = "induction"

    def __post_init__(self) -> None:
        _int(self.name, "vocab_size", self.vocab_size, 3)
        _int(self.name, "seq_len", self.seq_len, 3)

    @property
    def trigger(self) -> int:
        return self.vocab_size - 1

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(self.name, batch_size)
        B, T = batch_size, self.seq_len
        inputs = torch.randint(0, self.trigger, (B, T), generator=generator)
        where = torch.randint(0, T - 2, (B, 1), generator=generator)  # trigger position p in [0, T - 3]
        answer = inputs.gather(1, where + 1)  # (B, 1) the token after the trigger
        inputs.scatter_(1, where, self.trigger)
        inputs[:, -1] = self.trigger
        targets = torch.zeros(B, T, dtype=torch.long)
        targets[:, -1:] = answer
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, -1] = True
        return Batch(inputs, targets, mask)


@dataclass(frozen=True)
class Copy:
    """Copy a string after a separator (Jelassi et al. 2024, "Repeat After Me").

    Token 0 is padding, token 1 the separator, the alphabet is [2, V). A string of length n, uniform in
    [min_len, max_len], is followed by the separator and then the copy; the rest is padding. The targets are
    the string, at the separator and the copy positions (next-token prediction of the copy). A sequence counts
    as right (`seq_accuracy`) when every one of its n tokens is right; `accuracy_by_length` groups sequences
    by n. Defaults: max_len = (T - 1) // 2, min_len = 1; a test set of one length sets min_len = max_len.

    Worked example (V = 8, T = 9, n = 3):

        position   0  1  2  3  4  5  6  7  8
        inputs     5  2  6  1  5  2  6  0  0
        targets    .  .  .  5  2  6  .  .  .
        mask       0  0  0  1  1  1  0  0  0
    """

    vocab_size: int = 30
    seq_len: int = 65
    min_len: int = 1
    max_len: int | None = None
    name: ClassVar[str] = "copy"

    PAD: ClassVar[int] = 0
    SEP: ClassVar[int] = 1

    def __post_init__(self) -> None:
        _int(self.name, "vocab_size", self.vocab_size, 3)
        _int(self.name, "seq_len", self.seq_len, 3)
        _int(self.name, "min_len", self.min_len, 1)
        if self.max_len is not None:
            _int(self.name, "max_len", self.max_len, 1)
        if 2 * self.longest + 1 > self.seq_len:
            raise InputError(
                f"task 'copy': max_len = {self.longest} does not fit in seq_len = {self.seq_len}: a "
                f"string, the separator and the copy need 2 * max_len + 1 = {2 * self.longest + 1} positions"
            )
        if self.min_len > self.longest:
            raise InputError(f"task 'copy': min_len = {self.min_len} must be <= max_len = {self.longest}")

    @property
    def longest(self) -> int:
        return self.max_len if self.max_len is not None else (self.seq_len - 1) // 2

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(self.name, batch_size)
        B, T, L = batch_size, self.seq_len, self.longest
        n = torch.randint(self.min_len, L + 1, (B, 1), generator=generator)  # (B, 1) string lengths
        string = torch.randint(2, self.vocab_size, (B, L), generator=generator)
        t = torch.arange(T).expand(B, T)
        in_string = t < n
        in_copy = (t > n) & (t <= 2 * n)
        inputs = torch.full((B, T), self.PAD, dtype=torch.long)
        inputs[t == n] = self.SEP
        inputs = torch.where(in_string, string.gather(1, t.clamp(max=L - 1)), inputs)
        inputs = torch.where(in_copy, string.gather(1, (t - n - 1).clamp(0, L - 1)), inputs)
        mask = (t >= n) & (t < 2 * n)
        targets = torch.where(mask, string.gather(1, (t - n).clamp(0, L - 1)), 0)
        return Batch(inputs, targets, mask)


@dataclass(frozen=True)
class PrefixParity:
    """Prefix parity (the "deep thinking" prefix-sum task): random bits, target = running parity at every
    position.

    Vocabulary {0, 1}. The target at t is (x_0 + ... + x_t) mod 2; every position counts. The length is a
    parameter, so training and test lengths are chosen independently.

    Worked example (T = 6):

        position   0  1  2  3  4  5
        inputs     1  0  1  1  0  1
        targets    1  1  0  1  1  0
        mask       1  1  1  1  1  1
    """

    seq_len: int = 32
    vocab_size: ClassVar[int] = 2
    name: ClassVar[str] = "prefix_parity"

    def __post_init__(self) -> None:
        _int(self.name, "seq_len", self.seq_len, 1)

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        _check_batch_size(self.name, batch_size)
        inputs = torch.randint(0, 2, (batch_size, self.seq_len), generator=generator)
        targets = inputs.cumsum(dim=1) % 2
        return Batch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------
# registry


_TASKS: dict[str, Any] = {
    "mqar": MQAR,
    "selective_copy": SelectiveCopy,
    "induction": Induction,
    "copy": Copy,
    "prefix_parity": PrefixParity,
    "corpus": CorpusTask,
}


def available_tasks() -> list[str]:
    return list(_TASKS)


def task_class(name: str) -> Any:
    """The class behind a task name; `InputError` listing the available tasks for an unknown name."""
    if name not in _TASKS:
        raise InputError(f"unknown task {name!r}; available tasks: {', '.join(_TASKS)}")
    return _TASKS[name]


def make_task(name: str, **params: Any) -> Task:
    """Build a task by name, e.g. `make_task("mqar", vocab_size=64, seq_len=64, num_pairs=8)`.

    Raises `InputError` for an unknown name, an unknown parameter, or parameters that cannot work together.
    """
    cls = task_class(name)
    allowed = list(inspect.signature(cls).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InputError(f"task '{name}': unknown parameter {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return cls(**params)
