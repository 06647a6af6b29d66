"""`seqlab latents`: latent trajectories of a recurrent-depth checkpoint, and gradient flow over distance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seqlab.analysis.gradflow import gradient_flow, plot_gradient_flow
from seqlab.analysis.latents import Rules, analyze, check_recurrent_depth
from seqlab.checkpoint import load
from seqlab.commands import emit, parse_sets
from seqlab.data import Batch, make_task
from seqlab.document import Document, Section, write
from seqlab.errors import InputError

DESCRIPTION = """\
Capture the latent state s_0 .. s_N of every token of a recurrent-depth checkpoint (as the coda would read it),
fit one PCA over every step of every token, plot chosen tokens' trajectories in PC1-PC2, PC3-PC4 and PC5-PC6 and
every token's distance to its final state, and classify each trajectory (seqlab.analysis.latents.Rules; every
threshold is a ratio of two lengths of the same trajectory, so the rules do not depend on the state's scale):
  fixed_point  over the tail (the last half of the steps), the spread is at most --tol of the trajectory's own
               excursion
  orbit        over the tail, the state returns within --orbit-ratio of where it was p steps earlier, p >= 2
               (the period, up to 16), seen twice, while still moving
  slider       the tail's two halves move the same way (cosine >= --slide-cos) and the second moves about as far
  undecided    the tail has fewer than --hold steps, or more steps would tell
  other        none of these
Writes latents.json, report.md, report.html and plots/ into --out; reports the class shares, steps to converge,
and the loss per class (and the Spearman correlation of converge steps with the token loss).

--gradflow CKPT,CKPT,...: also measure, for each of these checkpoints (any architecture), the gradient norm of the
loss at the last position with respect to the input embedding at each earlier position, against distance,
averaged over --gradflow-batches batches of the same task or text; one curve per checkpoint, in the same report.
With --gradflow, the recurrent-depth CKPT may be left out (gradient flow only)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latents", help="latent trajectories (PCA, fixed points / orbits / sliders); gradient flow",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="recurrent-depth checkpoint folder (arch recurrent_depth)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="task whose batch to analyse, e.g. prefix_parity, corpus")
    src.add_argument("--text", help="text to analyse, as UTF-8 bytes (byte-level models, vocab_size 256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter, e.g. --set seq_len=64 (corpus: --set split=validation)")
    p.add_argument("--steps", type=int, default=32, help="core iterations to capture, N >= 2 (default 32)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8, help="rows of the task batch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task batch and of a noisy s_0 (default 0)")
    p.add_argument("--tokens", help="positions (in the first row) to plot, e.g. 0,5,9 (default: one per class)")
    p.add_argument("--components", type=int, default=6, help="principal components kept (default 6)")
    p.add_argument("--tol", type=float, default=Rules.tol, help="fixed point: the tail's spread over the "
                   f"trajectory's excursion (default {Rules.tol})")
    p.add_argument("--hold", type=int, default=Rules.hold, help="fewest tail steps to decide anything (default "
                   f"{Rules.hold})")
    p.add_argument("--orbit-ratio", type=float, default=Rules.orbit_ratio,
                   help=f"orbit: return distance over the largest shorter-lag distance (default {Rules.orbit_ratio})")
    p.add_argument("--slide-cos", type=float, default=Rules.slide_cos,
                   help=f"slider: cosine of the tail halves' displacements (default {Rules.slide_cos})")
    p.add_argument("--gradflow", metavar="CKPT,CKPT", help="checkpoints for the gradient-flow section")
    p.add_argument("--gradflow-batches", type=int, default=4, help="batches for gradient flow (default 4)")
    p.add_argument("--json", action="store_true", help="print latents.json (without the per-token list)")
    p.set_defaults(func=run)


def _batch(args: argparse.Namespace, vocab_size: int):
    """The batch to analyse: a task batch, or the text as one row (targets: the next byte)."""
    if args.text is not None:
        if vocab_size < 256:
            raise InputError(f"--text needs a byte-level model (vocab_size 256); this one has vocab_size "
                             f"{vocab_size}: use --task")
        data = list(args.text.encode("utf-8"))
        if len(data) < 2:
            raise InputError("--text must hold at least 2 bytes")
        inputs = torch.tensor([data])
        targets = torch.tensor([data[1:] + [0]])
        mask = torch.ones_like(inputs, dtype=torch.bool)
        mask[0, -1] = False  # the last byte has no next byte to predict
        return Batch(inputs, targets, mask, byte_level=True), {"text": args.text}
    task = make_task(args.task, **parse_sets(args.set))
    if vocab_size < task.vocab_size:
        raise InputError(f"task '{task.name}' needs vocab_size {task.vocab_size}; the checkpoint has vocab_size "
                         f"{vocab_size}")
    batch = task.batch(args.batch_size, torch.Generator().manual_seed(args.seed))
    return batch, {"task": args.task, **parse_sets(args.set), "batch_size": args.batch_size, "seed": args.seed}


def _positions(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--tokens {text!r}: expected comma-separated positions, e.g. 0,5,9") from None


def run(args: argparse.Namespace) -> int:
    if args.checkpoint is None and not args.gradflow:
        raise InputError("give a recurrent-depth checkpoint, or --gradflow CKPT,CKPT for gradient flow only")
    for name in ("batch_size", "components", "gradflow_batches"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    if args.steps < 2:
        raise InputError(f"--steps = {args.steps}: must be >= 2 (the classifier compares successive steps)")
    rules = Rules(tol=args.tol, hold=args.hold, orbit_ratio=args.orbit_ratio, slide_cos=args.slide_cos)
    gradflow_paths = [p for p in (args.gradflow or "").split(",") if p.strip()]

    result: dict[str, Any] = {"checkpoint": args.checkpoint}
    model = None
    if args.checkpoint is not None:
        model = load(args.checkpoint).eval()
        check_recurrent_depth(model, f"checkpoint '{args.checkpoint}'")
    gf_models = {p: load(p).eval() for p in gradflow_paths}  # every checkpoint is checked before any work
    vocab = min(m.config.vocab_size for m in [*(x for x in [model] if x is not None), *gf_models.values()])
    batch, source = _batch(args, vocab)
    result["source"] = source
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder '{args.out}': {e.strerror}") from None
    (args.out / "config.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}, indent=2) + "\n")

    if model is not None:
        result["latents"] = analyze(model, batch.inputs, batch.targets, batch.mask, args.steps, rules=rules,
                                    components=args.components, chosen=_positions(args.tokens),
                                    plots_dir=args.out / "plots", byte_level=batch.byte_level,
                                    seed=args.seed)
    if gf_models:
        result["gradflow"] = gradflow_section(gf_models, args, args.out / "plots")
    (args.out / "latents.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, args.out)
    brief = {k: v for k, v in result.items() if k != "latents"}
    if "latents" in result:
        brief["latents"] = {k: v for k, v in result["latents"].items() if k != "tokens"}
    emit(brief, args.json, summary_text(result, args.out))
    return 0


def gradflow_section(models: dict, args: argparse.Namespace, plots_dir: Path) -> dict:
    curves = {}
    for path, m in tqdm(models.items(), desc="gradient flow", disable=args.json, leave=False):
        name = f"{Path(path).name} ({'+'.join(sorted(set(m.config.layer_mixers)))})"
        gen = torch.Generator().manual_seed(args.seed)
        if args.text is not None:
            batches = [_batch(args, m.config.vocab_size)[0]]
        else:
            task = make_task(args.task, **parse_sets(args.set))
            batches = [task.batch(args.batch_size, gen) for _ in range(args.gradflow_batches)]
        curves[name] = gradient_flow(m, batches)
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_gradient_flow(curves, plots_dir / "gradflow.png")
    return {"plot": "gradflow.png", "curves": {k: v.to_dict() for k, v in curves.items()}}


# ---------------------------------------------------------------------------------------------------------------
# report: one document, as Markdown and as self-contained HTML


def report_document(result: dict) -> Document:
    doc = Document("seqlab latents report")
    lat = result.get("latents")
    if lat is not None:
        s, p = lat["summary"], lat["pca"]
        src = result["source"]
        what = f"text {src['text'][:60]!r}" if "text" in src else f"task `{src['task']}` ({lat['rows']} rows)"
        sec = Section("Latent trajectories")
        sec.p(f"Checkpoint `{result['checkpoint']}`, {what}: {s['tokens']} tokens x {lat['steps'] + 1} states "
              f"(s_0 .. s_{lat['steps']}), d_model {lat['d_model']}.")
        sec.p(f"PCA over all steps and tokens: the first {p['components']} components explain "
              f"{p['explained_total']:.1%} of the variance ("
              + ", ".join(f"{r:.1%}" for r in p["explained_ratio"]) + "); the mean squared reconstruction error "
              f"{p['reconstruction_mse']:.4g} equals the residual variance {p['residual_variance']:.4g}.")
        conv = s["converge_steps"]
        if conv is not None:
            sec.p(f"Steps to converge (fixed points): mean {conv['mean']:.1f}, median {conv['median']:.0f}, "
                  f"range {conv['min']} .. {conv['max']}.")
        if s["periods"]:
            sec.p("Orbit periods: " + ", ".join(f"{k}: {v} tokens" for k, v in s["periods"].items()) + ".")
        rho = s.get("spearman_converge_loss")
        if rho is not None:
            sec.p(f"Spearman correlation of steps to converge with token loss (fixed points): {rho:.2f}.")
        r = lat["rules"]
        sec.p(f"Rules: tol {r['tol']}, hold {r['hold']}, orbit ratio {r['orbit_ratio']}, slide cosine "
              f"{r['slide_cos']}, slide keep {r['slide_keep']}, tail {r['tail']} (see `seqlab latents --help`).")
        sec.table(["class", "tokens", "share", "mean loss"],
                  [[label, f"{s['counts'][label]}", f"{s['shares'][label]:.1%}",
                    "" if s.get("loss_by_class", {}).get(label) is None else f"{s['loss_by_class'][label]:.3f}"]
                   for label in s["shares"]])
        for key, caption in (("classes", "class shares; steps to converge against token loss"),
                             ("pcs", "chosen tokens in PC1-PC2, PC3-PC4, PC5-PC6 (o: s_0, *: final state)"),
                             ("distance", "distance to the final state against the step")):
            if key in lat["plots"]:
                sec.figure(f"plots/{lat['plots'][key]}", caption)
        doc.sections.append(sec)
    gf = result.get("gradflow")
    if gf is not None:
        last = max(max((d for d, n in enumerate(c["rows"]) if n > 0), default=0) for c in gf["curves"].values())
        dists = sorted({d for d in (1, 4, 16, 64, 256) if d < last} | {last})
        rows = []
        for name, c in gf["curves"].items():
            g = c["grad_norm"]
            rel = [g[d] / g[0] if g[0] > 0 and d < len(g) and c["rows"][d] > 0 else None for d in dists]
            rows.append([name, f"{g[0]:.3g}"] + ["" if v is None else f"{v:.3g}" for v in rel])
        sec = Section("Gradient flow over distance")
        sec.p("Norm of d loss(last position) / d input embedding at each earlier position, averaged over rows and "
              "batches; the table gives it relative to distance 0.")
        sec.table(["model", "norm at d=0"] + [f"d={d}" for d in dists], rows)
        sec.figure(f"plots/{gf['plot']}", "gradient norm against distance (relative to d=0)")
        doc.sections.append(sec)
    return doc


def write_report(result: dict, out: Path) -> None:
    write(report_document(result), out)


def summary_text(result: dict, out: Path) -> str:
    lines = []
    if "latents" in result:
        s = result["latents"]["summary"]
        lines.append("classes: " + ", ".join(f"{k} {v:.1%}" for k, v in s["shares"].items()))
        if s["converge_steps"] is not None:
            lines.append(f"steps to converge (fixed points): mean {s['converge_steps']['mean']:.1f}")
    if "gradflow" in result:
        lines.append("gradient flow: " + ", ".join(result["gradflow"]["curves"]))
    lines.append(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return "\n".join(lines)
