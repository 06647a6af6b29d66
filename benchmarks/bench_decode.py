"""Tiny-model decoding at batch 1 on one CPU thread: seqlab against onnxruntime running seqlab's own exported step,
and against transformers, on the very same weights; plus where the time of seqlab's step goes.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_decode.py           # full run, ~3 min on 2 busy cores
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_decode.py --quick   # smoke run, ~40 s

Models (d_model 128, 2 layers, vocab 256): `gpt2` (GPT2LMHeadModel), `llama` (LlamaForCausalLM: RoPE, RMSNorm,
SwiGLU, grouped-query heads, tied head) and `mamba` (MambaForCausalLM) built in transformers with random weights
and imported with `seqlab.from_hf`, so both run the same weights; `gla` and `gru` built in seqlab (no transformers
twin). Every runtime uses one thread (torch.set_num_threads(1); onnxruntime intra_op_num_threads = 1).

Variants, timed alternating in one process (rounds x variants, medians), so machine load hits them alike:
- `seqlab`: `seqlab.generate(model, prompt, n)`: one parallel prefill call, then the decode plan's steps.
- `seqlab_traced`: the same with `plan=TracedPlan(model, 1, cache)` (`seqlab.infer.traced`: the exported step graph
  traced with TorchScript and frozen; built once per model, its trace time saved as `trace_s`).
- `onnxruntime`: the step graph of `seqlab.interop.export.export_onnx(mode="step")` in one InferenceSession, the
  state fed back each call: the prompt goes through it one token per call, then the greedy tokens (its 8 prompt
  calls are counted in its time: an 8-token prompt against `n` new tokens). Its attention cache and the traced
  plan's have the same number of slots, prompt + n in `generate` and `cache_slots` (the longest context) in
  `step`; both attend over all their slots every step, seqlab's eager plan over the positions so far.
- `transformers`: `model.generate(do_sample=False)` (gpt2, llama, mamba).
`generate`: new tokens / wall seconds of a whole greedy generation of `n` tokens after an 8-token prompt.
`step`: one decode step from a state (the model call and the argmax, no generation loop): seqlab's decode plan
(`seqlab.infer.plan.DecodePlan`), the traced plan, onnxruntime's `session.run`, transformers' forward with its
cache; rounds in which each runs --block steps in a row, medians over the rounds. The greedy tokens of every
variant are checked against seqlab's (the count that agree is saved). CPU time (`time.process_time`) is saved beside
wall time, and the load average before and after each model.

`profile`: seqlab's decode-plan step under `torch.profiler` (CPU, --profile-steps steps): the top ops by self CPU
time (`key_averages`), aten ops per step, and the split of a step's time between the ATen kernels (the sum of the
self CPU time of `aten::` ops) and everything else: Python, argument handling and dispatch (the wall time per step
with the profiler on, minus that sum; the profiler's own per-op cost lands in the second part, so it is an upper
bound on the overhead). The unprofiled step time from `step` is saved beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import seqlab
from seqlab.infer.plan import DecodePlan
from seqlab.infer.traced import TracedPlan
from seqlab.interop.export import export_onnx, onnx_session
from seqlab.measure import Timer, load_average

MODELS = ("gpt2", "llama", "mamba", "gla", "gru")
HF_MODELS = ("gpt2", "llama", "mamba")


def build(name: str, d_model: int, layers: int, vocab: int):
    """(seqlab model, transformers model or None) with the same weights."""
    if name not in HF_MODELS:
        model = seqlab.build_model(mixer=name, d_model=d_model, n_layers=layers, vocab_size=vocab, seed=0)
        return model.eval(), None
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cls, cfg = {
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=d_model, n_layer=layers,
                                             n_head=4, **ids)),
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=3 * d_model,
                                                num_hidden_layers=layers, num_attention_heads=4,
                                                num_key_value_heads=2, max_position_embeddings=1024,
                                                tie_word_embeddings=True, **ids)),
        "mamba": (MambaForCausalLM, MambaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers,
                                                state_size=16, expand=2, conv_kernel=4, **ids)),
    }[name]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = seqlab.from_hf(tmp)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()), name  # the same sizes
    hf.generation_config.eos_token_id = None  # exactly n tokens, no stopping check per step
    return ours, hf


# ---------------------------------------------------------------------------------------------------------------
# one runtime each: a greedy generation, and a step function from a state


class OnnxStep:
    """seqlab's exported step graph in one onnxruntime session (one thread): (token (1, 1) int64 array, pos) ->
    logits (1, 1, V), the state kept here and fed back each call."""

    def __init__(self, path: Path):
        self.session = onnx_session(path, threads=1)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.names = [o.name.removeprefix("new_") for o in self.session.get_outputs()[1:]]

    def reset(self, cache: int) -> None:
        """A fresh sequence: the all-zero state, attention's cache allocated at `cache` slots (the graph attends
        over all of them, masked)."""
        self.state = [np.zeros([1 if d == "batch" else cache if d == "cache" else d for d in self.inputs[n].shape],
                               dtype=np.float32) for n in self.names]

    def __call__(self, token: np.ndarray, pos: int) -> np.ndarray:
        feeds = {"tokens": token, "pos": np.array([pos], dtype=np.int64), **dict(zip(self.names, self.state))}
        logits, *self.state = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})
        return logits

    def generate(self, prompt: torch.Tensor, n: int, cache: int) -> torch.Tensor:
        self.reset(cache)
        ids = prompt[0].tolist()
        token = np.empty((1, 1), dtype=np.int64)
        for p in range(len(ids) + n - 1):
            token[0, 0] = ids[p]
            logits = self(token, p)
            if p >= len(ids) - 1:
                ids.append(int(logits[0, -1].argmax()))
        return torch.tensor([ids])


def hf_generate(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0)


def seqlab_generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return seqlab.generate(model, prompt, n, stop_at_eos=False)


def steppers(name: str, model, hf, onnx: OnnxStep, traced: TracedPlan, prompt: torch.Tensor, cache: int) -> dict:
    """{variant: step()} each advancing its own greedy decode from the prompt by one token per call (model call +
    argmax); each records its tokens in `.tokens`."""
    out = {}
    with torch.inference_mode():
        logits, state = model(prompt)
    plan = DecodePlan.build(model)
    box = {"tok": logits[:, -1:].argmax(-1), "state": state, "tokens": []}

    def ours():
        logits, box["state"] = plan(box["tok"], box["state"])
        box["tok"] = logits[:, -1].argmax(-1, keepdim=True)
        box["tokens"].append(int(box["tok"]))
    out["seqlab"] = (ours, box)

    tbox = {"tok": box["tok"].clone(), "state": traced.start(state), "tokens": []}

    def ours_traced():
        logits, tbox["state"] = traced(tbox["tok"], tbox["state"])
        tbox["tok"] = logits[:, -1].argmax(-1, keepdim=True)
        tbox["tokens"].append(int(tbox["tok"]))
    out["seqlab_traced"] = (ours_traced, tbox)

    onnx.reset(cache)
    obox = {"tok": np.empty((1, 1), dtype=np.int64), "pos": 0, "tokens": []}
    for p, t in enumerate(prompt[0].tolist()):
        obox["tok"][0, 0] = t
        ologits = onnx(obox["tok"], p)
    obox["tok"][0, 0], obox["pos"] = int(ologits[0, -1].argmax()), prompt.shape[1]

    def ort():
        logits = onnx(obox["tok"], obox["pos"])
        obox["tok"][0, 0] = int(logits[0, -1].argmax())
        obox["pos"] += 1
        obox["tokens"].append(int(obox["tok"][0, 0]))
    out["onnxruntime"] = (ort, obox)

    if hf is not None:
        with torch.inference_mode():
            o = hf(prompt, use_cache=True)
        hbox = {"tok": o.logits[:, -1:].argmax(-1), "pos": prompt.shape[1], "tokens": [],
                "cache": o.cache_params if name == "mamba" else o.past_key_values}

        def theirs():
            if name == "mamba":
                o = hf(hbox["tok"], cache_params=hbox["cache"], use_cache=True,
                       cache_position=torch.tensor([hbox["pos"]]))
                hbox["cache"] = o.cache_params
            else:
                o = hf(hbox["tok"], past_key_values=hbox["cache"], use_cache=True)
                hbox["cache"] = o.past_key_values
            hbox["tok"] = o.logits[:, -1:].argmax(-1)
            hbox["pos"] += 1
            hbox["tokens"].append(int(hbox["tok"]))
        out["transformers"] = (theirs, hbox)
    return out


# ---------------------------------------------------------------------------------------------------------------
# measurements


def time_generate(runs: dict, rounds: int) -> dict:
    timers = {k: Timer() for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():  # alternating, so load hits all alike
            with timers[k]:
                run()
    return {k: {"wall_s": t.median_wall, "cpu_s": t.median_cpu} for k, t in timers.items()}


def time_steps(steps: dict, n: int, warmup: int, block: int) -> dict:
    """Seconds per step: rounds in which each variant runs `block` steps in a row (timed together, so the
    variants alternate without each step evicting the others' data from the caches); medians over the rounds."""
    timers = {k: Timer() for k in steps}
    with torch.inference_mode():
        for step, _ in steps.values():
            for _ in range(warmup):
                step()
        for _ in range(n // block):
            for k, (step, _) in steps.items():
                with timers[k]:
                    for _ in range(block):
                        step()
    return {k: {"wall_s": t.median_wall / block, "cpu_s": t.median_cpu / block} for k, t in timers.items()}


def profile_step(model, prompt: torch.Tensor, steps: int, top: int) -> dict:
    """seqlab's decode-plan step under torch.profiler: top ops by self CPU time, aten time vs the rest."""
    from torch.profiler import ProfilerActivity, profile

    plan = DecodePlan.build(model)
    with torch.inference_mode():
        logits, state = model(prompt)
        tok = logits[:, -1:].argmax(-1)
        for _ in range(8):  # warm-up
            logits, state = plan(tok, state)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                logits, state = plan(tok, state)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    aten_us = sum(e.self_cpu_time_total for e in aten) / steps
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "steps": steps, "profiled_step_us": wall * 1e6, "aten_self_us_per_step": aten_us,
        "aten_calls_per_step": sum(e.count for e in aten) / steps,
        "aten_share": aten_us / (wall * 1e6), "overhead_share": 1 - aten_us / (wall * 1e6),
        "top_ops": [{"op": e.key, "calls_per_step": e.count / steps, "self_us_per_step": e.self_cpu_time_total / steps,
                     "self_us_per_call": e.self_cpu_time_total / e.count} for e in ops[:top]],
    }


def run_model(name: str, args, tmp: Path) -> dict:
    model, hf = build(name, args.d_model, args.layers, 256)
    prompt = torch.randint(1, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    path = tmp / f"{name}.onnx"
    export_onnx(model, path, mode="step", cache_size=args.prompt + n, batch=1)
    onnx = OnnxStep(path)
    cache = args.prompt + args.warmup + args.steps + 1  # the step section's longest context
    t0 = time.perf_counter()
    traced_gen = TracedPlan(model, batch=1, cache_size=args.prompt + n)  # what a user builds for this generation
    trace_s = time.perf_counter() - t0
    traced = TracedPlan(model, batch=1, cache_size=cache)
    runs = {"seqlab": lambda: seqlab_generate(model, prompt, n),
            "seqlab_traced": lambda: seqlab.generate(model, prompt, n, stop_at_eos=False, plan=traced_gen),
            "onnxruntime": lambda: onnx.generate(prompt, n, args.prompt + n)}
    if hf is not None:
        runs["transformers"] = lambda: hf_generate(hf, prompt, n)
    load0 = load_average()
    outs = {k: run() for k, run in runs.items()}  # warm-up, and the tokens each variant picks
    ref = outs["seqlab"][0, args.prompt:]
    agree = {k: int((o[0, args.prompt:] == ref).sum()) for k, o in outs.items()}
    gen = time_generate(runs, args.rounds)
    for v in gen.values():
        v["tokens_per_s"], v["cpu_tokens_per_s"] = n / v["wall_s"], n / v["cpu_s"]
    st = steppers(name, model, hf, onnx, traced, prompt, cache)
    steps = time_steps(st, args.steps, args.warmup, args.block)
    seq_tokens = st["seqlab"][1]["tokens"]
    step_agree = {k: sum(a == b for a, b in zip(box["tokens"], seq_tokens)) for k, (_, box) in st.items()}
    entry = {
        "parameters": model.num_parameters(), "new_tokens": n, "prompt_tokens": args.prompt,
        "cache_slots": cache, "trace_s": trace_s,
        "generate": gen, "generate_tokens_agree": agree,
        "step": steps, "step_tokens_agree": step_agree, "step_tokens": len(seq_tokens),
        "ratios": {}, "load_before": load0, "load_after": load_average(),
    }
    for ours in ("seqlab", "seqlab_traced"):
        for k in runs:
            if not k.startswith("seqlab"):
                entry["ratios"][f"generate_{ours}_over_{k}"] = gen[ours]["tokens_per_s"] / gen[k]["tokens_per_s"]
                entry["ratios"][f"step_{ours}_over_{k}"] = steps[k]["wall_s"] / steps[ours]["wall_s"]
                entry["ratios"][f"step_cpu_{ours}_over_{k}"] = steps[k]["cpu_s"] / steps[ours]["cpu_s"]
    entry["ratios"]["generate_traced_over_eager"] = gen["seqlab_traced"]["tokens_per_s"] / gen["seqlab"]["tokens_per_s"]
    entry["profile"] = profile_step(model, prompt, args.profile_steps, args.top)
    entry["profile"]["unprofiled_step_us"] = steps["seqlab"]["wall_s"] * 1e6
    return entry


def report(name: str, e: dict) -> str:
    g, s, p = e["generate"], e["step"], e["profile"]
    lines = [f"{name} ({e['parameters']:,} params, load {e['load_before'][0]:.1f}):"]
    lines.append("  generate tokens/s  " + "  ".join(f"{k} {v['tokens_per_s']:,.0f}" for k, v in g.items())
                 + f"   (tokens agree {e['generate_tokens_agree']})")
    lines.append("  step us            " + "  ".join(f"{k} {v['wall_s'] * 1e6:,.0f}" for k, v in s.items())
                 + f"   (tokens agree {e['step_tokens_agree']} of {e['step_tokens']})")
    lines.append("  ratios             " + "  ".join(f"{k} {v:.2f}" for k, v in e["ratios"].items()))
    lines.append(f"  profile: {p['profiled_step_us']:.0f} us/step profiled ({p['unprofiled_step_us']:.0f} not), "
                 f"aten self {p['aten_self_us_per_step']:.0f} us in {p['aten_calls_per_step']:.0f} calls "
                 f"-> overhead share {p['overhead_share']:.0%}")
    for op in p["top_ops"][:8]:
        lines.append(f"    {op['op']:<32} {op['calls_per_step']:>5.1f} calls {op['self_us_per_step']:>7.1f} us")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/decode.json")
    p.add_argument("--quick", action="store_true", help="fewer tokens, rounds and steps: under 2 minutes")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15, help="alternating generate rounds (median)")
    p.add_argument("--steps", type=int, default=400, help="alternating timed steps (median)")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--block", type=int, default=10, help="steps a variant runs in a row in the step section")
    p.add_argument("--profile-steps", type=int, default=200)
    p.add_argument("--top", type=int, default=15, help="ops kept in the profile's table")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds, args.steps, args.profile_steps = 64, 5, 150, 100
        if args.out == p.get_default("out"):
            args.out = "/tmp/bench_decode_quick.json"
    torch.set_num_threads(1)
    import onnxruntime
    import transformers

    transformers.logging.set_verbosity_error()
    start, load0 = time.perf_counter(), load_average()
    result = {"command": " ".join(["python", *sys.argv]), "config": vars(args), "threads": 1,
              "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                           "transformers": transformers.__version__},
              "load_before": load0, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result["models"][name] = run_model(name, args, Path(tmp))
            print(report(name, result["models"][name]), flush=True)
    targets = {}
    for name, e in result["models"].items():
        r = e["ratios"]
        for ours in ("seqlab", "seqlab_traced"):
            targets[f"{name}_{ours}_generate_ge_onnxruntime"] = r[f"generate_{ours}_over_onnxruntime"] >= 1.0
            targets[f"{name}_{ours}_step_ge_onnxruntime"] = r[f"step_{ours}_over_onnxruntime"] >= 1.0
            if name in ("gpt2", "mamba"):
                targets[f"{name}_{ours}_generate_ge_5x_transformers"] = r[f"generate_{ours}_over_transformers"] >= 5

    result.update(targets=targets, load_after=load_average(), seconds=time.perf_counter() - start)
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s (load average {load0[0]:.1f} -> {result['load_after'][0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
