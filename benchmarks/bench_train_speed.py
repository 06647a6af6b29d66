"""Training speed at matched parameters: tokens/s of a training step (forward, backward, AdamW) per mixer against
attention, at long sequence lengths, on one CPU thread.

    PYTHONPATH=src python benchmarks/bench_train_speed.py                     # L = 1024 and 4096, ~30 s quiet
    PYTHONPATH=src python benchmarks/bench_train_speed.py --quick             # a smoke run, seconds
    PYTHONPATH=src python benchmarks/bench_train_speed.py --mixers attention,gated_deltanet,mamba2 --lens 1024
    PYTHONPATH=src python benchmarks/bench_train_speed.py --mixers gla,gla@chunked --lens 1024   # an impl pinned

Every model is a 2-layer language model whose d_model is matched to the non-embedding parameter count of the
attention model at --d-model (seqlab.models.matched_width), vocabulary 256, batch --batch. For each length, the
mixers' steps run in alternation (round r times every mixer once, in a shuffled order), --rounds rounds after one
warm-up step each; the figure is the median step's tokens/s, in wall time and in CPU time of the process (CPU time
is what a busy machine stretches least). A mixer written `name@impl` (e.g. gla@chunked) is that mixer with its
section's `impl` set (mamba, gla, deltanet and gated_deltanet have one; the default is "auto"), so a kernel and
the chunked form train side by side in the same rounds. Saved: benchmarks/results/train_speed.json, with the
torch thread count, the load average before and after, and per mixer the ratio to attention at each length. The
targets of issue 15: gated_deltanet and mamba2 within 1.5x of attention at L = 1024 (ratio >= 0.667) and faster
than attention at 4096.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import seqlab
from seqlab.config import ModelConfig, TrainConfig
from seqlab.measure import load_average
from seqlab.models import build_model, count_parameters, implementations, matched_width
from seqlab.train.trainer import make_optimizer

IMPL_SECTIONS = {"mamba": "mamba", "gla": "gla", "deltanet": "deltanet", "gated_deltanet": "deltanet"}


def model_for(spec: str, d_model: int, layers: int, vocab: int) -> torch.nn.Module:
    """The model of mixer spec `name` or `name@impl` (see the module docstring)."""
    mixer, _, impl = spec.partition("@")
    base = {"vocab_size": vocab, "n_layers": layers, "attention": {"n_heads": 4}}
    target = count_parameters(ModelConfig.from_dict({**base, "mixer": "attention", "d_model": d_model}),
                              exclude_embeddings=True)
    if impl:
        base[IMPL_SECTIONS[mixer]] = {"impl": impl}
    cfg = matched_width({**base, "mixer": mixer}, target, 8, exclude_embeddings=True, name=mixer)
    return build_model(cfg, seed=0)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> tuple[float, float]:
    """One forward, backward and AdamW step on tokens (B, L + 1); returns (wall s, CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    logits, _ = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", default="attention,gla,mamba,mingru,minlstm,gated_deltanet,deltanet,mamba2")
    p.add_argument("--lens", default="1024,4096")
    p.add_argument("--d-model", type=int, default=128, help="attention's width; the others match its parameters")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/train_speed.json")
    p.add_argument("--quick", action="store_true", help="short lengths, two rounds: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.lens, args.rounds, args.out = "128,256", 2, "/tmp/train_speed_quick.json"
    torch.set_num_threads(1)
    available = seqlab.available_mixers()
    mixers = [m for m in args.mixers.split(",") if m.partition("@")[0] in available]
    skipped = [m for m in args.mixers.split(",") if m.partition("@")[0] not in available]
    lens = [int(x) for x in args.lens.split(",")]
    start, load_before = time.perf_counter(), load_average()
    models = {m: model_for(m, args.d_model, args.layers, 256) for m in mixers}
    opts = {m: make_optimizer(models[m], TrainConfig()) for m in mixers}
    result = {"command": " ".join(["python", *sys.argv]), "torch_threads": torch.get_num_threads(),
              "load_before": load_before, "skipped_unavailable": skipped,
              "models": {m: {"d_model": models[m].config.d_model,
                             "params_non_embedding": models[m].num_parameters(exclude_embeddings=True),
                             "implementations": implementations(models[m])}
                         for m in mixers}, "lengths": {}}
    rng = random.Random(0)
    for L in lens:
        tokens = torch.randint(0, 256, (args.batch, L + 1), generator=torch.Generator().manual_seed(L))
        wall = {m: [] for m in mixers}
        cpu = {m: [] for m in mixers}

        for m in mixers:
            train_step(models[m], opts[m], tokens)  # warm-up
        for _ in range(args.rounds):
            order = mixers[:]
            rng.shuffle(order)
            for m in order:
                w, c = train_step(models[m], opts[m], tokens)
                wall[m].append(w)
                cpu[m].append(c)
        n = args.batch * L
        entry = {m: {"tokens_per_s": n / statistics.median(wall[m]), "cpu_tokens_per_s": n / statistics.median(cpu[m]),
                     "step_s": statistics.median(wall[m])} for m in mixers}
        if "attention" in entry:
            for m in mixers:
                entry[m]["vs_attention"] = entry[m]["tokens_per_s"] / entry["attention"]["tokens_per_s"]
                entry[m]["cpu_vs_attention"] = entry[m]["cpu_tokens_per_s"] / entry["attention"]["cpu_tokens_per_s"]
        result["lengths"][str(L)] = entry
        for m in mixers:
            e = entry[m]
            print(f"L {L:5d}  {m:16s} d {models[m].config.d_model:4d}  {e['tokens_per_s']:9,.0f} tokens/s "
                  f"(CPU {e['cpu_tokens_per_s']:9,.0f})" + (f"  x attention {e['vs_attention']:.2f} "
                  f"(CPU {e['cpu_vs_attention']:.2f})" if "vs_attention" in e else ""), flush=True)
    result.update(load_after=load_average(), seconds=time.perf_counter() - start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
