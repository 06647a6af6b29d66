"""The memory/latency profiler: the fixed recurrent state against the growing KV cache, measured.

For each mixer at a matched parameter count and each context length (a "cell"), a fresh process builds the model,
prefills `context` random tokens in chunks (carrying the state, so memory stays bounded by the cache, not by the
context's activations), then decodes greedily one token at a time from that state, and reports what the JSON
fields below describe. A fresh process per cell keeps cells from contaminating each other's peak memory: on a CPU
the peak resident set size (VmHWM, reset before each phase through /proc/self/clear_refs where Linux allows it,
else the process's ru_maxrss); on a GPU `torch.cuda.max_memory_allocated`. The clocks, the memory readings and the
fresh process are `seqlab.measure`'s (`Timer`, `PeakMemory`, `run_fresh`).

Timings are medians: prefill over `repeats` runs (a single run once one takes longer than `long_prefill_s`; the
cell says how many), decode over `decode_steps` steps after `warmup` steps. Decode latency is one model call on one
new token plus the argmax. Each timing is taken twice: wall clock (the latency a user sees) and CPU time of the
process, which other processes competing for the cores stretch less (shared caches and hyperthreads still do):
on a shared machine, compare CPU times, and repeat a profile before reading a 10% difference into it.

The crossover of a mixer is the context beyond which it decodes faster than `attention`: interpolated on the
log-log curves between the two measured contexts where the sign of (its latency - attention's) last changes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import seqlab
from seqlab import models
from seqlab.config import ModelConfig, layer_plan
from seqlab.errors import InputError
from seqlab.infer.decode import allocated_nbytes, reserve
from seqlab.infer.plan import DecodePlan, time_decode
from seqlab.measure import PeakMemory, Timer, run_fresh, serve
from seqlab.models import available_mixers, build_model, matched_width
from seqlab.ops.selective_scan import numba_version, resolve_impl

# Every field of the JSON that `run_profile` returns (and `seqlab profile --json` prints), with its meaning.
TOP_FIELDS = {
    "meta": "machine, torch version and thread count, memory method, start time and total seconds",
    "config": "the resolved profile settings (mixers, contexts, sizes, steps, repeats, ...)",
    "models": "one entry per mixer: its parameter count, d_model, full model config and state-size formula",
    "cells": "one entry per (mixer, context): the measurements below, or an 'error'",
    "crossover": "one entry per mixer other than attention: where it starts to decode faster than attention",
    "plots": "paths of the plots written (empty without a plot folder)",
}
MODEL_FIELDS = {
    "mixer": "mixer name (or a hybrid such as lstm+attention)",
    "params": "parameter count without the embedding, matched to the target",
    "d_model": "model width chosen to match the parameter count",
    "state_formula": "each mixer's STATE_FORMULA: how its state's bytes follow from the config, T and batch",
    "config": "the full model config",
}
CELL_FIELDS = {
    "mixer": "mixer name",
    "context": "tokens prefilled before decoding",
    "params": "parameter count without the embedding",
    "state_bytes": "state.nbytes after the context (used KV-cache entries or the recurrent state)",
    "state_bytes_formula": "the state's bytes after the context by the mixers' state_bytes formulas (null if "
                           "unknown)",
    "state_allocated_bytes": "bytes allocated for the state, preallocated KV-cache room included",
    "baseline_memory_bytes": "process memory (RSS; CUDA: allocated) after building and warming up the model",
    "peak_memory_prefill_bytes": "peak process memory during prefill",
    "peak_memory_decode_bytes": "peak process memory during decode",
    "peak_memory_bytes": "the larger of the two peaks",
    "prefill_seconds": "median time to prefill the context",
    "prefill_cpu_seconds": "median CPU time of the process (all threads) to prefill the context",
    "prefill_tokens_per_s": "batch x context / prefill_seconds",
    "prefill_repeats": "prefill runs the median is over",
    "prefill_chunk": "tokens per prefill call",
    "decode_latency_s": "median seconds per decoded token (one step)",
    "decode_cpu_s": "median CPU seconds of the process (all threads) per step: stretched less than the "
                    "wall-clock latency by other processes competing for the cores (not immune: shared caches)",
    "decode_latency_p10_s": "10th percentile of the step time",
    "decode_latency_p90_s": "90th percentile of the step time",
    "decode_steps": "timed decode steps (after the warmup steps)",
    "decode_tokens_per_s": "batch / decode_latency_s",
    "seconds": "wall time of the cell, process start excluded",
}
CROSSOVER_FIELDS = {
    "mixer": "mixer name",
    "baseline": "the mixer it is compared with: attention",
    "status": "crosses | faster_at_every_context | slower_at_largest_context",
    "context": "the interpolated crossover context (null unless status is crosses)",
    "bracket": "the two measured contexts the crossover lies between (null unless it crosses)",
    "speedup_at_largest_context": "attention's decode latency / this mixer's, at the largest context measured",
}

def state_bytes_formula(cfg: ModelConfig, context: int, batch: int = 1,
                        dtype: torch.dtype = torch.float32) -> int | None:
    """Bytes of the state after `context` tokens by the mixers' own formulas (`LanguageModel.state_bytes`, each
    mixer's `state_bytes`); the model is built on the meta device, so this costs no memory. None for a model
    without one."""
    with torch.device("meta"):
        model = build_model(cfg)
    return model.state_bytes(context, batch, dtype) if hasattr(model, "state_bytes") else None


def state_formulas(cfg: ModelConfig) -> dict[str, str]:
    """Each mixer's `STATE_FORMULA` (its state size in words), by mixer name, in layer order."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {block.mixer_name: getattr(block.mixer, "STATE_FORMULA", "unknown") for block in model.blocks}


@dataclass(frozen=True)
class ProfileConfig:
    """What `seqlab profile` measures. Models: every mixer at the parameter count (embedding excluded) of an
    attention model with `d_model` and `n_layers`, or at `params`, varying d_model only; `model` holds other
    config fields."""

    mixers: tuple[str, ...] = ()  # empty: every available mixer
    contexts: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
    d_model: int = 128
    n_layers: int = 2
    vocab_size: int = 256
    params: int | None = None
    model: dict = field(default_factory=dict)
    batch: int = 1
    chunk: int = 512
    decode_steps: int = 64
    warmup: int = 8
    repeats: int = 3
    long_prefill_s: float = 5.0
    threads: int | None = None  # None: torch's default
    device: str = "cpu"
    isolate: bool = True  # a fresh process per cell
    timeout_s: float = 900.0
    seed: int = 0

    def __post_init__(self) -> None:
        for entry in self.mixers:
            layer_plan(entry, self.n_layers)  # InputError for a mixer that is not available
        if not self.contexts or any(not isinstance(c, int) or c < 1 for c in self.contexts):
            raise InputError(f"contexts = {list(self.contexts)}: expected one or more integers >= 1")
        for name in ("d_model", "n_layers", "vocab_size", "batch", "chunk", "decode_steps", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} = {value!r}: must be an integer >= 1")
        if self.params is not None and self.params < 1:
            raise InputError(f"params = {self.params}: must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads = {self.threads}: must be >= 1")
        if self.warmup < 0:
            raise InputError(f"warmup = {self.warmup}: must be >= 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"device = {self.device!r}, but CUDA is not available here; use --device cpu")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InputError(f"device = {self.device!r}: expected cpu or cuda[:N]")

    @property
    def mixer_list(self) -> tuple[str, ...]:
        return self.mixers or tuple(available_mixers())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mixers": list(self.mixer_list), "contexts": list(self.contexts)}


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a model with this config, the embedding excluded."""
    return models.count_parameters(cfg, exclude_embeddings=True)


def matched_config(base: dict[str, Any], entry: str, target: int) -> ModelConfig:
    """The config for mixer `entry` ("gru", a hybrid "lstm+attention" or "3:1 mamba:attention"; see
    `seqlab.config.layer_plan`) whose parameter count (embedding excluded) is closest to `target`, varying d_model
    only, in steps of 2 x attention heads."""
    fields = {**base, "layers": layer_plan(entry, base["n_layers"])}
    step = 2 * base.get("attention", {}).get("n_heads", 4)
    return matched_width(fields, target, step, exclude_embeddings=True, name=entry)


def resolve_models(cfg: ProfileConfig) -> dict[str, ModelConfig]:
    """Each mixer's model config at the matched parameter count."""
    base = {**cfg.model, "vocab_size": cfg.vocab_size, "n_layers": cfg.n_layers, "d_model": cfg.d_model}
    target = cfg.params or count_parameters(ModelConfig.from_dict({**base, "mixer": "attention"}))
    return {m: matched_config(base, m, target) for m in cfg.mixer_list}


# ---------------------------------------------------------------------------------------------------------------
# one cell, in this process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prefill(model: torch.nn.Module, context: int, batch: int, chunk: int, extra: int, seed: int,
             device: torch.device):
    """Feed `context` random tokens in chunks, carrying the state; room for `extra` more tokens is reserved once
    the first chunk has made the caches. Returns the last logits and the state."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    logits, state = None, None
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        tokens = torch.randint(0, vocab, (batch, n), generator=gen).to(device)
        logits, state = model(tokens, state)
        if start == 0:
            state = reserve(model, state, context - n + extra)
    return logits[:, -1:], state


@torch.inference_mode()
def measure_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one cell in this process. spec: {"model": config dict, "context", "batch", "chunk",
    "decode_steps", "warmup", "repeats", "long_prefill_s", "threads", "device", "seed"}."""
    cell_start = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = ModelConfig.from_dict(spec["model"])
    model = build_model(cfg, seed=spec["seed"]).to(device).eval()
    context, batch, chunk = spec["context"], spec["batch"], spec["chunk"]
    steps, warmup = spec["decode_steps"], spec["warmup"]
    mem = PeakMemory(device)

    # Warm up kernels and allocators on a short sequence, then take the baseline.
    step = DecodePlan.build(model) or model  # the per-token path `seqlab.generate` takes
    logits, state = _prefill(model, min(context, 2 * min(chunk, 64)), batch, min(chunk, 64), 4, spec["seed"], device)
    for _ in range(3):
        logits, state = step(logits[:, -1].argmax(-1, keepdim=True), state)
    del logits, state
    gc.collect()
    baseline = mem.now()

    mem.reset()
    prefill = Timer()
    for r in range(spec["repeats"]):
        logits = state = None  # the previous run's cache is freed here (reference counting), before timing
        with prefill:
            logits, state = _prefill(model, context, batch, chunk, warmup + steps, spec["seed"] + r, device)
            _sync(device)
        if prefill.last_wall > spec["long_prefill_s"]:
            break
    peak_prefill = mem.peak()
    state_bytes, allocated = state.nbytes, allocated_nbytes(state)

    mem.reset()
    decode, logits, state = time_decode(model, logits, state, steps, warmup, lambda: _sync(device))
    peak_decode = mem.peak()

    latency = decode.median_wall
    prefill_s = prefill.median_wall
    return {
        "mixer": spec["mixer"], "context": context,
        "params": model.num_parameters(exclude_embeddings=True), "state_bytes": state_bytes,
        "state_bytes_formula": state_bytes_formula(cfg, context, batch, next(model.parameters()).dtype),
        "state_allocated_bytes": allocated, "baseline_memory_bytes": baseline,
        "peak_memory_prefill_bytes": peak_prefill, "peak_memory_decode_bytes": peak_decode,
        "peak_memory_bytes": max(peak_prefill, peak_decode), "prefill_seconds": prefill_s,
        "prefill_cpu_seconds": prefill.median_cpu,
        "prefill_tokens_per_s": batch * context / prefill_s, "prefill_repeats": len(prefill), "prefill_chunk": chunk,
        "decode_latency_s": latency, "decode_latency_p10_s": decode.wall_percentile(0.1),
        "decode_latency_p90_s": decode.wall_percentile(0.9), "decode_steps": steps,
        "decode_cpu_s": decode.median_cpu,
        "decode_tokens_per_s": batch / latency, "seconds": time.perf_counter() - cell_start,
        "memory_method": mem.method,
    }


def run_cell(spec: dict[str, Any], isolate: bool, timeout_s: float) -> dict[str, Any]:
    """Measure a cell in a fresh process (isolate) or in this one; failures come back as {"error": ...}."""
    if not isolate:
        try:
            return measure_cell(spec)
        except Exception as e:  # a failing cell is recorded and the profile goes on
            return {"error": f"{type(e).__name__}: {e}"}
    out = run_fresh(["-m", "seqlab.infer.profile"], spec, timeout_s)
    if "error" in out and not out["error"].startswith("timed out"):
        out["error"] = f"cell process failed: {out['error']}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# the whole profile


def crossovers(cells: list[dict[str, Any]], baseline: str = "attention") -> list[dict[str, Any]]:
    """Where each mixer starts decoding faster than `baseline` (see the module docstring)."""
    lat = {(c["mixer"], c["context"]): c["decode_latency_s"] for c in cells if "error" not in c}
    mixers = list(dict.fromkeys(c["mixer"] for c in cells))
    if baseline not in mixers:
        return []
    out = []
    for m in mixers:
        if m == baseline:
            continue
        ctx = sorted(c for (mm, c) in lat if mm == m and (baseline, c) in lat)
        if not ctx:
            continue
        ratio = [lat[(m, c)] / lat[(baseline, c)] for c in ctx]  # < 1: m is faster
        entry: dict[str, Any] = {"mixer": m, "baseline": baseline, "context": None, "bracket": None,
                                 "speedup_at_largest_context": 1 / ratio[-1]}
        if all(r < 1 for r in ratio):
            entry["status"] = "faster_at_every_context"
        elif ratio[-1] >= 1:
            entry["status"] = "slower_at_largest_context"
        else:
            i = max(j for j, r in enumerate(ratio) if r >= 1)  # last context where m is not faster
            a, b = math.log(ratio[i]), math.log(ratio[i + 1])
            t = a / (a - b) if a != b else 0.0
            entry.update(status="crosses", bracket=[ctx[i], ctx[i + 1]],
                         context=math.exp(math.log(ctx[i]) + t * (math.log(ctx[i + 1]) - math.log(ctx[i]))))
        out.append(entry)
    return out


def machine(device: str, threads: int | None) -> dict[str, Any]:
    """The machine, and what ran on it: numba's version ("not installed": no `kernels` extra) and the scan that
    mamba.impl="auto" (the default) runs on `device` for fp32 models."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": device, "torch_threads": threads or torch.get_num_threads(),
            "numba": numba_version() or "not installed", "impl_auto": resolve_impl("auto", device)}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run_profile(cfg: ProfileConfig, plot_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Measure every (mixer, context) cell; returns the JSON-ready results (fields: TOP_FIELDS, CELL_FIELDS...)."""
    start = time.perf_counter()
    models = resolve_models(cfg)
    results: dict[str, Any] = {
        "meta": {"seqlab": seqlab.__version__, "machine": machine(cfg.device, cfg.threads),
                 "started": dt.datetime.now().isoformat(timespec="seconds"), "isolated": cfg.isolate},
        "config": cfg.to_dict(),
        "models": [
            {"mixer": m, "params": count_parameters(mc), "d_model": mc.d_model, "config": mc.to_dict(),
             "state_formula": state_formulas(mc)}
            for m, mc in models.items()
        ],
    }
    cells = []
    todo = [(m, c) for m in models for c in sorted(cfg.contexts)]
    bar = _bar(len(todo), progress)
    failed: set[str] = set()
    for mixer, context in todo:
        if bar is not None:
            bar.set_postfix_str(f"{mixer} @ {context}")
        if mixer in failed:
            cell = {"error": "skipped: a shorter context already failed"}
        else:
            spec = {"mixer": mixer, "model": models[mixer].to_dict(), "context": context, "batch": cfg.batch,
                    "chunk": cfg.chunk, "decode_steps": cfg.decode_steps, "warmup": cfg.warmup,
                    "repeats": cfg.repeats, "long_prefill_s": cfg.long_prefill_s, "threads": cfg.threads,
                    "device": cfg.device, "seed": cfg.seed}
            cell = run_cell(spec, cfg.isolate, cfg.timeout_s)
        if "error" in cell:
            failed.add(mixer)
            cell = {"mixer": mixer, "context": context, **cell}
        cells.append(cell)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    methods = {c.pop("memory_method") for c in cells if "memory_method" in c}
    results["meta"]["memory_method"] = ", ".join(sorted(methods)) + ("" if cfg.isolate else " (in one process)")
    results["cells"] = cells
    results["crossover"] = crossovers(cells)
    results["plots"] = [str(p) for p in plot_profile(results, plot_dir)] if plot_dir is not None else []
    results["meta"]["seconds"] = time.perf_counter() - start
    return results


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc="profile", dynamic_ncols=True, file=sys.stderr)


PLOTS = {  # file name: (cell field, y label)
    "state_bytes.png": ("state_bytes", "state bytes"),
    "peak_memory.png": ("peak_memory_bytes", "peak process memory (bytes)"),
    "prefill_time.png": ("prefill_seconds", "prefill time (s)"),
    "decode_latency.png": ("decode_latency_s", "decode latency per token (s)"),
    "decode_cpu.png": ("decode_cpu_s", "decode CPU time per token (s)"),
}


def plot_profile(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Log-log plots against context, one line per mixer: one file per figure in PLOTS, and all of them together in
    profile.png."""
    import matplotlib  # lazy on purpose: a cell's fresh process imports this module and never plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [c for c in results["cells"] if "error" not in c]
    mixers = list(dict.fromkeys(c["mixer"] for c in results["cells"]))
    meta = results["meta"]["machine"]
    subtitle = (f"{meta.get('processor', '')} {meta['device']}, {meta['torch_threads']} threads; "
                f"median of {results['config']['decode_steps']} decode steps")

    def draw(ax, key: str, label: str) -> None:
        for m in mixers:
            pts = sorted((c["context"], c[key]) for c in cells if c["mixer"] == m and c[key] > 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)

    written = []
    for name, (key, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 4.2))
        draw(ax, key, label)
        ax.set_title(f"{label} vs context\n{subtitle}", fontsize=9)
        ax.legend(fontsize=8)
        fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.86)  # fixed margins: tight_layout is slow
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (key, label) in zip(axes.flat, PLOTS.values()):
        draw(ax, key, label)
    for ax in axes.flat[len(PLOTS):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"seqlab profile: {subtitle}", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.93, wspace=0.28, hspace=0.25)
    fig.savefig(out / "profile.png", dpi=110)
    plt.close(fig)
    written.append(out / "profile.png")
    return written


def format_table(results: dict[str, Any]) -> str:
    """The profile as a text table, plus the crossovers."""
    lines = [f"{'mixer':<18} {'params':>9} {'context':>8} {'state B':>12} {'formula B':>12} {'peak MiB':>9} "
             f"{'prefill tok/s':>13} {'decode ms':>10} {'cpu ms':>8}"]
    for c in results["cells"]:
        if "error" in c:
            lines.append(f"{c['mixer']:<18} {'':>9} {c['context']:>8}  error: {c['error']}")
            continue
        formula = "-" if c["state_bytes_formula"] is None else f"{c['state_bytes_formula']:,}"
        lines.append(f"{c['mixer']:<18} {c['params']:>9,} {c['context']:>8} {c['state_bytes']:>12,} {formula:>12} "
                     f"{c['peak_memory_bytes'] / 2**20:>9.1f} {c['prefill_tokens_per_s']:>13,.0f} "
                     f"{c['decode_latency_s'] * 1e3:>10.3f} {c['decode_cpu_s'] * 1e3:>8.3f}")
    for x in results["crossover"]:
        if x["status"] == "crosses":
            where = (f"decodes faster than attention beyond ~{x['context']:,.0f} tokens (between "
                     f"{x['bracket'][0]:,} and {x['bracket'][1]:,})")
        elif x["status"] == "faster_at_every_context":
            where = "decodes faster than attention at every context measured"
        else:
            where = "is not faster than attention at the largest context"
        lines.append(f"{x['mixer']}: {where}; {x['speedup_at_largest_context']:.2f}x attention's speed at the "
                     f"largest context")
    cfg = results["config"]
    lines.append(f"decode ms: wall clock, cpu ms: CPU time of the process, each the median of {cfg['decode_steps']} "
                 f"steps after {cfg['warmup']} warmup steps; prefill: median of up to {cfg['repeats']} runs in chunks "
                 f"of {cfg['chunk']}; memory: {results['meta']['memory_method']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover  (a cell's fresh process: see run_cell)
    serve(measure_cell)
