"""The fixed recurrent state against the growing KV cache, measured; and seqlab's decoding against transformers'.

    PYTHONPATH=src python benchmarks/bench_profile.py             # the full run, ~15 minutes on 2 busy cores
    PYTHONPATH=src python benchmarks/bench_profile.py --quick     # tiny contexts and steps, a smoke run
    PYTHONPATH=src python benchmarks/bench_profile.py --skip hf   # only the profile (or --skip profile)

1. Profile (`seqlab.infer.profile.run_profile`, what `seqlab profile` runs): every available mixer (or --mixers)
   at the non-embedding parameter count of a 2-layer d_model 64
   attention model, contexts 256 to 65,536; sliding attention with a 1,024-token window. Each (mixer, context) cell
   runs in a fresh process at one thread: chunked prefill (1,024 tokens per call, carrying the state), then greedy
   decoding one token at a time; state bytes from `state.nbytes` beside the analytical formula, peak RSS per phase,
   prefill tokens/s (median of up to 3 runs, 1 once a run takes over 5 s), per-token decode latency (median of
   --decode-steps steps after 16 warm-up steps), each in wall-clock and in CPU time of the process. Targets checked
   and saved: every recurrent mixer's decode latency at the largest context within 10% of that at the smallest (wall
   clock, and CPU time, which competing processes on a shared machine stretch far less); attention's state bytes
   equal to the formula exactly at every context; sliding attention's state bytes flat beyond its window. Plots:
   benchmarks/results/profile/.
2. Interleaved (`interleaved`): the same recurrent models in one process, prefilled to the smallest and to the
   largest context, then decoding from the two states in alternation (one step each per round, in a random order)
   for --interleaved-steps rounds: the latency ratio between the two contexts with machine load hitting both alike.
3. seqlab vs transformers (`hf`, needs `pip install -e .[hf]`): greedy decoding at batch 1 on CPU of a GPT-2 model
   and of a Mamba model with the same small sizes (d_model 128, 2 layers, vocab 256), random weights, imported into
   seqlab with `seqlab.from_hf` so both run the very same weights (the tokens are compared). Throughput is
   end-to-end generation: `seqlab.generate` against `transformers`' `model.generate(do_sample=False)`, an 8-token
   prompt and --hf-new-tokens new tokens, tokens/s = new tokens / wall time, median over --hf-repeats rounds in which
   the two run alternately (so machine load hits both alike); the CPU time of the process is recorded beside the
   wall time. The per-step model call alone (no generation loop; for seqlab the decode plan's step that generate
   runs, `seqlab.infer.plan`) is timed the same way and reported beside it.
   Target: seqlab at least 3x transformers' tokens/s for both.
The load average before and after is saved so a reader can tell a quiet run from a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import seqlab
from seqlab.infer.plan import DecodePlan
from seqlab.infer.profile import ProfileConfig, _prefill, format_table, resolve_models, run_profile
from seqlab.measure import Timer, load_average
from seqlab.models import implementations

SECTIONS = ("profile", "interleaved", "hf")


def recurrent(args) -> tuple[str, ...]:
    """The mixers whose state does not grow with the context (every mixer but the attentions)."""
    return tuple(m for m in args.mixers if "attention" not in m)


def profile_section(args) -> dict:
    cfg = ProfileConfig(mixers=args.mixers, contexts=args.contexts, d_model=args.d_model, n_layers=args.layers,
                        vocab_size=256, model={"attention": {"window": args.window}}, chunk=args.chunk,
                        decode_steps=args.decode_steps, warmup=16, repeats=3, threads=1, isolate=True,
                        timeout_s=1500)
    results = run_profile(cfg, plot_dir=args.plots, progress=True)
    print(format_table(results), flush=True)
    cells = {(c["mixer"], c["context"]): c for c in results["cells"] if "error" not in c}
    lo, hi = min(args.contexts), max(args.contexts)
    latency = {}
    for m in recurrent(args):
        if (m, lo) in cells and (m, hi) in cells:
            a, b = cells[(m, lo)], cells[(m, hi)]
            wall, cpu = b["decode_latency_s"] / a["decode_latency_s"], b["decode_cpu_s"] / a["decode_cpu_s"]
            latency[m] = {"latency_lo_s": a["decode_latency_s"], "latency_hi_s": b["decode_latency_s"],
                          "ratio": wall, "met": abs(wall - 1) <= 0.10, "cpu_lo_s": a["decode_cpu_s"],
                          "cpu_hi_s": b["decode_cpu_s"], "cpu_ratio": cpu, "cpu_met": abs(cpu - 1) <= 0.10}
    attention_exact = [cells[("attention", t)]["state_bytes"] == cells[("attention", t)]["state_bytes_formula"]
                       for t in args.contexts if ("attention", t) in cells]
    beyond = [cells[("sliding_attention", t)]["state_bytes"] for t in args.contexts
              if t >= args.window and ("sliding_attention", t) in cells]
    targets = {
        "recurrent_decode_latency_within_10pct": {
            "contexts": [lo, hi], "per_mixer": latency,
            "met": bool(latency) and all(v["met"] for v in latency.values()),  # wall clock
            "cpu_met": bool(latency) and all(v["cpu_met"] for v in latency.values()),  # CPU time per step
        },
        "attention_state_bytes_equal_formula": {"contexts_checked": len(attention_exact),
                                                "met": bool(attention_exact) and all(attention_exact)},
        "sliding_attention_flat_beyond_window": {"window": args.window, "state_bytes_beyond_window": beyond,
                                                 "met": len(beyond) >= 2 and len(set(beyond)) == 1},
    }
    for m, v in latency.items():
        print(f"target: {m:5s} decode latency at {hi:,} / at {lo:,}: wall {v['ratio']:.3f} "
              f"({'within' if v['met'] else 'NOT within'} 10%), CPU time {v['cpu_ratio']:.3f} "
              f"({'within' if v['cpu_met'] else 'NOT within'} 10%)")
    print(f"target: attention state bytes == formula at {len(attention_exact)} contexts: "
          f"{targets['attention_state_bytes_equal_formula']['met']}")
    print(f"target: sliding attention flat beyond its window ({args.window}): {beyond} -> "
          f"{targets['sliding_attention_flat_beyond_window']['met']}", flush=True)
    results["targets"] = targets
    return results


@torch.inference_mode()
def interleaved_section(args) -> dict:
    """Each recurrent mixer's decode latency after the smallest and after the largest context, measured in one
    process with the steps of the two contexts alternating, so machine load hits both alike (the profile's cells run
    minutes apart in separate processes, and on a shared machine the load drifts more than 10% in minutes)."""
    cfg = ProfileConfig(mixers=recurrent(args), d_model=args.d_model, n_layers=args.layers, vocab_size=256,
                        model={"attention": {"window": args.window}})
    lo, hi = min(args.contexts), max(args.contexts)
    out = {"contexts": [lo, hi], "steps": args.interleaved_steps, "warmup": 16, "per_mixer": {}}
    for mixer, mc in resolve_models(cfg).items():
        model = seqlab.build_model(mc, seed=0).eval()
        live = {}
        for n in (lo, hi):
            logits, state = _prefill(model, n, 1, args.chunk, 0, 0, torch.device("cpu"))
            live[n] = (logits[:, -1].argmax(-1, keepdim=True), state)
        timers = {lo: Timer(), hi: Timer()}
        order = torch.Generator().manual_seed(0)
        for i in range(16 + args.interleaved_steps):
            # a random order each round, so the scheduler's time slices cannot line up with one context's steps
            for n in ([lo, hi] if torch.rand((), generator=order) < 0.5 else [hi, lo]):
                token, state = live[n]
                with timers[n] if i >= 16 else Timer():  # the 16 warm-up rounds' times are thrown away
                    logits, state = model(token, state)
                    token = logits[:, -1].argmax(-1, keepdim=True)
                live[n] = (token, state)
        w = {n: t.median_wall for n, t in timers.items()}
        c = {n: t.median_cpu for n, t in timers.items()}
        entry = {"latency_s": {str(n): w[n] for n in w}, "cpu_s": {str(n): c[n] for n in c},
                 "ratio": w[hi] / w[lo], "cpu_ratio": c[hi] / c[lo], "implementations": implementations(model)}
        entry["met"] = abs(entry["ratio"] - 1) <= 0.10
        entry["cpu_met"] = abs(entry["cpu_ratio"] - 1) <= 0.10
        out["per_mixer"][mixer] = entry
        print(f"interleaved: {mixer:5s} decode after {lo:,}: {w[lo] * 1e3:.3f} ms, after {hi:,}: {w[hi] * 1e3:.3f} ms "
              f"-> {entry['ratio']:.3f} ({'within' if entry['met'] else 'NOT within'} 10%); CPU time "
              f"{entry['cpu_ratio']:.3f}", flush=True)
    out["met"] = all(e["met"] for e in out["per_mixer"].values())  # wall clock
    out["cpu_met"] = all(e["cpu_met"] for e in out["per_mixer"].values())
    return out


# ---------------------------------------------------------------------------------------------------------------
# seqlab vs transformers


def hf_models(d_model: int, layers: int, vocab: int):
    """{name: (transformers model, seqlab model with the same weights)} for a GPT-2 and a Mamba config (built by
    bench_decode's `build`: random weights from seed 0, imported with `seqlab.from_hf`, no end token)."""
    from bench_decode import build  # beside this script

    return {name: build(name, d_model, layers, vocab)[::-1] for name in ("gpt2", "mamba")}


def hf_generate(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          use_cache=True, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + n
    return out


def hf_step(hf, name: str):
    """One decode step of a transformers model with its cache: (token (1, 1), cache) -> (logits, cache)."""
    def step(tok, cache, pos):
        if name == "mamba":
            out = hf(tok, cache_params=cache, use_cache=True, cache_position=torch.tensor([pos]))
            return out.logits, out.cache_params
        out = hf(tok, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values
    return step


def hf_prefill(hf, name: str, prompt: torch.Tensor):
    out = hf(prompt, use_cache=True)
    return out.logits, (out.cache_params if name == "mamba" else out.past_key_values)


@torch.inference_mode()
def step_latency(hf, ours, name: str, prompt: torch.Tensor, steps: int, warmup: int = 8) -> dict[str, dict]:
    """Median seconds per model call on one new token (wall clock and CPU time), the two models alternating token
    by token; seqlab's call is its decode plan's step, what `seqlab.generate` runs per token."""
    hl, hc = hf_prefill(hf, name, prompt)
    sl, ss = ours(prompt)
    ours = DecodePlan.build(ours) or ours
    pos = prompt.shape[1]
    hf_timer, our_timer = Timer(), Timer()
    htok, stok = hl[:, -1:].argmax(-1), sl[:, -1:].argmax(-1)
    step = hf_step(hf, name)
    for i in range(warmup + steps):
        with hf_timer if i >= warmup else Timer():  # warm-up steps' times are thrown away
            hl, hc = step(htok, hc, pos)
            htok = hl[:, -1:].argmax(-1)
        with our_timer if i >= warmup else Timer():
            sl, ss = ours(stok, ss)
            stok = sl[:, -1:].argmax(-1)
        pos += 1
    return {"wall": {"transformers": hf_timer.median_wall, "seqlab": our_timer.median_wall},
            "cpu": {"transformers": hf_timer.median_cpu, "seqlab": our_timer.median_cpu}}


def hf_section(args) -> dict | None:
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        print("hf: transformers is not installed (pip install -e .[hf]); skipped")
        return None
    models = hf_models(args.hf_d_model, args.hf_layers, 256)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 256, (1, 8), generator=gen)
    n = args.hf_new_tokens
    out = {"transformers": transformers.__version__, "d_model": args.hf_d_model, "layers": args.hf_layers,
           "vocab_size": 256, "prompt_tokens": prompt.shape[1], "new_tokens": n, "repeats": args.hf_repeats,
           "models": {}}
    for name, (hf, ours) in models.items():
        a, b = hf_generate(hf, prompt, n), seqlab.generate(ours, prompt, n)  # warm-up, and the same tokens?
        agree = int((a[0, prompt.shape[1]:] == b[0, prompt.shape[1]:]).sum())
        runs = {"transformers": lambda hf=hf: hf_generate(hf, prompt, n),
                "seqlab": lambda ours=ours: seqlab.generate(ours, prompt, n)}
        timers = {k: Timer() for k in runs}
        for _ in range(args.hf_repeats):
            for k, run in runs.items():  # alternating, so load hits both alike
                with timers[k]:
                    run()
        times, cpu = {k: t.wall for k, t in timers.items()}, {k: t.cpu for k, t in timers.items()}
        tps = {k: n / t.median_wall for k, t in timers.items()}
        cpu_tps = {k: n / t.median_cpu for k, t in timers.items()}
        steps = step_latency(hf, ours, name, prompt, args.hf_steps)
        entry = {
            "parameters": ours.num_parameters(), "implementations": implementations(ours), "tokens_agree": agree,
            "generate_tokens_per_s": tps, "generate_seconds": times,
            "generate_ratio": tps["seqlab"] / tps["transformers"],
            "generate_cpu_tokens_per_s": cpu_tps, "generate_cpu_seconds": cpu,
            "generate_cpu_ratio": cpu_tps["seqlab"] / cpu_tps["transformers"],
            "step_latency_s": steps["wall"], "step_cpu_s": steps["cpu"], "step_steps": args.hf_steps,
            "step_ratio": steps["wall"]["transformers"] / steps["wall"]["seqlab"],
            "step_cpu_ratio": steps["cpu"]["transformers"] / steps["cpu"]["seqlab"],
        }
        entry["met_3x"] = entry["generate_ratio"] >= 3.0
        out["models"][name] = entry
        print(f"hf {name:5s} ({entry['parameters']:,} params): generate seqlab {tps['seqlab']:,.0f} tokens/s, "
              f"transformers {tps['transformers']:,.0f} tokens/s -> {entry['generate_ratio']:.2f}x "
              f"({'meets' if entry['met_3x'] else 'misses'} 3x); per CPU second {cpu_tps['seqlab']:,.0f} vs "
              f"{cpu_tps['transformers']:,.0f} -> {entry['generate_cpu_ratio']:.2f}x; model step alone "
              f"{steps['wall']['seqlab'] * 1e3:.3f} vs {steps['wall']['transformers'] * 1e3:.3f} ms -> "
              f"{entry['step_ratio']:.2f}x (CPU time {entry['step_cpu_ratio']:.2f}x); "
              f"greedy tokens agree {agree}/{n}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/profile.json", help="JSON file to write")
    p.add_argument("--plots", default="benchmarks/results/profile", help="folder for the plots")
    p.add_argument("--quick", action="store_true", help="tiny contexts, few steps: a smoke run")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: profile, interleaved, hf "
                                              "(an existing --out file keeps its skipped sections)")
    p.add_argument("--mixers", default=",".join(seqlab.available_mixers()), help="comma-separated mixers "
                   "(default: every available one)")
    p.add_argument("--contexts", default="256,1024,4096,16384,65536")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=1024, help="sliding attention window")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    p.add_argument("--decode-steps", type=int, default=200)
    p.add_argument("--interleaved-steps", type=int, default=400)
    p.add_argument("--hf-d-model", type=int, default=128)
    p.add_argument("--hf-layers", type=int, default=2)
    p.add_argument("--hf-new-tokens", type=int, default=128)
    p.add_argument("--hf-repeats", type=int, default=25, help="alternating generate rounds per model (median)")
    p.add_argument("--hf-steps", type=int, default=200)
    args = p.parse_args(argv)
    args.contexts = tuple(int(c) for c in args.contexts.split(","))
    args.mixers = tuple(m for m in args.mixers.split(",") if m)
    if args.quick:
        args.contexts, args.window, args.chunk, args.decode_steps, args.interleaved_steps = (64, 256), 128, 64, 16, 16
        args.hf_new_tokens, args.hf_repeats, args.hf_steps = 16, 2, 16
        args.out, args.plots = "/tmp/bench_profile_quick.json", "/tmp/bench_profile_quick"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.environ["OMP_NUM_THREADS"] = "1"  # the cells' processes inherit it
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), load_average()
    result = {"command": " ".join(["python", *sys.argv]), "load_before": load_before, "torch_threads": 1}
    sections = {"profile": profile_section, "interleaved": interleaved_section, "hf": hf_section}
    for name, section in sections.items():
        if name not in skip:
            t0, load = time.perf_counter(), load_average()
            result[name] = section(args)
            if result[name] is not None:  # each section records the run it came from
                result[name]["run"] = {"command": result["command"], "load_before": load,
                                       "load_after": load_average(), "seconds": time.perf_counter() - t0}
    result.update(load_after=load_average(), seconds=time.perf_counter() - start)
    out = Path(args.out)
    if skip and out.exists():  # a section run on its own keeps the other sections already in the file
        previous = json.loads(out.read_text())
        result = {**{k: previous[k] for k in SECTIONS if k in skip and k in previous}, **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s (load average {load_before[0]:.1f} -> "
          f"{result['load_after'][0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
