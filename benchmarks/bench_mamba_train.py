"""Mamba training tokens/s on CPU, one thread: seqlab with the numba kernel (the `kernels` extra) and without it
(the chunked form), against `transformers`' MambaForCausalLM on its default path and with `use_mambapy=True`.

    PYTHONPATH=src python benchmarks/bench_mamba_train.py            # d_model 128, 2 layers, batch 4, L 512
    PYTHONPATH=src python benchmarks/bench_mamba_train.py --quick    # d_model 64, batch 2, L 128: a smoke run
    PYTHONPATH=src python benchmarks/bench_mamba_train.py --variants seqlab_kernel,seqlab_chunked --length 2048

The model: a Mamba language model built in transformers (MambaConfig: vocabulary 256, --d-model, --layers, state 16,
expand 2, conv 4, tied embeddings; random init, seed 0), saved and imported with `seqlab.from_hf`, so every variant
starts from the very same weights. Variants, each its own copy of the model and its own AdamW (lr 1e-3):
    seqlab_kernel       seqlab, mamba.impl="kernel" (the fused numba scan, fwd + bwd)
    seqlab_chunked      seqlab, mamba.impl="chunked" (eager PyTorch, what runs without the extra)
    hf_default          transformers, use_mambapy=False: on CPU without the CUDA packages (mamba_ssm) its torch path,
                        which runs the scan as a Python loop over time
    hf_mambapy          transformers, use_mambapy=True: the scan by mamba.py's parallel scan (`mambapy.pscan`, the
                        `mambapy` package; without it transformers silently runs the loop, so the variant is skipped)
Which path each transformers model took is checked, not assumed: `mambapy.pscan.pscan` is wrapped to count its calls
during the first step, and whether `mamba_ssm` imports is recorded.

A training step: forward, cross-entropy over the next tokens, backward, AdamW step, zero_grad, on --batch sequences of
--length random tokens (one fixed batch per round, the same for every variant). The first (untimed) step of every
variant is on the same batch from the same weights: its losses and global gradient norms must agree within
LOSS_TOL (absolute) and GRAD_TOL (relative), else the script exits with status 1 after saving. Then --rounds
rounds, each variant one step per round in the order given (seqlab.measure.alternate); hf_default, ~200x slower
than the others at the default sizes (~50 s a step), takes part in the first --loop-rounds rounds only. Medians of
wall and of this process's CPU time; tokens/s = batch * length / step seconds. Saved:
benchmarks/results/mamba_train[_quick].json with the sizes, versions, load averages before and after,
`seqlab.models.implementations(model)` of the seqlab models and the paths transformers took.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import seqlab
from seqlab.measure import alternate, load_average
from seqlab.models import implementations

VARIANTS = ("seqlab_kernel", "seqlab_chunked", "hf_default", "hf_mambapy")
VOCAB = 256
LOSS_TOL = 1e-4  # absolute, on a loss of ~ln(256) = 5.5: fp32 sums in different orders differ by ~1e-6
GRAD_TOL = 1e-3  # relative, on the global gradient norm


def build(d_model: int, layers: int, variants: list[str]) -> tuple[dict[str, torch.nn.Module], dict]:
    """{variant: model in train mode}, all with the weights of one randomly initialized transformers model."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=d_model, num_hidden_layers=layers, state_size=16, expand=2,
               conv_kernel=4, use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = MambaForCausalLM(MambaConfig(**cfg, use_mambapy=False))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        imported = seqlab.from_hf(tmp)
    models = {}
    for name in variants:
        if name.startswith("seqlab_"):  # the same config with mamba.impl named outright (not "auto")
            model = seqlab.build_model(imported.config.replace(mamba={"impl": name.removeprefix("seqlab_")}))
            model.load_state_dict(imported.state_dict())
        else:
            model = MambaForCausalLM(MambaConfig(**cfg, use_mambapy=name == "hf_mambapy"))
            model.load_state_dict(hf.state_dict())
        models[name] = model.train()
    sizes = dict(hf_config=cfg, parameters=imported.num_parameters(),
                 hf_parameters=sum(p.numel() for p in hf.parameters()), seqlab_config=imported.config.to_dict())
    if sizes["parameters"] != sizes["hf_parameters"]:
        raise SystemExit(f"parameter counts differ: seqlab {sizes['parameters']}, hf {sizes['hf_parameters']}")
    return models, sizes


def logits_of(name: str, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if name.startswith("seqlab_"):
        return model(inputs)[0]
    return model(inputs, use_cache=False).logits


class PscanCounter:
    """Counts calls of mambapy's parallel scan, which transformers imports from `mambapy.pscan` at every call."""

    def __init__(self):
        import mambapy.pscan

        self.module, self.original, self.calls = mambapy.pscan, mambapy.pscan.pscan, 0

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)
        self.module.pscan = counted
        return self

    def __exit__(self, *exc):
        self.module.pscan = self.original


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant (medians reported)")
    p.add_argument("--loop-rounds", type=int, default=2,
                   help="timed steps of hf_default, whose loop takes ~50 s a step at the default sizes")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="d_model 64, batch 2, L 128, 2 rounds: a smoke run")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/mamba_train[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.batch, args.length, args.rounds, args.loop_rounds = 64, 2, 128, 2, 2
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; expected names from {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    import transformers

    mambapy = importlib.util.find_spec("mambapy") is not None
    skipped = {}
    if "hf_mambapy" in variants and not mambapy:
        skipped["hf_mambapy"] = "the mambapy package is not installed: transformers would run its loop instead"
        variants.remove("hf_mambapy")
    start, load_before = time.perf_counter(), load_average()
    models, sizes = build(args.d_model, args.layers, variants)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (args.batch, args.length + 1), generator=gen)
               for _ in range(max(args.rounds, args.loop_rounds) + 1)]
    steps = {name: 0 for name in models}
    first = {}

    def step(name: str) -> None:
        model, opt, tokens = models[name], opts[name], batches[steps[name]]
        logits = logits_of(name, model, tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        if steps[name] == 0:
            grad_norm = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in model.parameters()]))
            first[name] = dict(loss=loss.item(), grad_norm=grad_norm.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps[name] += 1

    paths = {}
    for name in models:  # the first step of each: same batch, same weights; untimed (numba loads its code here)
        if name.startswith("hf_"):
            counter = PscanCounter() if mambapy else None
            with counter or contextlib.nullcontext():
                t0 = time.perf_counter()
                step(name)
            calls = counter.calls if counter else 0
            paths[name] = dict(pscan_calls_first_step=calls,
                               path="mambapy.pscan (parallel scan)" if calls else "torch loop over time")
        else:
            t0 = time.perf_counter()
            step(name)
        first[name]["first_step_s"] = time.perf_counter() - t0
    ref = first[variants[0]]
    for name, f in first.items():
        f["loss_diff"] = abs(f["loss"] - ref["loss"])
        f["grad_norm_rel_diff"] = abs(f["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
        print(f"first step {name:15s}: loss {f['loss']:.6f} (|diff| {f['loss_diff']:.1e}), grad norm "
              f"{f['grad_norm']:.6f} (rel diff {f['grad_norm_rel_diff']:.1e}), {f['first_step_s']:.2f} s"
              + (f", path: {paths[name]['path']}" if name in paths else ""), flush=True)
    agree = all(f["loss_diff"] <= LOSS_TOL and f["grad_norm_rel_diff"] <= GRAD_TOL for f in first.values())

    rounds = {name: args.loop_rounds if name == "hf_default" else args.rounds for name in models}
    times = alternate(step, rounds)
    tokens = args.batch * args.length
    res = {name: dict(step_s=w, step_cpu_s=c, tokens_per_s=tokens / w, cpu_tokens_per_s=tokens / c)
           for name, (w, c) in times.items()}
    for name, r in res.items():
        r["cpu_speedup_vs"] = {other: res[other]["step_cpu_s"] / r["step_cpu_s"] for other in res if other != name}
    load_after = load_average()
    print(f"d_model {args.d_model}, {args.layers} layers, {sizes['parameters']:,} parameters, batch {args.batch}, "
          f"L {args.length}, rounds {rounds}; load average {load_before} -> {load_after}")
    for name, r in res.items():
        vs = ", ".join(f"{v:.2f}x {o}" for o, v in r["cpu_speedup_vs"].items())
        print(f"{name:15s} {r['tokens_per_s']:9,.0f} tokens/s (CPU {r['cpu_tokens_per_s']:9,.0f}); "
              f"step {r['step_s']:.3f} s (CPU {r['step_cpu_s']:.3f} s); CPU time speedup: {vs}", flush=True)
    seqlab_models = {name: implementations(m) for name, m in models.items() if name.startswith("seqlab_")}
    result = dict(command=" ".join(["python", *sys.argv]), quick=args.quick, torch=torch.__version__,
                  transformers=transformers.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  machine=platform.machine(), python=sys.version.split()[0],
                  mamba_ssm_installed=importlib.util.find_spec("mamba_ssm") is not None,
                  mambapy=_version("mambapy") if mambapy else None, load_before=load_before, load_after=load_after,
                  d_model=args.d_model, layers=args.layers, vocab=VOCAB, batch=args.batch, length=args.length,
                  rounds=rounds, optimizer="AdamW(lr=1e-3)", **sizes, implementations=seqlab_models,
                  hf_paths=paths, skipped=skipped, first_step=first, loss_tol=LOSS_TOL, grad_tol=GRAD_TOL,
                  first_step_agrees=agree, results=res, seconds=time.perf_counter() - start)
    out = Path(args.out or f"benchmarks/results/mamba_train{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s")
    if not agree:
        print(f"first-step losses or gradient norms disagree beyond {LOSS_TOL} / {GRAD_TOL}", file=sys.stderr)
        return 1
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
