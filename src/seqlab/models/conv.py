"""Causal depthwise convolution followed by a gated projection: the smallest recurrent mixer.

    [x, g] = W_in u            (B, T, 2D)
    x'_t   = sum_{i<k} w_i * x_{t-i}   (per channel; causal: only the past and present)
    y      = W_out (x' * silu(g))

Glossary
    k      conv.kernel_size; the state is the last k-1 inputs of the convolution, (B, D, k-1)

Its receptive field is k tokens per layer, so it cannot recall anything further back: a baseline that shows what
a fixed, tiny state buys. Mamba's block uses the same short convolution before its scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig, Section, check_types, positive
from seqlab.models.blocks import linear_fn
from seqlab.models.registry import register_mixer
from seqlab.models.state import State


def causal_conv1d_step(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of `causal_conv1d`: x (B, C), `window` (B, C, k-1) the last inputs, weight (C, k) (the
    depthwise kernel without its middle axis) -> (y (B, C), the new window). A dot product with the window: the
    step every short-convolution mixer (conv, mamba, mamba2, the delta-rule family) takes."""
    full = torch.cat([window if window.dtype == x.dtype else window.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, C, k)
    y = (full * weight).sum(-1)
    return (y + bias if bias is not None else y), full[..., 1:]


@dataclass(frozen=True)
class ConvConfig(Section):
    """Config section `conv`: causal depthwise convolution followed by a gated projection."""

    kernel_size: int = 4

    def __post_init__(self) -> None:
        check_types(self, "conv.")
        positive(self, "conv.", "kernel_size")


@dataclass(frozen=True)
class ConvState(State):
    window: torch.Tensor  # (B, D, k-1): the last k-1 inputs of the convolution, oldest first


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of x (B, C, T) with weight (C, 1, k), continuing from `window` (B, C, k-1).

    Returns the output (B, C, T) and the new window (the last k-1 inputs). A missing window means zeros, the
    padding the parallel form would use.
    """
    B, C, T = x.shape
    k = weight.shape[-1]
    if window is None:
        window = x.new_zeros(B, C, k - 1)
    xp = torch.cat([window.to(x.dtype), x], dim=-1)  # (B, C, k-1 + T)
    y = F.conv1d(xp, weight, bias, groups=C)  # (B, C, T)
    return y, xp[:, :, xp.shape[-1] - (k - 1):].clone()  # a copy: a view would keep all of xp alive in the state


@register_mixer("conv", "conv", ConvConfig)
class Conv(nn.Module):
    def __init__(self, cfg: ModelConfig, name: str = "conv"):
        super().__init__()
        D, k = cfg.d_model, cfg.conv.kernel_size
        self.in_proj = nn.Linear(D, 2 * D, bias=False)
        self.conv = nn.Conv1d(D, D, k, groups=D, bias=True)
        self.out_proj = nn.Linear(D, D, bias=False)

    STATE_FORMULA = "d_model x (kernel_size - 1) x batch x element size"

    def state_bytes(self, T: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the state, whatever T: the last k - 1 inputs, (B, D, k - 1), in the activations' dtype."""
        return batch * self.conv.in_channels * (self.conv.kernel_size[0] - 1) * dtype.itemsize

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> tuple[torch.Tensor, ConvState]:
        xs, g = self.in_proj(x).chunk(2, dim=-1)  # (B, T, D) each
        y, window = causal_conv1d(xs.transpose(1, 2), self.conv.weight, self.conv.bias,
                                  None if state is None else state.window)  # (B, D, T)
        y = y.transpose(1, 2) * F.silu(g)  # (B, T, D)
        return self.out_proj(y), ConvState(window)

    def bind(self, portable: bool = False) -> tuple:
        """(in_proj, kernel (D, k), bias, out_proj) for `step`."""
        return (linear_fn(self.in_proj, portable), self.conv.weight.squeeze(1), self.conv.bias,
                linear_fn(self.out_proj, portable))

    def step(self, x: torch.Tensor, state: ConvState, w: tuple | None = None) -> tuple[torch.Tensor, ConvState]:
        """One token, x (B, D) -> (B, D): the convolution as a dot product with the window of past inputs."""
        in_proj, kernel, bias, out_proj = w or self.bind()
        xs, g = in_proj(x).chunk(2, dim=-1)  # (B, D) each
        y, window = causal_conv1d_step(xs, state.window, kernel, bias)  # (B, D)
        return out_proj(y * F.silu(g)), ConvState(window)
