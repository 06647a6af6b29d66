"""Edge footprint per mixer: size on disk (fp32 / int8), peak memory and decode tokens/s in PyTorch and in
onnxruntime, at contexts 1k and 32k, for a byte-level model of a few million parameters.

    OMP_NUM_THREADS=1 python benchmarks/bench_edge.py                  # -> benchmarks/results/edge.json (~8 min)
    OMP_NUM_THREADS=1 python benchmarks/bench_edge.py --quality-only   # + int8 quality on the corpus (~20 min, loaded)

Every cell (mixer x runtime x precision x context) runs in a fresh subprocess with one thread, so its peak RSS
(VmHWM) is its own: `peak_rss_mb` is the whole process, `baseline_rss_mb` the same process after its imports
and before the model is loaded (the runtime's own cost), `model_rss_mb` their difference. The onnxruntime cells
import numpy and onnxruntime only (no torch), as an edge deployment would.

Decoding at context C starts from a state that stands for C tokens already seen: attention's KV cache holds C
random keys and values (a step's cost and memory depend on the cache's size, not on its values), recurrent states
come from a short real prefix (their size does not depend on C), and pos = C. This avoids prefilling 32k tokens
per cell at one thread. The onnxruntime graph is the `step` export (`seqlab export-onnx --mode step`); its
attention cache is allocated at C + the decoded tokens. Greedy decoding: each step feeds back the argmax.
Sizes: model.safetensors of the fp32 and the int8 (`seqlab quantize`) checkpoints, and the two ONNX step graphs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

MIXERS = ("attention", "sliding_attention", "lstm", "gru", "conv", "mamba", "gla")
ATTENTION = ("attention", "sliding_attention")


def _load_measure():
    """seqlab.measure, loaded from its file without importing the seqlab package (whose __init__ imports torch): the
    onnxruntime cells measure a process that never imports torch, as an edge deployment would."""
    package = importlib.util.find_spec("seqlab")  # locates the package without importing it
    spec = importlib.util.spec_from_file_location("seqlab_measure",
                                                  Path(package.submodule_search_locations[0]) / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


measure = _load_measure()


def _rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    return measure.peak_rss() / 2**20


def _now_rss_mb() -> float:
    return measure.current_rss() / 2**20


# ---------------------------------------------------------------------------------------------------------------
# one cell, in its own process


def cell_torch(c: dict) -> dict:
    import torch

    import seqlab
    from seqlab.models.attention import KVCache
    from seqlab.models.state import ModelState

    torch.set_num_threads(1)
    baseline = _now_rss_mb()
    model = seqlab.load(c["checkpoint"]).eval()
    C, n = c["context"], c["warmup"] + c["steps"]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        _, prefix = model(torch.randint(0, 256, (1, 16), generator=g))
        layers = []
        for block, s in zip(model.blocks, prefix.layers):
            if block.mixer_name in ATTENTION:
                S = C if block.mixer.window is None else min(C, block.mixer.window)
                shape = (1, block.mixer.kv_heads, S, block.mixer.head_dim)
                s = block.mixer.reserve(KVCache(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                                                C), n)
            layers.append(s)
        state = ModelState(tuple(layers), C)
        token = torch.randint(0, 256, (1, 1), generator=g)
        for i in range(n):
            if i == c["warmup"]:
                start = time.perf_counter()
            logits, state = model(token, state)
            token = logits[:, -1].argmax(-1, keepdim=True)
        seconds = time.perf_counter() - start
    return {"tokens_per_s": c["steps"] / seconds, "state_bytes": state.nbytes, "baseline_rss_mb": baseline,
            "peak_rss_mb": _rss_mb()}


def cell_onnx(c: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    baseline = _now_rss_mb()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(c["onnx"], opts, providers=["CPUExecutionProvider"])
    C, n = c["context"], c["warmup"] + c["steps"]
    rng = np.random.default_rng(0)
    wanted = {i.name: i for i in session.get_inputs()}
    names = [o.name.removeprefix("new_") for o in session.get_outputs()[1:]]
    state = []
    for name in names:
        dims = [1 if d == "batch" else C + n if d == "cache" else d for d in wanted[name].shape]
        state.append(rng.standard_normal(dims).astype(np.float32) * (1.0 if name.endswith((".k", ".v")) else 0.1))
    token = rng.integers(0, 256, (1, 1)).astype(np.int64)
    for i in range(n):
        if i == c["warmup"]:
            start = time.perf_counter()
        feeds = {"tokens": token, "pos": np.array([C + i], dtype=np.int64), **dict(zip(names, state))}
        logits, *state = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        token = logits[:, -1].argmax(-1).reshape(1, 1).astype(np.int64)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": c["steps"] / seconds, "state_bytes": int(sum(s.nbytes for s in state)),
            "baseline_rss_mb": baseline, "peak_rss_mb": _rss_mb()}


def run_cell(c: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = measure.run_fresh([__file__, "--cell"], c, timeout, env)
    if "error" in r:
        return r
    r["model_rss_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
    return r


# ---------------------------------------------------------------------------------------------------------------
# the sweep


def prepare(mixer: str, args: argparse.Namespace, root: Path) -> dict:
    """Checkpoints (fp32, int8) and ONNX step graphs (fp32, int8) for one mixer; their sizes."""
    import copy

    import torch

    import seqlab
    from seqlab.interop.export import export_onnx
    from seqlab.interop.quantize import quantize, save_quantized

    torch.set_num_threads(1)
    model = seqlab.build_model(mixer=mixer, d_model=args.d_model, n_layers=args.layers, vocab_size=256,
                               attention={"n_heads": args.heads, "window": args.window}, seed=0).eval()
    q = quantize(copy.deepcopy(model))
    paths = {"fp32": root / f"{mixer}-fp32", "int8": root / f"{mixer}-int8"}
    seqlab.save(model, paths["fp32"])
    save_quantized(q, paths["int8"])
    for precision, m in (("fp32", model), ("int8", q)):
        export_onnx(m, root / f"{mixer}-{precision}.onnx", mode="step", cache_size=8, batch=1)
    return {
        "parameters": model.num_parameters(),
        "checkpoint_bytes": {p: (paths[p] / "model.safetensors").stat().st_size for p in paths},
        "onnx_bytes": {p: (root / f"{mixer}-{p}.onnx").stat().st_size for p in paths},
        "paths": {p: str(paths[p]) for p in paths}, "onnx": {p: str(root / f"{mixer}-{p}.onnx") for p in paths},
    }


def quality(args: argparse.Namespace) -> dict:
    """Quality change from int8 on a task: train a small byte-level model per mixer on the text corpus, then
    evaluate fp32 and int8 on the same test batches (bits per byte; lower is better)."""
    import copy

    import torch

    import seqlab
    from seqlab.config import TrainConfig
    from seqlab.data import make_task
    from seqlab.interop.quantize import linear_bytes, quantize
    from seqlab.train import cross_entropy, evaluate, fit, task_batches

    torch.set_num_threads(1)
    task = make_task("corpus", seq_len=128)
    test = make_task("corpus", seq_len=128, split="test")
    train = TrainConfig(steps=args.quality_steps, batch_size=32, lr=3e-3, warmup_steps=20, seed=0, log_every=50)
    out = {"task": {"name": "corpus", "seq_len": 128, "eval_split": "test"}, "train": train.to_dict(),
           "eval_batches": 16, "eval_batch_size": 32, "d_model": args.quality_d_model, "n_layers": 2, "mixers": {}}
    for mixer in args.quality_mixers.split(","):
        model = seqlab.build_model(mixer=mixer, d_model=args.quality_d_model, n_layers=2, vocab_size=256,
                                   attention={"n_heads": 4}, seed=0)
        fit(model, task_batches(task, train), cross_entropy, train, desc=f"train {mixer}")
        model.eval()
        q = quantize(copy.deepcopy(model))
        fp32 = evaluate(model, test, 16, 32, seed=1234)
        int8 = evaluate(q, test, 16, 32, seed=1234)
        out["mixers"][mixer] = {"parameters": model.num_parameters(), "fp32": fp32, "int8": int8,
                                "change": {k: int8[k] - fp32[k] for k in fp32 if k in int8},
                                "linear_weight_bytes": {"fp32": linear_bytes(model)["fp32"],
                                                        "int8": linear_bytes(q)["held"]}}
        print(mixer, json.dumps(out["mixers"][mixer]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default=",".join(MIXERS))
    parser.add_argument("--contexts", default="1024,32768")
    parser.add_argument("--int8-contexts", default="1024", help="contexts at which int8 decoding is measured too")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024, help="sliding_attention window")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per cell")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edge.json")
    parser.add_argument("--quality-only", action="store_true",
                        help="only (re)run the int8 quality section, kept in --out beside the other figures")
    parser.add_argument("--quality-mixers", default="attention,mamba,gla")
    parser.add_argument("--quality-steps", type=int, default=250)
    parser.add_argument("--quality-d-model", type=int, default=64)
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)  # one cell: spec JSON on stdin
    args = parser.parse_args()
    if args.cell:
        measure.serve(lambda c: cell_torch(c) if c["runtime"] == "pytorch" else cell_onnx(c))
        return
    if args.quality_only:
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        results["int8_quality"] = quality(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        return

    from tqdm.auto import tqdm

    mixers = [m for m in args.mixers.split(",") if m]
    contexts = [int(x) for x in args.contexts.split(",")]
    int8_contexts = {int(x) for x in args.int8_contexts.split(",") if x}
    start = time.perf_counter()
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("cell", "out")}, "mixers": {}}
    results["config"]["threads"] = 1
    import onnxruntime
    import torch

    results["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    results["load_average_start"] = measure.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = [(m, rt, p, C) for m in mixers for C in contexts for p in ("fp32", "int8")
                if p == "fp32" or C in int8_contexts for rt in ("pytorch", "onnxruntime")]
        bar = tqdm(total=len(mixers) + len(plan), desc="edge", unit="cell")
        for m in mixers:
            bar.set_postfix_str(f"{m}: export")
            info = prepare(m, args, root)
            results["mixers"][m] = {k: v for k, v in info.items() if k not in ("paths", "onnx")}
            results["mixers"][m]["cells"] = []
            bar.update()
            for _, runtime, precision, C in [x for x in plan if x[0] == m]:
                bar.set_postfix_str(f"{m} {runtime} {precision} {C}")
                cell = {"runtime": runtime, "precision": precision, "context": C, "steps": args.steps,
                        "warmup": args.warmup, "checkpoint": info["paths"][precision],
                        "onnx": info["onnx"][precision]}
                r = run_cell(cell, args.timeout)
                results["mixers"][m]["cells"].append({"runtime": runtime, "precision": precision, "context": C,
                                                      **r})
                bar.update()
        bar.close()
    results["seconds"] = time.perf_counter() - start
    results["load_average_end"] = measure.load_average()
    if args.out.is_file() and "int8_quality" in (previous := json.loads(args.out.read_text())):
        results["int8_quality"] = previous["int8_quality"]  # from --quality-only, kept
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [f"{'mixer':<18} {'params':>9} {'ckpt fp32':>10} {'ckpt int8':>10} {'onnx fp32':>10} {'onnx int8':>10}"]
    for m, r in results["mixers"].items():
        cb, ob = r["checkpoint_bytes"], r["onnx_bytes"]
        lines.append(f"{m:<18} {r['parameters']:>9,} {cb['fp32'] / 2**20:>9.2f}M {cb['int8'] / 2**20:>9.2f}M "
                     f"{ob['fp32'] / 2**20:>9.2f}M {ob['int8'] / 2**20:>9.2f}M")
    lines.append("")
    lines.append(f"{'mixer':<18} {'runtime':<12} {'prec':<5} {'context':>7} {'tok/s':>9} {'peak MB':>8} "
                 f"{'model MB':>8} {'state MB':>9}")
    for m, r in results["mixers"].items():
        for c in r["cells"]:
            if "error" in c:
                lines.append(f"{m:<18} {c['runtime']:<12} {c['precision']:<5} {c['context']:>7} {c['error']}")
                continue
            lines.append(f"{m:<18} {c['runtime']:<12} {c['precision']:<5} {c['context']:>7} "
                         f"{c['tokens_per_s']:>9.1f} {c['peak_rss_mb']:>8.1f} {c['model_rss_mb']:>8.1f} "
                         f"{c['state_bytes'] / 2**20:>9.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
