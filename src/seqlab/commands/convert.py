"""`seqlab convert`: a Transformer checkpoint -> a hybrid or recurrent student, by a per-layer plan."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from seqlab.checkpoint import load, save
from seqlab.commands import emit
from seqlab.convert import CONVERTIBLE, RECIPES, STAGES, TRAINS, Recipe, convert, run_conversion
from seqlab.data import CorpusTask
from seqlab.errors import InputError
from seqlab.interop.gguf import from_gguf

DESCRIPTION = f"""\
Build a student from a Transformer teacher (a seqlab checkpoint folder, or a .gguf file) with one mixer per layer:
  attention            the teacher's layer kept
  sliding_attention    the same weights, a window of --window tokens
  gla, gated_deltanet, deltanet, mamba2, mamba
                       a recurrent mixer initialized from the attention's W_Q, W_K, W_V, W_O where the math maps
                       (Q -> q / C, K -> k / B, V -> v / x, O -> the output projection; see seqlab.convert)
Embeddings, norms, MLPs and the head are copied; the student keeps the teacher's tokenizer.

PLAN: a layer spec ('gated_deltanet', '3:1 gated_deltanet:attention'), 'MIXER everyN:OTHER' (every Nth layer
OTHER: 'gated_deltanet every4:attention'), or a comma list with one name per layer ('attention,gla,gla,attention').
Names: {', '.join(CONVERTIBLE)}.

Without --stages (and without --preset): writes the student checkpoint to --out with convert.json beside
config.json: the plan and, for every tensor, whether it was copied (from which teacher tensor), mapped (how) or
initialized.

With --stages a, b or a,b (or --preset, whose stages are a,b), --out is a run folder: the student is trained on the
lab corpus's train split (the Python standard library's source, read through the teacher's tokenizer) by
  (a) attention transfer: each replaced layer learns the teacher layer's attention output on the teacher's own
      hidden states (MSE); only the new mixers train
  (b) distillation: temperature^2 KL(teacher || student) (+ --ce-weight x cross-entropy); trains the new mixers
      (--train mixers), also rank --lora-rank adapters on the linear layers kept from the teacher, merged into the
      weights at the end (--train lora), or everything (--train all)
and evaluated (bits per byte on the first windows of the validation split) after the weight transfer and each stage.
It writes recipe.json (the plan and resolved recipe), metrics.json (per stage: history, evaluation, seconds,
training FLOPs), stage_a/ and stage_b/ (checkpoints: --resume continues an interrupted run) and student/ (the
final checkpoint, plain safetensors). Presets (flags given explicitly override them):
  cpu   stage a 60 steps, lr 1e-3; stage b 120 steps, lr 3e-4; batch 4 x 128 tokens; eval 4 x 512 tokens
        (SmolLM2-135M, 3:1 gated_deltanet:attention: about 15 minutes at one thread, extrapolated from
        measured per-step times of 3 s (a) and 5.7 s (b) per 512 tokens; not timed end to end)
  gpu   stage a 500 steps, lr 1e-3; stage b 2000 steps, lr 1e-4; batch 16 x 1024 tokens; bf16, device auto;
        eval 64 x 1024 tokens
Without --preset the defaults are the cpu preset's except 40 steps per stage."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Transformer checkpoint into a hybrid or recurrent student",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="teacher: a seqlab checkpoint folder or a .gguf file")
    p.add_argument("--plan", required=True, help="one mixer per layer (see above)")
    p.add_argument("--out", type=Path, required=True, help="student checkpoint folder (replaced atomically)")
    p.add_argument("--window", type=int, help="sliding_attention window in tokens (needed when the plan has one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tensors left at their init (default 0)")
    p.add_argument("--json", action="store_true", help="print convert.json (with stages: metrics.json)")
    t = p.add_argument_group("training (with --stages or --preset)")
    t.add_argument("--stages", help="stages to run, in order: a, b or a,b (default with --preset: a,b)")
    t.add_argument("--preset", choices=tuple(RECIPES), help="recipe preset (see above)")
    t.add_argument("--steps-a", type=int, help="stage (a) optimizer steps")
    t.add_argument("--steps-b", type=int, help="stage (b) optimizer steps")
    t.add_argument("--lr-a", type=float, help="stage (a) peak learning rate")
    t.add_argument("--lr-b", type=float, help="stage (b) peak learning rate")
    t.add_argument("--batch-size", type=int, help="rows per step, both stages")
    t.add_argument("--seq-len", type=int, help="tokens per row, both stages")
    t.add_argument("--train", choices=TRAINS, help="what stage (b) trains: mixers (the new ones; default), lora "
                                                   "(also adapters on the kept linears) or all")
    t.add_argument("--lora-rank", type=int, help="rank of the adapters with --train lora (default 8)")
    t.add_argument("--temperature", type=float, help="stage (b) distillation temperature (default 1)")
    t.add_argument("--ce-weight", type=float, help="stage (b) weight of the data cross-entropy (default 0)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def resolve_recipe(args: argparse.Namespace) -> Recipe | None:
    """The recipe the flags ask for (None: convert only); InputError for a bad combination."""
    trained = [f"--{k.replace('_', '-')}" for k in ("steps_a", "steps_b", "lr_a", "lr_b", "batch_size", "seq_len",
                                                     "train", "lora_rank", "temperature", "ce_weight")
               if getattr(args, k) is not None] + (["--resume"] if args.resume else [])
    if args.stages is None and args.preset is None:
        if trained:
            raise InputError(f"{trained[0]} sets up training: give --stages a,b (or a, or b) or --preset cpu|gpu")
        return None
    stages = tuple(s.strip() for s in (args.stages or "a,b").split(","))
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages) \
            or list(stages) != sorted(stages):
        raise InputError(f"--stages {args.stages!r}: expected a, b or a,b")
    recipe = RECIPES[args.preset] if args.preset else Recipe()
    a, b = recipe.a, recipe.b
    for flag, value in (("--steps-a", args.steps_a), ("--steps-b", args.steps_b), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len), ("--lora-rank", args.lora_rank)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: expected a whole number >= 1")
    for flag, value in (("--lr-a", args.lr_a), ("--lr-b", args.lr_b), ("--temperature", args.temperature)):
        if value is not None and not value > 0:
            raise InputError(f"{flag} {value}: expected a number > 0")
    if args.steps_a is not None:
        a = a.replace(steps=args.steps_a, warmup_steps=min(a.warmup_steps, max(1, args.steps_a // 10)))
    if args.steps_b is not None:
        b = b.replace(steps=args.steps_b, warmup_steps=min(b.warmup_steps, max(1, args.steps_b // 10)))
    a, b = a.replace(lr=args.lr_a or a.lr), b.replace(lr=args.lr_b or b.lr)
    if args.batch_size is not None:
        a, b = a.replace(batch_size=args.batch_size), b.replace(batch_size=args.batch_size)
    if args.lora_rank is not None and (args.train or recipe.train) != "lora":
        raise InputError("--lora-rank applies to --train lora only")
    changes = {"stages": stages, "a": a, "b": b, "window": args.window, "seed": args.seed}
    for key in ("train", "lora_rank", "temperature", "ce_weight"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.seq_len is not None:
        changes["seq_len_a"] = changes["seq_len_b"] = args.seq_len
    return recipe.replace(**changes)


def run(args: argparse.Namespace) -> int:
    recipe = resolve_recipe(args)  # a bad flag is an error before the teacher is read
    teacher = from_gguf(args.teacher) if str(args.teacher).endswith(".gguf") else load(args.teacher)
    if recipe is not None:
        return train_student(args, teacher, recipe)
    student, record = convert(teacher, args.plan, window=args.window, seed=args.seed)
    record["teacher"]["checkpoint"] = str(args.teacher)
    save(student, args.out, json_files={"convert.json": record})
    layers = Counter(record["plan"])
    tensors = Counter(t["status"] for layer in record["layers"] for t in layer["tensors"].values())
    emit(record, args.json, f"converted {args.teacher} -> {args.out}: "
                            f"{', '.join(f'{n} x {name}' for name, n in layers.items())} (per layer in convert.json); "
                            f"block tensors {', '.join(f'{n} {status}' for status, n in tensors.items())}; "
                            f"{record['fraction_transferred']:.1%} of the parameters in tensors copied or mapped")
    return 0


def train_student(args: argparse.Namespace, teacher, recipe: Recipe) -> int:
    task = CorpusTask(seq_len=max(recipe.seq_len_a, recipe.seq_len_b), split="train")
    eval_task = CorpusTask(seq_len=recipe.eval_seq_len, split="validation")
    _, metrics = run_conversion(teacher, args.plan, task, recipe, eval_task=eval_task, out=args.out,
                                resume=args.resume, progress=not args.no_progress)
    rows = [f"after weight transfer {metrics['transfer']['test']['bits_per_byte']:.3f}"]
    rows += [f"after stage {s} {m['test']['bits_per_byte']:.3f} ({m['steps']} steps, {m['seconds']:.0f} s)"
             for s, m in metrics["stages"].items()]
    emit(metrics, args.json, f"converted {args.teacher} -> {args.out}/student; bits per byte on "
                             f"{metrics['transfer']['test']['tokens']:,} validation tokens: {'; '.join(rows)} "
                             f"(recipe.json, metrics.json in {args.out})")
    return 0
