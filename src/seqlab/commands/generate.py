"""`seqlab generate`: continue a prompt with a checkpoint (byte-level models read and write text)."""

from __future__ import annotations

import argparse

from seqlab.commands import emit
from seqlab.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens from a checkpoint",
                       description="Prefill the prompt in one call, then decode token by token from the state.")
    p.add_argument("checkpoint", help="checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text, encoded as UTF-8 bytes (needs a model with vocab_size 256)")
    src.add_argument("--tokens", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the token ids as JSON")
    p.set_defaults(func=run)


def parse_tokens(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--tokens {text!r}: expected comma-separated integers, e.g. 1,2,3") from None


def run(args: argparse.Namespace) -> int:
    from seqlab.checkpoint import load
    from seqlab.generate import generate

    model = load(args.checkpoint).eval()
    if args.prompt is not None:
        if model.config.vocab_size < 256:
            raise InputError(f"--prompt needs a byte-level model (vocab_size 256); this one has vocab_size "
                             f"{model.config.vocab_size}: use --tokens")
        prompt = list(args.prompt.encode("utf-8"))
    else:
        prompt = parse_tokens(args.tokens)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    new = out[0, len(prompt):].tolist()
    text = bytes(new).decode("utf-8", errors="replace") if args.prompt is not None else ",".join(map(str, new))
    emit({"prompt": prompt, "generated": new}, args.json, text)
    return 0
