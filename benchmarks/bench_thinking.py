"""Test-time compute of the recurrent-depth model: think longer by iterating the core more times.

Figures (printed, and saved to benchmarks/results/thinking.json):

    scaling     prefix_parity (running parity of random bits), trained at length 32 with a random number of core
                steps r (mean `--mean-steps`); exact per-sequence accuracy at lengths 32 and 128 for r = 1 .. 8x the
                training mean. Beside it, a fixed-depth model with exactly the same parameters (the same blocks,
                r fixed = 1) trained with the same optimizer, steps and batches, to show it does not extrapolate.
                That twin fails at length 32 already (four conv blocks see 13 tokens), so:
    stack       a plain fixed-depth stack (arch lm, `--stack-layers` blocks of `--stack-mixer`, default 4 attention
                blocks at d_model 32: 49,568 parameters against 48,384) trained with the same budget (optimizer,
                lr schedule, steps, batch size, batches); exact per-sequence accuracy at lengths 32 and 128. It
                starts from PyTorch's default init with an untied head (init="torch"), which trains small attention
                models much faster than the GPT-2 init.
    exit        per-token adaptive exit on the parity model (KL between successive output distributions, and the
                relative latent change): mean steps used against the accuracy kept, beside fixed r.
    lm          loss against r on byte-level language modelling (the Python standard library corpus), saturating.
    kv_cache    bytes of the state of an attention-core model against r: one KV cache per (step, layer), and slot
                sharing (step i uses slot i mod N).
    compute     FLOPs per token and per parameter (torch's FlopCounterMode), and the bytes DDP all-reduces per
                training step, measured with a communication hook in a two-process gloo run, for the
                recurrent-depth model against the fixed-depth model of the same parameter count.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_thinking.py           # ~25 minutes, 1 loaded thread
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_thinking.py --quick   # a smoke run, ~1-3 minutes

The parity model is saved to --checkpoint (runs/bench_thinking/parity), so `seqlab think` can read it; with
--merge a run updates only the sections it redoes in the saved JSON (exit rows are added to the earlier sweep):

    ... bench_thinking.py --only scaling,exit --merge --kl-thresholds 1e-7,1e-9 --latent-thresholds 1e-1
    ... bench_thinking.py --only stack --merge     # the plain-stack baseline alone, ~1-2 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

import seqlab
from seqlab.analysis import scaling_curve
from seqlab.analysis.thinking import evaluate_steps
from seqlab.config import TrainConfig
from seqlab.data import Metrics, make_task
from seqlab.measure import load_average
from seqlab.models import RecurrentDepthModel
from seqlab.train import cross_entropy, fit, recurrent_depth, task_batches

RESULTS = Path(__file__).resolve().parent / "results" / "thinking.json"


def parity_config(args: argparse.Namespace, fixed_depth: bool = False) -> dict:
    """The parity model: conv blocks (prelude 1, core 2, coda 1); the baseline fixes r = 1 (same parameters)."""
    depth = {"prelude": 1, "core": 2, "coda": 1, "sampler": args.sampler, "mean_steps": args.mean_steps,
             "backprop_steps": args.backprop_steps}
    if fixed_depth:
        depth = {**depth, "sampler": "fixed", "mean_steps": 1, "backprop_steps": 1}
    return {"arch": "recurrent_depth", "mixer": "conv", "vocab_size": 2, "d_model": args.d_model, "mlp": "gelu",
            "conv": {"kernel_size": args.kernel_size}, "depth": depth}


def train_model(model: torch.nn.Module, task, steps: int, batch_size: int, lr: float, seed: int,
                label: str) -> dict:
    """`seqlab.train.fit` (AdamW, warmup + cosine), the recurrent-depth objective for a recurrent-depth model (r
    drawn per step by the model's own sampler, logged on every step as the row's `r`), cross-entropy for a plain
    stack; returns timing, the mean loss of the last 50 steps and, for a recurrent-depth model, the mean r."""
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                      weight_decay=0.0, seed=seed, log_every=1, eval_batches=1)
    rows: list[dict] = []
    start = time.perf_counter()

    def log(row: dict) -> None:
        if "loss" not in row:  # the final evaluation's row
            return
        rows.append(row)
        if (row["step"] - 1) % max(1, steps // 10) == 0 or row["step"] == steps:
            recent = [r["loss"] for r in rows[-50:]]
            print(f"  [{label}] step {row['step'] - 1:5d}/{steps}  r {row.get('r', 1):3.0f}  loss "
                  f"{sum(recent) / len(recent):.4f}  {time.perf_counter() - start:6.0f}s", flush=True)

    objective = recurrent_depth if isinstance(model, RecurrentDepthModel) else cross_entropy
    result = fit(model, task_batches(task, cfg), objective, cfg, progress=False, log=log)
    model.eval()
    recent = [r["loss"] for r in rows[-50:]]
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": result["seconds"],
            "final_loss": sum(recent) / len(recent)}
    if objective is recurrent_depth:
        info["mean_r"] = sum(r["r"] for r in rows) / len(rows)
    return info


def step_grid(mean: float, top_factor: int = 8) -> list[int]:
    """r = 1, 2, 4, ... up to top_factor x the training mean, plus the mean and its small multiples."""
    top = int(round(top_factor * mean))
    grid = {1, top, int(round(mean))} | {2**i for i in range(1, 12) if 2**i < top}
    grid |= {int(round(m * mean)) for m in (2, 4)}
    return sorted(r for r in grid if 1 <= r <= top)


def curve_rows(curve: dict) -> list[dict]:
    return [{k: row[k] for k in ("steps", "mean_steps_used", "effective_depth", "loss", "accuracy", "seq_accuracy")}
            for row in curve["fixed"]]


def parity_scaling(args: argparse.Namespace) -> tuple[dict, RecurrentDepthModel]:
    """Train the recurrent-depth model and its fixed-depth twin on prefix_parity (length 32), then sweep r."""
    train_task = make_task("prefix_parity", seq_len=args.train_len)
    out: dict = {"train_len": args.train_len, "test_lens": [args.train_len, args.test_len]}
    models = {}
    for name, fixed in (("recurrent_depth", False), ("fixed_depth", True)):
        model = seqlab.build_model(parity_config(args, fixed), seed=args.seed)
        print(f"parity: training {name} ({model.num_parameters()} parameters)", flush=True)
        info = train_model(model, train_task, args.steps, args.batch_size, args.lr, args.seed, name)
        d = model.config.depth
        expected = d.mean_steps + (1 if d.sampler == "poisson_lognormal" else 0)  # E[r] of the sampler
        info.update(params=model.num_parameters(), config=model.config.to_dict(), sampler=d.sampler,
                    expected_r=expected)
        grid = step_grid(expected, args.top_factor) if not fixed else [1]
        for length in (args.train_len, args.test_len):
            task = make_task("prefix_parity", seq_len=length)
            curve = scaling_curve(model, task, grid, None, args.eval_batches, args.eval_batch_size, seed=1234)
            info[f"len_{length}"] = curve_rows(curve)
            best = max(curve["fixed"], key=lambda row: (row["seq_accuracy"], -row["steps"]))
            info[f"best_len_{length}"] = {"steps": best["steps"], "seq_accuracy": best["seq_accuracy"]}
            print(f"  {name} length {length}: " + "  ".join(f"r={row['steps']}:{row['seq_accuracy']:.3f}"
                                                           for row in curve["fixed"]), flush=True)
        out[name] = info
        models[name] = model
    return out, models["recurrent_depth"]


def stack_config(args: argparse.Namespace) -> dict:
    """The plain fixed-depth baseline: arch lm, `--stack-layers` blocks of `--stack-mixer` at `--stack-d-model`
    (by default 4 attention blocks at d_model 32: 49,568 parameters against the parity model's 48,384), PyTorch's
    default init with an untied head, which trains small attention models much faster than the GPT-2 init."""
    return {"arch": "lm", "mixer": args.stack_mixer, "vocab_size": 2, "d_model": args.stack_d_model,
            "n_layers": args.stack_layers, "mlp": "gelu", "init": "torch", "tie_embeddings": False,
            "position": args.stack_position, "attention": {"n_heads": args.stack_heads},
            "conv": {"kernel_size": args.kernel_size}}


def plain_stack(args: argparse.Namespace) -> dict:
    """Train the plain fixed-depth stack with the parity model's budget (same optimizer, lr schedule, steps, batch
    size and batches), then exact per-sequence accuracy at the training and the test length."""
    model = seqlab.build_model(stack_config(args), seed=args.seed)
    print(f"parity: training plain_stack ({model.num_parameters()} parameters)", flush=True)
    info = train_model(model, make_task("prefix_parity", seq_len=args.train_len), args.steps, args.batch_size,
                       args.lr, args.seed, "plain_stack")
    info.update(params=model.num_parameters(), config=model.config.to_dict())
    for length in (args.train_len, args.test_len):
        task, gen, metrics = make_task("prefix_parity", seq_len=length), torch.Generator().manual_seed(1234), Metrics()
        with torch.no_grad():
            for _ in range(args.eval_batches):  # the same held-out batches as the scaling curves (seed 1234)
                batch = task.batch(args.eval_batch_size, gen)
                metrics.update(model(batch.inputs)[0], batch)
        info[f"len_{length}"] = metrics.compute()
        print(f"  plain_stack length {length}: seq_acc {info[f'len_{length}']['seq_accuracy']:.3f}  "
              f"token acc {info[f'len_{length}']['accuracy']:.3f}", flush=True)
    return info


def adaptive_exit(args: argparse.Namespace, model: RecurrentDepthModel, max_steps: int) -> dict:
    """Work against accuracy at the test length: fixed r (r = 1 .. max_steps) and adaptive exit (at most
    `max_steps`) per criterion and threshold, with the wavefront scheduler and without it (every position on every
    step: what exit cost before the scheduler). Each row: sequence accuracy on `--exit-batches` held-out batches,
    mean steps used, core token-evaluations and their FLOPs per token, the KL criterion's coda passes, and the
    median CPU and wall seconds over `--repeats` runs, the configurations alternating in one process. Then, for each
    exit row, the cheapest fixed r that is at least as accurate, and the ratios of core FLOPs and CPU time."""
    task = make_task("prefix_parity", seq_len=args.test_len)
    grid = sorted(set(step_grid(max_steps / args.top_factor, args.top_factor)) | set(args.exit_fixed))
    configs = [("fixed", r, None, True) for r in grid if r <= max_steps]
    for name, thresholds in (("kl", args.kl_thresholds), ("latent", args.latent_thresholds)):
        for threshold in thresholds:
            configs += [(name, max_steps, threshold, True), (name, max_steps, threshold, False)]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:  # alternate the configurations, so that load changes hit all of them alike
            criterion, steps, threshold, schedule = c
            exit = None if criterion == "fixed" else (criterion, threshold)
            runs[c].append(evaluate_steps(model, task, steps, exit, args.exit_batches, args.eval_batch_size,
                                          seed=4321, schedule=schedule))
    rows = []
    for (criterion, steps, threshold, schedule), results in runs.items():
        first = results[0]  # every repeat computes the same numbers; only the clocks differ
        rows.append({"criterion": criterion, "threshold": threshold, "max_steps": steps, "scheduler": schedule,
                     "sequences": args.exit_batches * args.eval_batch_size, "seq_accuracy": first["seq_accuracy"],
                     "accuracy": first["accuracy"], "mean_steps_used": first["mean_steps_used"],
                     "core_evals_per_token": first["core_evals_per_token"],
                     "core_flops_per_token": first["core_flops_per_token"],
                     "coda_evals_per_token": first["coda_evals_per_token"],
                     "cpu_s": statistics.median(r["cpu_s"] for r in results),
                     "wall_s": statistics.median(r["wall_s"] for r in results), "repeats": len(results)})
        row = rows[-1]
        label = "fixed" if criterion == "fixed" else f"{criterion}:{threshold:g}{'' if schedule else ' (no sched)'}"
        print(f"  {label:24s} r<={steps:4d}  steps used {row['mean_steps_used']:6.2f}  core evals/token "
              f"{row['core_evals_per_token']:7.2f}  seq_acc {row['seq_accuracy']:.3f}  cpu {row['cpu_s']:.2f}s  "
              f"wall {row['wall_s']:.2f}s", flush=True)
    fixed = sorted((r for r in rows if r["criterion"] == "fixed"), key=lambda r: r["core_flops_per_token"])
    for row in rows:
        if row["criterion"] == "fixed":
            continue
        match = next((f for f in fixed if f["seq_accuracy"] >= row["seq_accuracy"]), None)
        row["cheapest_fixed_as_accurate"] = match and {
            "steps": match["max_steps"], "seq_accuracy": match["seq_accuracy"],
            "flops_ratio": row["core_flops_per_token"] / match["core_flops_per_token"],
            "cpu_ratio": row["cpu_s"] / match["cpu_s"] if match["cpu_s"] else None}
    return {"task": task.name, "seq_len": args.test_len, "max_steps": max_steps, "threads": torch.get_num_threads(),
            "load_average": load_average(), "core_flops_per_eval": model.core_flops_per_eval(), "rows": rows}


def lm_loss_curve(args: argparse.Namespace) -> dict:
    """A small recurrent-depth byte model on the standard-library corpus: held-out loss against r."""
    cfg = {"arch": "recurrent_depth", "mixer": "conv", "vocab_size": 256, "d_model": args.lm_d_model,
           "mlp": "gelu", "depth": {"prelude": 1, "core": 2, "coda": 1, "mean_steps": args.lm_mean_steps,
                                    "backprop_steps": 2}}
    model = seqlab.build_model(cfg, seed=args.seed)
    print(f"lm: training on the corpus ({model.num_parameters()} parameters)", flush=True)
    info = train_model(model, make_task("corpus", seq_len=64), args.lm_steps, 32, 3e-3, args.seed, "lm")
    grid = [1, 2, 3, 4, 6, 8, 12, 16, 32]
    curve = scaling_curve(model, make_task("corpus", seq_len=128, split="test"), grid, None, args.eval_batches,
                          32, seed=1234)
    rows = [{**row, "bits_per_byte": row["loss"] / math.log(2)} for row in curve_rows(curve)]
    print("  " + "  ".join(f"r={row['steps']}:{row['bits_per_byte']:.3f}" for row in rows) + "  (bits per byte)")
    return {"task": "corpus (bytes, test split, length 128)", "params": model.num_parameters(),
            "train": info, "rows": rows}


def kv_cache_bytes(args: argparse.Namespace) -> dict:
    """State bytes after a prompt of `kv_len` tokens, attention core, without and with slot sharing."""
    grid, rows = [1, 2, 4, 8, 16, 32, 64], []
    x = torch.randint(0, 64, (1, args.kv_len), generator=torch.Generator().manual_seed(0))
    for slots in (None, 4):
        cfg = {"arch": "recurrent_depth", "mixer": "attention", "vocab_size": 64, "d_model": 64,
               "attention": {"n_heads": 4}, "depth": {"prelude": 1, "core": 2, "coda": 1, "kv_slots": slots}}
        model = seqlab.build_model(cfg, seed=0).eval()
        with torch.no_grad():
            for r in grid:
                rows.append({"kv_slots": slots, "steps": r, "nbytes": model(x, steps=r)[1].nbytes})
    print("  " + "  ".join(f"r={row['steps']}:{row['nbytes'] / 2**20:.2f}MiB" + ("(shared)" if row["kv_slots"]
                                                                                 else "") for row in rows))
    return {"seq_len": args.kv_len, "d_model": 64, "layers": "1 prelude + 2 core + 1 coda", "shared_slots": 4,
            "rows": rows}


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _ddp_worker(rank: int, port: int, cfg: dict, steps: int, batch_size: int, out: str) -> None:
    """One of two gloo processes: DDP over the model, a communication hook that counts the bytes of every bucket
    it all-reduces, `steps` training steps on this rank's half of each global batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        model = seqlab.build_model(cfg, seed=0)
        ddp = DistributedDataParallel(model)
        sent = [0]

        def counting_hook(state, bucket):
            sent[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        torch.manual_seed(0)  # every rank draws the same r, as under the trainer
        opt, data, per_step = torch.optim.AdamW(ddp.parameters(), lr=1e-3), torch.Generator().manual_seed(0), []
        task = make_task("prefix_parity", seq_len=32)
        rows = slice(rank * batch_size // 2, (rank + 1) * batch_size // 2)
        for _ in range(steps):
            batch = task.batch(batch_size, data)
            before = sent[0]
            logits, _ = ddp(batch.inputs[rows])
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets[rows].flatten()).backward()
            opt.step()
            per_step.append(sent[0] - before)
        if rank == 0:
            Path(out).write_text(json.dumps(per_step))
    finally:
        dist.destroy_process_group()


def allreduce_bytes_per_step(cfg: dict, steps: int = 3, batch_size: int = 16) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bytes.json")
        mp.spawn(_ddp_worker, args=(port, cfg, steps, batch_size, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def compute_per_parameter(args: argparse.Namespace) -> dict:
    """FLOPs per token at inference and per training step, per parameter, and all-reduce bytes per step."""
    rows = []
    x = torch.randint(0, 2, (args.batch_size, args.train_len), generator=torch.Generator().manual_seed(0))
    tokens = x.numel()
    for name, fixed in (("recurrent_depth", False), ("fixed_depth", True)):
        cfg = parity_config(args, fixed)
        cfg["depth"] = {**cfg["depth"], "sampler": "fixed", "mean_steps": 1 if fixed else round(args.mean_steps)}
        model = seqlab.build_model(cfg, seed=0)
        r = model.config.depth.default_steps
        params = model.num_parameters()
        model.eval()
        with torch.no_grad():
            infer = flops(lambda m=model, r=r: m(x, steps=r))
        model.train()

        def train_step(m=model, r=r):
            logits, _ = m(x, steps=r)
            logits.square().mean().backward()

        train = flops(train_step)
        sent = allreduce_bytes_per_step(cfg)
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        row = {"model": name, "params": params, "steps": r, "effective_depth": model.effective_depth(r),
               "backprop_steps": min(r, model.config.depth.backprop_steps),
               "flops_per_token": infer / tokens, "flops_per_token_per_param": infer / tokens / params,
               "train_flops_per_step": train, "train_batch": list(x.shape),
               "allreduce_bytes_per_step": sent, "grad_bytes": grad_bytes,
               "train_flops_per_allreduce_byte": train / sent[-1]}
        rows.append(row)
        print(f"  {name}: {params} params, r={r}: {row['flops_per_token']:.3g} FLOPs/token "
              f"({row['flops_per_token_per_param']:.2f} per param), training step {train:.3g} FLOPs, "
              f"all-reduce {sent} bytes/step", flush=True)
    rd, fd = rows
    return {"rows": rows,
            "ratio_flops_per_token": rd["flops_per_token"] / fd["flops_per_token"],
            "ratio_train_flops_per_allreduce_byte": rd["train_flops_per_allreduce_byte"]
            / fd["train_flops_per_allreduce_byte"]}


def plot_results(result: dict, path: Path) -> Path:
    """Sequence accuracy against r (both lengths, both models) and LM bits per byte against r, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lm) = plt.subplots(1, 2, figsize=(11, 4))
    s = result.get("scaling")
    if s:
        for name, style in (("recurrent_depth", "o-"), ("fixed_depth", "s")):
            for length in s["test_lens"]:
                rows = s[name][f"len_{length}"]
                ax.plot([r["steps"] for r in rows], [r["seq_accuracy"] for r in rows], style,
                        label=f"{name.replace('_', '-')}, length {length}")
        if result.get("exit"):
            for crit, marker in (("kl", "x"), ("latent", "+")):
                rows = [r for r in result["exit"]["rows"] if r["criterion"] == crit and r.get("scheduler", True)]
                ax.plot([r.get("core_evals_per_token", r["mean_steps_used"]) for r in rows],
                        [r["seq_accuracy"] for r in rows], marker, ms=9,
                        label=f"adaptive exit ({crit}), length {result['exit']['seq_len']}: core evaluations "
                              "per token (work done)")
        st = result.get("stack")
        if st:  # one pass of a plain stack: plotted at r = 1
            for length, marker in zip(s["test_lens"], ("^", "v")):
                ax.plot([1], [st[f"len_{length}"]["seq_accuracy"]], marker, ms=8,
                        label=f"plain {st['config']['mixer']} stack ({st['params']:,} params), length {length}")
        ax.axvline(s["recurrent_depth"]["expected_r"], color="gray", linestyle=":", label="training mean r")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("core steps r at test time")
        ax.set_ylabel("exact sequence accuracy")
        ax.set_title(f"prefix parity, trained at length {s['train_len']}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if result.get("lm"):
        rows = result["lm"]["rows"]
        ax_lm.plot([r["steps"] for r in rows], [r["bits_per_byte"] for r in rows], "o-")
        ax_lm.axvline(result["lm"]["train"]["mean_r"], color="gray", linestyle=":", label="training mean r")
        ax_lm.set_xscale("log", base=2)
        ax_lm.set_xlabel("core steps r at test time")
        ax_lm.set_ylabel("bits per byte (test split)")
        ax_lm.set_title("byte-level LM on the stdlib corpus")
        ax_lm.legend(fontsize=7)
        ax_lm.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, small evaluations")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=4)
    p.add_argument("--sampler", default="progressive", choices=["progressive", "poisson_lognormal"])
    p.add_argument("--mean-steps", type=float, default=12.0)
    p.add_argument("--backprop-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps for each parity model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--train-len", type=int, default=32)
    p.add_argument("--test-len", type=int, default=128)
    p.add_argument("--top-factor", type=int, default=8, help="sweep r up to this multiple of the training mean")
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--lm-d-model", type=int, default=64)
    p.add_argument("--lm-mean-steps", type=float, default=4.0)
    p.add_argument("--lm-steps", type=int, default=300)
    p.add_argument("--kv-len", type=int, default=256)
    p.add_argument("--stack-mixer", default="attention", help="the plain fixed-depth baseline's mixer")
    p.add_argument("--stack-d-model", type=int, default=32)
    p.add_argument("--stack-layers", type=int, default=4)
    p.add_argument("--stack-heads", type=int, default=4)
    p.add_argument("--stack-position", default="rope", choices=["rope", "learned"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="scaling,stack,exit,lm,kv_cache,compute",
                   help="comma-separated sections to run (exit needs scaling)")
    p.add_argument("--kl-thresholds", type=lambda t: [float(x) for x in t.split(",")],
                   default=[1e-2, 5e-4, 1e-5, 1e-7, 1e-9])
    p.add_argument("--latent-thresholds", type=lambda t: [float(x) for x in t.split(",")],
                   default=[3e-2, 3e-3, 3e-4, 3e-5])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each exit/fixed configuration (median)")
    p.add_argument("--exit-batches", type=int, default=2, help="held-out batches of --eval-batch-size for exit")
    p.add_argument("--exit-fixed", type=lambda t: [int(x) for x in t.split(",")], default=[28, 36, 40, 44],
                   help="fixed r values added to the exit section's grid (where the accuracy turns)")
    p.add_argument("--checkpoint", type=Path, default=Path("runs/bench_thinking/parity"),
                   help="where the scaling section saves the parity model, and the exit section alone loads it")
    p.add_argument("--merge", action="store_true", help="update the sections run in an existing --out JSON")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replot", action="store_true", help="only redraw the plot from the saved JSON")
    args = p.parse_args()
    if args.replot:
        print(f"plot: {plot_results(json.loads(args.out.read_text()), args.out.with_suffix('.png'))}")
        return 0
    if args.quick:
        args.steps, args.lm_steps, args.eval_batches, args.eval_batch_size, args.kv_len = 30, 20, 1, 16, 32
        args.top_factor, args.repeats, args.exit_batches = 2, 1, 1
    torch.set_num_threads(1)
    sections = set(args.only.split(","))
    result: dict = {"command": " ".join(["python", *sys.argv]), "args": {k: str(v) if isinstance(v, Path) else v
                                                                      for k, v in vars(args).items()},
                    "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1}}
    start = time.perf_counter()
    model = None
    previous = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else None
    if previous:  # keep the sections of an earlier run that this run does not redo
        result = {**previous, "reruns": [*previous.get("reruns", []), {"command": result["command"],
                                                                        "sections": sorted(sections)}]}
    if "scaling" in sections:
        result["scaling"], model = parity_scaling(args)
        seqlab.save(model, args.checkpoint)
    elif "exit" in sections:
        model = seqlab.load(args.checkpoint).eval()  # the parity model an earlier run saved
    if "stack" in sections:
        result["stack"] = plain_stack(args)
    if "exit" in sections:
        print("adaptive exit (parity, test length):", flush=True)
        d = model.config.depth
        expected = d.mean_steps + (1 if d.sampler == "poisson_lognormal" else 0)
        result["exit"] = adaptive_exit(args, model, int(round(args.top_factor * expected)))
        if previous and "exit" in previous:  # add to the rows of the earlier sweep (same model: same seed)
            key = lambda row: (row["criterion"], row.get("threshold") or 0, row.get("max_steps"),  # noqa: E731
                               row.get("scheduler", True))
            new = {key(row) for row in result["exit"]["rows"]}
            rows = [row for row in previous["exit"]["rows"] if "core_evals_per_token" in row and key(row) not in new]
            result["exit"]["rows"] = sorted(rows + result["exit"]["rows"], key=lambda row: (row["criterion"],
                                            -(row.get("threshold") or 0), row["max_steps"]))
    if "lm" in sections:
        result["lm"] = lm_loss_curve(args)
    if "kv_cache" in sections:
        print("kv cache bytes (attention core):", flush=True)
        result["kv_cache"] = kv_cache_bytes(args)
    if "compute" in sections:
        print("compute per parameter and all-reduce bytes (two gloo processes):", flush=True)
        result["compute"] = compute_per_parameter(args)
    if "scaling" in sections or ("stack" in sections and "scaling" in result):
        s = result["scaling"]
        rd, fd = s["recurrent_depth"], s["fixed_depth"]
        mean = max(rd["expected_r"], rd["mean_r"])
        above = [row for row in rd[f"len_{args.test_len}"] if row["steps"] > mean]
        best_long = max(above, key=lambda row: row["seq_accuracy"]) if above else None
        result["targets"] = {
            f"len_{args.test_len}_seq_accuracy_at_some_r_above_mean >= 0.95": {
                "value": best_long and best_long["seq_accuracy"], "at_steps": best_long and best_long["steps"],
                "held": bool(best_long and best_long["seq_accuracy"] >= 0.95)},
            f"len_{args.train_len}_seq_accuracy ~ 1": {"value": rd[f"best_len_{args.train_len}"]["seq_accuracy"],
                                                       "held": rd[f"best_len_{args.train_len}"]["seq_accuracy"]
                                                       >= 0.99},
            "fixed_depth_fails_to_extrapolate": {"value": fd[f"best_len_{args.test_len}"]["seq_accuracy"],
                                                 "held": fd[f"best_len_{args.test_len}"]["seq_accuracy"] < 0.5},
        }
        if "stack" in result:  # the plain stack: fits the training length (>= 0.99) and fails the test length
            st = result["stack"]
            result["targets"]["plain_stack_fits_train_len_and_fails_to_extrapolate"] = {
                "value": {f"len_{n}": st[f"len_{n}"]["seq_accuracy"] for n in (args.train_len, args.test_len)},
                "held": st[f"len_{args.train_len}"]["seq_accuracy"] >= 0.99
                and st[f"len_{args.test_len}"]["seq_accuracy"] < 0.5}
        print("targets:", json.dumps(result["targets"], indent=1))
    result["seconds" if not args.merge else f"seconds_{'_'.join(sorted(sections))}"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out} ({time.perf_counter() - start:.0f}s); "
          f"plot: {plot_results(result, args.out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
