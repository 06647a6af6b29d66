"""`seqlab export-onnx`: a checkpoint's single-token step or prefill graph as ONNX, checked with onnxruntime."""

from __future__ import annotations

import argparse
import os

from seqlab.checkpoint import load
from seqlab.commands import emit
from seqlab.interop.export import export_onnx, verify_onnx

TOLERANCE = 1e-4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx", help="export a checkpoint's decode step or prefill graph to ONNX",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write an ONNX graph of the model as a function of plain tensors:\n"
                    "  inputs   tokens (B, T) int64, pos (1,) int64, state.{layer}.{field} ...\n"
                    "  outputs  logits (B, T, V), new_state.{layer}.{field} ...\n"
                    "--mode step has T = 1 (one decode step, state in, state out); --mode prefill has T = --length. "
                    "The batch is dynamic. Attention layers carry a fixed-size cache k, v (B, Hkv, S, hd) whose size S "
                    "is also a dynamic axis. "
                    "A fresh sequence starts at pos 0 with an all-zero state. When onnxruntime is installed, the "
                    "graph is run on random tokens and compared with PyTorch (exit status 1 if they differ by more "
                    f"than {TOLERANCE:g}).",
    )
    p.add_argument("checkpoint", help="checkpoint folder (seqlab train, seqlab import-hf or seqlab.save)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--mode", default="step", help="step (T = 1, default) or prefill (T = --length)")
    p.add_argument("--length", type=int, default=64, help="tokens per call of the prefill graph (default 64)")
    p.add_argument("--cache-size", type=int, default=1024,
                   help="attention cache slots to trace and check with (default 1024); the cache axis of the "
                        "graph is dynamic: allocate it at the longest context you will decode")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--json", action="store_true", help="print the graph's description (and the check) as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load(args.checkpoint).eval()
    info = export_onnx(model, args.out, mode=args.mode, length=args.length, cache_size=args.cache_size)
    info.pop("config")
    info["bytes"] = os.path.getsize(args.out)
    check = None
    if not args.no_verify:
        try:
            import onnxruntime  # noqa: F401  (optional: whether verification can run here)
        except ImportError:
            info["verified"] = "skipped: onnxruntime is not installed (pip install 'seqlab[onnx]')"
        else:
            check = verify_onnx(model, args.out, info)
            info["verified"] = check
    ok = check is None or max(check["max_abs_diff_logits"], check["max_abs_diff_state"]) <= TOLERANCE
    text = f"wrote {args.out} ({info['bytes']:,} bytes): {args.mode} graph, T = {info['length']}, dynamic batch"
    if check is not None:
        text += (f"\nonnxruntime vs PyTorch: max |diff| logits {check['max_abs_diff_logits']:.2e}, state "
                 f"{check['max_abs_diff_state']:.2e} ({'ok' if ok else 'MISMATCH'})")
    elif "verified" in info:
        text += f"\nnot verified: {info['verified'].removeprefix('skipped: ')}"
    emit(info, args.json, text)
    return 0 if ok else 1
