"""`seqlab distill`: distill a teacher checkpoint into a student of any architecture, and compare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from seqlab.checkpoint import load, save
from seqlab.commands import emit, parse_sets
from seqlab.config import ModelConfig, read_json
from seqlab.data import make_task
from seqlab.distill import DistillConfig, distill_and_compare
from seqlab.document import Document, Section, fmt_bytes, write
from seqlab.errors import InputError

DESCRIPTION = """\
Distill a trained teacher (any checkpoint) into a student of any architecture, on a task:
  loss = kl_weight * T^2 * KL(teacher || student at temperature T) + ce_weight * cross-entropy on the data
         + hidden_weight * per-layer MSE of block outputs (through a learned projection when widths differ)
Before training, the student takes the teacher's weights where shapes allow (embedding, MLPs, norms, head; an
attention teacher's W_Q, W_K, W_V, W_O mapped onto a gla or mamba student's mixer; see seqlab.distill); then the
same student architecture is trained from scratch with the same steps, batches and optimizer. Reported on the
held-out data (corpus: the validation split): teacher quality, distilled student, scratch student, the fraction
of the teacher's quality each keeps (teacher bpb / student bpb on byte-level data, else accuracy ratio), and the
state bytes and median decode latency at --context tokens from the profiler (and whether the state has the same
size at a shorter context: a constant state).

--student-config FILE is JSON: a model config ({"mixer": "mamba", "d_model": 128, "n_layers": 2, ...}), or
{"model": {...}, "train": {...}, "distill": {...}} with TrainConfig and distill fields (temperature, kl_weight,
ce_weight, hidden_weight, transfer). Flags override the file. Writes into --out: config.json (resolved),
student/ and scratch/ (checkpoints), report.json and report.md."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distill a teacher checkpoint into a student; compare with scratch",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder")
    p.add_argument("--student-config", type=Path, required=True, help="student JSON config (see above)")
    p.add_argument("--task", required=True, help="task name, e.g. corpus, mqar")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --set seq_len=128")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--steps", type=int, help="optimizer steps (both students; default: the config's, 200)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the config's, 32)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the config's, 3e-3)")
    p.add_argument("--seed", type=int, help="seed of the student init and the batches (default 0)")
    p.add_argument("--eval-batches", type=int, help="held-out batches for evaluation (default 8)")
    p.add_argument("--temperature", type=float, help="KL temperature T (default 2)")
    p.add_argument("--kl-weight", type=float, help="weight of the KL term (default 1)")
    p.add_argument("--ce-weight", type=float, help="weight of the data cross-entropy (default 0: off)")
    p.add_argument("--hidden-weight", type=float, help="weight of the per-layer hidden MSE (default 0: off)")
    p.add_argument("--no-transfer", action="store_true", help="start the student from its own init")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch twin")
    p.add_argument("--context", type=int, default=4096,
                   help="context length for state bytes and decode latency (default 4096; 0: skip)")
    p.add_argument("--json", action="store_true", help="print report.json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def read_student_config(path: Path) -> tuple[dict, dict, dict]:
    """(model, train, distill) sections of a --student-config file."""
    data = read_json(path, "student config file")
    if not isinstance(data, dict):
        raise InputError(f"student config file '{path}' must hold a JSON object")
    if "model" in data:
        unknown = sorted(set(data) - {"model", "train", "distill"})
        if unknown:
            raise InputError(f"student config file '{path}': unknown section '{unknown[0]}'; expected model, "
                             "train, distill")
        return data["model"], data.get("train") or {}, data.get("distill") or {}
    return data, {}, {}


def run(args: argparse.Namespace) -> int:
    model_dict, train_dict, distill_dict = read_student_config(args.student_config)
    flags = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "eval_batches": args.eval_batches}
    train_dict = {**train_dict, **{k: v for k, v in flags.items() if v is not None}}
    flags = {"temperature": args.temperature, "kl_weight": args.kl_weight, "ce_weight": args.ce_weight,
             "hidden_weight": args.hidden_weight}
    distill_dict = {**distill_dict, **{k: v for k, v in flags.items() if v is not None}}
    if args.no_transfer:
        distill_dict["transfer"] = False
    cfg = DistillConfig.from_dict({**distill_dict, "train": train_dict})
    if args.context < 0 or args.context == 1:
        raise InputError(f"--context = {args.context}: must be 0 (skip) or >= 2")
    student_cfg = ModelConfig.from_dict(model_dict)
    teacher = load(args.teacher)
    if teacher.config.vocab_size != student_cfg.vocab_size:
        raise InputError(f"teacher '{args.teacher}' has vocab_size {teacher.config.vocab_size} but the student "
                         f"config has vocab_size {student_cfg.vocab_size}: distillation compares next-token "
                         "distributions, so both must use the same vocabulary")
    params = parse_sets(args.set)
    task = make_task(args.task, **params)
    eval_params = {**params, "split": params.get("split", "validation")} if args.task == "corpus" else params
    eval_task = make_task(args.task, **eval_params)
    if task.vocab_size > student_cfg.vocab_size:
        raise InputError(f"task '{task.name}' needs vocab_size {task.vocab_size}; the models have vocab_size "
                         f"{student_cfg.vocab_size}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder '{args.out}': {e.strerror}") from None
    resolved = {"teacher": str(args.teacher), "task": {"name": args.task, **params},
                "eval_task": {"name": args.task, **eval_params}, "model": student_cfg.to_dict(),
                "distill": cfg.to_dict(), "context": args.context, "scratch": not args.no_scratch}
    (args.out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")

    torch.manual_seed(cfg.train.seed)
    comp = distill_and_compare(teacher, student_cfg, task, cfg, eval_task=eval_task, scratch=not args.no_scratch,
                               context=args.context, progress=not args.no_progress)
    report = {"teacher_checkpoint": str(args.teacher), **comp.report}
    save(comp.student, args.out / "student", json_files={"distill.json": report})
    if comp.scratch is not None:
        save(comp.scratch, args.out / "scratch")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write(report_document(report), args.out, page=None)
    emit(report, args.json, headline(report) + f"\nreport: {args.out / 'report.md'}")
    return 0


def headline(report: dict[str, Any]) -> str:
    m = report["metric"]
    t, d = report["teacher"], report["distilled"]
    text = (f"distilled {'+'.join(d['mixers'])} student keeps {d['retained']:.1%} of the teacher's quality "
            f"({m} {d['eval'][m]:.4f} vs teacher {t['eval'][m]:.4f})")
    if "scratch" in report:
        s = report["scratch"]
        text += f"; from scratch with the same budget: {s['retained']:.1%} ({m} {s['eval'][m]:.4f})"
    return text


def report_document(report: dict[str, Any]) -> Document:
    m, ctx = report["metric"], report["context"]
    tc = report["train"]
    sec = Section("")
    sec.p(f"**{headline(report)}.**")
    sec.p(f"Both students: {tc['steps']} steps of batch {tc['batch_size']}, lr {tc['lr']}, seed {tc['seed']}. "
          f"Distillation: temperature {report['distill']['temperature']}, weights kl "
          f"{report['distill']['kl_weight']}, ce {report['distill']['ce_weight']}, hidden "
          f"{report['distill']['hidden_weight']}. Quality on held-out data ({tc['eval_batches']} batches).")
    headers = ["model", "mixers", "params", m, "retained"] + (
        [f"state bytes @ {ctx}", f"decode ms/token @ {ctx}"] if ctx else [])
    rows = []
    for name in ("teacher", "distilled", "scratch"):
        if name not in report:
            continue
        r = report[name]
        row = [name, "+".join(r["mixers"]), f"{r['params']:,}", f"{r['eval'][m]:.4f}", f"{r['retained']:.1%}"]
        if ctx:
            dc = r["decode"]
            row += [f"{fmt_bytes(dc['state_bytes'])} ({'constant' if dc['constant_state'] else 'grows'})",
                    f"{dc['decode_ms']:.2f}"]
        rows.append(row)
    sec.table(headers, rows)
    tr = report["distilled"].get("transfer")
    if tr is not None:
        sec.p(f"Weight transfer (teacher block for each student block: {tr['layer_map']}): "
              f"{len(tr['copied'])} tensors copied, {len(tr['mapped'])} mapped, {len(tr['fresh'])} fresh; "
              f"{tr['fraction']:.1%} of the student's parameters are in tensors copied or mapped from the teacher.")
        for k, v in tr["mapped"].items():
            sec.p(f"- mapped `{k}`: {v}")
        for n in tr["notes"]:
            sec.p(f"- note: {n}")
    if ctx:
        sec.p("Decode latency: the profiler's median wall time of one token at batch 1 after a prefill of the "
              "context (seqlab.distill.decode_cost); state bytes: the KV cache or recurrent state at that point, "
              "'constant' when it is the same size after half the context or fewer tokens.")
    return Document(f"seqlab distill report: task `{report['task']}`", sections=[sec])
