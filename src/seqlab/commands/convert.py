"""`seqlab convert`: a Transformer checkpoint -> a hybrid or recurrent student, by a per-layer plan."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from seqlab.checkpoint import load, save
from seqlab.commands import emit
from seqlab.convert import CONVERTIBLE, convert
from seqlab.interop.gguf import from_gguf

DESCRIPTION = f"""\
Build a student from a Transformer teacher (a seqlab checkpoint folder, or a .gguf file) with one mixer per layer:
  attention            the teacher's layer kept
  sliding_attention    the same weights, a window of --window tokens
  gla, gated_deltanet, deltanet, mamba2, mamba
                       a recurrent mixer initialized from the attention's W_Q, W_K, W_V, W_O where the math maps
                       (Q -> q / C, K -> k / B, V -> v / x, O -> the output projection; see seqlab.convert)
Embeddings, norms, MLPs and the head are copied; the student keeps the teacher's tokenizer.

PLAN: a layer spec ('gated_deltanet', '3:1 gated_deltanet:attention'), 'MIXER everyN:OTHER' (every Nth layer
OTHER: 'gated_deltanet every4:attention'), or a comma list with one name per layer ('attention,gla,gla,attention').
Names: {', '.join(CONVERTIBLE)}.

Writes the student checkpoint to --out with convert.json beside config.json: the plan and, for every tensor,
whether it was copied (from which teacher tensor), mapped (how) or initialized."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Transformer checkpoint into a hybrid or recurrent student",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="teacher: a seqlab checkpoint folder or a .gguf file")
    p.add_argument("--plan", required=True, help="one mixer per layer (see above)")
    p.add_argument("--out", type=Path, required=True, help="student checkpoint folder (replaced atomically)")
    p.add_argument("--window", type=int, help="sliding_attention window in tokens (needed when the plan has one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tensors left at their init (default 0)")
    p.add_argument("--json", action="store_true", help="print convert.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    teacher = from_gguf(args.teacher) if str(args.teacher).endswith(".gguf") else load(args.teacher)
    student, record = convert(teacher, args.plan, window=args.window, seed=args.seed)
    record["teacher"]["checkpoint"] = str(args.teacher)
    save(student, args.out, json_files={"convert.json": record})
    layers = Counter(record["plan"])
    tensors = Counter(t["status"] for layer in record["layers"] for t in layer["tensors"].values())
    emit(record, args.json, f"converted {args.teacher} -> {args.out}: "
                            f"{', '.join(f'{n} x {name}' for name, n in layers.items())} (per layer in convert.json); "
                            f"block tensors {', '.join(f'{n} {status}' for status, n in tensors.items())}; "
                            f"{record['fraction_transferred']:.1%} of the parameters in tensors copied or mapped")
    return 0
