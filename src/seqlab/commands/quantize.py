"""`seqlab quantize`: weight-only int8 for a checkpoint's linear layers; size on disk and quality change."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from seqlab.checkpoint import load, read_json
from seqlab.commands import emit, parse_sets
from seqlab.config import RunConfig
from seqlab.data import make_task
from seqlab.errors import InputError
from seqlab.interop.quantize import DECODES, HEADS, SCHEMES, linear_bytes, quantize, save_quantized
from seqlab.train import evaluate
from seqlab.train.trainer import eval_task_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a checkpoint's linear layers to int8 (weight-only)",
        description="Store every linear layer's weight as int8 with one fp32 scale per output channel; recurrence "
                    "parameters (Mamba's A_log, D and dt_proj, GLA's forget gate, LSTM/GRU cells), norms, biases, "
                    "the embedding and every state stay fp32. Writes a checkpoint that seqlab.load (and every "
                    "command) reads back, then reports the size on disk and the quality change: on a task (--task, "
                    "or the task a seqlab train checkpoint was trained on) and as the agreement of the logits on "
                    "random tokens.",
    )
    p.add_argument("checkpoint", help="fp32 checkpoint folder")
    p.add_argument("--out", required=True, help="quantized checkpoint folder to write")
    p.add_argument("--scheme", default="int8", help="quantization scheme: int8 (default; the only one)")
    p.add_argument("--decode", default="dequant", choices=DECODES,
                   help="how decoding multiplies by the int8 weights: dequant (default: cast to fp32, as the forward "
                        "does) or dynamic (int8 x int8 products through torch's fbgemm, activations quantized per "
                        "token on the fly: faster, x86 only); recorded in the checkpoint")
    p.add_argument("--head", default="int8", choices=HEADS,
                   help="the output head: int8 (default: quantized like the other layers; a head tied to the "
                        "embedding decodes through an int8 copy of it under --decode dynamic) or fp32 (kept fp32: "
                        "the logits lose nothing to the head, each decoded token reads its fp32 bytes)")
    p.add_argument("--task", help="task to compare fp32 and int8 on (default: the checkpoint's training task, if "
                                  "it was written by seqlab train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task parameter, e.g. "
                                                                                     "--set seq_len=256")
    p.add_argument("--batches", type=int, default=8, help="evaluation batches (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default 32)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation batches and random tokens")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _task_params(args: argparse.Namespace) -> dict | None:
    """The task to evaluate on: --task, else the training task recorded in a seqlab train checkpoint."""
    if args.task is not None:
        return {"name": args.task, **parse_sets(args.set)}
    if (Path(args.checkpoint) / "trainer.json").is_file():
        run_config = read_json(args.checkpoint, "trainer.json").get("run_config")
        if run_config:
            return {**eval_task_params(RunConfig.from_dict(run_config)), **parse_sets(args.set)}
    if args.set:
        raise InputError("--set needs --task (this checkpoint records no training task)")
    return None


def run(args: argparse.Namespace) -> int:
    if args.scheme not in SCHEMES:
        raise InputError(f"--scheme {args.scheme!r} is not supported; expected one of {', '.join(SCHEMES)}")
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be positive")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise InputError(f"--out '{args.out}' is the input checkpoint; write the quantized one elsewhere")
    model = load(args.checkpoint).eval()
    if getattr(model, "quantization", None) is not None:
        raise InputError(f"checkpoint '{args.checkpoint}' is already quantized")
    params = _task_params(args)
    task = None
    if params is not None:
        task = make_task(params["name"], **{k: v for k, v in params.items() if k != "name"})
        if model.config.vocab_size < task.vocab_size:
            raise InputError(f"task '{task.name}' needs vocab_size {task.vocab_size}; checkpoint "
                             f"'{args.checkpoint}' has vocab_size {model.config.vocab_size}")
    q = quantize(copy.deepcopy(model), args.scheme, args.decode, args.head)
    save_quantized(q, args.out)
    fp32_file = Path(args.checkpoint) / "model.safetensors"
    q_file = Path(args.out) / "model.safetensors"
    before, after = linear_bytes(model), linear_bytes(q)
    report = {
        "out": args.out, "scheme": args.scheme, "decode": args.decode, "head": args.head,
        "quantized_layers": len(q.quantization["layers"]),
        "model_file_bytes": {"fp32": fp32_file.stat().st_size, "int8": q_file.stat().st_size},
        "linear_weight_bytes": {"fp32": before["fp32"], "int8": after["held"]},
    }
    report["model_file_ratio"] = report["model_file_bytes"]["int8"] / report["model_file_bytes"]["fp32"]
    report["linear_weight_ratio"] = after["held"] / max(before["fp32"], 1)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
    with torch.no_grad():
        a, b = model(tokens)[0], q(tokens)[0]
    report["random_tokens"] = {
        "max_abs_diff_logits": float((a - b).abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "kl_fp32_to_int8": float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                                            reduction="batchmean") / tokens.shape[1]),
    }
    text = [f"wrote {args.out}: {report['quantized_layers']} linear layers as int8",
            f"model.safetensors {report['model_file_bytes']['fp32']:,} -> {report['model_file_bytes']['int8']:,} "
            f"bytes ({report['model_file_ratio']:.3f}x); linear weights {before['fp32']:,} -> {after['held']:,} "
            f"bytes ({report['linear_weight_ratio']:.3f}x)",
            f"random tokens: top-1 agreement {report['random_tokens']['top1_agreement']:.4f}, max |diff| logits "
            f"{report['random_tokens']['max_abs_diff_logits']:.2e}"]
    if task is not None:
        m32 = evaluate(model, task, args.batches, args.batch_size, args.seed)
        m8 = evaluate(q, task, args.batches, args.batch_size, args.seed)
        report["task"] = {"params": params, "fp32": m32, "int8": m8,
                          "change": {k: m8[k] - m32[k] for k in m32 if k in m8}}
        text.append(f"task {task.name}: " + "  ".join(f"{k} {m32[k]:.4f} -> {m8[k]:.4f}" for k in m32 if k in m8))
    emit(report, args.json, "\n".join(text))
    return 0
