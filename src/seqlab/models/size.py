"""Memory a model will need, estimated from its config before anything is allocated, and the check that refuses
what cannot fit.

    estimate_bytes(cfg)                                  # the weights (fp32)
    estimate_bytes(cfg, batch=32, tokens=512, training=True)   # + gradients, AdamW moments, activations
    estimate_bytes(cfg, batch=1, tokens=4096)            # + the state (KV caches) after 4096 tokens
    check_fits(cfg, "build_model", ...)                  # InputError with the estimate and the memory available

Parameters are counted exactly, on the meta device (no memory, no init), one block per distinct mixer: a config
claiming a thousand layers costs one block's construction, not a thousand. State bytes are the mixers' own
formulas (`mixer.state_bytes`). Activations are a rough lower bound (per token and layer: the block's input, its
norms, the mixer's projections and the MLP's hidden; plus the logits): what matters is the order of magnitude,
since the check only refuses what is far beyond the machine.

Available memory is what this process can see: `MemAvailable` in /proc/meminfo on the CPU (sysconf elsewhere),
`torch.cuda.mem_get_info` on a GPU. Where seqlab cannot see the memory that will be used (a remote machine, swap
meant to be used), `allow_large=True` skips the check.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.models.blocks import Block

FP32 = 4


@dataclass(frozen=True)
class SizeEstimate:
    """Bytes by kind; `total` is what is compared with the memory available."""

    parameters: int  # the weights
    training: int  # gradients and AdamW's two moments (training only)
    activations: int  # kept for the backward pass (training) or one forward's working set (inference)
    state: int  # the model state (KV caches, recurrent states) after the tokens
    tokens: int  # the int64 token buffers

    @property
    def total(self) -> int:
        return self.parameters + self.training + self.activations + self.state + self.tokens

    def describe(self) -> str:
        parts = [("parameters", self.parameters), ("gradients and optimizer", self.training),
                 ("activations", self.activations), ("state", self.state), ("tokens", self.tokens)]
        return ", ".join(f"{name} {fmt_bytes(n)}" for name, n in parts if n)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.3g} EB"  # unreachable; keeps the return type


def _meta_parameters(module_fn) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_fn().parameters())


def _layer_counts(cfg: ModelConfig) -> Counter:
    """Blocks per mixer name, without building the per-layer tuple (n_layers may be absurd)."""
    return Counter(cfg.layers) if cfg.layers is not None else Counter({cfg.mixer: cfg.n_layers})


@functools.lru_cache(maxsize=16)
def _blocks(cfg: ModelConfig) -> dict[str, torch.nn.Module]:
    """One meta-device block per distinct mixer (a constructor error is the config's, as an InputError). Cached
    per config (configs are frozen): `generate` checks its sizes on every call, and building the blocks, even on
    the meta device, cost milliseconds per call (5-15% of a 128-token generation of a small model)."""
    out = {}
    for name in _layer_counts(cfg):
        with torch.device("meta"):
            out[name] = Block(cfg, name)
    return out


def estimate_bytes(cfg: ModelConfig, *, batch: int = 0, tokens: int = 0, training: bool = False,
                   prefill: int | None = None) -> SizeEstimate:
    """Bytes a model with config `cfg` needs: its fp32 weights; with `training`, gradients, AdamW moments and the
    activations of a (batch, tokens) step; without, the state after `tokens` tokens for `batch` sequences, the
    token buffers and the activations of one parallel call over `prefill` tokens (default: all `tokens`; decoding
    feeds one token at a time after the prompt). One InputError when the config's sizes are too large to even
    describe as tensors."""
    try:
        blocks = _blocks(cfg)
        counts = _layer_counts(cfg)
        block_params = sum(counts[n] * sum(p.numel() for p in b.parameters()) for n, b in blocks.items())
        frame = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + 4 * cfg.d_model
        if cfg.position == "learned":
            frame += cfg.max_positions * cfg.d_model
        if cfg.arch == "recurrent_depth":
            frame += 2 * cfg.d_model * cfg.d_model  # the adapter [s, e] -> core input
        params = block_params + frame
        # a token passes each block once (recurrent depth: the core about default_steps times)
        passes = cfg.n_layers + (cfg.depth.core * (cfg.depth.default_steps - 1) if cfg.arch == "recurrent_depth"
                                 else 0)
        n, n_act = batch * tokens, batch * (tokens if prefill is None else prefill)
        logits = n_act * cfg.vocab_size * FP32 * (3 if training else 1)  # training: logits, softmax, their grad
        act = n_act * passes * (6 * cfg.d_model + cfg.ff_dim) * FP32 + logits
        state = 0
        if not training and n:
            state = sum(counts[name] * b.mixer.state_bytes(tokens, batch) for name, b in blocks.items())
    except InputError:
        raise
    except (RuntimeError, OverflowError, MemoryError, TypeError, ValueError) as e:  # torch: a size past int64
        raise InputError(f"model config (d_model {cfg.d_model}, n_layers {cfg.n_layers}, vocab_size "
                         f"{cfg.vocab_size}) describes tensors too large to build: {e}") from None
    return SizeEstimate(parameters=params * FP32, training=3 * params * FP32 if training else 0, activations=act,
                        state=state, tokens=n * 8)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory this process could still allocate on `device`, or None where seqlab cannot tell."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: ModelConfig, what: str, *, batch: int = 0, tokens: int = 0, training: bool = False,
               prefill: int | None = None, override: str | None = "pass allow_large=True (--allow-large)",
               device: torch.device | str = "cpu", allow_large: bool = False, built: bool = False) -> SizeEstimate:
    """The estimate; one InputError naming it and the memory available when it is more than that (unless
    `allow_large`). `what` says what was asked, e.g. "build_model" or "generate with 1,000,000 new tokens".
    built: the weights exist already (so the memory available does not include them): they are not counted.
    override: how the caller skips the check, named in the message (None: it cannot)."""
    est = estimate_bytes(cfg, batch=batch, tokens=tokens, training=training, prefill=prefill)
    if built:
        est = dataclasses.replace(est, parameters=0)
    free = None if allow_large else available_bytes(device)
    if free is not None and est.total > free:
        raise InputError(
            f"{what} needs about {fmt_bytes(est.total)} ({est.describe()}) but {torch.device(device).type} memory "
            f"available is {fmt_bytes(free)}; use a smaller model, batch or length (d_model {cfg.d_model}, "
            f"n_layers {cfg.n_layers}, vocab_size {cfg.vocab_size})"
            + (f", or {override} where seqlab cannot see the memory that will be used" if override else "")
        )
    return est


def check_decode_fits(model: torch.nn.Module, batch: int, tokens: int, device: torch.device, prefill: int = 1) -> None:
    """Before a decode loop allocates its token buffer and reserves its caches: refuse one whose state and tokens
    for `batch` sequences of `tokens` tokens (the prompt's `prefill` tokens fed in one call) cannot fit beside the
    (built) model. Models without a seqlab config are not checked."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ModelConfig):
        check_fits(cfg, f"decoding up to {tokens:,} tokens for {batch} sequence(s)", batch=batch, tokens=tokens,
                   prefill=prefill, device=device, built=True, override=None)
