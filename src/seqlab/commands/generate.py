"""`seqlab generate`: continue a prompt with a checkpoint. Text goes through the checkpoint's tokenizer (its
byte-level BPE, or UTF-8 bytes for a byte model); generation stops at the tokenizer's end-of-sequence tokens."""

from __future__ import annotations

import argparse
import codecs
import sys
import time

from seqlab.checkpoint import load
from seqlab.commands import emit
from seqlab.data.tokenizer import Tokenizer, text_tokenizer, tokenizer_of
from seqlab.errors import InputError
from seqlab.generate import decode_prompts
from seqlab.infer.stream import Stream


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens from a checkpoint",
                       description="Prefill the prompt in one call, then decode token by token from the state. "
                                   "Several --prompt (or --tokens) flags decode as one batch, whatever their "
                                   "lengths.")
    p.add_argument("checkpoint", help="checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append",
                     help="prompt text, encoded with the checkpoint's tokenizer (UTF-8 bytes for a byte model, "
                          "vocab_size 256); repeat for a batch")
    src.add_argument("--chat", action="append", metavar="MESSAGE",
                     help="a user message, rendered with the checkpoint's chat template (e.g. an imported GGUF "
                          "model's) and answered; repeat for a batch")
    src.add_argument("--tokens", action="append",
                     help="prompt as comma-separated token ids, e.g. 1,2,3; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-stop", action="store_true",
                   help="generate all --max-new-tokens even past the tokenizer's end-of-sequence tokens")
    p.add_argument("--allow-large", action="store_true",
                   help="skip the check that the model fits in the memory seqlab sees")
    p.add_argument("--stream", action="store_true", help="print each token as soon as it is produced (one prompt)")
    p.add_argument("--stats", action="store_true",
                   help="also report prefill and decode tokens/s and the state's bytes (on stderr without --json)")
    p.add_argument("--json", action="store_true",
                   help='print JSON: {"prompt", "generated", "text" (with --prompt or --chat)} for one prompt, '
                        '{"outputs": [...]} for several, plus "stats" with --stats')
    p.set_defaults(func=run)


def parse_tokens(text: str, vocab_size: int) -> list[int]:
    """Comma-separated ids, each in [0, vocab_size); an empty item (`1,,2`) or a trailing comma is an error."""
    expected = f"expected comma-separated integers, token ids in [0, {vocab_size}), e.g. 1,2,3"
    parts = text.split(",")
    if not all(t.strip().isdigit() and t.strip().isascii() for t in parts):
        raise InputError(f"--tokens {text!r}: {expected}")
    ids = [int(t) for t in parts]
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise InputError(f"--tokens {text!r}: token id {bad} is out of range; {expected}")
    return ids


def run(args: argparse.Namespace) -> int:
    model = load(args.checkpoint, allow_large=args.allow_large).eval()
    as_text = args.tokens is None
    tokenizer = text_tokenizer(model) if as_text else tokenizer_of(model)
    if args.prompt is not None:
        prompts = [tokenizer.encode_prompt(text) for text in args.prompt]
    elif args.chat is not None:
        prompts = [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}])) for text in args.chat]
    else:
        prompts = [parse_tokens(text, model.config.vocab_size) for text in args.tokens]
    if args.stream and (args.json or len(prompts) > 1):
        raise InputError("--stream prints the tokens of one prompt as they come: use it without --json and with "
                         "one --prompt or --tokens")
    stream = Stream(model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    show = _printer(tokenizer if as_text else None) if args.stream else None
    eos = set() if args.no_stop else set(tokenizer.eos_ids)
    new: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)  # the row produced an end-of-sequence token (kept as its last new token)
    start = time.perf_counter()
    decoding, first_new, steps = None, 0, 0  # when the first tokens were out (prefill done), how many were new
    for _, tokens, is_new in decode_prompts(stream, prompts, args.max_new_tokens):
        if decoding is None:
            decoding, first_new = time.perf_counter(), int(is_new.sum())
        steps += 1
        for i in is_new.nonzero().flatten().tolist():
            if not ended[i]:
                new[i].append(int(tokens[i]))
                ended[i] = new[i][-1] in eos
                if show is not None and i == 0:
                    show(new[0][-1])
        if all(ended):
            break
    end = time.perf_counter()
    if show is not None:
        show(None)
    texts = [tokenizer.decode(g) if as_text else ",".join(map(str, g)) for g in new]
    outputs = [{"prompt": p, "generated": g, **({"text": t} if as_text else {})}
               for p, g, t in zip(prompts, new, texts)]
    result: dict = dict(outputs[0]) if len(outputs) == 1 else {"outputs": outputs}
    if args.stats:
        result["stats"] = _stats(prompts, sum(map(len, new)), steps, first_new, start, decoding or end, end,
                                 stream.nbytes)
        if not args.json:
            s = result["stats"]
            print(f"prefill {s['prefill_tokens']} tokens in {s['prefill_seconds']:.3f} s; decode "
                  f"{s['decode_tokens']} tokens at {s['decode_tokens_per_s']:,.1f} tokens/s; state "
                  f"{s['state_bytes']:,} bytes", file=sys.stderr)
    if not args.stream:
        emit(result, args.json, "\n".join(texts))
    elif args.json:
        emit(result, True, "")
    return 0


def _stats(prompts: list[list[int]], made: int, steps: int, first_new: int, start: float, decoding: float,
           end: float, state_bytes: int) -> dict:
    """Throughput figures. Prefill covers the shortest prompt's length (fed in parallel to every row) and the first
    sample; decode covers every later step and the `made` - `first_new` new tokens they made (see
    `decode_prompts`)."""
    B, first = len(prompts), min(len(p) for p in prompts)
    steps = max(steps - 1, 0)
    decode_tokens = made - first_new
    return {"batch": B, "prefill_tokens": B * first, "prefill_seconds": decoding - start,
            "prefill_tokens_per_s": B * first / max(decoding - start, 1e-9), "decode_steps": steps,
            "decode_tokens": decode_tokens, "decode_seconds": end - decoding,
            "decode_tokens_per_s": decode_tokens / max(end - decoding, 1e-9), "state_bytes": state_bytes}


def _printer(tokenizer: Tokenizer | None):
    """A function printing tokens as they come: as text through `tokenizer` (each token's bytes decoded
    incrementally, so a character split across tokens prints once complete), or as ids without one; call it with
    None at the end."""
    as_text = tokenizer is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sep = [""]

    def show(token: int | None) -> None:
        if token is None:
            text = decoder.decode(b"", final=True) + "\n" if as_text else "\n"
        elif as_text:
            text = decoder.decode(tokenizer.token_bytes(token))
        else:
            text, sep[0] = f"{sep[0]}{token}", ","
        sys.stdout.write(text)
        sys.stdout.flush()

    return show
