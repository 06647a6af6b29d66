"""`seqlab import-hf`: a Hugging Face model folder (GPT-2, Llama-style, Mamba-1, Mamba-2) as a seqlab checkpoint."""

from __future__ import annotations

import argparse

from seqlab.commands import emit
from seqlab.interop.hf import import_hf


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-hf", help="import a Hugging Face checkpoint (GPT-2, Llama, Mamba, Mamba-2) as a seqlab checkpoint",
        description="Read a Hugging Face model folder (config.json + model.safetensors, or a sharded "
                    "model.safetensors.index.json) with safetensors alone (transformers is not needed and no code "
                    "from the folder runs), map it onto seqlab's mixers exactly, and save a seqlab checkpoint "
                    "(config.json + model.safetensors + manifest.json, plus import.json naming the source). "
                    "Supported model_type: gpt2, llama, mamba, mamba2. The tokenizer is not converted: feed token ids "
                    "(seqlab generate --tokens).",
    )
    p.add_argument("folder", help="Hugging Face model folder (written by save_pretrained or downloaded)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically if it exists)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = import_hf(args.folder, args.out)
    cfg = model.config
    result = {"out": args.out, "mixer": cfg.mixer, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
              "vocab_size": cfg.vocab_size, "parameters": model.num_parameters()}
    emit(result, args.json, f"imported {args.folder} -> {args.out}: {cfg.n_layers} x {cfg.mixer}, d_model "
                            f"{cfg.d_model}, {model.num_parameters():,} parameters")
    return 0
