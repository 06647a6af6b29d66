"""Honest numbers for reports: intervals, chance levels, seeds, and whether a model has learned its task at all.

    wilson(0.17, 64)                      # [lo, hi]: the 95% Wilson score interval of an accuracy over 64 queries
    chance_accuracy(task)                 # what guessing scores on the task's counted tokens (None if unknown)
    eval_counts(task, batches, bs, seed)  # queries a held-out evaluation counts, and the targets' order-0 entropy
    spread([0.61, 0.58, 0.66])            # {"mean", "std", "min", "max", "n"} over seeds
    seed_interval(spread(values))         # mean +- 2 std over seeds: what a difference must clear (None: one seed)
    learned(...)                          # False when a model is within noise of chance, or of order-0 on text

A difference is called only when it exceeds the noise: `separated(a, b)` for two intervals.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval [lo, hi] of an accuracy p measured on n queries (sound at p = 0 or 1)."""
    if n <= 0:
        return [0.0, 1.0]
    center, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, (center - half) / (1 + z * z / n)), min(1.0, (center + half) / (1 + z * z / n))]


def chance_accuracy(task: Any) -> float | None:
    """Accuracy of a uniform guess over the answers a counted token can take: mqar 1/P (a value from the context),
    induction 1/(V - 1), copy and selective_copy 1/(V - 2) (data tokens), prefix_parity 1/2; None for a corpus."""
    name, V = task.name, getattr(task, "vocab_size", None)
    if name == "mqar":
        return 1 / task.num_pairs
    if name == "induction":
        return 1 / (V - 1)
    if name in ("copy", "selective_copy"):
        return 1 / (V - 2)
    if name == "prefix_parity":
        return 0.5
    return None


def eval_counts(task: Any, batches: int, batch_size: int, seed: int) -> dict[str, float | int]:
    """The counted tokens (queries) of the held-out batches `evaluate(task, batches, batch_size, seed)` reads, and
    the order-0 entropy of their targets in bits per token (what a model that ignores the context can reach)."""
    gen = torch.Generator().manual_seed(seed)
    counts: dict[int, int] = {}
    queries = 0
    for _ in range(batches):
        batch = task.batch(batch_size, gen)
        targets = batch.targets[batch.mask.bool()]
        queries += int(targets.numel())
        for value, n in zip(*torch.unique(targets, return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(n)
    total = max(sum(counts.values()), 1)
    entropy = -sum(n / total * math.log2(n / total) for n in counts.values())
    return {"queries": queries, "order0_bits_per_token": entropy}


def spread(values: list[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value), min and max over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def seed_interval(s: dict[str, float | int]) -> list[float] | None:
    """[mean - 2 std, mean + 2 std] of a `spread` over seeds; None for one seed (no estimate of the noise)."""
    if s["n"] < 2:
        return None
    return [s["mean"] - 2 * s["std"], s["mean"] + 2 * s["std"]]


def learned(accuracy_interval: list[float] | None, chance: float | None, loss_nats: float | None = None,
            order0_bits: float | None = None) -> bool:
    """False when the model has not learned its task: the low end of its accuracy interval is not above chance by a
    tenth of the way from chance to perfect, or (a corpus) its loss is within 5% of the targets' order-0 entropy."""
    if accuracy_interval is not None and chance is not None and accuracy_interval[0] <= chance + 0.1 * (1 - chance):
        return False
    if loss_nats is not None and order0_bits is not None and loss_nats / math.log(2) >= 0.95 * order0_bits:
        return False
    return True


def separated(a: list[float], b: list[float]) -> bool:
    """True when intervals a = [lo, hi] and b do not overlap: only then is a difference called."""
    return a[0] > b[1] or b[0] > a[1]
