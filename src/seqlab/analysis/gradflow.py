"""Gradient flow over distance: how strongly the loss at the end of a sequence reaches back to earlier tokens.

    curve = gradient_flow_on_task(model, task, batches=4, batch_size=16)
    curve.norm[d]       # mean ||d loss(last) / d e_{last - d}|| over rows and batches, d = 0 .. T - 1
    plot_gradient_flow({"attention": curve_a, "lstm": curve_b}, "gradflow.png")

For each row, "last" is its last position whose target counts (the task's mask); e_t is the input embedding at
position t (the output of `model.embed`, so both `LanguageModel` and the recurrent-depth model qualify). The norm is
taken over the embedding width and averaged over every row that has a position at that distance. An RNN's path
from e_{last - d} to the loss passes through d state transitions, so its curve tends to fall with d; attention
reaches every position in one step per layer. A causal convolution of kernel k in L layers sees exactly
L * (k - 1) positions back, so its curve is exactly zero from there on (a test checks this).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from seqlab.data import Batch, Task
from seqlab.errors import InputError


@dataclass(frozen=True)
class GradFlow:
    """norm[d]: mean gradient norm at distance d (0 = the last counted position itself); count[d]: rows that
    had a position at distance d."""

    norm: torch.Tensor  # (T,) float64
    count: torch.Tensor  # (T,) int64

    def to_dict(self) -> dict:
        return {"distance": list(range(self.norm.numel())), "grad_norm": self.norm.tolist(),
                "rows": self.count.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> GradFlow:
        return cls(torch.tensor(data["grad_norm"], dtype=torch.float64), torch.tensor(data["rows"]))


def _embedding(model: torch.nn.Module) -> torch.nn.Module:
    embed = getattr(model, "embed", None)
    if not isinstance(embed, torch.nn.Embedding):
        raise InputError(f"gradient flow needs a seqlab language model with an `embed` layer, got "
                         f"{type(model).__name__}")
    return embed


def gradient_flow(model: torch.nn.Module, batches: Iterable[Batch]) -> GradFlow:
    """Mean ||d loss_b(last_b) / d e_b[last_b - d]|| over rows b of every batch, per distance d (see module)."""
    embed = _embedding(model)
    device = embed.weight.device
    captured: list[torch.Tensor] = []

    def leaf(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.detach().requires_grad_(True)  # a leaf: we want d loss / d e, not the embedding weights' grads
        captured.append(out)
        return out

    was_training = model.training
    model.eval()
    handle = embed.register_forward_hook(leaf)
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    try:
        for batch in batches:
            captured.clear()
            inputs, targets, mask = (t.to(device) for t in (batch.inputs, batch.targets, batch.mask))
            B, T = inputs.shape
            rows = mask.any(dim=1)
            if not rows.any():
                continue
            last = torch.where(mask, torch.arange(T, device=device), -1).max(dim=1).values  # (B,)
            with torch.enable_grad():
                logits, _ = model(inputs)
                picked = logits[torch.arange(B, device=device), last.clamp_min(0)]  # (B, V)
                loss = F.cross_entropy(picked.float(), targets[torch.arange(B, device=device), last.clamp_min(0)],
                                       reduction="none")
                # rows are independent, so one backward of the sum gives each row's own gradient
                (grad,) = torch.autograd.grad((loss * rows).sum(), captured[0])  # (B, T, D)
            norms = grad.float().norm(dim=-1).double()  # (B, T)
            dist = last[:, None] - torch.arange(T, device=device)[None, :]  # (B, T): distance to the row's last
            valid = (dist >= 0) & rows[:, None]
            if total is None:
                total = torch.zeros(T, dtype=torch.float64, device=device)
                count = torch.zeros(T, dtype=torch.long, device=device)
            elif total.numel() < T:
                total = F.pad(total, (0, T - total.numel()))
                count = F.pad(count, (0, T - count.numel()))
            total.index_add_(0, dist[valid], norms[valid])
            count.index_add_(0, dist[valid], torch.ones_like(dist[valid]))
    finally:
        handle.remove()
        model.train(was_training)
    if total is None:
        raise InputError("gradient flow: no batch had a position whose target counts")
    norm = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return GradFlow(norm.cpu(), count.cpu())


def gradient_flow_on_task(model: torch.nn.Module, task: Task, batches: int = 4, batch_size: int = 16,
                          seed: int = 0) -> GradFlow:
    """`gradient_flow` on `batches` batches of `task` drawn from a generator seeded with `seed`."""
    if batches < 1 or batch_size < 1:
        raise InputError(f"gradient flow needs batches >= 1 and batch_size >= 1, got {batches} and {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    return gradient_flow(model, (task.batch(batch_size, gen) for _ in range(batches)))


def plot_gradient_flow(curves: dict[str, GradFlow], path: str | Path, normalize: bool = True) -> Path:
    """One curve per model against distance, log y; with `normalize`, each divided by its value at distance 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, c in curves.items():
        y = c.norm.clone()
        if normalize and y[0] > 0:
            y = y / y[0]
        keep = (c.count > 0) & (y > 0)
        d = torch.arange(y.numel())[keep]
        ax.plot(d.tolist(), y[keep].tolist(), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("distance to the last position (tokens)")
    ax.set_ylabel("||d loss / d embedding||" + (" / value at distance 0" if normalize else ""))
    ax.set_title("gradient flow over distance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
