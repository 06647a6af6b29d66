"""Text <-> token ids for every text path: UTF-8 bytes, or a byte-level BPE vocabulary a checkpoint carries.

    tok = tokenizer_of(model)                 # the model's own (seqlab.load attaches it), bytes otherwise
    ids = tok.encode("def f(x):")             # list[int]
    text = tok.decode(ids)                    # str; special tokens (<|im_end|>) left out
    tok.eos_ids                               # tokens that end a generation: () for bytes
    tok.render_chat([{"role": "user", "content": "Hi"}])   # the chat template's prompt text

Two kinds, one interface (`Tokenizer`):
    bytes   `ByteTokenizer`: token i is byte i (vocabulary 256), what every seqlab model trained on text uses.
    bpe     `BPETokenizer`: a `tokenizers` byte-level BPE (GPT-2 style: every token spells bytes through the GPT-2
            byte -> printable-character table, so any UTF-8 text encodes and decodes exactly), plus what the
            `tokenizers` format lacks: end-of-sequence ids, the BOS id, and a Jinja chat template.

A checkpoint stores a BPE tokenizer as `tokenizer.json` (the `tokenizers` format) and `tokenizer_config.json`
({"eos_ids", "bos_id", "add_bos", "chat_template"}); a checkpoint without them reads and writes bytes.

`token_bytes(id)` is the UTF-8 bytes a token stands for (b"" for a special token): streaming output decodes it
incrementally, and bits per byte count bytes with it, so a BPE model and a byte model are scored per byte of the
same text.

Chat templates are Jinja, rendered in jinja2's immutable sandbox: a template comes from a downloaded file, and the
sandbox lets it format messages but not reach Python objects' internals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from seqlab.errors import InputError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the other 68 for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


class Tokenizer:
    """The interface every text path uses; see the module docstring."""

    kind: str
    vocab_size: int
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def encode_prompt(self, text: str) -> list[int]:
        """`encode`, with the BOS token first where the tokenizer asks for one."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of `messages` ([{"role", "content"}, ...])."""
        if self.chat_template is None:
            raise InputError(f"this {self.kind} tokenizer has no chat template: use --prompt, or a checkpoint "
                             "imported with one (seqlab import-gguf)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._name(self.bos_id), eos_token=self._name(self.eos_ids[0] if self.eos_ids else None))
        except TemplateError as e:
            raise InputError(f"the chat template cannot render these messages: {e}") from None

    def _name(self, token: int | None) -> str:
        return ""


def _raise(message: str) -> None:
    raise TemplateError(message)


class ByteTokenizer(Tokenizer):
    """Token i is byte i: encode is UTF-8, decode replaces an incomplete or invalid sequence with U+FFFD."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < 256:
            raise InputError(f"token {token} is not a byte (0..255): this model reads and writes bytes")
        return bytes([token])


class BPETokenizer(Tokenizer):
    """A byte-level BPE `tokenizers.Tokenizer` with its end-of-sequence ids, BOS and chat template."""

    kind = "bpe"

    def __init__(self, tokenizer: HFTokenizer, *, eos_ids: Sequence[int] = (), bos_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, ids in (("eos_ids", list(eos_ids)), ("bos_id", [] if bos_id is None else [bos_id])):
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size]
            if bad:
                raise InputError(f"tokenizer {name}: token {bad[0]!r} is not in the vocabulary "
                                 f"(0..{self.vocab_size - 1})")
        self.eos_ids, self.bos_id, self.add_bos = tuple(eos_ids), bos_id, bool(add_bos)
        self.chat_template = chat_template
        self._bytes = self._byte_table()

    def _byte_table(self) -> list[bytes]:
        """Bytes of every token: the byte alphabet read back for vocabulary tokens, b"" for special ones."""
        back = {c: b for b, c in byte_alphabet().items()}
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        table = []
        for i in range(self.vocab_size):
            piece = self.tokenizer.id_to_token(i)
            if piece is None or piece in special:
                table.append(b"")
            elif all(c in back for c in piece):
                table.append(bytes(back[c] for c in piece))
            else:  # an added, non-special token spelled as plain text (e.g. "<think>")
                table.append(piece.encode("utf-8"))
        return table

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.vocab_size:
            raise InputError(f"token {token} is not in the vocabulary (0..{self.vocab_size - 1})")
        return self._bytes[token]

    def _name(self, token: int | None) -> str:
        return "" if token is None else self.tokenizer.id_to_token(token) or ""

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "eos_ids": list(self.eos_ids), "bos_id": self.bos_id, "add_bos": self.add_bos,
                "chat_template": self.chat_template}

    def files(self) -> dict[str, str]:
        """The checkpoint files holding this tokenizer: {name: text}."""
        return {TOKENIZER_FILE: self.tokenizer.to_str(), CONFIG_FILE: json.dumps(self.config(), indent=2) + "\n"}

    @classmethod
    def from_files(cls, tokenizer_json: str, config: dict, where: str) -> BPETokenizer:
        try:
            tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises its own Exception subclass for any malformed file
            raise InputError(f"{where}: {TOKENIZER_FILE} is not a tokenizers file: {e}") from None
        if not isinstance(config, dict) or config.get("kind") != "bpe":
            raise InputError(f"{where}: {CONFIG_FILE} must be a JSON object with kind 'bpe'")
        try:
            return cls(tok, eos_ids=config.get("eos_ids") or (), bos_id=config.get("bos_id"),
                       add_bos=config.get("add_bos", False), chat_template=config.get("chat_template"))
        except InputError as e:
            raise InputError(f"{where}: {CONFIG_FILE}: {e}") from None


def tokenizer_of(model: Any) -> Tokenizer:
    """The tokenizer a model carries (`seqlab.load` and `seqlab.from_gguf` attach it), else bytes."""
    tok = getattr(model, "tokenizer", None)
    return tok if isinstance(tok, Tokenizer) else ByteTokenizer()


def text_tokenizer(model: Any) -> Tokenizer:
    """`tokenizer_of(model)`, checked to fit the model's vocabulary (a byte model needs vocab_size >= 256)."""
    tok = tokenizer_of(model)
    vocab = model.config.vocab_size
    if tok.vocab_size > vocab:
        raise InputError(f"text needs a byte-level model (vocab_size 256) or a checkpoint with a tokenizer; this "
                         f"one has vocab_size {vocab} and no tokenizer: feed token ids" if tok.kind == "bytes" else
                         f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab}")
    return tok
