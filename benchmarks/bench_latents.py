"""Latent trajectories of a small recurrent-depth model, and gradient flow over distance per mixer.

    trajectories  a recurrent-depth model (prelude 1, a core of 1 block iterated r times, coda 1; width 32; a conv
                  core, and an attention core) is trained briefly (--depth-steps, r drawn around a mean of 8) on
                  prefix_parity (length 32) and, separately, on the byte-level corpus; then every
                  token of a held-out batch is run for --analysis-steps core steps (beyond the training mean, to
                  see where the latents go), one PCA is fitted over all steps and tokens, and each trajectory is
                  classified (fixed_point / orbit / slider / other, `seqlab.analysis.latents`). Per task: class
                  shares, steps to converge, mean loss per class, the Spearman correlation of converge steps with
                  token loss, and a report (Markdown + HTML) with the PC1-PC2 / PC3-PC4 / PC5-PC6 and
                  distance-to-final plots, under benchmarks/results/latents/<task>-<core>/; and whether later
                  positions take more steps to settle (Spearman correlation of converge step with position).
    solved        models that solve their task: bench_thinking's parity recipe trained per seed (--solved-seeds,
                  800 steps), its accuracy checked (`learned`), class shares per seed over 64 core steps, and PC
                  plots of the first orbit and slider token when one occurs (absent classes are listed as such).
    gradient flow small language models of several mixers (2 layers, width 48) trained briefly on the corpus;
                  the norm of the gradient of the last position's loss with respect to the input embedding at each
                  earlier position, against distance, averaged over batches of held-out text (one curve per
                  mixer: benchmarks/results/latents/gradflow.png).

Everything is saved to benchmarks/results/latents.json.

    PYTHONPATH=src python benchmarks/bench_latents.py            # ~12 minutes at one thread
    PYTHONPATH=src python benchmarks/bench_latents.py --quick    # a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from bench_thinking import parity_config, train_model

import seqlab
from seqlab.analysis.gradflow import gradient_flow_on_task, plot_gradient_flow
from seqlab.analysis.latents import LABELS, analyze, capture, classify, fit_pca, plot_pc_pairs, spearman
from seqlab.commands.latents import write_report
from seqlab.config import ModelConfig, TrainConfig
from seqlab.data import make_task
from seqlab.models import build_model
from seqlab.train import cross_entropy, fit, recurrent_depth, task_batches

RESULTS = Path(__file__).resolve().parent / "results"
DEPTH = {"prelude": 1, "core": 1, "coda": 1, "mean_steps": 8, "backprop_steps": 4}
TASKS = {  # name -> (train task, held-out task, model overrides, train overrides)
    "prefix_parity": ({"name": "prefix_parity", "seq_len": 32}, {"name": "prefix_parity", "seq_len": 32},
                      {"vocab_size": 2}, {"lr": 3e-3}),
    "corpus": ({"name": "corpus", "seq_len": 64}, {"name": "corpus", "seq_len": 64, "split": "test"},
               {"vocab_size": 256}, {"lr": 3e-3, "batch_size": 16}),
}


def task_of(params: dict):
    return make_task(params["name"], **{k: v for k, v in params.items() if k != "name"})


def trajectories(name: str, core: str, args: argparse.Namespace, out_dir: Path) -> dict:
    train_p, test_p, model_o, train_o = TASKS[name]
    cfg = ModelConfig.from_dict({"arch": "recurrent_depth", "mixer": core, "d_model": 32, "mlp": "gelu",
                                 "sandwich_norm": True, "depth": DEPTH, **model_o})
    model = build_model(cfg, seed=args.seed)
    torch.manual_seed(args.seed)  # training draws r from the global RNG
    tc = TrainConfig(**{"steps": args.depth_steps, "batch_size": 32, "warmup_steps": max(1, args.depth_steps // 20),
                        "seed": args.seed, "eval_batches": 8, "log_every": max(1, args.depth_steps // 10), **train_o})
    t0 = time.perf_counter()
    fit_result = fit(model, task_batches(task_of(train_p), tc), recurrent_depth, tc, progress=False,
                     eval_task=task_of(test_p))
    train_seconds = time.perf_counter() - t0
    batch = task_of(test_p).batch(args.rows, torch.Generator().manual_seed(args.seed + 100))
    lat = analyze(model, batch.inputs, batch.targets, batch.mask, args.analysis_steps, plots_dir=out_dir / "plots",
                  byte_level=name == "corpus", seed=args.seed)
    result = {"checkpoint": f"{name} recurrent-depth model, {core} core (trained in bench_latents.py)",
              "source": {"task": name, **{k: v for k, v in test_p.items() if k != "name"}, "batch_size": args.rows},
              "latents": lat}
    write_report(result, out_dir)
    s = lat["summary"]
    # does a later position (more of the sequence to summarize) take more steps to settle?
    fixed = [t for t in lat["tokens"] if t["converge_step"] >= 0]
    pos = torch.tensor([t["pos"] for t in fixed], dtype=torch.float64)
    conv = torch.tensor([t["converge_step"] for t in fixed], dtype=torch.float64)
    T = lat["positions"]
    by_position = {
        "spearman_converge_position": spearman(pos, conv),
        "mean_converge_first_quarter": conv[pos < T / 4].mean().item() if (pos < T / 4).any() else None,
        "mean_converge_last_quarter": conv[pos >= 3 * T / 4].mean().item() if (pos >= 3 * T / 4).any() else None,
    }
    print(f"{name}/{core}: eval {fit_result['eval']} after {args.depth_steps} steps ({train_seconds:.0f} s); classes "
          + ", ".join(f"{k} {v:.1%}" for k, v in s["shares"].items()) + f"; converge steps by position {by_position}",
          flush=True)
    return {"model": cfg.to_dict(), "train": tc.to_dict(), "train_seconds": train_seconds,
            "eval": fit_result["eval"], "analysis_steps": args.analysis_steps,
            "pca": lat["pca"], "summary": s, "converge_by_position": by_position, "mean_loss": lat["mean_loss"],
            "plots": lat["plots"],
            "report": f"latents/{out_dir.name}/report.md"}


def solved(args: argparse.Namespace, out_dir: Path) -> dict:
    """Trajectories of models that solve their task: bench_thinking's parity recipe (conv core, r around 12,
    `--solved-train-steps` steps at 32 bits) per seed; the model's exact-sequence accuracy at 32 bits (at r = 2x the
    training mean) must be high for the classes to mean anything (`learned`). Per seed: class shares over every
    token of `--rows` held-out rows at `--solved-analysis-steps` core steps (enough to see periods up to 16 twice),
    the periods found, and PC plots of the first orbit and the first slider token when they occur; a seed with none
    says so."""
    args_t = argparse.Namespace(d_model=32, kernel_size=4, sampler="progressive", mean_steps=12.0, backprop_steps=4)
    out = {}
    for seed in [int(s) for s in args.solved_seeds.split(",")]:
        model = seqlab.build_model(parity_config(args_t), seed=seed)
        train_model(model, make_task("prefix_parity", seq_len=32), args.solved_train_steps, 32, 5e-3, seed,
                    f"parity seed {seed}")
        task = make_task("prefix_parity", seq_len=32)
        batch = task.batch(args.rows, torch.Generator().manual_seed(seed + 100))
        steps = args.solved_analysis_steps
        cap = capture(model, batch.inputs, steps, seed)
        hit = cap.logits.argmax(-1) == batch.targets
        seq_acc = float(hit.all(dim=1).float().mean())
        acc = float(hit.float().mean())
        S1, B, T, D = cap.trajectory.shape
        flat = cap.trajectory.reshape(S1, B * T, D)
        c = classify(flat)
        pca = fit_pca(flat.reshape(-1, D), 6)
        shown, names = [], []
        for label in ("orbit", "slider"):
            i = next((i for i, x in enumerate(c.labels) if x == label), None)
            if i is not None:
                shown.append(i)
                names.append(f"row {i // T} pos {i % T} ({label}" + (f", period {int(c.period[i])})" if
                                                                     label == "orbit" else ")"))
        plot = None
        if shown:
            out_dir.mkdir(parents=True, exist_ok=True)
            plot = plot_pc_pairs(pca.project(flat[:, shown]).float(), names,
                                 out_dir / f"parity-seed{seed}-pcs.png", pca.explained_ratio.tolist()).name
        shares = c.shares()
        periods = c.period[c.period > 0]
        out[str(seed)] = {"seq_accuracy_32": seq_acc, "accuracy_32": acc, "learned": seq_acc >= 0.9,
                          "analysis_steps": steps, "tokens": B * T, "shares": shares,
                          "periods": {int(p): int((periods == p).sum()) for p in periods.unique()},
                          "shown": names, "plot": plot,
                          "absent": [label for label in ("orbit", "slider") if shares[label] == 0]}
        print(f"solved parity seed {seed}: seq acc {seq_acc:.3f} at 32 bits; " + ", ".join(
            f"{k} {v:.1%}" for k, v in shares.items()) + (f"; no {' and no '.join(out[str(seed)]['absent'])} among "
                                                          f"{B * T} tokens" if out[str(seed)]["absent"] else ""),
              flush=True)
    return out


def gradflow(args: argparse.Namespace, out_dir: Path) -> dict:
    task = task_of({"name": "corpus", "seq_len": args.gradflow_len})
    test = task_of({"name": "corpus", "seq_len": args.gradflow_len, "split": "test"})
    curves, rows = {}, {}
    for mixer in [m for m in args.mixers.split(",") if m]:
        cfg = ModelConfig(mixer=mixer, vocab_size=256, d_model=48, n_layers=2)
        model = build_model(cfg, seed=args.seed)
        tc = TrainConfig(steps=args.gradflow_steps, batch_size=16, lr=3e-3,
                         warmup_steps=max(1, args.gradflow_steps // 20), seed=args.seed, eval_batches=4,
                         log_every=max(1, args.gradflow_steps // 10))
        t0 = time.perf_counter()
        r = fit(model, task_batches(task, tc), cross_entropy, tc, progress=False, eval_task=test)
        curve = gradient_flow_on_task(model, test, batches=args.gradflow_batches, batch_size=16, seed=args.seed)
        curves[mixer] = curve
        g = curve.norm
        rel = {d: float(g[d] / g[0]) for d in (1, 4, 16, args.gradflow_len - 1) if d < g.numel() and g[0] > 0}
        rows[mixer] = {"params_non_embedding": model.num_parameters(exclude_embeddings=True),
                       "bpb": r["eval"]["bits_per_byte"], "seconds": time.perf_counter() - t0,
                       "relative_to_distance_0": rel, **curve.to_dict()}
        print(f"gradient flow {mixer}: bpb {r['eval']['bits_per_byte']:.3f}; relative to d=0: "
              + ", ".join(f"d={d} {v:.3g}" for d, v in rel.items()), flush=True)
    plot_gradient_flow(curves, out_dir / "gradflow.png")
    return {"task": "corpus", "seq_len": args.gradflow_len, "train_steps": args.gradflow_steps,
            "batches": args.gradflow_batches, "plot": "latents/gradflow.png", "mixers": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", default="conv,attention", help="the recurrent-depth models' core mixers")
    p.add_argument("--depth-steps", type=int, default=200, help="training steps of each recurrent-depth model")
    p.add_argument("--analysis-steps", type=int, default=32, help="core steps captured per token")
    p.add_argument("--rows", type=int, default=8, help="held-out rows analysed per task")
    p.add_argument("--mixers", default="attention,lstm,gru,conv,mamba,gla")
    p.add_argument("--gradflow-steps", type=int, default=100)
    p.add_argument("--gradflow-len", type=int, default=64)
    p.add_argument("--gradflow-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--solved-seeds", default="0,1,2", help="seeds of the parity models trained to solve the task")
    p.add_argument("--solved-train-steps", type=int, default=800)
    p.add_argument("--solved-analysis-steps", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "latents.json")
    args = p.parse_args()
    if args.quick:
        args.depth_steps, args.analysis_steps, args.rows, args.gradflow_steps = 10, 8, 2, 5
        args.solved_seeds, args.solved_train_steps, args.solved_analysis_steps = "0", 20, 40
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    out_dir = args.out.parent / "latents"
    result = {"benchmark": "latents", "seqlab": seqlab.__version__, "torch": torch.__version__,
              "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                          "threads": torch.get_num_threads()},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "trajectories": {f"{name}/{core}": trajectories(name, core, args, out_dir / f"{name}-{core}")
                               for core in args.cores.split(",") if core for name in TASKS},
              "solved": solved(args, out_dir),
              "gradflow": gradflow(args, out_dir)}
    result["total_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print("| task/core | eval | " + " | ".join(LABELS) + " | converge (median) | Spearman(conv., loss) |")
    print("|---|---|" + "---:|" * (len(LABELS) + 2))
    for name, t in result["trajectories"].items():
        s, ev = t["summary"], t["eval"]
        metric = f"bpb {ev['bits_per_byte']:.3f}" if "bits_per_byte" in ev else f"acc {ev['accuracy']:.3f}"
        conv = s["converge_steps"]
        rho = s.get("spearman_converge_loss")
        print(f"| {name} | {metric} | " + " | ".join(f"{s['shares'][k]:.1%}" for k in s["shares"])
              + f" | {'-' if conv is None else conv['median']} | {'-' if rho is None else f'{rho:.2f}'} |")
    print()
    print(f"total {result['total_seconds']:.0f} s; saved {args.out} and {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
