"""Scan ops and decoding: chunked vs the sequential reference as the sequence grows; decode latency as the context
grows; the same small Mamba through Hugging Face transformers' CPU path as a reference point.

    PYTHONPATH=src python benchmarks/bench_scans.py                 # the full run, ~15 minutes on 2 busy cores
    PYTHONPATH=src python benchmarks/bench_scans.py --quick         # small shapes, seconds
    PYTHONPATH=src python benchmarks/bench_scans.py --chunk-sizes 32,64,128 --lengths 2048 --skip decode,hf
    PYTHONPATH=src python benchmarks/bench_scans.py --memory        # peak memory of the largest chunked case

1. Ops. Shapes (full run): selective_scan (batch, d_inner, N) = (1, 256, 16) and (2, 512, 16), with D, z,
   delta_bias and softplus, as a Mamba block calls it; gla (batch, heads, dk, dv) = (1, 4, 64, 64) and
   (2, 4, 64, 64). Each timing is forward + backward of a fixed random projection of the output and the final state,
   all inputs requiring grad. Medians over --repeats runs, chunked and ref measured in the same process, one after
   the other; the ref at L >= 8192 is measured --long-ref-repeats times (1 by default) because one run takes tens
   of seconds. Wall time is the figure; CPU time of this process is recorded too, since on a shared machine other
   processes stretch wall time.
2. Decode (`decode`): per-token latency of a small mamba and a small gla language model (d_model 256, 4 layers,
   vocab 256) after a prefill of 256 and of 16,384 tokens; the steps at both contexts are interleaved, so machine
   load hits both alike. Median over --decode-steps tokens after a warm-up.
3. Hugging Face (`hf`, when `transformers` is installed: pip install -e .[hf]): a MambaForCausalLM with random
   weights and the same sizes, loaded into seqlab with `seqlab.from_hf` (so both run the very same weights; the
   logits are compared), then prefill tokens/s on a 2048-token prompt and decode tokens/s after a 256-token
   prompt, both models timed alternately in the same run.
The load average before and after is saved so a reader can tell a quiet run from a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import seqlab
from seqlab.infer.plan import DecodePlan
from seqlab.measure import load_average, median_time, peak_growth
from seqlab.models import implementations
from seqlab.ops import gla, selective_scan

VOCAB, D_MODEL, N_LAYERS = 256, 256, 4  # the small decode models


def scan_inputs(L, batch, d_inner, N, gen):
    u = torch.randn(batch, d_inner, L, generator=gen)
    delta = torch.randn(batch, d_inner, L, generator=gen) * 0.5
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d_inner, 1)  # S4D-real init, as in Mamba
    B = torch.randn(batch, N, L, generator=gen)
    C = torch.randn(batch, N, L, generator=gen)
    D = torch.ones(d_inner)
    z = torch.randn(batch, d_inner, L, generator=gen)
    delta_bias = torch.log(torch.expm1(torch.full((d_inner,), 0.01)))  # softplus(bias) = dt = 0.01
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    return {k: t.requires_grad_() for k, t in tensors.items()}


def gla_inputs(L, batch, heads, dk, dv, gen):
    q = torch.randn(batch, heads, L, dk, generator=gen)
    k = torch.randn(batch, heads, L, dk, generator=gen)
    v = torch.randn(batch, heads, L, dv, generator=gen)
    g = F.logsigmoid(torch.randn(batch, heads, L, dk, generator=gen) + 2) / 16  # GLA's gate normalizer
    return {n: t.requires_grad_() for n, t in dict(q=q, k=k, v=v, g=g).items()}


def make_case(op, L, shape, gen):
    """Returns run(impl, chunk_size): one forward + backward."""
    if op == "selective_scan":
        x = scan_inputs(L, *shape, gen)
        gy = torch.randn(x["u"].shape, generator=gen)

        def run(impl, chunk_size):
            y, s = selective_scan(**x, delta_softplus=True, return_final_state=True, impl=impl,
                                  chunk_size=chunk_size)
            ((y * gy).sum() + s.sum()).backward()
    else:
        x = gla_inputs(L, *shape, gen)
        go = torch.randn(x["v"].shape, generator=gen)

        def run(impl, chunk_size):
            o, s = gla(**x, return_final_state=True, impl=impl, chunk_size=chunk_size)
            ((o * go).sum() + s.sum()).backward()
    return run


def time_it(fn, repeats):
    """Median wall and CPU seconds over `repeats` calls, after one warm-up call."""
    return median_time(fn, repeats, warmup=1)


def peak_memory(op, L, shape, chunk_size):
    """Peak resident memory added by one chunked forward+backward, measured in a forked child (Linux)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        gen = torch.Generator().manual_seed(0)
        run = make_case(op, L, shape, gen)
        with peak_growth() as mem:
            run("chunked", chunk_size)
        os.write(w, str(mem["growth"]).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    return int(out) if out else None


def small_mamba_config():
    """Mamba as published (and as Hugging Face builds it): norm -> mixer -> residual, no MLP, tied embeddings."""
    return dict(mixer="mamba", vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, mlp="none", norm="rmsnorm",
                tie_embeddings=True, mamba={"d_state": 16, "d_conv": 4, "expand": 2})


def small_gla_config():
    return dict(mixer="gla", vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, gla={"n_heads": 4})


def step_fn(model, kind):
    """One decode step: (token (1, 1), state) -> (logits (1, 1, V), state), for a seqlab or a Hugging Face model."""
    if kind == "seqlab":
        return DecodePlan.build(model) or model  # what seqlab.generate runs per token

    def hf_step(tok, cache):
        out = model(tok, cache_params=cache, use_cache=True)
        return out.logits, out.cache_params
    return hf_step


def prefill_fn(model, kind):
    if kind == "seqlab":
        return lambda tokens: model(tokens)

    def hf_prefill(tokens):
        out = model(tokens, use_cache=True)
        return out.logits, out.cache_params
    return hf_prefill


@torch.inference_mode()
def interleaved_decode(runs, steps, warmup=8):
    """runs: {name: (step, logits, state)} after a prefill. Decode greedily, one token per run in turn, so load
    hits every run alike. Returns {name: [seconds per token]}."""
    live = {name: (step, logits[:, -1:].argmax(-1), state) for name, (step, logits, state) in runs.items()}
    times = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (step, tok, state) in live.items():
            t0 = time.perf_counter()
            logits, state = step(tok, state)
            dt = time.perf_counter() - t0
            live[name] = (step, logits[:, -1:].argmax(-1), state)
            if i >= warmup:
                times[name].append(dt)
    return times


@torch.inference_mode()
def timed_prefill(prefill, tokens):
    t0 = time.perf_counter()
    logits, state = prefill(tokens)
    return logits, state, time.perf_counter() - t0


def decode_section(contexts, steps, gen):
    """Per-token decode latency of small mamba and gla models after each context length."""
    out = {}
    for mixer, cfg in (("mamba", small_mamba_config()), ("gla", small_gla_config())):
        model = seqlab.build_model(cfg, seed=0)
        step, prefill = step_fn(model, "seqlab"), prefill_fn(model, "seqlab")
        runs, info = {}, {}
        for n in contexts:
            logits, state, sec = timed_prefill(prefill, torch.randint(0, VOCAB, (1, n), generator=gen))
            runs[n] = (step, logits, state)
            info[n] = dict(prefill_s=sec, state_bytes=state.nbytes)
        times = interleaved_decode(runs, steps)
        for n in contexts:
            info[n].update(ms_per_token=statistics.median(times[n]) * 1e3, steps=steps)
        lo, hi = min(contexts), max(contexts)
        ratio = info[hi]["ms_per_token"] / info[lo]["ms_per_token"]
        out[mixer] = dict(config=cfg, parameters=model.num_parameters(), contexts={str(n): info[n] for n in contexts},
                          ratio_long_to_short=ratio, implementations=implementations(model))
        print(f"decode {mixer:5s}: " + ", ".join(f"after {n}: {info[n]['ms_per_token']:.3f} ms/token "
                                                  f"(state {info[n]['state_bytes']} B)" for n in contexts)
              + f"; ratio {ratio:.3f}", flush=True)
    return out


def hf_section(prefill_len, decode_ctx, steps, repeats, gen):
    """The same small Mamba, seqlab vs transformers' CPU path, same weights; None without transformers."""
    try:
        import transformers
        from transformers import MambaConfig, MambaForCausalLM
    except ImportError:
        print("hf: transformers is not installed (pip install -e .[hf]); skipped")
        return None
    cfg = small_mamba_config()
    hf_cfg = MambaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, state_size=16, num_hidden_layers=N_LAYERS,
                         expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = MambaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = seqlab.from_hf(tmp)
    models = {"seqlab": ours, "transformers": hf}
    prompt = torch.randint(0, VOCAB, (1, prefill_len), generator=gen)
    with torch.inference_mode():
        parity = (ours(prompt[:, :256])[0] - hf(prompt[:, :256]).logits).abs().max().item()
    prefill_s = {k: [] for k in models}
    for _ in range(1 + repeats):  # the first round is a warm-up
        for name, m in models.items():
            prefill_s[name].append(timed_prefill(prefill_fn(m, name), prompt)[2])
    prefill_s = {k: statistics.median(v[1:]) for k, v in prefill_s.items()}
    ctx = prompt[:, :decode_ctx]
    runs = {name: (step_fn(m, name), *timed_prefill(prefill_fn(m, name), ctx)[:2]) for name, m in models.items()}
    times = interleaved_decode(runs, steps)
    res = {name: dict(prefill_tokens_per_s=prefill_len / prefill_s[name],
                      decode_tokens_per_s=1 / statistics.median(times[name])) for name in models}
    ratios = {k: res["seqlab"][k] / res["transformers"][k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    for name, r in res.items():
        print(f"hf mamba {name:12s}: prefill {r['prefill_tokens_per_s']:9.0f} tokens/s ({prefill_len} tokens), "
              f"decode {r['decode_tokens_per_s']:7.0f} tokens/s (after {decode_ctx})", flush=True)
    print(f"hf mamba seqlab / transformers: prefill {ratios['prefill_tokens_per_s']:.2f}x, "
          f"decode {ratios['decode_tokens_per_s']:.2f}x; max |logit difference| {parity:.2e}", flush=True)
    return dict(transformers=transformers.__version__, config=cfg, parameters=ours.num_parameters(),
                implementations=implementations(ours),
                prefill_len=prefill_len, decode_context=decode_ctx, decode_steps=steps, prefill_repeats=repeats,
                max_abs_logit_diff=parity, results=res, ratio_seqlab_to_transformers=ratios)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/scans.json", help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="small shapes and lengths, one repeat: a smoke run")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 512,2048,8192)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--long-ref-repeats", type=int, default=1, help="timed runs of the ref at L >= 8192")
    p.add_argument("--chunk-sizes", default=None, help="comma-separated chunk sizes to time (default: each op's "
                   "default, i.e. automatic for selective_scan and 16 for gla)")
    p.add_argument("--ops", default="selective_scan,gla", help="which ops to time")
    p.add_argument("--no-ref", action="store_true", help="time the chunked form only")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of the longest chunked case")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: ops, decode, hf")
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps timed per context")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 by default: a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))

    if args.quick:
        shapes = {"selective_scan": [(1, 64, 16)], "gla": [(1, 2, 32, 32)]}
        lengths, contexts, hf_lens = [128, 512], [16, 256], (256, 32)
        args.repeats, args.decode_steps = 1, 8
    else:
        shapes = {"selective_scan": [(1, 256, 16), (2, 512, 16)], "gla": [(1, 4, 64, 64), (2, 4, 64, 64)]}
        lengths, contexts, hf_lens = [512, 2048, 8192], [256, 16384], (2048, 256)
    if args.lengths:
        lengths = [int(s) for s in args.lengths.split(",")]
    default_chunk = {"selective_scan": None, "gla": 16}  # the ops' defaults (None: selective_scan picks it)
    chunk_sizes = {op: [int(s) for s in args.chunk_sizes.split(",")] if args.chunk_sizes else [c]
                   for op, c in default_chunk.items()}
    ops = [] if "ops" in skip else args.ops.split(",")

    load_before = load_average()
    rows = []
    header = (f"{'op':15s} {'shape':15s} {'L':>6s} {'chunk':>5s} {'chunked s':>10s} {'ref s':>9s} "
              f"{'chunked/ref':>11s} {'speedup':>8s} {'cpu chunked':>11s} {'cpu ref':>8s}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before}")
    print(header)
    cases = [(name, shape) for name in ops for shape in shapes[name]]
    for op, shape in cases:
        for L in lengths:
            gen = torch.Generator().manual_seed(0)
            run = make_case(op, L, shape, gen)
            ref = None
            if not args.no_ref:
                n_ref = args.long_ref_repeats if L >= 8192 else args.repeats
                ref = time_it(lambda run=run: run("ref", None), n_ref) + (n_ref,)
            for cs in chunk_sizes[op]:
                wall, cpu = time_it(lambda cs=cs, run=run: run("chunked", cs), args.repeats)
                row = dict(op=op, L=L, shape=shape, chunk_size=cs, chunked_s=wall, chunked_cpu_s=cpu,
                           repeats=args.repeats)
                if ref is not None:
                    row.update(ref_s=ref[0], ref_cpu_s=ref[1], ref_repeats=ref[2], ratio=wall / ref[0],
                               speedup=ref[0] / wall)
                rows.append(row)
                r = row.get
                ref_txt = f"{r('ref_s'):9.3f} {r('ratio'):11.3f} {r('speedup'):7.1f}x" if ref else f"{'-':>9s}"
                cpu_ref = f"{r('ref_cpu_s'):8.3f}" if ref else ""
                print(f"{op:15s} {str(shape):15s} {L:6d} {str(cs or 'auto'):>5s} {wall:10.3f} {ref_txt} {cpu:11.3f} "
                      f"{cpu_ref}", flush=True)

    # linear growth: time per step of the chunked form at each length (flat means linear); the ratio at L = 2048
    growth, speedup_2048 = {}, {}
    for op, shape in cases:
        key = f"{op} {tuple(shape)}"
        mine = [r for r in rows if r["op"] == op and r["shape"] == shape and r["chunk_size"] == chunk_sizes[op][0]]
        if len(mine) > 1:
            growth[key] = {str(r["L"]): r["chunked_s"] / r["L"] * 1e6 for r in mine}
            print(f"{key}: chunked microseconds per step: "
                  + ", ".join(f"L={L}: {v:.1f}" for L, v in growth[key].items()))
        speedup_2048.update({f"{key} chunk {r['chunk_size'] or 'auto'}": r["speedup"] for r in mine
                             if r["L"] == 2048 and "speedup" in r})

    memory = {}
    if args.memory:
        for op in ops:
            L = max(lengths)
            shape = (4, 512, 16) if op == "selective_scan" and not args.quick else shapes[op][-1]
            mem = peak_memory(op, L, shape, chunk_sizes[op][0])
            memory[op] = dict(L=L, shape=shape, peak_extra_bytes=mem)
            print(f"{op}: peak extra memory for chunked forward+backward at L={L}, shape {shape}: "
                  f"{mem / 2**30:.2f} GiB")

    gen = torch.Generator().manual_seed(1)
    decode = None if "decode" in skip else decode_section(contexts, args.decode_steps, gen)
    hf = None if "hf" in skip else hf_section(*hf_lens, args.decode_steps, args.repeats, gen)

    result = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  machine=platform.machine(), python=sys.version.split()[0], load_before=load_before,
                  load_after=load_average(), quick=args.quick, command=" ".join(sys.argv), rows=rows,
                  speedup_at_2048=speedup_2048, us_per_step=growth, memory=memory, decode=decode, hf=hf)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
