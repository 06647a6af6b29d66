"""Distillation on the byte-level corpus: an attention teacher into mamba, gla and lstm students of about half
its size, each distilled and trained from scratch with the same steps, batches and optimizer.

    teacher   attention, 4 layers of width 64, trained on the corpus for --teacher-steps (800; longer than the
              students: the usual setup, a teacher that already exists)
    students  2 layers of width 64 (mamba with expand 1 and d_state 8; gla with key/value widths 64; lstm with
              hidden size 40): about half the teacher's non-embedding parameters
    distilled weights transferred (embedding, head, norms, MLPs of teacher blocks 0 and 3; attention W_Q, W_K,
              W_V, W_O mapped onto the gla / mamba mixer), then loss = KL(teacher || student) at temperature 1
              + 0.5 x cross-entropy on the data, for --student-steps steps (300)
    scratch   the same architecture and seed, --student-steps steps of plain cross-entropy (`seqlab.train.fit`)
All runs: batches of 16 x 64 bytes, AdamW at lr 3e-3 with warmup and cosine decay, one thread.

Quality: bits per byte on the held-out test split (32 batches). Inference: the profiler's state bytes and decode
latency (batch 1) after --context tokens (4096), whether the state has the same size after 256 tokens (a constant
state); the teacher and students are measured in turn over --decode-rounds rounds (the median of the rounds'
medians), so that the drifting load of a shared machine falls on all of them alike.

Targets (issue 7): every distilled student beats its from-scratch twin; the best student is within 10% of the
teacher's bits per byte while decoding faster than the teacher at the long context with a constant state.

    PYTHONPATH=src python benchmarks/bench_distill.py            # 7 min at one thread (16 with load average 8)
    PYTHONPATH=src python benchmarks/bench_distill.py --decode-only   # re-measure decoding on the saved results
    PYTHONPATH=src python benchmarks/bench_distill.py --quick    # a smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import seqlab
from seqlab.config import ModelConfig, TrainConfig
from seqlab.data import make_task
from seqlab.distill import DistillConfig, decode_cost, distill_and_compare
from seqlab.models import build_model
from seqlab.train import cross_entropy, fit, task_batches

RESULTS = Path(__file__).resolve().parent / "results" / "distill.json"
WIDTH = 64
TEACHER = {"mixer": "attention", "vocab_size": 256, "d_model": WIDTH, "n_layers": 4, "attention": {"n_heads": 4}}
STUDENTS = {
    "mamba": {"mixer": "mamba", "vocab_size": 256, "d_model": WIDTH, "n_layers": 2,
              "mamba": {"expand": 1, "d_state": 8}},
    "gla": {"mixer": "gla", "vocab_size": 256, "d_model": WIDTH, "n_layers": 2,
            "gla": {"n_heads": 4, "expand_k": 1.0, "expand_v": 1.0}},
    "lstm": {"mixer": "lstm", "vocab_size": 256, "d_model": WIDTH, "n_layers": 2, "rnn": {"d_hidden": 40}},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=800)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--context", type=int, default=4096, help="long context for state bytes and decode latency")
    p.add_argument("--decode-rounds", type=int, default=5, help="interleaved rounds of decode measurements")
    p.add_argument("--decode-only", action="store_true",
                   help="keep the trained results in --out and measure the decode costs again (no training)")
    p.add_argument("--students", default="mamba,gla,lstm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, short context")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.teacher_steps, args.student_steps, args.eval_batches, args.context = 40, 10, 4, 512
        args.decode_rounds = 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.decode_only:
        result = json.loads(args.out.read_text())
        result["settings"].update(context=args.context, decode_rounds=args.decode_rounds)
        t0 = time.perf_counter()
        measure_decode(result, args.context, args.decode_rounds)
        result["decode_seconds"] = time.perf_counter() - t0
        finish(result, args)
        return 0

    task = make_task("corpus", seq_len=args.seq_len)
    test = make_task("corpus", seq_len=args.seq_len, split="test")

    def train_cfg(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, steps // 20),
                           seed=args.seed, eval_batches=args.eval_batches, log_every=max(1, steps // 10))

    print(f"teacher: attention, {args.teacher_steps} steps of {args.batch_size} x {args.seq_len} bytes", flush=True)
    teacher = build_model(ModelConfig.from_dict(TEACHER), seed=args.seed)
    t0 = time.perf_counter()
    teacher_cfg = train_cfg(args.teacher_steps)
    t_fit = fit(teacher, task_batches(task, teacher_cfg), cross_entropy, teacher_cfg, progress=False, eval_task=test)
    teacher_seconds = time.perf_counter() - t0
    teacher_bpb = t_fit["eval"]["bits_per_byte"]
    print(f"  {teacher.num_parameters(exclude_embeddings=True):,} non-embedding params, test bpb "
          f"{teacher_bpb:.4f}, {teacher_seconds:.0f} s", flush=True)

    cfg = DistillConfig(temperature=args.temperature, kl_weight=1.0, ce_weight=args.ce_weight, transfer=True,
                        train=train_cfg(args.student_steps))
    rows = []
    for name in [s for s in args.students.split(",") if s]:
        print(f"student {name}: distilled and from scratch, {args.student_steps} steps each", flush=True)
        t0 = time.perf_counter()
        comp = distill_and_compare(teacher, STUDENTS[name], task, cfg, eval_task=test, scratch=True, context=0,
                                   progress=False)
        r = comp.report
        d, s = r["distilled"], r["scratch"]
        row = {
            "student": name, "params_non_embedding": comp.student.num_parameters(exclude_embeddings=True),
            "size_vs_teacher": comp.student.num_parameters(exclude_embeddings=True)
            / teacher.num_parameters(exclude_embeddings=True),
            "distilled_bpb": d["eval"]["bits_per_byte"], "scratch_bpb": s["eval"]["bits_per_byte"],
            "distilled_retained": d["retained"], "scratch_retained": s["retained"],
            "distilled_seconds": d["seconds"], "scratch_seconds": s["seconds"],
            "transfer_fraction": d["transfer"]["fraction"], "transfer_mapped": d["transfer"]["mapped"],
            "transfer_notes": d["transfer"]["notes"],
            "distill_history": d["history"], "scratch_history": s["history"],
        }
        row["distilled_better"] = row["distilled_bpb"] < row["scratch_bpb"]
        row["within_10_percent_of_teacher"] = row["distilled_bpb"] <= 1.1 * teacher_bpb
        rows.append(row)
        print(f"  distilled {row['distilled_bpb']:.4f} bpb vs scratch {row['scratch_bpb']:.4f} "
              f"({row['distilled_retained']:.1%} vs {row['scratch_retained']:.1%} of the teacher); "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    result = {
        "benchmark": "distill", "seqlab": seqlab.__version__, "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "threads": torch.get_num_threads()},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "teacher": TEACHER, "students": {k: STUDENTS[k] for k in (r["student"] for r in rows)},
                     "distill": {k: v for k, v in cfg.to_dict().items() if k != "train"}},
        "teacher": {"params_non_embedding": teacher.num_parameters(exclude_embeddings=True), "bpb": teacher_bpb,
                    "steps": args.teacher_steps, "seconds": teacher_seconds},
        "students": rows,
    }
    measure_decode(result, args.context, args.decode_rounds)
    result["total_seconds"] = time.perf_counter() - start
    finish(result, args)
    return 0


def measure_decode(result: dict, context: int, rounds: int) -> None:
    """State bytes and decode latency of the teacher and every student at `context`, from the profiler.

    The models are measured in turn, `rounds` times over (teacher, student, student, ..., teacher, ...), and each
    latency is the median over the rounds of each round's median: on a shared machine the load drifts, and
    interleaving puts every model under the same drift. The profiler builds each model afresh from its config
    (cost depends on the architecture, not on the trained weights).
    """
    configs = {"teacher": result["settings"]["teacher"],
               **{r["student"]: result["settings"]["students"][r["student"]] for r in result["students"]}}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for i in range(rounds):
        for name, cfg in configs.items():
            runs[name].append(decode_cost(build_model(ModelConfig.from_dict(cfg)), context))
        print(f"decode round {i + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]['decode_ms']:.2f} ms"
                                                            for n, v in runs.items()), flush=True)
    costs = {}
    for name, cells in runs.items():
        costs[name] = {**cells[0], "decode_ms": statistics.median(c["decode_ms"] for c in cells),
                       "decode_ms_rounds": [c["decode_ms"] for c in cells], "rounds": rounds}
        del costs[name]["decode_ms_p10"], costs[name]["decode_ms_p90"]
    result["teacher"]["decode"] = costs["teacher"]
    for r in result["students"]:
        r["decode"] = costs[r["student"]]
        r["decode_speedup_vs_teacher"] = costs["teacher"]["decode_ms"] / r["decode"]["decode_ms"]
    teacher_ms = costs["teacher"]["decode_ms"]
    best = min(result["students"], key=lambda r: r["distilled_bpb"])
    result["targets"] = {
        "every_distilled_better_than_scratch": all(r["distilled_better"] for r in result["students"]),
        "best_student": best["student"],
        "best_within_10_percent": best["within_10_percent_of_teacher"],
        "best_gap_to_teacher": best["distilled_bpb"] / result["teacher"]["bpb"] - 1,
        "best_decodes_faster": best["decode"]["decode_ms"] < teacher_ms,
        "best_constant_state": best["decode"]["constant_state"],
        "students_within_10_percent_decoding_faster_with_constant_state": [
            r["student"] for r in result["students"] if r["within_10_percent_of_teacher"]
            and r["decode"]["decode_ms"] < teacher_ms and r["decode"]["constant_state"]],
    }


def finish(result: dict, args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    teacher_bpb = result["teacher"]["bpb"]
    targets = result["targets"]
    t_steps, s_steps = result["settings"]["teacher_steps"], result["settings"]["student_steps"]

    ctx = result["settings"]["context"]
    print()
    print(f"| model | params | test bpb | retained | state bytes @ {ctx} | constant state | decode ms @ {ctx} |")
    print("|---|---:|---:|---:|---:|---|---:|")
    td = result["teacher"]["decode"]
    print(f"| teacher attention ({t_steps} steps) | {result['teacher']['params_non_embedding']:,} | "
          f"{teacher_bpb:.3f} | 100% | {td['state_bytes']:,} | {td['constant_state']} | {td['decode_ms']:.2f} |")
    for r in result["students"]:
        dc = r["decode"]
        for kind in ("distilled", "scratch"):
            print(f"| {r['student']} {kind} ({s_steps} steps) | {r['params_non_embedding']:,} | "
                  f"{r[kind + '_bpb']:.3f} | {r[kind + '_retained']:.1%} | {dc['state_bytes']:,} | "
                  f"{dc['constant_state']} | {dc['decode_ms']:.2f} |")
    print()
    for k, v in targets.items():
        print(f"{k}: {v}")
    print(f"total {result['total_seconds']:.0f} s; saved {args.out}")


if __name__ == "__main__":
    sys.exit(main())
